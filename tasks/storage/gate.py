"""The storage gate (the runbook's `storage` section): the storage gate. ``compare_storage`` is a plain function of
the two sides returning a report; ``run_storage_gate`` runs it against the runbook's servers and records the
result in the ledger.

Per bucket: object count and total bytes equal on both sides; per object of the source's inventory
(``storage.objects``): present on the target, same size, same MD5 (the target's md5chksum metadata, written
while the bytes streamed, against the source row's eTag when that is an MD5, else the MD5 the copy
computed from the source's bytes), same Content-Type; objects on the target the source does not have are
named; with ``deep`` every target object is read back and hashed. Access: an anonymous GET works in a
public bucket and is refused in a private one, and anonymous listing is refused.

How the target side is read (``compare_bucket``), and what each read proves:

- **The target's listing** (one ListObjectsV2 page per 1,000 objects) gives every object's key, size, ETag and
  LastModified, never its Content-Type (SeaweedFS 4.48 lists no metadata, with or without MinIO's
  ``metadata=true`` extension: checked here; MinIO's extension could not be tried, its server is not on these
  registries). It proves the key is there, its size, and, for a single-PUT object, its MD5 (that ETag is the
  MD5 the server computed of what it stores).
- **The copy's own write, recorded in the ledger** (``tasks/storage/copy.py::ledger_row``): the ETag the target
  answered to our PUT (or multipart completion), the Content-Type we sent, and the server's Date of that answer.
  When the listing shows the same ETag and a LastModified no later than that Date, the object is the one our
  write stored (a later PUT, copy or metadata change gets a later LastModified): its bytes are what the copy
  proved by MD5 (Content-MD5, the ETag or the stream hashed), its Content-Type what we sent, compared with the
  source row's. What this cannot see: a change of metadata alone (same bytes, so same ETag) within the same
  second as our write, and a server that stores another Content-Type than it was sent; the sampled HEADs
  are there for the second.
- **A HEAD** of every object the listing cannot prove so (no record of its write, a different ETag, modified
  since, missing from the listing), of the first ``SAMPLED_HEADS`` objects of each bucket and of a random
  ``SAMPLED_FRACTION`` of the others: the Content-Type the server actually returns, size and MD5 (our
  md5chksum metadata). Without ``deep``, the listing + record replace one HEAD per object; with ``deep``
  every object is HEADed and re-read as before.

An object missing on the target has the source's first byte read: a row whose bytes are gone on the source
too is said to be so ("no bytes on the source"), never blamed on the target; under
``storage.missing_source_bytes: skip`` such rows are listed as not migrated and do not fail the gate.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.checks import GateReport
from liftoff.errors import LiftoffError
from liftoff.ledger import Ledger
from liftoff.reports import Progress, markdown_table, publish_markdown, publish_table
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import postgres, s3, supabase_storage
from liftoff.tasks.storage.common import PHASE, item_kind, require_storage, storage_source, target_bucket, target_client

MAX_NAMED = 5
SAMPLED_HEADS = 100  # of each bucket's objects the listing proves, the first this many are HEADed all the same
SAMPLED_FRACTION = 0.01  # and this share of the others, picked at random


@dataclass
class BucketCheck:
    bucket: str
    target: str
    source_objects: int = 0
    source_bytes: int = 0
    target_objects: int = 0
    target_bytes: int = 0
    problems: list[str] = field(default_factory=list)  # "key: what differs"
    problem_count: int = 0
    access: str = ""
    first_key: str | None = None  # an object that exists, for the anonymous access proof
    # After the switch the apps upload to the target: objects the source lacks are theirs, counted, not wrong.
    extra_allowed: bool = False
    target_only: list[str] = field(default_factory=list)  # the first few of them
    target_only_count: int = 0
    target_only_bytes: int = 0
    # Rows whose bytes are gone on the source, left out (missing_source_bytes: skip): every one, as
    # "key (N bytes; why)", and their rows' bytes
    not_migrated: list[str] = field(default_factory=list)
    not_migrated_bytes: int = 0
    # How each object was proven: by the listing and the record of the copy's write, or by a HEAD
    by_listing: int = 0
    by_head: int = 0

    @property
    def expected(self) -> tuple[int, int]:
        """Objects and bytes the target should hold of the source's."""
        return self.source_objects - len(self.not_migrated), self.source_bytes - self.not_migrated_bytes

    @property
    def counts_match(self) -> bool:
        """The target holds, of the source's, the objects and bytes it should (its apps' own aside)."""
        return self.expected == (self.target_objects - self.target_only_count,
                                 self.target_bytes - self.target_only_bytes)

    @property
    def ok(self) -> bool:
        return not self.problem_count and not self.access and self.counts_match

    def notes(self) -> list[str]:
        """What passes but an operator must know: the rows not migrated."""
        if not self.not_migrated:
            return []
        return [f"bucket {self.bucket}: {len(self.not_migrated)} objects have no bytes on the source, not migrated: "
                + "; ".join(self.not_migrated)]

    def summary(self) -> list[str]:
        lines = []
        if not self.counts_match:
            gone = (f", {len(self.not_migrated)} of them with no bytes on the source" if self.not_migrated else "")
            lines.append(f"bucket {self.bucket}: target {self.target} holds {self.target_objects} objects "
                         f"({self.target_bytes:,} bytes), the source {self.source_objects} ({self.source_bytes:,}"
                         f"{gone})")
        if self.problem_count:
            more = f" and {self.problem_count - len(self.problems)} more" if self.problem_count > len(self.problems) else ""
            lines.append(f"bucket {self.bucket}: " + "; ".join(self.problems) + more)
        if self.access:
            lines.append(f"bucket {self.target}: {self.access}")
        return lines


