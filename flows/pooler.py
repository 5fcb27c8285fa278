"""The platform: PgBouncer in front of the target, with SCRAM authentication that works, and its gate."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.errors import PreflightFailed
from liftoff.ledger import exclusive
from liftoff.flows.hooks import notify_on_failure
from liftoff.systems.pgbouncer import plan_pooler
from liftoff.tasks.pooler.steps import publish_pooler, run_pooler_preflight, verify_pooler, write_pooler_config


@flow(name="setup-pooler", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def setup_pooler(options: RunOptions) -> dict:
    """Succeeds when PgBouncer runs with the runbook's config (transaction pooling and the pool sizes of
    ``pooler``), its userlist holds each pooled user's SCRAM secret from pg_authid, and the gate passed: 100
    clients at once through target.pooled did short transactions without an error, on no more server
    connections than default_pool_size + reserve_pool_size. Preflight stops first on what this run cannot fix
    (a password stored as md5, a missing role). A dry run shows the config, secrets masked, and writes nothing."""
    runbook = open_runbook(options, "pooler")
    plan = plan_pooler(runbook)
    preflight, config = run_pooler_preflight(runbook, plan, options.dry_run)
    if options.dry_run or not preflight.ok:
        publish_pooler(plan, preflight, config, None, None, options.dry_run)
        if not preflight.ok:
            raise PreflightFailed("pooler preflight failed:\n" + "\n".join(preflight.failures()))
        return {"dry_run": True, "files": sorted(config.files)}
    with exclusive(runbook.state_dir):
        written = write_pooler_config(runbook, plan, config)
        report = verify_pooler(runbook, plan, preflight, config, written)
    return {"config": written, "clients": report.clients, "transactions": report.transactions, "tps": report.tps,
            "max_server_connections": report.max_server_connections, "errors": report.error_count}


