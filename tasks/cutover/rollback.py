"""The rollback's steps: the ledger's event log since the last rollback, replayed backwards.

Once the apps were switched, the target is frozen first (the same freeze methods, applied to the target),
so what they changed there is final; every change since the switch is found row by row (``tasks.changes``),
shown, and carried to the source or written to a file (the operator chooses; the automatic rollback writes
the file). Then the source's write freeze is lifted, the apps' environment is put back and they are
redeployed, the storage URL rewrite is inverted on the target, and the apps' health is awaited.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.ledger import Event, Ledger, current_run_id
from liftoff.steps import recorded
from runbooks.model import Runbook
from tasks import changes, postgres
from tasks.changes import TableChanges
from tasks.cutover import freeze as freeze_step
from tasks.cutover import switch as switch_step
from tasks.cutover.catch_up import baseline, unfrozen_tables
from tasks.cutover.common import FROZEN, PHASE, ROLLED_BACK, SWITCHED, log, since_last_rollback
from tasks.cutover.smoke import wait_apps_healthy
from tasks.storage.urls import pending_rewrites, restore_storage_urls, rewritten_url_columns


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


@dataclass
class ChangeSet:
    """Every change the apps made on the target since the switch, per migrated table (``tasks.changes``)."""

    tables: dict[str, TableChanges] = field(default_factory=dict)
    frozen: bool = False  # counted with the target frozen (the count is final), or not (a dry run's estimate)
    both: list[str] = field(default_factory=list)  # keys changed on both sides (unfrozen tables): not carried
    objects: list[dict] = field(default_factory=list)  # bucket, key, op (upload/overwrite/delete), size
    unknown: str | None = None  # why the changes could not be counted (the target down or not freezable)

    @property
    def total(self) -> int:
        return sum(c.total for c in self.tables.values()) + len(self.objects)

    def rows(self) -> list[dict]:
        rows = [c.row() for c in self.tables.values() if c.total]
        for bucket in sorted({o["bucket"] for o in self.objects}):
            mine = [o for o in self.objects if o["bucket"] == bucket]
            count = {op: sum(o["op"] == op for o in mine) for op in ("upload", "overwrite", "delete")}
            rows.append({"table": f"bucket {bucket}", "key": "object key", "inserts": count["upload"],
                         "updates": count["overwrite"], "deletes": count["delete"],
                         "some keys": ", ".join(o["key"] for o in mine[:changes.SAMPLE_KEYS])
                         + (f" (+{len(mine) - changes.SAMPLE_KEYS})" if len(mine) > changes.SAMPLE_KEYS else "")})
        return rows

    def summary(self) -> str:
        return (f"{self.total} change(s) on the target since the switch in {len(self.rows())} table(s)"
                + ("" if self.frozen else " (counted while the apps still write: an estimate)"))

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: {"inserts": len(c.inserts), "updates": len(c.updates), "deletes": len(c.deletes)}
                for name, c in self.tables.items() if c.total}


@task(name="find the changes made on the target since the switch", cache_policy=NO_CACHE)
@recorded("rollback.changes")
def changes_on_target(rb: Runbook, frozen: bool = True) -> ChangeSet:
    """Compares every migrated table of the target with the frozen source, row by row: the final sync's gate
    proved them equal at the switch and the source took no app writes since, so every difference is a
    change the apps made on the target (``tasks.changes``). The storage URL rewrite counts only where a row
    holds something else than the rewrite of the source's value."""
    rewritten = {name: {r.column: r.expected for r in columns} for name, columns in rewritten_url_columns(rb).items()}
    found = ChangeSet(frozen=frozen)
    ledger = Ledger(rb.state_dir)
    with postgres.session(rb.source, "source") as src, postgres.session(rb.target.direct, "target.direct") as tgt:
        unfrozen = {t.qualified for t in unfrozen_tables(rb, src)}
        for table in postgres.list_tables(src, rb.database.schemas):
            if table.qualified in unfrozen:  # the source took writes too: only the target's side is carried
                split = changes.three_way(table, baseline(ledger, table), changes.row_hashes(src, table),
                                          changes.row_hashes(tgt, table))
                found.tables[table.qualified] = split.target
                found.both += [f"{table.qualified} key {changes.key_label(k)}" for k in split.both]
            else:
                found.tables[table.qualified] = changes.diff_table(src, tgt, table, rewritten.get(table.qualified))
    found.objects = object_changes(rb)
    log.info("changes on the target since the switch", total=found.total, tables=len(found.rows()))
    return found