@dataclass
class StorageReport(GateReport):
    buckets: list[BucketCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.buckets)

    def failures(self) -> list[str]:
        return [line for b in self.buckets for line in b.summary()]

    def notes(self) -> list[str]:
        return [line for b in self.buckets for line in b.notes()]

    @property
    def not_migrated(self) -> int:
        return sum(len(b.not_migrated) for b in self.buckets)

    def summary(self) -> str:
        if self.ok:
            gone = (f"; {self.not_migrated} objects with no bytes on the source not migrated"
                    if self.not_migrated else "")
            return (f"passed: {len(self.buckets)} buckets, {sum(b.target_objects for b in self.buckets)} objects, "
                    f"{sum(b.target_bytes for b in self.buckets):,} bytes, sizes and MD5s equal{gone}")
        failures = self.failures()
        return "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")

    def rows(self) -> list[dict]:
        return [{"bucket": b.bucket, "target bucket": b.target, "source objects": b.source_objects,
                 "target objects": b.target_objects, "source bytes": b.source_bytes, "target bytes": b.target_bytes,
                 "differences": b.problem_count, "no bytes on the source, not migrated": len(b.not_migrated),
                 "proven by listing + copy record": b.by_listing, "proven by HEAD": b.by_head,
                 "access": b.access or "as the runbook says",
                 "status": "match" if b.ok else "DIFFERS"} for b in self.buckets]


def compare_storage(conn, target, buckets: list[tuple[str, str, bool]],
                    copied_md5: Callable[[str], Iterator[tuple[str, str]]], *, endpoint_url: str,
                    deep: bool = False, concurrency: int = 8,
                    on_bucket_done: Callable[[BucketCheck], None] | None = None,
                    include: Callable[[str, Any], bool] | None = None, extra_allowed: bool = False,
                    tolerate: Callable[[str], set[str]] | None = None,
                    probe_source: Callable[[str, str, int | None], Any] | None = None,
                    skip_gone: bool = False, sampled_heads: int = SAMPLED_HEADS,
                    sampled_fraction: float = SAMPLED_FRACTION) -> StorageReport:
    """Compares each (source bucket, target bucket, public) of the inventory in ``conn`` with the target S3
    server (``target``, a boto3 client; ``endpoint_url`` for the anonymous access proof). ``copied_md5(bucket)``
    streams (key, MD5 the copy computed) in key order: the reference where the source's eTag is no MD5.
    Reads only; holds at most ``2 * concurrency`` objects at a time, whatever the bucket's size.
    ``include(bucket, object)``: only the inventory objects it accepts are compared, the others may be on
    the target or not (a cutover's final sync: uploads after the freeze are the catch-up's; the catch-up:
    uploads after it read the inventory); ``tolerate(bucket)``: keys that may be on the target only (deleted
    on the source after the freeze: the catch-up's); ``extra_allowed``: objects only on the target are counted
    as the apps' uploads, not failed (after the switch). ``probe_source(bucket, key, size)``: reads the
    source's first byte of an object missing on the target (``StorageSource.probe``): when the source has
    none either, that is said, and with ``skip_gone`` the object is listed as not migrated, not failed."""
    report = StorageReport()
    for bucket, tbucket, public in buckets:
        # not compared: the copy may have carried them already, or not (and ``tolerate``'s: deleted since)
        late: set[str] = set(tolerate(bucket)) if tolerate is not None else set()

        def inventory(bucket=bucket, late=late):
            for obj in supabase_storage.inventory(conn, bucket):
                if include is not None and not include(bucket, obj):
                    late.add(obj.key)
                else:
                    yield obj

        probe = None if probe_source is None else (lambda key, size, bucket=bucket: probe_source(bucket, key, size))
        check = compare_bucket(target, bucket, tbucket, inventory, copied_md5(bucket), deep=deep,
                               concurrency=concurrency, extra_allowed=extra_allowed, tolerated=late,
                               probe_source=probe, skip_gone=skip_gone, sampled_heads=sampled_heads,
                               sampled_fraction=sampled_fraction)
        if check.first_key is not None:
            proof = s3.prove_bucket_access(endpoint_url, tbucket, check.first_key, public)
            check.access = "; ".join(proof.problems)
        report.buckets.append(check)
        if on_bucket_done:
            on_bucket_done(check)
    return report


