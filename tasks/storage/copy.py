"""The storage copy (the runbook's `storage` section), its tasks: the target's buckets, then every object copied
exactly once.

One Prefect task per batch of ``storage.batch_size`` objects (never one per object), each copying with
``storage.concurrency`` objects in flight on shared clients (``liftoff.systems.s3.copy_batch``) and recording what it
copied in the ledger every few objects, one transaction at a time. A re-run (or a run after a kill) copies
only what the ledger does not record as copied, or what changed on the source since.
"""

from __future__ import annotations

import itertools
import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import StepFailed
from liftoff.ledger import Ledger
from liftoff.reports import Progress
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import postgres, s3
from liftoff.tasks.storage.common import (
    PHASE, item_kind, log, source_client, storage_source, target_bucket, target_client,
)
from liftoff.tasks.storage.plan import StoragePlan, pending, record_gone

LEDGER_EVERY = 50  # objects between two ledger writes: what a kill can make us copy twice
# A batch of only small objects is bound by round trips and per-request work, not bytes: it keeps this many
# times storage.concurrency in flight on the same pooled keep-alive connections (the clients' pools are
# sized for it, common.py).
SMALL_OBJECT = 256 * 2**10
SMALL_IN_FLIGHT = 4


def in_flight(concurrency: int, sizes: list[int | None]) -> int:
    """Objects in flight for a batch of objects of these sizes: ``concurrency``, or ``SMALL_IN_FLIGHT`` times
    it (at most 64) when every one is known to be at most ``SMALL_OBJECT`` bytes."""
    if sizes and all(size is not None and size <= SMALL_OBJECT for size in sizes):
        return min(64, concurrency * SMALL_IN_FLIGHT)
    return concurrency


@task(name="prepare buckets", cache_policy=NO_CACHE)
@recorded("storage.buckets")
def prepare_buckets(rb: Runbook, plan: StoragePlan) -> dict:
    """Creates the runbook's buckets on the target (idempotent); public ones get an anonymous-download
    policy, private ones none."""
    dst = target_client(rb)
    done = {}
    for b in plan.buckets:
        done[b.target] = s3.ensure_bucket(dst, b.target, b.public)
        log.info("bucket ready", bucket=b.target, public=b.public, did=done[b.target])
    return done


def ledger_row(outcome: s3.CopiedObject | s3.ObjectFailure) -> tuple:
    """The ledger item an object's copy leaves: (key, status, size, MD5, what its write said). The last is
    the target's ETag answer, the Content-Type sent and the server's Date of its answer: with them the gate
    proves from a listing that the object is still the one this write stored (``tasks/storage/gate.py``)."""
    if isinstance(outcome, s3.CopiedObject):
        written = ({"etag": outcome.etag, "type": outcome.sent_type, "at": outcome.written_at}
                   if outcome.etag and outcome.written_at is not None else None)
        return outcome.key, "copied", outcome.size, outcome.md5, written
    return outcome.key, "failed", None, None, None


@task(name="copy objects (one batch)", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def copy_object_batch(rb: Runbook, bucket: str, objects: list[list], concurrency: int | None = None) -> dict:
    """``objects``: [key, Content-Type, Cache-Control] as the source's row stores them (either may be None);
    ``concurrency``: objects in flight (``in_flight``; storage.concurrency when None)."""
    ledger = Ledger(rb.state_dir)
    names = [key for key, _, _ in objects]
    # The row's metadata is how Supabase stored each object; the download's headers are not (Storage's REST
    # API serves text/html as text/plain, and its Cache-Control is the backend's).
    stored = {key: {k: v for k, v in (("ContentType", content_type), ("CacheControl", cache_control)) if v}
              for key, content_type, cache_control in objects}
    dst = target_client(rb)
    buffer: list[tuple] = []

    def record(outcome) -> None:
        buffer.append(ledger_row(outcome))
        if len(buffer) >= LEDGER_EVERY:
            ledger.set_items(PHASE, item_kind(bucket), buffer)
            buffer.clear()

    options = {"part_size": rb.storage.part_size_mb * 2**20, "concurrency": concurrency or rb.storage.concurrency,
               "on_done": record}
    try:
        if rb.storage.source.protocol == "rest":  # downloads streamed into single PUTs or sequential parts
            with storage_source(rb) as src:
                def open_source(key: str):
                    stream = src.open(bucket, key)
                    stream.content_type = stored[key].get("ContentType", stream.content_type)
                    stream.cache_control = stored[key].get("CacheControl", stream.cache_control)
                    return stream

                result = s3.copy_batch_from(names, open_source, dst, target_bucket(rb, bucket), **options)
        else:  # S3 to S3: the large objects' parts are read by range, each retried on its own
            result = s3.copy_batch(names, source_client(rb), bucket, dst, target_bucket(rb, bucket),
                                   stored=stored.get, **options)
    finally:
        if buffer:
            ledger.set_items(PHASE, item_kind(bucket), buffer)
    return {"copied": len(result.copied), "bytes": result.bytes,
            "failed": [f"{bucket}/{f.key}: {f.error}" for f in result.failed]}


@task(name="copy objects", cache_policy=NO_CACHE)
@recorded("storage.copy")
def copy_objects(rb: Runbook, plan: StoragePlan) -> dict:
    """Copies every object the ledger does not record as copied, bucket by bucket, in batches, except the
    plan's rows whose bytes are gone (recorded in the ledger for the gate and the URL rewrite; only under
    ``storage.missing_source_bytes: skip`` does a plan with such rows get here). Succeeds when none failed;
    a failed object is named and a re-run copies only the failed and the missing ones."""
    ledger = Ledger(rb.state_dir)
    record_gone(rb, plan)
    total = sum(b.to_copy for b in plan.buckets)
    total_bytes = sum(b.to_copy_bytes for b in plan.buckets)
    progress = Progress("storage: copying objects", total)
    copied = copied_bytes = 0
    failed: list[str] = []
    started = time.monotonic()
    with postgres.session(rb.source, "source") as conn:
        for b in plan.buckets:
            gone = b.gone_keys
            objects = ((obj.key, obj.mimetype, obj.cache_control, obj.size)
                       for obj in pending(rb, conn, ledger, b.name) if obj.key not in gone)
            while batch := list(itertools.islice(objects, rb.storage.batch_size)):
                done = copy_object_batch(rb, b.name, [[key, ctype, cache] for key, ctype, cache, _ in batch],
                                         in_flight(rb.storage.concurrency, [size for *_, size in batch]))
                copied += done["copied"]
                copied_bytes += done["bytes"]
                failed += done["failed"]
                rate = copied_bytes / max(time.monotonic() - started, 1e-6)
                eta = (total_bytes - copied_bytes) / rate if rate else 0
                progress.advance(f"{b.name}: {copied}/{total} objects, {copied_bytes / 2**20:,.1f}/"
                                 f"{total_bytes / 2**20:,.1f} MiB, ETA {eta:,.0f} s", by=len(batch))
    if failed:
        raise StepFailed(f"{len(failed)} objects failed to copy ({'; '.join(failed[:3])}"
                         f"{' ...' if len(failed) > 3 else ''}); re-run: only those and the missing ones are copied")
    return {"copied": copied, "bytes": copied_bytes, "seconds": round(time.monotonic() - started, 2),
            "not_migrated": len(plan.gone)}
