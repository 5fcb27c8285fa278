"""One Prefect flow per phase of the migration runbook; ``migrate_database`` composes the database phase."""