def compare_bucket(target, bucket: str, tbucket: str, inventory: Callable[[], Iterator[Any]],
                   copied_md5: Iterator[tuple[str, str]], *, deep: bool = False,
                   concurrency: int = 8, extra_allowed: bool = False,
                   tolerated: set[str] = frozenset(),
                   probe_source: Callable[[str, int | None], Any] | None = None,
                   skip_gone: bool = False, sampled_heads: int = SAMPLED_HEADS,
                   sampled_fraction: float = SAMPLED_FRACTION) -> BucketCheck:
    """One bucket's objects: ``inventory()`` streams the source's objects in byte order of the key (each with
    ``key``, ``size``, ``md5``, ``mimetype``, as ``supabase_storage.SourceObject``; called twice), ``copied_md5``
    (key, MD5 the copy computed[, what its write said: ``{"etag", "type", "at"}`` or None]) in the same order.

    Without ``deep``: the target's listing merged with the inventory and the records of the copy's writes,
    a HEAD only where they prove nothing and for a sample (``_compare_by_listing``; the module's docstring
    says what each proves). With ``deep``: per object, one HEAD of the target and a full read.
    ``tolerated``, ``probe_source`` and ``skip_gone``: as ``compare_storage``'s."""
    if not deep:
        return _compare_by_listing(target, bucket, tbucket, inventory, copied_md5, concurrency=concurrency,
                                   extra_allowed=extra_allowed, tolerated=tolerated, probe_source=probe_source,
                                   skip_gone=skip_gone, sampled_heads=sampled_heads,
                                   sampled_fraction=sampled_fraction)
    return _compare_by_head(target, bucket, tbucket, inventory, copied_md5, deep=deep, concurrency=concurrency,
                            extra_allowed=extra_allowed, tolerated=tolerated, probe_source=probe_source,
                            skip_gone=skip_gone)


def _compare_by_head(target, bucket: str, tbucket: str, inventory: Callable[[], Iterator[Any]],
                     copied_md5: Iterator[tuple], *, deep: bool = False,
                     concurrency: int = 8, extra_allowed: bool = False,
                     tolerated: set[str] = frozenset(),
                     probe_source: Callable[[str, int | None], Any] | None = None,
                     skip_gone: bool = False) -> BucketCheck:
    """Per object, one HEAD of the target, ``concurrency`` in flight: it is the one read that gives the
    Content-Type (a listing does not), and it gives the size and the MD5 (our md5chksum metadata, else a
    plain-MD5 ETag) too. Each HEAD is a plain signed request (``liftoff.systems.s3.head``), not a boto3 call: the CPU
    per object, not the server, bounds a verification of many small objects. Then the target is listed to
    count objects and bytes; what the source lacks is looked for, and named, only when the counts say there
    is some. ``tolerated``: keys only on the target that are not wrong there (filled while ``inventory`` is
    read: objects the source wrote after a cutover's freeze, which the final sync's copy may have carried).
    ``probe_source(key, size)`` and ``skip_gone``: as ``compare_storage``'s."""
    check = BucketCheck(bucket, tbucket, extra_allowed=extra_allowed)
    missing: list[str] = []  # appended to from the pool's threads; only whether it is empty is read
    one = _head_check(target, tbucket, deep=deep, probe_source=probe_source, skip_gone=skip_gone, missing=missing)

    def counted():
        for obj, copied, _ in _with_copied_md5(inventory(), copied_md5):
            check.source_objects += 1
            check.source_bytes += obj.size or 0
            if check.first_key is None:
                check.first_key = obj.key
            yield obj, copied

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="storage-gate") as pool:
        for problems, gone in _windowed(pool, one, counted(), 2 * concurrency):
            check.by_head += 1
            _settle(check, problems, gone)
    _count_target(target, tbucket, lambda: (o.key for o in inventory()), check, all_found=not missing,
                  tolerated=tolerated)
    return check


