"""Runbook step 6g: the catch-up after the switch. What the freeze cannot stop keeps writing on the source
(Supabase Auth's sign-ups into ``auth.users``, Supabase Storage's uploads, the runbook's
``cutover.unfrozen_tables``); the final sync's gates leave those out (``catch_up_pending``), and once the
apps write to the target nothing new reaches the source through them, so this step carries what those
writers added, changed or deleted since the final sync, then checks again.

Rows: the target's copy of each such table right after the final sync is the baseline both sides shared
(``record_baseline``, kept in the ledger); the source's changes since are the keys where the source now
differs from it, and only those are written to the target (``tasks.changes``, triggers off on the target so
the app's sign-up trigger does not run twice), unless the apps changed the same key on the target too: a
conflict, named, the target's row kept. The source as read becomes the next baseline, so the step can run
again (``liftoff run catch-up``) for writes that keep arriving, e.g. from Supabase Auth when the project
keeps it. Objects: the storage phase's incremental copy (new or changed in ``storage.objects``).

Then the gates again: definitions and access of every migrated object (the source's pre-freeze grants),
every carried row equal on both sides, every object of the source's inventory on the target (objects the
apps uploaded to the target since the switch are counted as theirs).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import StepFailed
from liftoff.ledger import Ledger
from liftoff.steps import recorded
from runbooks.model import Runbook
from tasks import changes, postgres, supabase, supabase_storage
from tasks.cutover.common import COMPLETED, FROZEN, SWITCHED, log, since_last_rollback
from tasks.cutover.freeze import grants_withheld
from tasks.database.common import assess_source, export_done, exported_catalog, read_shim
from tasks.postgres import Table
from tasks.verify import compare_databases

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
    """Which of ``candidates`` a trigger function on a table of Supabase's schemas (or, transitively, on one
    of those found) names in its body."""
    found: set[str] = set()
    watched = {(s, None) for s in SUPABASE_WRITERS}
    while True:
        bodies = [body for schema, table, body in source.execute(
            """SELECT n.nspname, c.relname, p.prosrc FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_proc p ON p.oid = g.tgfoid
               WHERE NOT g.tgisinternal""") if (schema, None) in watched or (schema, table) in watched]
        more = {t.qualified for t in candidates if t.qualified not in found
                and any(re.search(rf"(?<![\w$]){re.escape(t.name)}(?![\w$])", body, re.IGNORECASE) for body in bodies)}
        if not more:
            return found
        found |= more
        watched |= {tuple(name.split(".", 1)) for name in more}


@task(name="record the catch-up's baseline", cache_policy=NO_CACHE)
@recorded("cutover.baseline")
def record_baseline(rb: Runbook) -> dict:
    """The target's rows of the unfrozen tables right after the final sync (what both sides then shared)."""
    ledger = Ledger(rb.state_dir)
    ledger.forget_items(BASELINE)
    counted = {}
    with postgres.session(rb.source, "source") as src, postgres.session(rb.target.direct, "target.direct") as tgt:
        for table in unfrozen_tables(rb, src):
            counted[table.qualified] = _store(ledger, table, changes.row_hashes(tgt, table))
    return {"tables": counted}


def _store(ledger: Ledger, table: Table, hashes: dict[tuple, str]) -> int:
    rows = ((json.dumps(list(k)), "baseline", None, h) for k, h in hashes.items())
    total = 0
    while batch := list(itertools.islice(rows, 10_000)):
        total += ledger.set_items(BASELINE, table.qualified, batch)
    return total


def baseline(ledger: Ledger, table: Table) -> dict[tuple, str]:
    """The table's rows (hashes by key) when both sides last agreed: after the final sync, or the last
    catch-up's read of the source."""
    return {tuple(json.loads(key)): h for key, _, _, h in ledger.items(BASELINE, table.qualified)}


@dataclass
class CatchUpReport:
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
        objects = sum(b["objects"] for b in self.buckets)
        head = (f"carried {rows} row change(s) in {len(self.tables)} table(s) and {objects} object(s), "
                f"{len(self.conflicts)} conflict(s)")
        return (f"passed: {head}" if self.ok else f"{head}; " + "; ".join(self.differences[:3]))

    def rows(self) -> list[dict]:
        return ([{"what": f"table {t['table']}", "inserts": t["inserts"], "updates": t["updates"],
                  "deletes": t["deletes"], "keys": t["keys"]} for t in self.tables]
                + [{"what": f"bucket {b['bucket']}", "inserts": b["objects"], "updates": "", "deletes": "",
                    "keys": b["keys"]} for b in self.buckets])