def object_changes(rb: Runbook) -> list[dict]:
    """The objects the apps uploaded to, overwrote in or deleted from the target's buckets since the storage
    phase copied them: the target's listing against the ledger's record of each copied object (size and
    MD5; a HEAD reads our md5chksum metadata where the ETag is not the MD5, as after a multipart copy)."""
    if not rb.storage.buckets or rb.storage.target is None or rb.storage.source is None:
        return []
    from tasks import s3
    from tasks.storage.common import PHASE as STORAGE
    from tasks.storage.common import item_kind, target_bucket, target_client

    ledger, target, out = Ledger(rb.state_dir), target_client(rb), []
    for b in rb.storage.buckets:
        tbucket = target_bucket(rb, b.name)
        copied = {key: (size, md5) for key, _, size, md5 in ledger.items(STORAGE, item_kind(b.name), status="copied")}
        listed = set()
        for obj in s3.list_objects(target, tbucket):
            listed.add(obj.key)
            was = copied.get(obj.key)
            if was is None:
                out.append({"bucket": b.name, "target_bucket": tbucket, "key": obj.key, "op": "upload", "size": obj.size})
            elif obj.size != was[0] or (obj.etag.strip('"') != was[1]
                                        and getattr(s3.head(target, tbucket, obj.key), "md5", None) != was[1]):
                out.append({"bucket": b.name, "target_bucket": tbucket, "key": obj.key, "op": "overwrite",
                            "size": obj.size})
        out += [{"bucket": b.name, "target_bucket": tbucket, "key": key, "op": "delete", "size": copied[key][0]}
                for key in sorted(copied.keys() - listed)]
    return out


@task(name="carry the target's changes", cache_policy=NO_CACHE)
@recorded("rollback.carry")
def carry_changes(rb: Runbook, found: ChangeSet, how: str) -> dict:
    """``apply``: the changes written to the source (one transaction per table, foreign-key order, conflicts
    named by key, sequences moved past the carried ids), and also to the file, so what was carried stays on
    record. ``file``: only the file (``state_dir/rollback-changes-<time>.jsonl``), the source left as it
    was. Either way every change is named in the file."""
    path = rb.state_dir / f"rollback-changes-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.jsonl"
    with postgres.session(rb.source, "source") as src, postgres.session(rb.target.direct, "target.direct") as tgt:
        tables = changes.foreign_key_order(src, postgres.list_tables(src, rb.database.schemas))
        # Objects stay on the target's S3 server (the rollback does not touch its buckets): named here, with
        # where they are, for the operator to upload to Supabase Storage where the app needs them.
        extra = ([{"object": o, "where": f"target bucket {o['target_bucket']} (kept there)"} for o in found.objects]
                 + [{"conflict": key, "why": "changed on both sides since the catch-up; not carried"}
                    for key in found.both])
        lines = changes.write_changes(path, tgt, tables, found.tables, extra)
        done = {"total": found.total, "file": str(path), "lines": lines, "how": how, "tables": found.counts(),
                "objects": len(found.objects), "both": found.both}
        if how == "apply":
            applied = changes.apply_changes(src, tgt, tables, found.tables)
            done.update(carried=sum(applied.carried.values()), conflicts=applied.conflicts,
                        sequences=applied.sequences, triggers_fired=applied.triggers_fired)
            log.info("target's changes applied to the source", carried=done["carried"],
                     conflicts=len(applied.conflicts), file=str(path))
        else:
            log.info("target's changes written to a file; the source left as it was", total=found.total,
                     file=str(path))
    return done


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


__all__ = ["ChangeSet", "RollbackPlan", "carry_changes", "changes_on_target", "finish_rollback", "lift_source_freeze",
           "plan_rollback", "restore_storage_urls", "switch_apps_back", "wait_healthy_again"]
