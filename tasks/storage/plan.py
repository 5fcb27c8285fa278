"""Runbook step 5a, its task: what the storage phase would copy, read from the source's own inventory.

``storage.objects`` in the source database is the inventory; the source's S3 listing is reconciled with it
(a row with no bytes, bytes with no row, a size that differs) and the result is part of the plan, never
skipped. What the ledger records as copied, unchanged since, is not copied again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.ledger import Ledger
from runbooks.model import Runbook
from tasks import postgres, supabase_storage
from tasks.storage.common import item_kind, require_storage, storage_source, target_bucket


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

    @property
    def row(self) -> dict:
        return {"bucket": self.name, "target bucket": self.target, "public": self.public,
                "objects": self.objects, "bytes": self.bytes, "to copy": self.to_copy,
                "bytes to copy": self.to_copy_bytes,
                "size limit": self.file_size_limit or "", "mime types": ", ".join(self.allowed_mime_types or []),
                "reconciliation": "; ".join(self.reconciliation) or "rows and bytes agree"}


@dataclass
class StoragePlan:
    buckets: list[BucketPlan]
    not_in_runbook: list[str]  # source buckets the runbook does not move
    missing_on_source: list[str]  # runbook buckets the source does not have
    policies: list[dict]  # storage.objects policies, and what replaces each on the target

    @property
    def problems(self) -> list[str]:
        lines = [f"bucket {b} is in the runbook's storage.buckets but not among the source's buckets; check the name"
                 for b in self.missing_on_source]
        for b in self.buckets:
            if b.source_public is not None and b.source_public != b.public:
                lines.append(f"bucket {b.name} is {'public' if b.source_public else 'private'} on Supabase but "
                             f"storage.buckets says public: {str(b.public).lower()}; say which on purpose")
        return lines


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
    require_storage(rb)
    ledger = Ledger(rb.state_dir) if (rb.state_dir / "ledger.sqlite").exists() else None
    with storage_source(rb) as src, postgres.session(rb.source, "source") as conn:
        on_source = {b.name: b for b in supabase_storage.read_buckets(conn)}
        plans = []
        for b in rb.storage.buckets:
            sb = on_source.get(b.name)
            plan = BucketPlan(b.name, target_bucket(rb, b.name), b.public, sb.public if sb else None,
                              sb.file_size_limit if sb else None, sb.allowed_mime_types if sb else None)
            if sb is not None:
                for obj in supabase_storage.inventory(conn, b.name):
                    plan.objects += 1
                    plan.bytes += obj.size or 0
                todo = pending(rb, conn, ledger, b.name) if ledger else supabase_storage.inventory(conn, b.name)
                for obj in todo:
                    plan.to_copy += 1
                    plan.to_copy_bytes += obj.size or 0
                # In byte order of the key, which the merge with the inventory needs. The REST API lists
                # the rows themselves: there each listed object's bytes are proven by a download's headers.
                listed = src.list(b.name)
                if not src.listing_proves_bytes:
                    listed = supabase_storage.check_bytes(src, listed, concurrency=rb.storage.concurrency)
                rec = supabase_storage.reconcile(supabase_storage.inventory(conn, b.name), listed, bucket=b.name)
                plan.reconciliation = rec.failures()
            plans.append(plan)
        policies = [{"policy": p.name, "bucket": p.bucket, "command": p.command, "roles": ", ".join(p.roles),
                     "expression": p.expression, "on the target": p.replacement}
                    for p in supabase_storage.storage_policies(conn)]
    named = {b.name for b in rb.storage.buckets}
    return StoragePlan(plans, sorted(set(on_source) - named), sorted(named - set(on_source)), policies)
