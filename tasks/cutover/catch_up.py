"""The cutover's catch-up (the runbook's `cutover.unfrozen_tables`): the catch-up after the switch. What the freeze
cannot stop keeps writing on the source (Supabase Auth's sign-ups into ``auth.users``, Supabase Storage's
uploads, the runbook's ``cutover.unfrozen_tables``); the final sync's gates leave those out
(``catch_up_pending``), and once the apps write to the target nothing new reaches the source through them, so
this step carries what those writers added, changed or deleted since the final sync, then checks again.

Rows: the target's copy of each such table right after the final sync is the baseline both sides shared
(``record_baseline``, kept in the ledger); the source's changes since are the keys where the source now
differs from it, and only those are written to the target (``liftoff.systems.pg_changes``, triggers off on the target so
the app's sign-up trigger does not run twice), unless the apps changed the same key on the target too: a
conflict, named, the target's row kept. The source as read becomes the next baseline, so the step can run
again (``liftoff run catch-up``) for writes that keep arriving, e.g. from Supabase Auth when the project
keeps it. Objects: the storage phase's incremental copy (new or changed in ``storage.objects``).

Then the gates again: definitions and access of every migrated object (the source's pre-freeze grants),
every carried row equal on both sides, every object of the source's inventory on the target (objects the
apps uploaded to the target since the switch are counted as theirs).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psycopg
from prefect import task
from psycopg import sql
from prefect.cache_policies import NO_CACHE

from liftoff.checks import GateReport
from liftoff.errors import StepFailed
from liftoff.ledger import Ledger
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import pg_changes as changes, postgres, supabase_storage
from liftoff.tasks.cutover.common import COMPLETED, FROZEN, SWITCHED, log, since_last_rollback
from liftoff.tasks.database.common import read_shim
from liftoff.systems.postgres import Table
from liftoff.tasks.storage.urls import rewritten_url_columns

BASELINE = "catch-up.baseline"  # ledger items: kind "schema.table", key: the row's key (JSON), checksum: its hash
SHOWN_KEYS = 10


def catch_up_pending(rb: Runbook) -> float | None:
    """When a cutover's freeze stands and the cutover has not completed (its final sync is running): the
    freeze's instant, after which the unfrozen writers' rows and objects are the catch-up's, not the final
    sync gates'. Otherwise None."""
    if not (rb.state_dir / "ledger.sqlite").exists():
        return None
    events = since_last_rollback(Ledger(rb.state_dir))
    frozen = next((e for e in events if e.what == FROZEN), None)
    if frozen is None or any(e.what == COMPLETED for e in events):
        return None
    return frozen.after.get("frozen_at")


# Supabase's own services write these schemas as their own admin roles, which no freeze reaches.
SUPABASE_WRITERS = ("auth", "storage")


def unfrozen_tables(rb: Runbook, source) -> list[Table]:
    """The migrated tables writers the freeze cannot stop write on the source: ``cutover.unfrozen_tables``;
    ``auth.users`` when the auth shim carries it (Supabase Auth writes it as its own admin role); and every
    migrated table a trigger on Supabase's tables writes (the profile-on-sign-up pattern), found by the
    trigger functions' bodies naming it, transitively (a trigger on such a table counts too). Naming a table
    that is in fact frozen costs nothing: its changes are told apart from a baseline all the same."""
    names = set(rb.cutover.unfrozen_tables)
    schemas = sorted({n.split(".", 1)[0] for n in names} | set(rb.database.schemas))
    every = postgres.list_tables(source, schemas)
    unknown = names - {t.qualified for t in every}
    if unknown:
        raise StepFailed(f"cutover.unfrozen_tables: {', '.join(sorted(unknown))} is not a table of the source")
    names |= written_by_triggers(source, [t for t in every if t.schema in rb.database.schemas])
    tables = [t for t in every if t.qualified in names]
    if read_shim(rb, source):
        tables += [t for t in postgres.list_tables(source, ["auth"]) if t.name == "users"]
    return tables


