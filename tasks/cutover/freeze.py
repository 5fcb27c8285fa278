"""The cutover's write freeze (the runbook's `cutover.freeze`): the source stops taking the apps' writes
(``liftoff.systems.pg_freeze``, each method of ``cutover.freeze`` in order), and what each changed goes to the
ledger's event log, so the rollback can always lift it. A method that fails lifts those applied before it."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.ledger import Event, Ledger, current_run_id
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import postgres
from liftoff.runbooks.model import Freeze
from liftoff.tasks.cutover.common import (FROZEN, PHASE, TARGET_FROZEN, TARGET_LIFTED, log, since_last_rollback,
                                  target_freeze_in_force)
from liftoff.systems import pg_freeze as freeze


@task(name="freeze writes on the source", cache_policy=NO_CACHE)
@recorded("cutover.freeze")
def freeze_source(rb: Runbook) -> dict:
    """Freezes the source; a freeze already in force since the last rollback is kept as it is (its recorded
    previous state is what the rollback must put back)."""
    ledger = Ledger(rb.state_dir)
    earlier = [e for e in since_last_rollback(ledger) if e.what == FROZEN]
    if earlier:
        return {"frozen_at": earlier[0].after["frozen_at"], "kept": True}
    methods = [m.method for m in rb.cutover.freeze]
    with postgres.session(rb.source, "source") as conn:
        recorded = _freeze_recorded(conn, rb, rb.cutover.freeze, FROZEN, lambda applied: {
            "frozen_at": max((a.get("frozen_at") or 0 for a in applied), default=0) or time.time(),
            "methods": methods})
    log.info("source frozen", methods=[f"{m.method}: {', '.join(m.roles)}" for m in rb.cutover.freeze])
    return {"frozen_at": recorded["frozen_at"], "methods": methods}


def _freeze_recorded(conn, rb: Runbook, freezes: list[Freeze], what: str, after) -> dict:
    """Applies each freeze in order and records them as one ``what`` event, whose after is
    ``after(applied)`` (returned); if anything fails, what was applied is lifted again: never a freeze the
    ledger cannot undo."""
    applied: list[dict] = []
    try:
        for method in freezes:
            applied.append(freeze.freeze_writes(conn, method, rb.database.schemas))
        recorded = after(applied)
        Ledger(rb.state_dir).record_event(PHASE, what, before={"freezes": applied}, after=recorded,
                                          flow_run_id=current_run_id())
    except BaseException:
        _lift_all(conn, applied)
        raise
    return recorded


def _lift_all(conn, records: list[dict]) -> None:
    for previous in reversed(records):  # last applied first
        freeze.lift_freeze(conn, previous)


def lift(rb: Runbook, event: Event) -> None:
    """Lifts the freezes recorded by ``event``, last applied first (the rollback's step)."""
    with postgres.session(rb.source, "source") as conn:
        _lift_all(conn, event.before["freezes"])


def grants_withheld(rb: Runbook) -> list[dict]:
    """The write grants a freeze in force took from the source (each: schema, table, column, grantee,
    privilege ...): the source's access is what it was before the freeze, so the final sync restores, and
    its gate expects, these too."""
    if not (rb.state_dir / "ledger.sqlite").exists():
        return []
    frozen = [e for e in since_last_rollback(Ledger(rb.state_dir)) if e.what == FROZEN]
    if not frozen:
        return []
    return [g for record in frozen[0].before["freezes"] for g in record.get("revoked", [])]


def target_freezes(rb: Runbook, conn) -> tuple[list[Freeze], list[str]]:
    """How the target stops taking the apps' writes before a rollback counts them: each ``cutover.freeze``
    method for those of its roles the target has (the API roles are created there), and ``role`` for the
    runbook's ``database.app_roles`` and the user of every PostgreSQL URL in the apps' new environment (the
    login roles the apps use on the target). Also returns the roles the apps use that no freeze can stop (a
    superuser, or the user Liftoff connects as): their writes after the count are not in it."""
    app_users = {a.name for a in rb.database.app_roles} | _url_users(rb)
    names = {r for m in rb.cutover.freeze for r in m.roles} | app_users
    rows = conn.execute("SELECT rolname, rolsuper OR rolname = current_user FROM pg_roles WHERE rolname = ANY(%s)",
                        (sorted(names),)).fetchall()
    present = {r for r, unstoppable in rows if not unstoppable}
    unstoppable = sorted(r for r, cannot in rows if cannot and r in app_users)
    freezes = [Freeze(method=m.method if m.method != "database" else "role", roles=[r for r in m.roles if r in present])
               for m in rb.cutover.freeze]
    listed = {r for f in freezes for r in f.roles}
    freezes.append(Freeze(method="role", roles=sorted(r for r in app_users if r in present and r not in listed)))
    return [f for f in freezes if f.roles], unstoppable


def _url_users(rb: Runbook) -> set[str]:
    from urllib.parse import urlsplit

    from liftoff.tasks.cutover.common import resolve_env

    if rb.cutover.switch is None:
        return set()
    return {urlsplit(v).username for v in resolve_env(rb).values()
            if v.startswith(("postgres://", "postgresql://")) and urlsplit(v).username}


@task(name="freeze writes on the target", cache_policy=NO_CACHE)
@recorded("rollback.freeze-target")
def freeze_target(rb: Runbook) -> dict:
    """Stops the apps' writes on the target (the rollback's first step once they were switched), so the
    changes it counts are all there will be; recorded, lifted by a rejected rollback or the next cutover. A
    freeze of the target already in force is kept."""
    ledger = Ledger(rb.state_dir)
    if (kept := target_freeze_in_force(ledger)) is not None:
        return {"kept": True, "roles": kept.after.get("roles", []), "unstoppable": kept.after.get("unstoppable", [])}
    with postgres.session(rb.target.direct, "target.direct") as conn:
        freezes, unstoppable = target_freezes(rb, conn)
        roles = sorted({r for f in freezes for r in f.roles})
        _freeze_recorded(conn, rb, freezes, TARGET_FROZEN, lambda _: {
            "frozen_at": time.time(), "roles": roles, "unstoppable": unstoppable})
    log.info("target frozen", roles=roles, unstoppable=unstoppable)
    return {"roles": roles, "unstoppable": unstoppable}


def lift_target_freeze(rb: Runbook) -> dict:
    """Lifts the target's freeze a rollback left (before a new cutover's final sync, or when the rollback is
    not approved); nothing when none is in force."""
    if not (rb.state_dir / "ledger.sqlite").exists():
        return {"lifted": False}
    ledger = Ledger(rb.state_dir)
    event = target_freeze_in_force(ledger)
    if event is None:
        return {"lifted": False}
    with postgres.session(rb.target.direct, "target.direct") as conn:
        _lift_all(conn, event.before["freezes"])
    ledger.record_event(PHASE, TARGET_LIFTED, before={"event": event.id}, flow_run_id=current_run_id())
    log.info("target freeze lifted")
    return {"lifted": True}
