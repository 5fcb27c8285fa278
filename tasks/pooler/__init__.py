"""The pooler phase: PgBouncer in front of the target."""
