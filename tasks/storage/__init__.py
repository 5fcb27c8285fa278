"""The storage phase's Prefect tasks, one module per runbook step: plan, copy (buckets and objects), gate,
URL rewrite. Each is recorded in the ledger (``liftoff.steps.recorded``); objects are the ledger's items
(phase ``storage``, kind ``object:<bucket>``), written one batch at a time. The systems are reached through
``liftoff/systems/supabase_storage.py`` (the source: its database inventory and its S3 endpoint), ``liftoff/systems/s3.py``
(any S3-compatible target) and ``liftoff/systems/storage_urls.py`` (the app's URL columns)."""