def written_by_triggers(source, candidates: list[Table]) -> set[str]:
    """Which of ``candidates`` Supabase's services write through the database itself: a trigger function on a
    table of Supabase's schemas names it in its body, or a foreign key to such a table cascades into it (ON
    DELETE/UPDATE CASCADE, SET NULL, SET DEFAULT); transitively, from each table found."""
    found: set[str] = set()
    watched = {(s, None) for s in SUPABASE_WRITERS}
    triggers = source.execute(
        """SELECT n.nspname, c.relname, p.prosrc FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_proc p ON p.oid = g.tgfoid
           WHERE NOT g.tgisinternal""").fetchall()
    cascades = source.execute(
        """SELECT cn.nspname || '.' || c.relname, fn.nspname, f.relname FROM pg_constraint k
           JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
           JOIN pg_class f ON f.oid = k.confrelid JOIN pg_namespace fn ON fn.oid = f.relnamespace
           WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))"""
    ).fetchall()
    names = {t.qualified for t in candidates}
    while True:
        bodies = [body for schema, table, body in triggers if (schema, None) in watched or (schema, table) in watched]
        more = {t.qualified for t in candidates if t.qualified not in found
                and any(re.search(rf"(?<![\w$]){re.escape(t.name)}(?![\w$])", body, re.IGNORECASE) for body in bodies)}
        more |= {child for child, schema, table in cascades if child in names and child not in found
                 and ((schema, None) in watched or (schema, table) in watched)}
        if not more:
            return found
        found |= more
        watched |= {tuple(name.split(".", 1)) for name in more}


def hashing(source, table, rewrites: dict) -> tuple[list[str], dict]:
    """The columns a row's hash covers on both sides (the source's, in its order) and the table's rewritten
    storage URL columns (column -> the rewrite of a source value), which the hash leaves out."""
    columns = [c[0] for c in changes.table_columns(source, table)]
    rewritten = {r.column: r.expected for r in rewrites.get(table.qualified, [])} if table.pk else {}
    return columns, rewritten


# A table both the source's unfrozen writers and the apps insert into would hand out the same ids on both
# sides from the final sync on: the target's sequences of those tables jump this far ahead at the switch.
SEQUENCE_GAP = 1_000_000


@task(name="record the catch-up's baseline", cache_policy=NO_CACHE)
@recorded("cutover.baseline")
def record_baseline(rb: Runbook) -> dict:
    """The target's rows of the unfrozen tables right after the final sync (what both sides then shared),
    hashed over the source's columns; and their sequences on the target moved ``SEQUENCE_GAP`` ahead, so a
    row the apps insert on the target never takes an id the source's writers hand out meanwhile."""
    ledger = Ledger(rb.state_dir)
    ledger.forget_items(BASELINE)
    counted, moved = {}, {}
    rewrites = rewritten_url_columns(rb)
    with postgres.session(rb.source, "source") as src, postgres.session(rb.target.direct, "target.direct") as tgt:
        tables = unfrozen_tables(rb, src)
        for table in tables:
            columns, rewritten = hashing(src, table, rewrites)
            counted[table.qualified] = _store(ledger, table, changes.row_hashes(tgt, table, set(rewritten), columns))
        owned = {s.table: s.sequence for s in postgres.sequence_states(tgt, sorted({t.schema for t in tables}))}
        for table in tables:
            if table.qualified in owned:
                sequence = owned[table.qualified]
                moved[sequence] = tgt.execute(
                    sql.SQL("SELECT setval(%s::regclass, (SELECT last_value FROM {}) + %s)").format(
                        sql.Identifier(*sequence.split(".", 1))), (sequence, SEQUENCE_GAP)).fetchone()[0]
    return {"tables": counted, "sequences moved ahead": moved}


def _store(ledger: Ledger, table: Table, hashes: dict[tuple, str]) -> int:
    """The table's baseline replaced whole, in one ledger transaction (never a part of it)."""
    return ledger.replace_items(BASELINE, table.qualified,
                                ((json.dumps(list(k)), "baseline", None, h) for k, h in hashes.items()))


