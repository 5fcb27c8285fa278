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


@flow(name="migrate-database", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def migrate_database(options: RunOptions) -> dict:
    """Succeeds when the target is a verified copy of the source's migrated schemas. Each step is a flow of
    its own, runnable alone; the ledger lets a re-run continue where a killed run stopped. The runbook's lock
    is held from the export to the gate.

    Every step runs inside this flow run (``in_this_run``): its tasks, artifacts (the gate's table among
    them, on this run's own page) and ledger steps are this run's, and this run's state is the gate's
    verdict. A subflow run per step bought only its own bookkeeping."""
    runbook = open_runbook(options, "database")
    checked = in_this_run(preflight, options)  # reads only; it says clearly when state_dir cannot take the lock
    # One lock from the first write to the last (each step's own lock re-enters it): no other run of this
    # runbook can slip in between two steps. A dry run writes nothing, not even the lock file.
    with contextlib.nullcontext() if options.dry_run else exclusive(runbook.state_dir):
        exported = in_this_run(export_database, options)
        restored = in_this_run(restore_database, options)
        verified = in_this_run(verify_database, options)
    return {"preflight": checked, "export": exported, "restore": restored, "verify": verified}


def in_this_run(step, options: RunOptions):
    """Runs a step's flow body (``Flow.fn``) in the current flow run instead of as a subflow run: the same
    code, checks and ledger records as when it runs alone, without a flow run to create, report and finish.
    Measured on a quiet 2-core machine, a subflow run cost 0.8 s: its creation and state changes, and
    Prefect's heartbeat thread, which sleeps in whole seconds and is joined when the run ends."""
    return step.fn(options)
