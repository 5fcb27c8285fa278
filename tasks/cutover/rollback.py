"""The rollback's steps: the ledger's event log since the last rollback, replayed backwards.

Once the apps were switched, the target is frozen first (the same freeze methods, applied to the target),
so what they changed there is final; every change since the switch is found row by row (``liftoff.systems.pg_changes``),
shown, and carried to the source or written to a file (the operator chooses; the automatic rollback writes
the file). Then the source's write freeze is lifted, the apps' environment is put back and they are
redeployed, the storage URL rewrite is inverted on the target, and the apps' health is awaited.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import time

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import LiftoffError, StepFailed
from liftoff.ledger import Event, Ledger, current_run_id
from liftoff.redaction import first_line
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import pg_changes as changes, postgres
from liftoff.systems.pg_changes import TableChanges
from liftoff.tasks.cutover import freeze as freeze_step
from liftoff.tasks.cutover import switch as switch_step
from liftoff.tasks.cutover.catch_up import baseline, hashing, unfrozen_tables
from liftoff.tasks.cutover.common import FROZEN, PHASE, ROLLED_BACK, SWITCHED, log, since_last_rollback
from liftoff.tasks.cutover.smoke import wait_apps_healthy
from liftoff.tasks.storage.urls import pending_rewrites, restore_storage_urls, rewritten_url_columns


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
        if self.switch:
            out += ["freeze writes on the target (the apps stop writing there), so the count below is final",
                    "carry every change the apps made on the target since the switch to the source (apply) or to a "
                    "file in state_dir (file), as you choose"]
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
    """Every change the apps made on the target since the switch, per migrated table (``liftoff.systems.pg_changes``)."""

    tables: dict[str, TableChanges] = field(default_factory=dict)
    frozen: bool = False  # counted with the target frozen (the count is final), or not (a dry run's estimate)
    both: list[tuple[str, tuple]] = field(default_factory=list)  # (table, key) changed on both sides: not carried
    objects: list[dict] = field(default_factory=list)  # bucket, key, op (upload/overwrite/delete), size
    unknown: str | None = None  # why the changes could not be counted (the target down or not freezable)
    unstoppable: list[str] = field(default_factory=list)  # app roles no freeze stops on the target

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
    """The rollback's step: ``count_changes_on_target``, recorded."""
    return count_changes_on_target(rb, frozen)


def count_changes_on_target(rb: Runbook, frozen: bool = True) -> ChangeSet:
    """Compares every migrated table of the target with the frozen source, row by row: the final sync's gate
    proved them equal at the switch and the source took no app writes since, so every difference is a
    change the apps made on the target (``liftoff.systems.pg_changes``). The storage URL rewrite counts only where a row
    holds something else than the rewrite of the source's value. A table the source kept writing (the
    unfrozen ones) is compared with the baseline both sides last agreed on, so only the target's changes
    count, and a row both changed is named. A table that cannot be read is named, not skipped silently."""
    rewrites = rewritten_url_columns(rb)
    found = ChangeSet(frozen=frozen)
    ledger = Ledger(rb.state_dir)
    unreadable = []
    with postgres.session(rb.source, "source") as src, postgres.session(rb.target.direct, "target.direct") as tgt:
        unfrozen = {t.qualified for t in unfrozen_tables(rb, src)}
        for table in postgres.list_tables(src, rb.database.schemas):
            columns, rewritten = hashing(src, table, rewrites)
            try:
                if table.qualified in unfrozen:  # the source took writes too: only the target's side is carried
                    split = changes.three_way(table, baseline(ledger, table),
                                              changes.row_hashes(src, table, set(rewritten), columns),
                                              changes.row_hashes(tgt, table, set(rewritten), columns))
                    found.tables[table.qualified] = split.target
                    found.both += [(table.qualified, k) for k in split.both]
                else:
                    found.tables[table.qualified] = changes.diff_table(src, tgt, table, rewritten)
            except psycopg.Error as exc:
                unreadable.append(f"{table.qualified}: {first_line(exc)}")
    if unreadable:
        found.unknown = "tables not compared: " + "; ".join(unreadable)
    found.objects = object_changes(rb)
    log.info("changes on the target since the switch", total=found.total, tables=len(found.rows()),
             both=len(found.both), unreadable=len(unreadable))
    return found