def baseline(ledger: Ledger, table: Table) -> dict[tuple, str]:
    """The table's rows (hashes by key) when both sides last agreed: after the final sync, or the last
    catch-up's read of the source."""
    return {tuple(json.loads(key)): h for key, _, _, h in ledger.items(BASELINE, table.qualified)}


@dataclass
class CatchUpReport(GateReport):
    """What the catch-up carried (per table and bucket, counts and keys) and the gates it ran after."""

    since: float | None = None  # the final sync's snapshot: writes after it are the catch-up's
    until: float = 0.0  # when it read the source: every write acknowledged before is carried
    tables: list[dict] = field(default_factory=list)
    buckets: list[dict] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)  # what the gates after it found

    @property
    def ok(self) -> bool:
        return not self.differences

    def failures(self) -> list[str]:
        return list(self.differences)

    def summary(self) -> str:
        rows = sum(t["inserts"] + t["updates"] + t["deletes"] for t in self.tables)
        objects = sum(b["objects"] + b.get("deleted", 0) for b in self.buckets)
        head = (f"carried {rows} row change(s) in {len(self.tables)} table(s) and {objects} object(s), "
                f"{len(self.conflicts)} conflict(s)")
        return (f"passed: {head}" if self.ok else f"{head}; " + "; ".join(self.differences[:3]))

    def rows(self) -> list[dict]:
        return ([{"what": f"table {t['table']}", "inserts": t["inserts"], "updates": t["updates"],
                  "deletes": t["deletes"], "keys": t["keys"]} for t in self.tables]
                + [{"what": f"bucket {b['bucket']}", "inserts": b["objects"], "updates": "",
                    "deletes": b.get("deleted", 0), "keys": b["keys"]} for b in self.buckets])


def publish_catch_up(report: CatchUpReport, rb: Runbook) -> None:
    """What the catch-up carried from the source after the switch, and its gates' verdict."""
    rows = report.rows()
    publish_table("cutover-catch-up", rows, "Catch-up after the switch: what the freeze could not stop, carried")
    md = [f"# Catch-up after the switch: {'passed' if report.ok else 'FAILED'}",
          f"Every write the source acknowledged before {_when(report.until)} by what the freeze could not stop "
          f"(since the final sync's snapshot at {_when(report.since)}) is on the target.", "",
          markdown_table(rows) if rows else "Nothing to carry: no unfrozen table or bucket changed."]
    if report.conflicts:
        md += ["", "## Changed on both sides (the target's row kept)", *[f"- {c}" for c in report.conflicts[:50]]]
    if report.differences:
        md += ["", "## What the gates found", *[f"- {d}" for d in report.differences]]
    publish_markdown("cutover-catch-up", "\n".join(md))


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at)) if at else "(unknown)"


