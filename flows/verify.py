"""The database gate (the runbook's `database` section): prove the target holds what the source holds (a gate)."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.reports import publish_markdown
from liftoff.tasks.database.gate import run_gate
from liftoff.flows.hooks import notify_on_failure


@flow(name="verify-database", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def verify_database(options: RunOptions) -> dict:
    """Succeeds only when every migrated table has the same row count and content checksum on both sides,
    every owned sequence is above its column's max, and every schema object of the source exists on the
    target. Otherwise fails with a summary naming each table and check that differs. Reads only."""
    runbook = open_runbook(options, "verify")
    if options.dry_run:
        publish_markdown("verify-plan", "# Verify (dry run)\n\nWould compare row counts, checksums, sequences "
                         f"and schema objects of {', '.join(runbook.database.schemas)}.")
        return {"dry_run": True}
    report = run_gate(runbook)
    return {"tables": len(report.tables), "rows": sum(t.target_rows for t in report.tables)}


