"""The database phase's Prefect tasks, one module per runbook step: preflight, export, restore, gate.

Each task is idempotent and recorded in the ledger (``liftoff.steps.recorded``), so a re-run after a crash
continues where the last run stopped. Tasks read the runbook; they never hold a secret longer than a
connection needs it. The systems they touch are reached through ``liftoff/systems/postgres.py``, ``pg_tools``,
``supabase``, ``privileges``, ``dependencies`` and the gate's ``liftoff/systems/pg_compare.py``.
"""
