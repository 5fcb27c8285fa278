"""Building blocks: each knows one system (PostgreSQL, S3, Supabase, SSH, Coolify, DNS ...) and nothing of
Prefect, flows or runbooks. Steps (``liftoff.tasks``) compose them; a test fails if one imports Prefect."""
