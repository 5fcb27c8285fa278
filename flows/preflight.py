"""Runbook step 1: check that the move can start."""

from __future__ import annotations

from prefect import flow

from flows.options import RunOptions, open_runbook
from liftoff.reports import markdown_table, publish_markdown, publish_table
from tasks.database import PreflightReport, require, run_preflight


@flow(name="preflight")
def preflight(options: RunOptions) -> dict:
    """Succeeds when both servers answer, the versions and pg_dump/pg_restore fit, the target offers every
    extension the source uses, the target is empty (or was written by this runbook) and the state disk has
    room for the dump. Reads only, so a dry run does the same."""
    runbook = open_runbook(options, "preflight")
    report = run_preflight(runbook)
    publish_preflight(report)
    require(report)
    return {"source_major": report.source_major, "target_major": report.target_major, "tools": report.tools}


def publish_preflight(report: PreflightReport) -> None:
    rows = [{"check": c.name, "status": "ok" if c.ok else "FAILED", "detail": c.detail} for c in report.checks]
    publish_table("preflight-checks", rows, "Preflight: every check, passed or not")
    verdict = "passed" if not report.failures else f"FAILED ({len(report.failures)} checks)"
    publish_markdown("preflight-summary", f"# Preflight {verdict}\n\n" + markdown_table(rows))