@task(name="carry the target's changes", cache_policy=NO_CACHE)
@recorded("rollback.carry")
def carry_changes(rb: Runbook, found: ChangeSet, how: str) -> dict:
    """``apply``: the changes written to the source (one transaction per table, foreign-key order, a row the
    source refuses or changed since the count named by its key, sequences moved past the carried ids, the
    objects uploaded to Supabase Storage), and also to the file, so what was carried stays on record.
    ``file``: only the file, the source left as it was. Either way every change, and every row changed on
    both sides with the target's values, is in the file (``state_dir/rollback-changes-<time>-<run>.jsonl``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = rb.state_dir / f"rollback-changes-{stamp}-{(current_run_id() or 'local')[:8]}.jsonl"
    rewrites = rewritten_url_columns(rb)
    with postgres.session(rb.source, "source") as src, postgres.session(rb.target.direct, "target.direct") as tgt:
        tables = changes.foreign_key_order(src, postgres.list_tables(src, rb.database.schemas))
        how_each = {}
        for t in tables:
            columns, rewritten = hashing(src, t, rewrites)
            how_each[t.qualified] = changes.Carry(columns, rewritten=rewritten, to_target=False)
        by_name = {t.qualified: t for t in tables}
        both_rows = [{"conflict": {"table": name, "key": changes.key_label(key),
                                   "row on the target": dict(changes.read_rows(tgt, by_name[name], [key],
                                                                               how_each[name].columns)).get(key)},
                      "why": "changed on both sides since the catch-up; not carried"} for name, key in found.both]
        # Objects are named here either way, with where they are (the rollback leaves the target's buckets as
        # they are); ``apply`` also uploads them to Supabase Storage (or deletes them there).
        extra = [{"object": o, "where": f"target bucket {o['target_bucket']} (kept there)"} for o in found.objects]
        lines = changes.write_changes(path, tgt, tables, found.tables, extra + both_rows,
                                      hashed={name: c.columns for name, c in how_each.items()})
        done = {"total": found.total, "file": str(path), "lines": lines, "how": how, "tables": found.counts(),
                "objects": len(found.objects), "both": [f"{n} key {changes.key_label(k)}" for n, k in found.both]}
        if how == "apply":
            applied = changes.apply_changes(src, tgt, tables, found.tables, how_each)
            objects, refused = carry_objects(rb, found.objects)
            done.update(carried=sum(applied.carried.values()) + objects, conflicts=applied.conflicts + refused,
                        sequences=applied.sequences, triggers_fired=applied.triggers_fired)
            log.info("target's changes applied to the source", carried=done["carried"],
                     conflicts=len(done["conflicts"]), file=str(path))
        else:
            log.info("target's changes written to a file; the source left as it was", total=found.total,
                     file=str(path))
    return done


def carry_objects(rb: Runbook, objects: list[dict]) -> tuple[int, list[str]]:
    """The apps' object changes on the target made on Supabase Storage too, through the runbook's source
    protocol (Storage writes its own rows): an upload or overwrite streamed from the target, a delete
    deleted. Returns how many were carried and, one line each, those Storage refused."""
    if not objects:
        return 0, []
    from liftoff.tasks.storage.common import storage_source, target_client

    target, carried, refused = target_client(rb), 0, []
    with storage_source(rb) as source:
        for o in objects:
            try:
                if o["op"] == "delete":
                    source.remove(o["bucket"], o["key"])
                else:
                    info = s3_head(target, o["target_bucket"], o["key"])
                    source.put(o["bucket"], o["key"],
                               lambda o=o: target.get_object(Bucket=o["target_bucket"], Key=o["key"])["Body"],
                               info.size, info.content_type, info.cache_control)
                carried += 1
            except LiftoffError as exc:
                refused.append(f"object {o['bucket']}/{o['key']}: {o['op']}: {first_line(exc)}")
    log.info("objects carried to Supabase Storage", carried=carried, refused=len(refused))
    return carried, refused


def s3_head(client, bucket: str, key: str):
    from liftoff.systems import s3

    info = s3.head(client, bucket, key)
    if info is None:
        raise StepFailed(f"target bucket {bucket} key {key!r}: gone since the rollback counted it")
    return info


def object_changes(rb: Runbook) -> list[dict]:
    """The objects the apps uploaded to, overwrote in or deleted from the target's buckets since the storage
    phase copied them: the target's listing against the ledger's record of each copied object (size and
    MD5; a HEAD reads our md5chksum metadata where the ETag is not the MD5, as after a multipart copy)."""
    if not rb.storage.configured:
        return []
    from liftoff.systems import s3
    from liftoff.tasks.storage.common import PHASE as STORAGE
    from liftoff.tasks.storage.common import item_kind, target_bucket, target_client

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
    if plan.switch is None:  # the cutover stopped before the switch; the apps may be in maintenance still
        from liftoff.tasks.cutover.maintenance import leave_maintenance

        return {"switched_back": False, "maintenance_off": leave_maintenance(rb)}
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
