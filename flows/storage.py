"""Runbook step 5: move the files from Supabase Storage to the target's S3 server (MinIO)."""

from __future__ import annotations

from prefect import flow

from flows.options import RunOptions, open_runbook
from flows.storage_urls import publish_url_preview
from flows.storage_verify import verify_storage
from liftoff.ledger import exclusive
from liftoff.reports import markdown_table, publish_markdown, publish_table
from tasks.notify import notify_on_failure
from tasks.storage.copy import copy_objects, prepare_buckets
from tasks.storage.plan import StoragePlan, plan_storage
from tasks.storage.urls import preview_storage_urls, rewrite_storage_urls


@flow(name="migrate-storage", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def migrate_storage(options: RunOptions) -> dict:
    """Succeeds when every object of the runbook's buckets in the source's inventory (storage.objects) is on
    the target, copied once, with its size, MD5, Content-Type and Cache-Control, in buckets whose public
    ones (and only those) allow anonymous download, the storage gate passed, and then the app's stored
    Storage URLs (``storage.rewrite``) point at the target's public base. Resumable: objects the ledger
    records as copied are not copied again."""
    runbook = open_runbook(options, "storage")
    plan = plan_storage(runbook)
    publish_storage_plan(plan, options.dry_run)
    publish_url_preview(preview_storage_urls(runbook), options.dry_run)
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
    md += ["## Access rules that change",
           "Supabase guards private files with row-level security on storage.objects; an S3 server has none. "
           "Each policy below stops applying; its bucket stays private and the app hands out presigned URLs.",
           markdown_table(plan.policies) if plan.policies else "No policy on storage.objects.",
           "## Buckets on the source the runbook does not move",
           ", ".join(plan.not_in_runbook) or "none"]
    publish_markdown("storage-plan", "\n".join(md))