@task(name="catch up what the freeze could not stop", cache_policy=NO_CACHE)
@recorded("cutover.catch-up", gate="catch-up", publish=publish_catch_up)
def catch_up(rb: Runbook) -> CatchUpReport:
    ledger = Ledger(rb.state_dir)
    exported = ledger.exported()
    since = exported[0].snapshot_at if exported else None
    if rb.cutover.final_sync == "replicate":  # the target followed the source until replication was dropped
        stopped = [e.at for e in ledger.events("replication") if e.what == "replication.stopped"]
        since = stopped[-1] if stopped else since
    report = CatchUpReport(since=since, until=time.time())
    with postgres.session(rb.source, "source", autocommit=False) as src, \
            postgres.session(rb.target.direct, "target.direct") as tgt:
        # One snapshot of the source for every read (hashes, rows, sequences): a sign-up and the profile its
        # trigger wrote are carried together or not at all, and everything committed before ``until`` is in.
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        src.read_only = True
        tables, splits, read, base, how = unfrozen_tables(rb, src), {}, {}, {}, {}
        rewrites = rewritten_url_columns(rb)
        for table in tables:
            columns, rewritten = hashing(src, table, rewrites)
            how[table.qualified] = changes.Carry(columns, rewritten=rewritten, to_target=True)
            base[table.qualified] = baseline(ledger, table)
            read[table.qualified] = changes.row_hashes(src, table, set(rewritten), columns)
            split = changes.three_way(table, base[table.qualified], read[table.qualified],
                                      changes.row_hashes(tgt, table, set(rewritten), columns))
            splits[table.qualified] = split
            report.conflicts += [f"{table.qualified} key {changes.key_label(k)}: changed on both sides since the "
                                 "last catch-up; the target's row kept" for k in split.both]
        # all tables at once: foreign-key order across them (auth.users before the profiles that point at it)
        applied = changes.apply_changes(tgt, src, tables, {name: split.source for name, split in splits.items()}, how)
        failed = applied.failed
        if applied.conflicts:
            report.differences.append(f"{len(applied.conflicts)} row change(s) of the source not carried (they stay on "
                                      f"the source; the next catch-up tries them again): "
                                      + "; ".join(applied.conflicts[:3]))
        for table in tables:
            name, split = table.qualified, splits[table.qualified]
            report.tables.append({"table": name, "inserts": len(split.source.inserts),
                                  "updates": len(split.source.updates), "deletes": len(split.source.deletes),
                                  "carried": applied.carried.get(name, 0), "keys": changes.sample(split.source)})
            # The gate over the whole table: no row the source changed since the baseline is left as the
            # baseline on the target, unless named above (the apps' own writes, during this step too, are
            # theirs). The baseline is the target's own copy, so a row the final sync missed shows as one the
            # source has and the baseline lacks: carried, then proven here.
            after = changes.row_hashes(tgt, table, set(how[name].rewritten), how[name].columns)
            old, now_source = base[name], read[name]
            missed = [k for k in old.keys() | now_source.keys() if old.get(k) != now_source.get(k)
                      and after.get(k) == old.get(k) and k not in failed.get(name, set())]
            if missed:
                report.differences.append(f"table {name}: {len(missed)} row(s) the source changed are not on the "
                                          f"target, first key {changes.key_label(sorted(missed, key=str)[0])}")
            # the next baseline: the source as read, but where a carry failed, what was agreed before
            agreed = dict(now_source)
            for k in failed.get(name, set()) | set(missed):
                if k in old:
                    agreed[k] = old[k]
                else:
                    agreed.pop(k, None)
            _store(ledger, table, agreed)
    report.differences += _definitions_and_access(rb)
    if rb.storage.configured:
        report.buckets, differences, clashes = _catch_up_objects(rb)
        report.differences += differences
        report.conflicts += clashes
    log.info("catch-up done", tables=len(report.tables), conflicts=len(report.conflicts), ok=report.ok)
    return report


def replace_baseline(ledger: Ledger, table: Table, hashes: dict[tuple, str]) -> None:
    """The source as the catch-up read it becomes what both sides last agreed on, for this table."""
    ledger.forget_items(BASELINE, kind=table.qualified)
    _store(ledger, table, hashes)


def _definitions_and_access(rb: Runbook) -> list[str]:
    """The database gate's checks of every migrated object's definition and every mapped role's access
    (against the source's grants as before its freeze), and sequences not behind the source's. Table data
    is left out: the apps write to the target now."""
    from liftoff.tasks.database.gate import compare_as_restored, restored_assessment  # the gate imports this module

    with postgres.session(rb.source, "source") as src:
        assessment = restored_assessment(rb, src)
    return compare_as_restored(rb, [], assessment).failures()