def _settle(check: BucketCheck, problems: list[str], gone: tuple[str, int] | None) -> None:
    if gone is not None:
        check.not_migrated.append(gone[0])
        check.not_migrated_bytes += gone[1]
    for p in problems:
        check.problem_count += 1
        if len(check.problems) < MAX_NAMED:
            check.problems.append(p)


def _head_check(target, tbucket: str, *, deep: bool, probe_source, skip_gone: bool, missing: list[str]):
    """The check of one object by a HEAD of the target (and with ``deep`` a full read): a function of
    (source object, MD5 its copy computed) returning (what differs, (the line, the row's bytes) of an object
    not migrated for want of source bytes). Thread-safe: run ``concurrency`` at a time."""
    def one(obj, copied: str | None) -> tuple[list[str], tuple[str, int] | None]:
        info = s3.head(target, tbucket, obj.key)
        if info is None:
            why = _source_gone(probe_source, obj)
            if why is not None and skip_gone:
                size = obj.size if obj.size is not None else "unknown"
                return [], (f"{obj.key} ({size} bytes; {why})", obj.size or 0)
            missing.append(obj.key)
            if why is not None:
                return [f"{obj.key}: missing on target, and no bytes on the source either ({why}): a row whose "
                        "file is gone; decide with storage.missing_source_bytes"], None
            return [f"{obj.key}: missing on target"], None
        problems = []
        if obj.size is not None and info.size != obj.size:
            problems.append(f"{obj.key}: size differs (source {obj.size}, target {info.size})")
        want = obj.md5 or copied
        got = s3.deep_md5(target, tbucket, obj.key) if deep else info.md5
        if want and got != want:
            problems.append(f"{obj.key}: MD5 differs (source {want}, target {got})")
        if obj.mimetype and info.content_type != obj.mimetype:
            problems.append(f"{obj.key}: Content-Type differs (source {obj.mimetype}, target {info.content_type})")
        return problems, None

    return one


def _compare_by_listing(target, bucket: str, tbucket: str, inventory: Callable[[], Iterator[Any]],
                        copied_md5: Iterator[tuple], *, concurrency: int, extra_allowed: bool,
                        tolerated: set[str], probe_source, skip_gone: bool, sampled_heads: int,
                        sampled_fraction: float) -> BucketCheck:
    """The inventory, the records of the copy's writes and the target's listing (put in byte order of the
    key) merged in one pass. An object the listing shows unchanged since our write (``_proof_from_listing``)
    is compared there, without a request; every other one, and the sample, gets ``_head_check``'s HEAD,
    ``concurrency`` in flight. The listing also gives the target's counts and what only the target holds."""
    check = BucketCheck(bucket, tbucket, extra_allowed=extra_allowed)
    one = _head_check(target, tbucket, deep=False, probe_source=probe_source, skip_gone=skip_gone, missing=[])
    pick = random.Random()
    sampled = 0

    with _listing_in_key_order(target, tbucket) as (listed, count, size):
        check.target_objects, check.target_bytes = count, size
        current = next(listed, None)

        def only_on_target(entry: s3.ListedObject) -> None:
            if check.extra_allowed or entry.key in tolerated:
                check.target_only_count += 1
                check.target_only_bytes += entry.size
                if len(check.target_only) < MAX_NAMED:
                    check.target_only.append(entry.key)
            else:
                _settle(check, [f"{entry.key}: on the target only, not in the source's storage.objects"], None)

        def to_head():
            nonlocal current, sampled
            for obj, copied, written in _with_copied_md5(inventory(), copied_md5):
                check.source_objects += 1
                check.source_bytes += obj.size or 0
                if check.first_key is None:
                    check.first_key = obj.key
                key = obj.key.encode()
                while current is not None and current.key.encode() < key:
                    only_on_target(current)
                    current = next(listed, None)
                entry = None
                if current is not None and current.key == obj.key:
                    entry, current = current, next(listed, None)
                problems = _proof_from_listing(obj, copied, written, entry)
                if problems is not None and sampled >= sampled_heads and pick.random() >= sampled_fraction:
                    check.by_listing += 1
                    _settle(check, problems, None)
                    continue
                if problems is not None:
                    sampled += 1
                yield obj, copied
            while current is not None:
                only_on_target(current)
                current = next(listed, None)

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="storage-gate") as pool:
            for problems, gone in _windowed(pool, one, to_head(), 2 * concurrency):
                check.by_head += 1
                _settle(check, problems, gone)
    return check


