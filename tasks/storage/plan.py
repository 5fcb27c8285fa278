"""The storage plan (the runbook's `storage` section), its task: what the storage phase would copy, read from the
source's own inventory.

``storage.objects`` in the source database is the inventory; the source's listing is reconciled with it
(a row with no bytes, bytes with no row, a size that differs) and the result is part of the plan, never
skipped. Neither of Supabase Storage's listings proves bytes (both are read from the rows), so every object
not yet copied has its first byte read (``check_bytes``): a row whose bytes are gone is found here, before
anything is copied, and named with its size; ``storage.missing_source_bytes`` decides (``require_source_bytes``).
What the ledger records as copied, unchanged since, is not copied again, nor read by the plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import PreflightFailed, RunbookInvalid, StepFailed
from liftoff.ledger import Ledger
from liftoff.runbooks.model import Runbook
from liftoff.systems import postgres, supabase_storage
from liftoff.tasks.storage.common import PHASE, item_kind, require_storage, storage_source, target_bucket

NAMED_IN_ERRORS = 5  # rows without bytes named in the one-line error (the plan's artifact lists them all)


@dataclass(frozen=True)
class GoneBytes:
    """A ``storage.objects`` row whose bytes are gone on the source: ``size`` is the row's claim."""

    key: str
    size: int | None
    why: str

    def line(self, bucket: str) -> str:
        return f"{bucket}/{self.key} ({self.size if self.size is not None else 'unknown'} bytes; {self.why})"


@dataclass
class BucketPlan:
    name: str
    target: str
    public: bool
    source_public: bool | None
    file_size_limit: int | None
    allowed_mime_types: list[str] | None
    objects: int = 0
    bytes: int = 0
    to_copy: int = 0
    to_copy_bytes: int = 0
    reconciliation: list[str] = field(default_factory=list)  # what the source's listing and rows disagree on
    gone: list[GoneBytes] = field(default_factory=list)  # rows whose bytes are gone: never copied

    @property
    def gone_keys(self) -> set[str]:
        return {g.key for g in self.gone}

    @property
    def row(self) -> dict:
        return {"bucket": self.name, "target bucket": self.target, "public": self.public,
                "objects": self.objects, "bytes": self.bytes, "to copy": self.to_copy,
                "bytes to copy": self.to_copy_bytes, "no bytes on the source": len(self.gone),
                "size limit": self.file_size_limit or "", "mime types": ", ".join(self.allowed_mime_types or []),
                "reconciliation": "; ".join(self.reconciliation) or "rows and bytes agree"}


@dataclass
class StoragePlan:
    buckets: list[BucketPlan]
    not_in_runbook: list[str]  # source buckets the runbook does not move
    policies: list[dict]  # storage.objects policies, and what replaces each on the target
    decision: str = "fail"  # storage.missing_source_bytes

    @property
    def gone(self) -> list[tuple[str, GoneBytes]]:
        return [(b.name, g) for b in self.buckets for g in b.gone]

    @property
    def problems(self) -> list[str]:
        lines = []
        for b in self.buckets:
            if b.source_public is not None and b.source_public != b.public:
                lines.append(f"bucket {b.name} is {'public' if b.source_public else 'private'} on Supabase but "
                             f"storage.buckets says public: {str(b.public).lower()}; say which on purpose")
        return lines


def gone_kind(bucket: str) -> str:
    """Ledger items of one bucket's rows whose bytes are gone (status ``no-bytes``, size = the row's), as the
    last plan found them: what the gate and the URL rewrite leave out under ``missing_source_bytes: skip``."""
    return f"no-bytes:{bucket}"


def recorded_gone(ledger: Ledger, bucket: str) -> set[str]:
    return {key for key, *_ in ledger.items(PHASE, gone_kind(bucket))}


def not_migrated(rb: Runbook) -> int:
    """How many rows the last storage plan found without bytes (and, under skip, left out)."""
    if not rb.storage.buckets or not (rb.state_dir / "ledger.sqlite").exists():
        return 0
    ledger = Ledger(rb.state_dir)
    return sum(len(recorded_gone(ledger, b.name)) for b in rb.storage.buckets)


def require_source_bytes(rb: Runbook, plan: StoragePlan) -> None:
    """Stops the phase, before anything is written, when rows have no bytes and the runbook has not said
    to skip them: one line naming the first few (the plan's artifact lists all) and how to decide."""
    gone = plan.gone
    if not gone or rb.storage.missing_source_bytes == "skip":
        return
    named = "; ".join(g.line(bucket) for bucket, g in gone[:NAMED_IN_ERRORS])
    more = f"; and {len(gone) - NAMED_IN_ERRORS} more (the storage plan lists all)" if len(gone) > NAMED_IN_ERRORS else ""
    raise PreflightFailed(
        f"storage plan: {len(gone)} storage.objects rows have no bytes on the source: {named}{more}. Nothing was "
        f"written. Put their files back on Supabase, or set storage.missing_source_bytes: skip in {rb.name}'s "
        "runbook to move the rest without them (listed by the gate and the URL rewrite)")


