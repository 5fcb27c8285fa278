"""The target's PostgreSQL tuned as the plan sets it for the 16 GB VPS, and its gate."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.hooks import notify_on_failure
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import exclusive
from liftoff.reports import markdown_table, publish_markdown
from liftoff.systems.pg_tuning import plan_rows, read_tuning, tuning_settings
from liftoff.tasks.tuning.steps import configure_tuning, run_tuning_gate


@flow(name="tune", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def tune_postgres(options: RunOptions) -> dict:
    """Succeeds when target.direct runs with the runbook's tuning (the plan's shared_buffers 1GB,
    effective_cache_size 3GB, work_mem 32MB, maintenance_work_mem 256MB, max_connections 100, wal_buffers 32MB by
    default) and no setting waits for a restart. With ``tuning.apply`` what differs is set first (ALTER SYSTEM,
    pg_reload_conf()); the settings that need a restart are named, and the gate fails until PostgreSQL is
    restarted. Without it nothing is changed and each difference is a red line with the statement that fixes
    it. A dry run reads the settings and reports what it would set; it writes nothing."""
    runbook = open_runbook(options, "tuning")
    if options.dry_run:
        return publish_tuning_plan(runbook)
    with exclusive(runbook.state_dir):
        configured = configure_tuning(runbook)
        report = run_tuning_gate(runbook, configured)
    return {"where": report.where, "changed": configured.get("changed", {}),
            "needs_restart": configured.get("needs_restart", []), "gate": report.summary()}


def publish_tuning_plan(runbook) -> dict:
    settings = tuning_settings(runbook)
    found = read_tuning(runbook)
    md = ["# Tuning plan (dry run: nothing written)", "",
          f"PostgreSQL {found.where}: {len(found.differences())} of {len(found.settings)} settings differ from the "
          "plan.", "", markdown_table(plan_rows(found, settings.apply))]
    if found.pending_restart:
        md += ["", f"Waiting for a restart already: {', '.join(found.pending_restart)}."]
    publish_markdown("tuning-summary", "\n".join(md))
    return {"dry_run": True, "differ": [s.name for s in found.differences()], "apply": settings.apply}