def _proof_from_listing(obj, copied: str | None, written: dict | None,
                        entry: s3.ListedObject | None) -> list[str] | None:
    """What differs between the source's row and the target's object when the listing proves the object is
    the one the copy's write stored (``written``: the ETag the target answered, the Content-Type sent, the
    server's Date of the answer): the listed ETag is that ETag and its LastModified no later than that
    Date. None when it proves nothing (no record, no such object listed, another ETag, modified since):
    then the object needs a HEAD."""
    if entry is None or not written or not written.get("etag") or written.get("at") is None:
        return None
    if entry.etag != written["etag"] or entry.last_modified is None or entry.last_modified > written["at"]:
        return None
    if obj.mimetype and not written.get("type"):
        return None  # we sent none: the server chose one, which only a HEAD shows
    problems = []
    if obj.size is not None and entry.size != obj.size:
        problems.append(f"{obj.key}: size differs (source {obj.size}, target {entry.size})")
    want = obj.md5 or copied
    got = s3.md5_of(entry.etag, {}) or copied  # a single PUT's ETag is the MD5 the server computed
    if want and got != want:
        problems.append(f"{obj.key}: MD5 differs (source {want}, target {got})")
    if obj.mimetype and written["type"] != obj.mimetype:
        problems.append(f"{obj.key}: Content-Type differs (source {obj.mimetype}, target {written['type']})")
    return problems


@contextlib.contextmanager
def _listing_in_key_order(target, tbucket: str):
    """The target's flat listing, spooled to a temporary SQLite file and read back in byte order of the key
    (SQLite compares TEXT bytewise): any S3 server's order will do (SeaweedFS's is folder by folder), and
    memory stays flat whatever the bucket's size. Yields (entries in key order, object count, total bytes)."""
    with tempfile.TemporaryDirectory(prefix="liftoff-gate-") as tmp:
        db = sqlite3.connect(f"{tmp}/listing.db")
        try:
            db.execute("PRAGMA journal_mode = OFF")
            db.execute("PRAGMA synchronous = OFF")
            db.execute("CREATE TABLE listed (key TEXT PRIMARY KEY, size INTEGER, etag TEXT, at REAL) WITHOUT ROWID")
            count = size = 0
            page: list[tuple] = []
            for item in s3.list_objects(target, tbucket):
                count += 1
                size += item.size
                page.append((item.key, item.size, item.etag, item.last_modified))
                if len(page) >= 1000:
                    db.executemany("INSERT INTO listed VALUES (?, ?, ?, ?)", page)
                    page.clear()
            db.executemany("INSERT INTO listed VALUES (?, ?, ?, ?)", page)
            rows = (s3.ListedObject(*row) for row in db.execute("SELECT key, size, etag, at FROM listed ORDER BY key"))
            yield rows, count, size
        finally:
            db.close()


def _source_gone(probe_source: Callable[[str, int | None], Any] | None, obj) -> str | None:
    """Why the source has no bytes for ``obj`` (its first byte read), or None: it has them, or it could not
    be read (then the object is only missing on the target, which is what the gate can prove)."""
    if probe_source is None:
        return None
    try:
        found = probe_source(obj.key, obj.size)
    except LiftoffError:
        return None
    return found.error


def _with_copied_md5(inventory, copied: Iterator[tuple]):
    """(object, MD5 its copy recorded or None, what its write said or None): the inventory and the ledger
    merged, both in byte order. ``copied`` gives (key, MD5) or (key, MD5, write record)."""
    current = next(copied, None)
    for obj in inventory:
        while current is not None and current[0].encode() < obj.key.encode():
            current = next(copied, None)
        if current is not None and current[0] == obj.key:
            yield obj, current[1], (current[2] if len(current) > 2 else None)
        else:
            yield obj, None, None


