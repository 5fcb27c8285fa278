"""The pooler phase's steps: write PgBouncer's config (the ledger step ``pooler.config``) and its gate
(``verify-pooler``). What PgBouncer is and how it is spoken to: ``liftoff.systems.pgbouncer``."""

from __future__ import annotations

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.logs import get_logger
from liftoff.runbooks.model import Runbook
from liftoff.steps import recorded
from liftoff.systems.pgbouncer import PHASE, PoolerConfig, PoolerPlan, PoolerReport, check_pooler, config_dir, reload_pgbouncer, server_line

log = get_logger(phase=PHASE)


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


@task(name="verify pooler", cache_policy=NO_CACHE)
@recorded("verify-pooler", gate=PHASE)
def verify_pooler(rb: Runbook, plan: PoolerPlan) -> PoolerReport:
    """The pooler's gate (``check_pooler``) and the apps' DATABASE_URL tried through PgBouncer."""
    report = check_pooler(plan)
    report.database_url = check_database_url(rb)
    log.info("pooler gate", ok=report.ok, clients=report.clients, transactions=report.transactions,
             tps=report.tps, max_server_connections=report.max_server_connections, errors=report.error_count)
    return report
