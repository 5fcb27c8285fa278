"""What the storage phase's steps share: the runbook's endpoints as clients, and the target bucket names."""

from __future__ import annotations

from liftoff.errors import RunbookInvalid
from liftoff.logs import get_logger
from liftoff.runbooks.model import Runbook, S3Access
from liftoff.systems import s3, supabase_storage

log = get_logger(phase="storage")
PHASE = "storage"


def require_storage(rb: Runbook) -> None:
    if rb.storage.configured:
        return
    missing = [k for k in ("source", "target") if getattr(rb.storage, k) is None]
    if missing or not rb.storage.buckets:
        what = ", ".join([f"storage.{k}" for k in missing] + ([] if rb.storage.buckets else ["storage.buckets"]))
        raise RunbookInvalid(f"runbook {rb.name}: the storage phase needs {what}; see runbooks/tour-crm.yaml")


def endpoint(access: S3Access, field: str) -> s3.S3Endpoint:
    key_id = access.access_key_id.resolve(f"{field}.access_key_id", sensitive=False)  # errors name it
    return s3.S3Endpoint(access.endpoint_url, access.region, key_id,
                         access.secret_access_key.resolve(f"{field}.secret_access_key"))


def source_client(rb: Runbook):
    """The S3 client of Supabase Storage's S3 endpoint (protocol s3 only)."""
    return s3.client(endpoint(rb.storage.source.s3, "storage.source.s3"), max_pool_connections=pool_size(rb))


def storage_source(rb: Runbook) -> supabase_storage.StorageSource:
    """Supabase Storage through the protocol the runbook chose: its S3 endpoint (listed folder by folder,
    which gives byte order on any S3 server) or its REST API with the service_role key."""
    src = rb.storage.source
    if src.protocol == "rest":
        return supabase_storage.RestSource(src.rest_url or src.project_url,
                                           src.service_key.resolve("storage.source.service_key"),
                                           key_field="storage.source.service_key")
    return supabase_storage.S3Source(source_client(rb), listing="levels")


def target_client(rb: Runbook):
    return s3.client(endpoint(rb.storage.target, "storage.target"), max_pool_connections=pool_size(rb))


def pool_size(rb: Runbook) -> int:
    """Keep-alive connections per client: enough for a batch of small objects (``copy.in_flight``: up to four
    times storage.concurrency, at most 64) and two more."""
    return min(64, rb.storage.concurrency * 4) + 2


def target_bucket(rb: Runbook, bucket: str) -> str:
    return rb.storage.bucket_prefix + bucket


def item_kind(bucket: str) -> str:
    """Ledger items of one bucket: key = object name, checksum = the MD5 the copy computed."""
    return f"object:{bucket}"
