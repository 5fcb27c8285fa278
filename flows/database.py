"""The database phase of the runbook: preflight, export, restore, verify."""

from __future__ import annotations

import contextlib

from prefect import flow

from liftoff.flows.export import export_database
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.flows.preflight import preflight
from liftoff.flows.restore import restore_database
from liftoff.flows.verify import verify_database
from liftoff.ledger import exclusive
from liftoff.flows.hooks import notify_on_failure
from liftoff.reports import forget, republish

GATE_ON_PAGE = ("verify-tables", "verify-summary")


@flow(name="migrate-database", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def migrate_database(options: RunOptions) -> dict:
    """Succeeds when the target is a verified copy of the source's migrated schemas. Each step is a flow of
    its own, runnable alone; the ledger lets a re-run continue where a killed run stopped. The runbook's lock
    is held from the export to the gate."""
    runbook = open_runbook(options, "database")
    checked = preflight(options)  # reads only; it says clearly when state_dir cannot take the lock
    # One lock from the first write to the last (each step's own lock re-enters it): no other run of this
    # runbook can slip in between two steps. A dry run writes nothing, not even the lock file.
    with contextlib.nullcontext() if options.dry_run else exclusive(runbook.state_dir):
        exported = export_database(options)
        restored = restore_database(options)
        forget(*GATE_ON_PAGE)
        try:
            verified = verify_database(options)
        finally:  # passed or failed, the gate's table on this run's own page too
            republish(*GATE_ON_PAGE)
    return {"preflight": checked, "export": exported, "restore": restored, "verify": verified}
