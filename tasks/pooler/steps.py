"""The pooler phase's steps: write PgBouncer's config (the ledger step ``pooler.config``) and its gate
(``verify-pooler``). What PgBouncer is and how it is spoken to: ``liftoff.systems.pgbouncer``."""

from __future__ import annotations

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.logs import get_logger
from liftoff.runbooks.model import Runbook
from liftoff.steps import recorded
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.systems.pgbouncer import (
    PHASE,
    PoolerConfig,
    PoolerPlan,
    PoolerPreflight,
    PoolerReport,
    check_pooler,
    config_dir,
    preflight_pooler,
    read_current,
    read_server_auth,
    reload_pgbouncer,
    render_config,
    server_line,
)

log = get_logger(phase=PHASE)


@task(name="pooler preflight", cache_policy=NO_CACHE)
def run_pooler_preflight(runbook: Runbook, plan: PoolerPlan, dry_run: bool) -> tuple[PoolerPreflight, PoolerConfig]:
    """Reads the users' secrets and the config at the destination; renders the config. Writes nothing."""
    auth = read_server_auth(plan)
    current = read_current(plan, runbook)
    preflight = preflight_pooler(plan, auth, current["userlist.txt"], dry_run=dry_run)
    return preflight, render_config(plan, auth)


@task(name="write pgbouncer config", cache_policy=NO_CACHE)
@recorded("pooler.config")
def write_pooler_config(rb: Runbook, plan: PoolerPlan, config: PoolerConfig) -> dict:
    """Writes the files that differ from what is there and reloads PgBouncer when one did; an unchanged file
    is not rewritten. What the ledger keeps: each path, its SHA-256 and whether it was written; no secret."""
    hashes, written = config.sha256(), []
    with config_dir(plan, rb) as place:
        for name, text in config.files.items():
            if place.read(name) != text:
                place.write(name, text)
                written.append(name)
        reloaded = reload_pgbouncer(plan, place) if written else ""
    log.info("pooler config", where=plan.where, written=written, reloaded=bool(reloaded))
    return {"config_dir": plan.settings.config_dir, "write_via": plan.settings.write_via,
            "files": [{"path": plan.path(n), "sha256": hashes[n], "written": n in written} for n in config.files],
            "reloaded": reloaded or "no (nothing changed)"}



def check_database_url(rb: Runbook) -> str:
    """Connects with the apps' DATABASE_URL (cutover.switch.env) as an app would through PgBouncer."""
    if rb.cutover.switch is None or "DATABASE_URL" not in rb.cutover.switch.env:
        return ""
    from liftoff.tasks.cutover.common import resolve_env

    url, pooled = resolve_env(rb)["DATABASE_URL"], rb.target.pooled
    try:
        with psycopg.connect(url, prepare_threshold=None, connect_timeout=10) as conn:
            with conn.transaction():
                conn.execute("SELECT 1").fetchone()
            host, port = conn.info.host, conn.info.port
    except psycopg.Error as exc:
        return f"cannot connect through it: {server_line(exc)}"
    if (host, port) != (pooled.host, pooled.port):
        return f"does not use PgBouncer: it points at {host}:{port}, target.pooled is {pooled.host}:{pooled.port}"
    return "works through PgBouncer (prepare_threshold=None)"


def publish_pooler(plan: PoolerPlan, preflight: PoolerPreflight, config: PoolerConfig, written: dict | None,
                   report: PoolerReport | None, dry_run: bool) -> None:
    publish_table("pooler-preflight", preflight.rows(), "Pooler preflight: SCRAM secrets and the current userlist")
    verdict = ("dry run: nothing written" if dry_run else "PREFLIGHT FAILED" if not preflight.ok
               else "PASSED" if report is not None and report.ok else "FAILED")
    md = [f"# Pooler ({verdict})", "", f"PgBouncer's config in {plan.where}; apps connect to target.pooled "
          f"({plan.pooled.host}:{plan.pooled.port}/{plan.pooled.database}).", "", "## Preflight",
          markdown_table(preflight.rows())]
    if report is not None:
        publish_table("pooler-gate", report.rows(), "Pooler gate: concurrent clients through PgBouncer")
        if not report.ok:
            md += ["## What failed", *[f"- {line}" for line in report.failures()], ""]
        md += ["## Gate", markdown_table(report.rows())]
    if written is not None:
        md += ["## Config written", markdown_table([{"file": f["path"], "written": "yes" if f["written"] else
                                                      "unchanged", "sha256": f["sha256"][:16]} for f in written["files"]]),
               f"Reload: {written['reloaded']}", ""]
    if dry_run or written is None:
        for name, text in config.masked().items():
            md += [f"## {plan.path(name)}{' (would be written)' if dry_run else ''}", "```ini", text.rstrip(), "```"]
    publish_markdown("pooler-summary", "\n".join(md))


def _publish_gate(report: PoolerReport, rb: Runbook, plan: PoolerPlan, preflight: PoolerPreflight, config: PoolerConfig,
                  written: dict) -> None:
    publish_pooler(plan, preflight, config, written, report, False)


@task(name="verify pooler", cache_policy=NO_CACHE)
@recorded("verify-pooler", gate=PHASE, publish=_publish_gate)
def verify_pooler(rb: Runbook, plan: PoolerPlan, preflight: PoolerPreflight, config: PoolerConfig,
                  written: dict) -> PoolerReport:
    """The pooler's gate (``check_pooler``) and the apps' DATABASE_URL tried through PgBouncer; shown with the
    preflight and the config ``write_pooler_config`` wrote."""
    report = check_pooler(plan)
    report.database_url = check_database_url(rb)
    log.info("pooler gate", ok=report.ok, clients=report.clients, transactions=report.transactions,
             tps=report.tps, max_server_connections=report.max_server_connections, errors=report.error_count)
    return report
