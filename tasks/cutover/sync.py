"""Runbook step 6d, its bookkeeping: what a full final sync makes the ledger forget, so the database and
storage phases bring the target up to the frozen source."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.ledger import Ledger
from runbooks.model import Runbook
from tasks.cutover.common import log


@task(name="reset the phases for the final sync", cache_policy=NO_CACHE)
def forget_for_full_resync(rb: Runbook) -> dict:
    """A new export from the frozen source (which makes the restore reload every table, its foreign keys and
    triggers dropped first and built again), a new database gate, and the URL rewrite again after the storage
    phase copied what was added or changed (the reload brought the source's URLs back). Copied objects stay
    recorded: the storage phase copies only what is new or changed."""
    ledger = Ledger(rb.state_dir)
    forgotten = ["export", "verify", "storage.rewrite", "verify-storage"]
    for step in forgotten:
        ledger.forget_steps(step)
    log.info("final sync: phases reset", steps=forgotten)
    return {"forgotten": forgotten}


def refuse_after_switch(rb: Runbook) -> None:
    """A resync reloads every table from the source: after a switch that stands, the apps' writes on the target
    would be overwritten. Refuses then, naming what to do."""
    from liftoff.errors import StepFailed
    from tasks.cutover.common import SWITCHED, since_last_rollback

    if not (rb.state_dir / "ledger.sqlite").exists():
        return
    switched = [e for e in since_last_rollback(Ledger(rb.state_dir)) if e.what == SWITCHED]
    if switched:
        raise StepFailed(f"runbook {rb.name}: the apps were switched to the target (ledger event {switched[0].id}) "
                         "and no rollback followed: a resync would overwrite what they wrote there; run "
                         "`liftoff run rollback` first")
