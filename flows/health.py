"""The platform's health: every service and app answers, the VPS's disk and connections are under the plan's
thresholds; and the Uptime Kuma monitor list, so the operator does not retype it."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.reports import publish_markdown
from liftoff.tasks.health.monitoring import (
    monitors_markdown,
    run_health_gate,
    uptime_kuma_monitors,
    uptime_kuma_yaml,
)
from liftoff.flows.hooks import notify_on_failure


@flow(name="health", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def check_health(options: RunOptions) -> dict:
    """Succeeds when no check is critical: PostgreSQL accepts TCP and answers ``SELECT 1`` (target.direct),
    PgBouncer does too (target.pooled), Redis answers PING, MinIO's /minio/health/live answers, every app's
    /api/health is healthy in the plan's JSON shape, and over SSH each health.disk_paths filesystem and the
    established connections to PostgreSQL are under the critical thresholds (85 %, 95 by default). Warnings
    (70 %, 80) and services the runbook does not name are reported, and do not fail it. Writes the Uptime Kuma
    monitor list (Uptime Kuma's own monitor fields) to state_dir. A dry run lists what would be checked and
    the monitors; it contacts nothing and writes nothing."""
    runbook = open_runbook(options, "health")
    monitors = uptime_kuma_yaml(runbook)
    if options.dry_run:
        publish_markdown("health-summary", "# Health checks (dry run: nothing checked, nothing written)\n\n"
                         "Would check: " + ", ".join(m["name"] for m in uptime_kuma_monitors(runbook))
                         + f", the disk of {', '.join(runbook.health.disk_paths)} and the connections to PostgreSQL "
                         "over SSH.\n\n" + monitors_markdown(runbook, monitors, written=False))
        return {"dry_run": True, "monitors": len(uptime_kuma_monitors(runbook))}
    export = runbook.state_dir / runbook.health.uptime_kuma.file
    export.parent.mkdir(parents=True, exist_ok=True)
    export.write_text(monitors)
    report = run_health_gate(runbook, monitors)
    return {"summary": report.summary(), "warnings": report.warnings(), "uptime_kuma": str(export)}