def _catch_up_objects(rb: Runbook) -> tuple[list[dict], list[str], list[str]]:
    """Copies the objects new or changed in the source's inventory since the storage phase recorded them,
    unless the apps wrote that key on the target since (theirs is kept, the clash named), then checks every
    other inventory object is on the target (objects only there are the apps' uploads). Returns the per
    bucket rows, what the check found, and the clashes."""
    from liftoff.systems import s3
    from liftoff.tasks.storage.common import PHASE as STORAGE
    from liftoff.tasks.storage.common import item_kind, storage_source, target_bucket, target_client
    from liftoff.tasks.storage.copy import copy_object_batch
    from liftoff.tasks.storage.gate import compare_storage
    from liftoff.tasks.storage.plan import pending, recorded_gone

    ledger, target = Ledger(rb.state_dir), target_client(rb)
    buckets, failed, seen, clashes = [], [], {}, {}
    with postgres.session(rb.source, "source") as conn:
        for b in rb.storage.buckets:
            # What the inventory holds now is what this catch-up answers for; what arrives later, the next one.
            seen[b.name] = {obj.key: obj.updated_at for obj in supabase_storage.inventory(conn, b.name)}
            copied = {k: md5 for k, _, _, md5 in ledger.items(STORAGE, item_kind(b.name), status="copied")}
            objects, clashes[b.name] = [], set()
            gone = recorded_gone(ledger, b.name)  # rows without bytes the storage phase left out (skip)
            for obj in pending(rb, conn, ledger, b.name):
                if obj.key in gone:
                    continue
                there = s3.head(target, target_bucket(rb, b.name), obj.key)
                if there is not None and (obj.key not in copied or there.md5 != copied[obj.key]):
                    clashes[b.name].add(obj.key)
                else:
                    objects.append([obj.key, obj.mimetype, obj.cache_control])
            for start in range(0, len(objects), rb.storage.batch_size):
                failed += copy_object_batch(rb, b.name, objects[start:start + rb.storage.batch_size])["failed"]
            names = [key for key, _, _ in objects]
            # deleted on Supabase since the copy: deleted on the target too, where the apps left it as copied
            deleted = []
            for key in sorted(copied.keys() - seen[b.name].keys()):
                there = s3.head(target, target_bucket(rb, b.name), key)
                if there is not None and there.md5 != copied[key]:
                    clashes[b.name].add(key)
                    continue
                if there is not None:
                    s3.call(s3.RetryPolicy(), "delete", lambda key=key: target.delete_object(
                        Bucket=target_bucket(rb, b.name), Key=key), target, target_bucket(rb, b.name), key)
                deleted.append(key)
            ledger.set_items(STORAGE, item_kind(b.name), [(key, "deleted", None, None) for key in deleted])
            buckets.append({"bucket": b.name, "objects": len(names), "deleted": len(deleted),
                            "keys": ", ".join(names[:SHOWN_KEYS]) + (f" (+{len(names) - SHOWN_KEYS})"
                                                                     if len(names) > SHOWN_KEYS else "")})
        with storage_source(rb) as src:
            report = compare_storage(
                conn, target, [(b.name, target_bucket(rb, b.name), b.public) for b in rb.storage.buckets],
                lambda bucket: ((k, md5) for k, _, _, md5 in ledger.items(STORAGE, item_kind(bucket),
                                                                          status="copied")),
                endpoint_url=rb.storage.target.endpoint_url, concurrency=rb.storage.concurrency, extra_allowed=True,
                include=lambda bucket, obj: (obj.key not in clashes[bucket] and obj.key in seen[bucket]
                                             and seen[bucket][obj.key] == obj.updated_at),
                probe_source=src.probe, skip_gone=rb.storage.missing_source_bytes == "skip")
    for check, row in zip(report.buckets, buckets):
        row["uploaded on the target"] = check.target_only_count
    named = [f"object {bucket}/{key}: changed on Supabase and written by the apps on the target since; the "
             "target's kept" for bucket, keys in clashes.items() for key in sorted(keys)]
    return (buckets, [f"objects that failed to copy: {'; '.join(failed[:3])}"] * bool(failed) + report.failures(),
            named)


def switched_and_kept(rb: Runbook) -> bool:
    """A cutover switched the apps and completed, and no rollback followed."""
    if not (rb.state_dir / "ledger.sqlite").exists():
        return False
    events = since_last_rollback(Ledger(rb.state_dir))
    return any(e.what == SWITCHED for e in events) and any(e.what == COMPLETED for e in events)


def frozen_at_datetime(at: float | None) -> datetime | None:
    return datetime.fromtimestamp(at, tz=timezone.utc) if at is not None else None
