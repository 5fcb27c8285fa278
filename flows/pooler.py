"""The platform: PgBouncer in front of the target, with SCRAM authentication that works, and its gate."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.errors import GateFailed, PreflightFailed
from liftoff.ledger import exclusive
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.runbooks.model import Runbook
from liftoff.flows.hooks import notify_on_failure
from liftoff.systems.pgbouncer import PoolerConfig, PoolerPlan, PoolerPreflight, PoolerReport, plan_pooler, preflight_pooler, read_current, read_server_auth, render_config
from liftoff.tasks.pooler.steps import verify_pooler, write_pooler_config


@flow(name="setup-pooler", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def setup_pooler(options: RunOptions) -> dict:
    """Succeeds when PgBouncer runs with the runbook's config (transaction pooling and the pool sizes of
    ``pooler``), its userlist holds each pooled user's SCRAM secret from pg_authid, and the gate passed: 100
    clients at once through target.pooled did short transactions without an error, on no more server
    connections than default_pool_size + reserve_pool_size. Preflight stops first on what this run cannot fix
    (a password stored as md5, a missing role). A dry run shows the config, secrets masked, and writes nothing."""
    runbook = open_runbook(options, "pooler")
    plan = plan_pooler(runbook)
    preflight, config = check_pooler(runbook, plan, options.dry_run)
    if options.dry_run or not preflight.ok:
        publish_pooler(plan, preflight, config, None, None, options.dry_run)
        if not preflight.ok:
            raise PreflightFailed("pooler preflight failed:\n" + "\n".join(preflight.failures()))
        return {"dry_run": True, "files": sorted(config.files)}
    with exclusive(runbook.state_dir):
        written = write_pooler_config(runbook, plan, config)
        report = verify_pooler(runbook, plan)
    publish_pooler(plan, preflight, config, written, report, False)
    if not report.ok:
        raise GateFailed.of("pooler", report.failures())
    return {"config": written, "clients": report.clients, "transactions": report.transactions, "tps": report.tps,
            "max_server_connections": report.max_server_connections, "errors": report.error_count}


@task(name="pooler preflight", cache_policy=NO_CACHE)
def check_pooler(runbook: Runbook, plan: PoolerPlan, dry_run: bool) -> tuple[PoolerPreflight, PoolerConfig]:
    """Reads the users' secrets and the config at the destination; renders the config. Writes nothing."""
    auth = read_server_auth(plan)
    current = read_current(plan, runbook)
    preflight = preflight_pooler(plan, auth, current["userlist.txt"], dry_run=dry_run)
    return preflight, render_config(plan, auth)


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
