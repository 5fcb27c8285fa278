"""The rollback's steps: the ledger's event log since the last rollback, replayed backwards.

The source's write freeze is lifted first (the apps are not on the source yet, so nothing is exposed),
then the apps' environment is put back and they are redeployed, then the storage URL rewrite is inverted on
the target, then the apps' health is awaited. Before any of it, what the apps wrote on the target since the
switch is counted (by sequence positions recorded at the switch, and by timestamp columns): rolling back
strands those rows, so the flow asks first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from liftoff.ledger import Event, Ledger, current_run_id
from liftoff.steps import recorded
from runbooks.model import Runbook
from tasks import postgres
from tasks.cutover import freeze as freeze_step
from tasks.cutover import switch as switch_step
from tasks.cutover.common import FROZEN, PHASE, ROLLED_BACK, SWITCHED, log, since_last_rollback
from tasks.cutover.smoke import wait_apps_healthy
from tasks.storage.urls import pending_rewrites, restore_storage_urls

TIMESTAMP_COLUMNS = ("created_at", "updated_at", "inserted_at", "booked_at")


@dataclass
class RollbackPlan:
    freeze: Event | None = None
    switch: Event | None = None
    rewrites: list[Event] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def nothing(self) -> bool:
        return self.freeze is None and self.switch is None and not self.rewrites

    def lines(self) -> list[str]:
        out = []
        if self.freeze:
            out.append(f"lift the source's write freeze ({', '.join(self.freeze.after.get('methods', []))}) recorded at event "
                       f"{self.freeze.id}")
        if self.switch:
            out.append(f"put back the apps' environment at {self.switch.after.get('where')} and redeploy")
        if self.rewrites:
            rows = sum(len(e.after.get("rows", [])) for e in self.rewrites)
            out.append(f"put back {rows} storage URLs on the target")
        return out


@task(name="plan the rollback", cache_policy=NO_CACHE)
def plan_rollback(rb: Runbook) -> RollbackPlan:
    if not (rb.state_dir / "ledger.sqlite").exists():
        return RollbackPlan()
    ledger = Ledger(rb.state_dir)
    events = since_last_rollback(ledger)
    first = {kind: next((e for e in events if e.what == kind), None) for kind in (FROZEN, SWITCHED)}
    return RollbackPlan(first[FROZEN], first[SWITCHED], pending_rewrites(ledger), events)


@task(name="count rows written on the target since the switch", cache_policy=NO_CACHE)
def rows_written_since_switch(rb: Runbook, switch: Event) -> list[dict]:
    """Per table, rows the apps wrote on the target since the switch: from each sequence's position then and
    now, and from timestamp columns (created_at, updated_at ...) later than the switch."""
    at, before = switch.after.get("at"), switch.after.get("sequences") or {}
    found: dict[str, dict] = {}
    now = switch_step.target_sequences(rb)
    with postgres.session(rb.target.direct, "target.direct") as conn:
        for name, value in now.items():
            advanced = (value or 0) - (before.get(name) or 0)
            if advanced > 0:
                found[name] = {"where": name, "rows": advanced, "how": "sequence advanced"}
        columns = conn.execute(
            "SELECT table_schema, table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = ANY(%s) AND column_name = ANY(%s) AND data_type LIKE 'timestamp%%'",
            (rb.database.schemas, list(TIMESTAMP_COLUMNS))).fetchall()
        for schema, table, column in columns:
            rows = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} > to_timestamp(%s)").format(
                sql.Identifier(schema, table), sql.Identifier(column)), (at,)).fetchone()[0]
            if rows:
                key = f"{schema}.{table}"
                if rows > found.get(key, {}).get("rows", 0):
                    found[key] = {"where": f"{key}.{column}", "rows": rows, "how": "timestamp after the switch"}
    return sorted(found.values(), key=lambda r: r["where"])


@task(name="lift the source's write freeze", cache_policy=NO_CACHE)
@recorded("rollback.unfreeze")
def lift_source_freeze(rb: Runbook, plan: RollbackPlan) -> dict:
    if plan.freeze is None:
        return {"lifted": False}
    freeze_step.lift(rb, plan.freeze)
    log.info("source freeze lifted")
    return {"lifted": True}


@task(name="switch the apps back to the source", cache_policy=NO_CACHE)
@recorded("rollback.switch-back")
def switch_apps_back(rb: Runbook, plan: RollbackPlan) -> dict:
    if plan.switch is None:
        return {"switched_back": False}
    where = switch_step.switch_back(rb, plan.switch)
    log.info("apps switched back", where=where)
    return {"switched_back": True, "where": where}


@task(name="wait for the apps on the source", cache_policy=NO_CACHE)
@recorded("rollback.health")
def wait_healthy_again(rb: Runbook) -> dict:
    return {"healthy_after_s": wait_apps_healthy(rb)}


def finish_rollback(rb: Runbook, plan: RollbackPlan, done: dict) -> None:
    """Marks every event of this plan undone: the next rollback starts after it."""
    Ledger(rb.state_dir).record_event(PHASE, ROLLED_BACK, before={"events": [e.id for e in plan.events]},
                                      after=done, flow_run_id=current_run_id())


__all__ = ["RollbackPlan", "finish_rollback", "lift_source_freeze", "plan_rollback", "restore_storage_urls",
           "rows_written_since_switch", "switch_apps_back", "wait_healthy_again"]
