"""The cutover's final sync, its bookkeeping (the runbook's `cutover` section): what a full final sync makes the
ledger forget, so the database and storage phases bring the target up to the frozen source."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import StepFailed
from liftoff.ledger import Ledger
from liftoff.runbooks.model import Runbook
from liftoff.tasks.cutover.common import PHASE, ROLLED_BACK, SWITCHED, log, since_last_rollback


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


@task(name="reset the storage phase for the replicated sync", cache_policy=NO_CACHE)
def forget_for_replicated_sync(rb: Runbook) -> dict:
    """Replication carried the source's storage URLs into the target's URL columns (the initial copy reloaded
    them): the URL rewrite runs again after the storage phase's incremental copy and its gate."""
    ledger = Ledger(rb.state_dir)
    forgotten = ["storage.rewrite", "verify-storage"]
    for step in forgotten:
        ledger.forget_steps(step)
    return {"forgotten": forgotten}


def refuse_after_switch(rb: Runbook) -> None:
    """A resync reloads every table from the source: after a switch that stands, the apps' writes on the target
    would be overwritten. Refuses then, naming what to do."""

    if not (rb.state_dir / "ledger.sqlite").exists():
        return
    switched = [e for e in since_last_rollback(Ledger(rb.state_dir)) if e.what == SWITCHED]
    if switched:
        raise StepFailed(f"runbook {rb.name}: the apps were switched to the target (ledger event {switched[0].id}) "
                         "and no rollback followed: a resync would overwrite what they wrote there; run "
                         "`liftoff run rollback` first")


def refuse_while_changes_stranded(rb: Runbook) -> None:
    """A resync or a new cutover reloads every table of the target. When the last rollback left changes the
    apps made there only on the target (written to its file, refused by the source, or not counted), that
    would destroy them: refuses until the operator says they were dealt with (a marker file it names)."""

    if not (rb.state_dir / "ledger.sqlite").exists():
        return
    rollbacks = [e for e in Ledger(rb.state_dir).events(PHASE) if e.what == ROLLED_BACK]
    if not rollbacks:
        return
    last = rollbacks[-1]
    carried = (last.after or {}).get("changes") or {}
    left = ("uncounted (" + carried["unknown"] + ")" if carried.get("unknown") else
            f"{carried.get('total')} change(s) only in {carried.get('file')}" if carried.get("how") == "file"
            and carried.get("total") else
            f"{len(carried.get('conflicts') or [])} change(s) the source refused, in {carried.get('file')}"
            if carried.get("conflicts") else
            f"{len(carried.get('both') or [])} row(s) changed on both sides, in {carried.get('file')}"
            if carried.get("both") else None)
    marker = rb.state_dir / f"rollback-{last.id}.handled"
    if left and not marker.exists():
        raise StepFailed(f"runbook {rb.name}: the last rollback (ledger event {last.id}) left the apps' changes on "
                         f"the target {left}; reloading the target would destroy them: carry them to the source, "
                         f"then `touch {marker}` and run again")
