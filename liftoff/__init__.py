"""Liftoff: a migration runbook as Prefect flows that check themselves and can be resumed."""
