"""The backup phase: ``archive`` holds the plain building blocks (pg_dump streamed to the bucket, retention,
reading a backup back), ``steps`` the Prefect step tasks the flows in ``flows/backup.py`` call."""
