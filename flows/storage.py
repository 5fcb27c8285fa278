"""The storage phase (the runbook's `storage` section): move the files from Supabase Storage to the target's S3
server (MinIO)."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.flows.storage_urls import publish_url_preview
from liftoff.flows.storage_verify import verify_storage
from liftoff.ledger import exclusive
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.flows.hooks import notify_on_failure
from liftoff.tasks.storage.copy import copy_objects, prepare_buckets
from liftoff.tasks.storage.plan import StoragePlan, plan_storage, require_source_bytes
from liftoff.tasks.storage.urls import preview_storage_urls, rewrite_storage_urls


@flow(name="migrate-storage", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def migrate_storage(options: RunOptions) -> dict:
    """Succeeds when every object of the runbook's buckets in the source's inventory (storage.objects) is on
    the target, copied once, with its size, MD5, Content-Type and Cache-Control, in buckets whose public
    ones (and only those) allow anonymous download, the storage gate passed, and then the app's stored
    Storage URLs (``storage.rewrite``) of the moved buckets point at the target's public base. Rows whose
    bytes are gone on the source stop it before anything is written, unless ``storage.missing_source_bytes``
    is ``skip``: then they are not copied, and the gate, the rewrite and the reports name them. Resumable:
    objects the ledger records as copied are not copied again."""
    runbook = open_runbook(options, "storage")
    plan = plan_storage(runbook)
    publish_storage_plan(plan, options.dry_run)
    publish_url_preview(preview_storage_urls(runbook, {b.name: b.gone_keys for b in plan.buckets}), options.dry_run)
    require_source_bytes(runbook, plan)
    if options.dry_run:
        return {"dry_run": True, "objects": sum(b.to_copy for b in plan.buckets),
                "bytes": sum(b.to_copy_bytes for b in plan.buckets)}
    with exclusive(runbook.state_dir):
        buckets = prepare_buckets(runbook, plan)
        copied = copy_objects(runbook, plan)
        verified = verify_storage(options)
        urls = rewrite_storage_urls(runbook)
    return {"buckets": buckets, "copy": copied, "verify": verified, "urls": urls}


def publish_storage_plan(plan: StoragePlan, dry_run: bool) -> None:
    rows = [b.row for b in plan.buckets]
    publish_table("storage-plan-buckets", rows, "Storage plan: objects and bytes per bucket, and what is left to copy")
    md = [f"# Storage plan{' (dry run: nothing written)' if dry_run else ''}",
          f"{sum(b.to_copy for b in plan.buckets)} objects ({sum(b.to_copy_bytes for b in plan.buckets):,} bytes) "
          f"to copy of {sum(b.objects for b in plan.buckets)} in the source's inventory.", "",
          "## Buckets", markdown_table(rows)]
    if plan.problems:
        md += ["## Needs attention", *[f"- {p}" for p in plan.problems], ""]
    if plan.gone:
        decided = ("**skip**: they are not copied; the gate lists them as not migrated, the URL rewrite leaves "
                   "their URLs" if plan.decision == "skip" else
                   "**fail**: the phase stops here. Put their files back on Supabase, or set "
                   "`storage.missing_source_bytes: skip` to move the rest without them")
        md += [f"## Rows whose bytes are gone on the source ({len(plan.gone)})",
               "Their `storage.objects` rows exist, but reading their first byte found nothing "
               f"(storage.missing_source_bytes: {decided}).", "",
               markdown_table([{"bucket": bucket, "key": g.key, "bytes (the row's)": g.size if g.size is not None
                                else "unknown", "why": g.why} for bucket, g in plan.gone]), ""]
    md += ["## Access rules that change",
           "Supabase guards private files with row-level security on storage.objects; an S3 server has none. "
           "Each policy below stops applying; its bucket stays private and the app hands out presigned URLs.",
           markdown_table(plan.policies) if plan.policies else "No policy on storage.objects.",
           "## Buckets on the source the runbook does not move",
           ", ".join(plan.not_in_runbook) or "none"]
    publish_markdown("storage-plan", "\n".join(md))
