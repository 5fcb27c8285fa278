"""The tuning phase's steps: the target's PostgreSQL set as the plan says (``tuning.apply``) and its gate
(``verify-tuning``). What is read and set on PostgreSQL: ``liftoff.systems.pg_tuning``."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.reports import publish_markdown, publish_table
from liftoff.runbooks.model import Runbook
from liftoff.steps import recorded
from liftoff.systems.pg_tuning import TuningReport, apply_tuning, check_tuning, read_tuning, tuning_settings


@task(name="tune PostgreSQL", cache_policy=NO_CACHE)
@recorded("tuning.apply")
def configure_tuning(rb: Runbook) -> dict:
    """With ``tuning.apply``: ALTER SYSTEM for what differs, then a reload. Without: changes nothing and records
    what differs (the gate then names the statement for each)."""
    if not tuning_settings(rb).apply:
        found = read_tuning(rb)
        return {"where": found.where, "applied": False,
                "differ": {s.name: {"current": s.shown, "wanted": s.wanted} for s in found.differences()}}
    return {**apply_tuning(rb), "applied": True}


def publish_tuning_gate(report: TuningReport, rb: Runbook, configured: dict) -> None:
    publish_table("tuning-checks", report.rows(), "Tuning gate: the target's PostgreSQL settings against the plan")
    md = [f"# Tuning gate {'PASSED' if report.ok else 'FAILED'}", "", f"PostgreSQL {report.where}: "
          f"{report.summary()}.", ""]
    if configured.get("applied"):
        changed = configured.get("changed") or {}
        md += ["## Set by this run (ALTER SYSTEM, pg_reload_conf)",
               *([f"- {name}: {c['from']} → {c['to']}" for name, c in changed.items()]
                 or ["- nothing: every setting was as wanted, or already set and waiting for a restart"]), ""]
        if configured.get("needs_restart"):
            md += [f"**Needs a restart of PostgreSQL**: {', '.join(configured['needs_restart'])}.", ""]
    elif configured.get("differ"):
        md += ["Nothing was changed: tuning.apply is false.", ""]
    md += ["## Settings", report.markdown()]
    publish_markdown("tuning-summary", "\n".join(md))


@task(name="verify tuning (gate)", cache_policy=NO_CACHE)
@recorded("verify-tuning", gate="tuning", publish=publish_tuning_gate)
def run_tuning_gate(rb: Runbook, configured: dict) -> TuningReport:
    """The tuning gate (``check_tuning``), shown with what ``configure_tuning`` set (``configured``)."""
    return check_tuning(rb)