@task(name="catch up what the freeze could not stop", cache_policy=NO_CACHE)
@recorded("cutover.catch-up", gate="catch-up")
def catch_up(rb: Runbook) -> CatchUpReport:
    ledger = Ledger(rb.state_dir)
    exported = ledger.exported()
    report = CatchUpReport(since=exported[0].snapshot_at if exported else None, until=time.time())
    with postgres.session(rb.source, "source", autocommit=False) as src, \
            postgres.session(rb.target.direct, "target.direct") as tgt:
        # One snapshot of the source for every read (hashes, rows, sequences): a sign-up and the profile its
        # trigger wrote are carried together or not at all, and everything committed before ``until`` is in.
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        src.read_only = True
        tables, splits, read, moved = unfrozen_tables(rb, src), {}, {}, {}
        for table in tables:
            base, read[table.qualified] = baseline(ledger, table), changes.row_hashes(src, table)
            before = changes.row_hashes(tgt, table)
            split = changes.three_way(table, base, read[table.qualified], before)
            splits[table.qualified] = split
            moved[table.qualified] = {k for k in base.keys() | before.keys() if base.get(k) != before.get(k)}
            report.conflicts += [f"{table.qualified} key {changes.key_label(k)}: changed on both sides since the "
                                 "last catch-up; the target's row kept" for k in split.both]
            report.tables.append({"table": table.qualified, "inserts": len(split.source.inserts),
                                  "updates": len(split.source.updates), "deletes": len(split.source.deletes),
                                  "keys": changes.sample(split.source)})
        # all tables at once: foreign-key order across them (auth.users before the profiles that point at it)
        applied = changes.apply_changes(tgt, src, tables, {name: split.source for name, split in splits.items()})
        report.conflicts += applied.conflicts
        for table in tables:
            # The gate over the whole table: every row the apps did not change on the target since the
            # baseline is the source's now (carried, or never changed). The baseline is the target's own copy,
            # so a row the final sync missed shows here as one the source has and the baseline lacks: carried.
            now_source, after = read[table.qualified], changes.row_hashes(tgt, table)
            wrong = [k for k in now_source.keys() | after.keys()
                     if k not in moved[table.qualified] and after.get(k) != now_source.get(k)]
            if wrong:
                report.differences.append(f"table {table.qualified}: {len(wrong)} row(s) differ from the source "
                                          f"on the target, first key {changes.key_label(sorted(wrong, key=str)[0])}")
            replace_baseline(ledger, table, now_source)
    report.differences += _definitions_and_access(rb)
    if rb.storage.buckets and rb.storage.source is not None and rb.storage.target is not None:
        report.buckets, differences = _catch_up_objects(rb)
        report.differences += differences
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
    with postgres.session(rb.source, "source") as src:
        assessment = exported_catalog(rb).assessment if export_done(rb) else assess_source(rb, src)
    report = compare_databases(
        lambda: postgres.connect(rb.source, "source"), lambda: postgres.connect(rb.target.direct, "target.direct"),
        [], rb.database.schemas, left_out=assessment.gate_left_out(), roles=assessment.role_map,
        ignored_extensions=supabase.MANAGED_EXTENSIONS | set(assessment.extensions_unused),
        outside_triggers=[("auth", "users", t.name) for t in assessment.auth_triggers], withheld=grants_withheld(rb))
    return report.failures()


def _catch_up_objects(rb: Runbook) -> tuple[list[dict], list[str]]:
    """Copies the objects new or changed in the source's inventory since the storage phase recorded them,
    then checks every inventory object is on the target (objects only there are the apps' uploads)."""
    from tasks.storage.common import PHASE as STORAGE
    from tasks.storage.common import item_kind, target_bucket, target_client
    from tasks.storage.copy import copy_object_batch
    from tasks.storage.gate import compare_storage
    from tasks.storage.plan import pending

    ledger = Ledger(rb.state_dir)
    buckets, failed, seen = [], [], {}
    with postgres.session(rb.source, "source") as conn:
        for b in rb.storage.buckets:
            # What the inventory holds now is what this catch-up answers for; what arrives later, the next one.
            seen[b.name] = {obj.key: obj.updated_at for obj in supabase_storage.inventory(conn, b.name)}
            names = [obj.key for obj in pending(rb, conn, ledger, b.name)]
            for start in range(0, len(names), rb.storage.batch_size):
                failed += copy_object_batch(rb, b.name, names[start:start + rb.storage.batch_size])["failed"]
            buckets.append({"bucket": b.name, "objects": len(names),
                            "keys": ", ".join(names[:SHOWN_KEYS]) + (f" (+{len(names) - SHOWN_KEYS})"
                                                                     if len(names) > SHOWN_KEYS else "")})
        report = compare_storage(
            conn, target_client(rb), [(b.name, target_bucket(rb, b.name), b.public) for b in rb.storage.buckets],
            lambda bucket: ((k, md5) for k, _, _, md5 in ledger.items(STORAGE, item_kind(bucket), status="copied")),
            endpoint_url=rb.storage.target.endpoint_url, concurrency=rb.storage.concurrency, extra_allowed=True,
            include=lambda bucket, obj: obj.key in seen[bucket] and seen[bucket][obj.key] == obj.updated_at)
    for check, row in zip(report.buckets, buckets):
        row["uploaded on the target"] = check.target_only_count
    return buckets, [f"objects that failed to copy: {'; '.join(failed[:3])}"] * bool(failed) + report.failures()


def switched_and_kept(rb: Runbook) -> bool:
    """A cutover switched the apps and completed, and no rollback followed."""
    if not (rb.state_dir / "ledger.sqlite").exists():
        return False
    events = since_last_rollback(Ledger(rb.state_dir))
    return any(e.what == SWITCHED for e in events) and any(e.what == COMPLETED for e in events)


def frozen_at_datetime(at: float | None) -> datetime | None:
    return datetime.fromtimestamp(at, tz=timezone.utc) if at is not None else None
