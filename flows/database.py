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
    is held from the export to the gate.

    Here preflight, export and restore run inside this flow run (``in_this_run``): their tasks, artifacts
    and ledger steps are this run's, and a subflow run each bought only its own bookkeeping. The gate stays
    a subflow: its page (the verify table, its pass or fail) is what an operator opens."""
    runbook = open_runbook(options, "database")
    checked = in_this_run(preflight, options)  # reads only; it says clearly when state_dir cannot take the lock
    # One lock from the first write to the last (each step's own lock re-enters it): no other run of this
    # runbook can slip in between two steps. A dry run writes nothing, not even the lock file.
    with contextlib.nullcontext() if options.dry_run else exclusive(runbook.state_dir):
        exported = in_this_run(export_database, options)
        restored = in_this_run(restore_database, options)
        forget(*GATE_ON_PAGE)
        try:
            verified = verify_database(options)
        finally:  # passed or failed, the gate's table on this run's own page too
            republish(*GATE_ON_PAGE)
    return {"preflight": checked, "export": exported, "restore": restored, "verify": verified}


def in_this_run(step, options: RunOptions):
    """Runs a step's flow body (``Flow.fn``) in the current flow run instead of as a subflow run: the same
    code, checks and ledger records as when it runs alone, without a flow run to create, report and finish
    (about half a second each on a loaded 2-core machine)."""
    return step.fn(options)
