"""The way back to a cutover after a failed one: the target brought up to the source again, from a fresh
export, before the next attempt."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.final_sync import STRATEGIES
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import exclusive
from liftoff.reports import publish_markdown
from liftoff.tasks.cutover.sync import refuse_after_switch, refuse_while_changes_stranded
from liftoff.flows.hooks import notify_on_failure


@flow(name="resync", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def resync(options: RunOptions) -> dict:
    """Succeeds when the target is again a verified copy of the source: a fresh export (the one a failed
    final sync made came from the frozen source, which has taken writes since), every table reloaded, the
    database gate, then the storage phase's incremental copy and its gate (when the runbook has storage).
    Refuses while a cutover's switch stands (the apps' writes on the target would be overwritten)."""
    runbook = open_runbook(options, "resync")
    refuse_after_switch(runbook)
    refuse_while_changes_stranded(runbook)
    if options.dry_run:
        publish_markdown("resync-plan", "# Resync (dry run: nothing changed)\n\nWould forget the last export and "
                         "the gates, export the source again, reload every table, run the database gate, then copy "
                         "what is new in the buckets and run the storage gate.")
        return {"dry_run": True}
    with exclusive(runbook.state_dir):
        return STRATEGIES["full"].run(runbook, options)