def record_gone(rb: Runbook, plan: StoragePlan) -> None:
    """Keeps the plan's rows without bytes in the ledger, per bucket, replacing the last plan's."""
    ledger = Ledger(rb.state_dir)
    for b in plan.buckets:
        ledger.replace_items(PHASE, gone_kind(b.name), ((g.key, "no-bytes", g.size, None) for g in b.gone))


def pending(rb: Runbook, conn, ledger: Ledger, bucket: str) -> Iterator[supabase_storage.SourceObject]:
    """The bucket's objects not yet copied, or changed on the source since they were: the inventory (by
    name) merged with the ledger's items (by key), both streamed in byte order."""
    done = ledger.items("storage", item_kind(bucket), status="copied")
    current = next(done, None)
    for obj in supabase_storage.inventory(conn, bucket):
        while current is not None and current[0].encode() < obj.key.encode():
            current = next(done, None)
        if current is not None and current[0] == obj.key and _unchanged(obj, current):
            continue
        yield obj


def _unchanged(obj: supabase_storage.SourceObject, item: tuple) -> bool:
    _, _, size, md5 = item
    return size == obj.size and (obj.md5 is None or obj.md5 == md5)


@task(name="plan storage", cache_policy=NO_CACHE)
def plan_storage(rb: Runbook) -> StoragePlan:
    """Reads only. Refuses (RunbookInvalid) a bucket of ``storage.buckets`` the source does not have, before
    anything is read of the objects or written anywhere."""
    require_storage(rb)
    ledger = Ledger(rb.state_dir) if (rb.state_dir / "ledger.sqlite").exists() else None
    with storage_source(rb) as src, postgres.session(rb.source, "source") as conn:
        on_source = {b.name: b for b in supabase_storage.read_buckets(conn)}
        unknown = [b.name for b in rb.storage.buckets if b.name not in on_source]
        if unknown:
            raise RunbookInvalid(
                f"runbook {rb.name}: storage.buckets: {', '.join(repr(u) for u in unknown)} "
                f"{'is' if len(unknown) == 1 else 'are'} not among the source's buckets "
                f"({', '.join(on_source) or 'none'}); fix the name. Nothing was written")
        plans = []
        for b in rb.storage.buckets:
            sb = on_source[b.name]
            plan = BucketPlan(b.name, target_bucket(rb, b.name), b.public, sb.public, sb.file_size_limit,
                              sb.allowed_mime_types)
            rec = _reconcile(rb, src, conn, ledger, b.name)
            tally = rec.tally(b.name)  # the merge counted every row of the inventory: no read of its own
            plan.objects, plan.bytes = tally.rows, tally.row_bytes
            plan.reconciliation = rec.failures()
            plan.gone = [GoneBytes(key, size, why) for _, key, size, why in rec.gone]
            gone = plan.gone_keys
            todo = pending(rb, conn, ledger, b.name) if ledger else supabase_storage.inventory(conn, b.name)
            for obj in todo:
                if obj.key not in gone:
                    plan.to_copy += 1
                    plan.to_copy_bytes += obj.size or 0
            plans.append(plan)
        policies = [{"policy": p.name, "bucket": p.bucket, "command": p.command, "roles": ", ".join(p.roles),
                     "expression": p.expression, "on the target": p.replacement}
                    for p in supabase_storage.storage_policies(conn)]
    named = {b.name for b in rb.storage.buckets}
    return StoragePlan(plans, sorted(set(on_source) - named), policies, rb.storage.missing_source_bytes)


def _reconcile(rb: Runbook, src: supabase_storage.StorageSource, conn, ledger: Ledger | None,
               bucket: str) -> supabase_storage.Reconciliation:
    """The inventory merged with the source's listing, each object not yet copied read for its first byte.
    A bucket where every read answered 500 has a failing server, not rows without bytes: that stops here."""
    copied = {key: size for key, _, size, _ in ledger.items(PHASE, item_kind(bucket), status="copied")} if ledger else {}
    probed = 0

    def proven(item: supabase_storage.ListedFile) -> bool:
        nonlocal probed
        if item.key in copied and copied[item.key] == item.size:
            return True
        probed += 1
        return False

    listed = supabase_storage.check_bytes(src, src.list(bucket), concurrency=rb.storage.concurrency, proven=proven)
    rec = supabase_storage.reconcile(supabase_storage.inventory(conn, bucket), listed, bucket=bucket)
    failing = [g for g in rec.gone if "HTTP 500" in g[3]]
    if probed >= 3 and len(failing) == probed:
        raise StepFailed(f"{src.endpoint} bucket '{bucket}': every one of the {probed} objects read answered HTTP "
                         "500: the server is failing, not the files; re-run once it answers", bucket=bucket)
    return rec