def _windowed(pool: ThreadPoolExecutor, fn: Callable, items, window: int):
    """``fn(*item)`` for each item, at most ``window`` in flight, results in order (``pool.map`` would submit
    the whole bucket at once)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _count_target(target, tbucket: str, source_names: Callable[[], Iterator[str]], check: BucketCheck,
                  all_found: bool, tolerated: set[str] = frozenset()) -> None:
    """Counts the target bucket's objects and bytes (one flat listing, in whatever order the server lists).
    When every source object was found on the target (``all_found``) and the counts are equal, the target
    holds nothing else. Otherwise objects the source's inventory lacks are named: both are streamed in byte
    order and merged (the target listed folder by folder, which gives byte order on any S3 server)."""
    for listed in s3.list_objects(target, tbucket):
        check.target_objects += 1
        check.target_bytes += listed.size
    if all_found and check.target_objects == check.expected[0]:
        return
    check.target_objects = check.target_bytes = 0
    names = source_names()
    current = next(names, None)
    for listed in supabase_storage.S3Source(target, listing="levels").list(tbucket):
        check.target_objects += 1
        check.target_bytes += listed.size
        while current is not None and current.encode() < listed.key.encode():
            current = next(names, None)
        if current != listed.key and (check.extra_allowed or listed.key in tolerated):
            check.target_only_count += 1
            check.target_only_bytes += listed.size
            if len(check.target_only) < MAX_NAMED:
                check.target_only.append(listed.key)
        elif current != listed.key:
            check.problem_count += 1
            if len(check.problems) < MAX_NAMED:
                check.problems.append(f"{listed.key}: on the target only, not in the source's storage.objects")


def publish_storage_gate(report: StorageReport, rb: Runbook, deep: bool | None = None) -> None:
    rows = report.rows()
    publish_table("verify-storage-buckets", rows, "Storage gate: objects and bytes per bucket")
    md = [f"# Storage gate {'PASSED' if report.ok else 'FAILED'}", ""]
    if not report.ok:
        md += ["## What differs", *[f"- {line}" for line in report.failures()], ""]
    if report.notes():
        md += ["## No bytes on the source, not migrated (storage.missing_source_bytes: skip)",
               *[f"- {line}" for line in report.notes()], ""]
    md += ["## Buckets", markdown_table(rows)]
    publish_markdown("verify-storage-summary", "\n".join(md))


@task(name="verify storage (gate)", cache_policy=NO_CACHE)
@recorded("verify-storage", gate="storage", publish=publish_storage_gate)
def run_storage_gate(rb: Runbook, deep: bool | None = None) -> StorageReport:
    from liftoff.tasks.cutover.catch_up import catch_up_pending, frozen_at_datetime

    require_storage(rb)
    ledger = Ledger(rb.state_dir)
    frozen_at = frozen_at_datetime(catch_up_pending(rb))

    def copied_md5(bucket: str) -> Iterator[tuple[str, str | None, dict | None]]:
        return ledger.item_details(PHASE, item_kind(bucket), "copied")

    progress = Progress("storage gate: comparing buckets", len(rb.storage.buckets))
    with postgres.session(rb.source, "source") as conn, storage_source(rb) as src:
        return compare_storage(
            conn, target_client(rb), [(b.name, target_bucket(rb, b.name), b.public) for b in rb.storage.buckets],
            copied_md5, endpoint_url=rb.storage.target.endpoint_url,
            deep=rb.storage.deep_verify if deep is None else deep, concurrency=rb.storage.concurrency,
            on_bucket_done=lambda c: progress.advance(f"{c.bucket}: {'match' if c.ok else 'differs'}"),
            # during a cutover's final sync, uploads after the freeze are the catch-up's
            include=None if frozen_at is None else (
                lambda bucket, obj: obj.updated_at is None or obj.updated_at <= frozen_at),
            tolerate=None if frozen_at is None else (
                lambda bucket: {key for key, *_ in ledger.items(PHASE, item_kind(bucket), status="copied")}),
            probe_source=src.probe, skip_gone=rb.storage.missing_source_bytes == "skip",
            sampled_heads=rb.storage.sampled_heads, sampled_fraction=rb.storage.sampled_fraction)
