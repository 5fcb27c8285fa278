"""The storage gate (the runbook's `storage` section): prove the target's buckets hold what Supabase Storage holds."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.reports import publish_markdown
from liftoff.flows.hooks import notify_on_failure
from liftoff.tasks.storage.gate import run_storage_gate


@flow(name="verify-storage", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def verify_storage(options: RunOptions, deep: bool = False) -> dict:
    """Succeeds only when, per bucket, object count and total bytes are equal on both sides, every object of
    the source's inventory (storage.objects) is on the target with the same size, MD5 and Content-Type,
    nothing extra is on the target, and anonymous access is as the runbook says (public buckets readable,
    private ones refused, listing refused); rows whose bytes are gone on the source too are listed as not
    migrated, and pass only under ``storage.missing_source_bytes: skip``. ``deep`` re-reads and hashes every
    target object. Reads only."""
    runbook = open_runbook(options, "storage")
    if options.dry_run:
        publish_markdown("verify-storage-plan", "# Storage gate (dry run)\n\nWould compare counts, bytes, sizes, "
                         f"MD5s and access of {', '.join(b.name for b in runbook.storage.buckets)}.")
        return {"dry_run": True}
    report = run_storage_gate(runbook, deep or None)
    return {"buckets": len(report.buckets), "objects": sum(b.target_objects for b in report.buckets),
            "bytes": sum(b.target_bytes for b in report.buckets), "not_migrated": report.not_migrated,
            "proven_by_listing": sum(b.by_listing for b in report.buckets),
            "proven_by_head": sum(b.by_head for b in report.buckets)}


