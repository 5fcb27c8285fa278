"""Runbook step 6c: the source stops taking the apps' writes (``tasks.database.freeze``, each method of
``cutover.freeze`` in order), and what each changed goes to the ledger's event log, so the rollback can
always lift it. A method that fails lifts those applied before it."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.ledger import Event, Ledger, current_run_id
from liftoff.steps import recorded
from runbooks.model import Runbook
from tasks import postgres
from tasks.cutover.common import FROZEN, PHASE, log, since_last_rollback
from tasks.database import freeze


@task(name="freeze writes on the source", cache_policy=NO_CACHE)
@recorded("cutover.freeze")
def freeze_source(rb: Runbook) -> dict:
    """Freezes the source; a freeze already in force since the last rollback is kept as it is (its recorded
    previous state is what the rollback must put back)."""
    ledger = Ledger(rb.state_dir)
    earlier = [e for e in since_last_rollback(ledger) if e.what == FROZEN]
    if earlier:
        return {"frozen_at": earlier[0].after["frozen_at"], "kept": True}
    applied: list[dict] = []
    with postgres.session(rb.source, "source") as conn:
        try:
            for method in rb.cutover.freeze:
                applied.append(freeze.freeze_writes(conn, method, rb.database.schemas))
            frozen_at = max((a.get("frozen_at") or 0 for a in applied), default=0) or time.time()
            ledger.record_event(PHASE, FROZEN, before={"freezes": applied},
                                after={"frozen_at": frozen_at, "methods": [m.method for m in rb.cutover.freeze]},
                                flow_run_id=current_run_id())
        except BaseException:
            for previous in reversed(applied):  # never a freeze the ledger cannot undo
                freeze.lift_freeze(conn, previous)
            raise
    log.info("source frozen", methods=[f"{m.method}: {', '.join(m.roles)}" for m in rb.cutover.freeze])
    return {"frozen_at": frozen_at, "methods": [m.method for m in rb.cutover.freeze]}


def lift(rb: Runbook, event: Event) -> None:
    """Lifts the freezes recorded by ``event``, last applied first (the rollback's step)."""
    with postgres.session(rb.source, "source") as conn:
        for previous in reversed(event.before["freezes"]):
            freeze.lift_freeze(conn, previous)
