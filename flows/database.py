"""The database phase of the runbook: preflight, export, restore, verify."""

from __future__ import annotations

from prefect import flow

from flows.export import export_database
from flows.options import RunOptions
from flows.preflight import preflight
from flows.restore import restore_database
from flows.verify import verify_database


@flow(name="migrate-database")
def migrate_database(options: RunOptions) -> dict:
    """Succeeds when the target is a verified copy of the source's migrated schemas. Each step is a flow of
    its own, runnable alone; the ledger lets a re-run continue where a killed run stopped."""
    checked = preflight(options)
    exported = export_database(options)
    restored = restore_database(options)
    verified = verify_database(options)
    return {"preflight": checked, "export": exported, "restore": restored, "verify": verified}
