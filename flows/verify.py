"""Runbook step 4: prove the target holds what the source holds (a gate)."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.errors import GateFailed
from liftoff.ledger import Ledger
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.tasks.database.gate import report_rows, run_gate
from liftoff.flows.hooks import notify_on_failure
from liftoff.systems.pg_compare import DatabaseReport


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
    exported = {}
    if (runbook.state_dir / "ledger.sqlite").exists():
        exported = {n: r for n, (_, r) in Ledger(runbook.state_dir).tables("export").items()}
    publish_gate(report, exported)
    if not report.ok:
        raise GateFailed.of("database", report.failures())
    return {"tables": len(report.tables), "rows": sum(t.target_rows for t in report.tables)}


def publish_gate(report: DatabaseReport, exported: dict[str, int]) -> None:
    rows = report_rows(report, exported)
    publish_table("verify-tables", rows, "Database gate: rows and checksums per table")
    verdict = "PASSED" if report.ok else "FAILED"
    seq_rows = [{"sequence": s.sequence, "target next": s.target_next, "column max": s.column_max,
                 "status": "ok" if s.ok else "STALE"} for s in report.sequences]
    md = [f"# Database gate {verdict}", ""]
    if not report.ok:
        md += ["## What differs", *[f"- {line}" for line in report.failures()], ""]
    md += ["## Tables", markdown_table(rows), "## Sequences", markdown_table(seq_rows)]
    if report.deferred:
        md += ["## Rows left to the cutover's catch-up (written on the source during the freeze)",
               *[f"- {t}" for t in report.deferred], ""]
    if report.left_out_by_policy:
        md += ["## Left out by the runbook's decisions (see the restore plan)", *[f"- {o}" for o in report.left_out_by_policy]]
    publish_markdown("verify-summary", "\n".join(md))
