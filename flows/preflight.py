"""Preflight (the runbook's `source`, `target` and `database` sections): check that the move can start."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.tasks.database.preflight import run_preflight
from liftoff.flows.hooks import notify_on_failure


@flow(name="preflight", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def preflight(options: RunOptions) -> dict:
    """Succeeds when both servers answer, the versions and pg_dump/pg_restore fit, the target offers every
    extension the source uses, the target is empty (or was written by this runbook) and the state disk has
    room for the dump. Warns (or fails, per database.collation_mismatch) when the target database's encoding or
    locale differs from the source's, and warns about weak passwords. Reads only, so a dry run does the same."""
    runbook = open_runbook(options, "preflight")
    report = run_preflight(runbook)
    return {"source_major": report.source_major, "target_major": report.target_major, "tools": report.tools,
            "warnings": report.warnings}


