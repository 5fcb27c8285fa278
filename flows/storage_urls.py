"""The storage phase's last part (the runbook's `storage.rewrite`): the app's stored Storage URLs point at the
target's public base."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import exclusive
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.flows.hooks import notify_on_failure
from liftoff.tasks.storage.urls import preview_storage_urls, rewrite_storage_urls
from liftoff.systems.storage_urls import ColumnPreview


@flow(name="rewrite-storage-urls", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def rewrite_urls(options: RunOptions) -> dict:
    """Succeeds when every value of the runbook's ``storage.rewrite`` columns on the target that is a public
    Supabase Storage URL (or a bare key) of a moved bucket reads as the target's public URL, in one
    transaction, with each old value kept in the ledger for the rollback. Refuses to start unless the latest
    storage gate passed. Values it cannot map (signed URLs, image transforms) are left and listed."""
    runbook = open_runbook(options, "storage")
    publish_url_preview(preview_storage_urls(runbook), options.dry_run)
    if options.dry_run:
        return {"dry_run": True}
    with exclusive(runbook.state_dir):
        return rewrite_storage_urls(runbook)


def publish_url_preview(previews: list[ColumnPreview], dry_run: bool) -> None:
    """The rewrite's preview: rows per column, three examples, and what it cannot map, with why."""
    rows = [{"column": p.name, "kind": p.kind, "rows": p.rows_total, "to rewrite": p.rows_mapped,
             "cannot map": p.rows_unmappable, "already rewritten": p.rows_already_rewritten,
             "bucket not moved": p.rows_not_moved, "no bytes on the source": p.rows_no_bytes,
             "not Storage URLs": p.rows_other, "null": p.rows_null} for p in previews]
    publish_table("storage-urls-preview", rows, "Storage URL rewrite: rows per column")
    md = [f"# Storage URL rewrite{' (dry run: nothing written)' if dry_run else ''}", ""]
    if not previews:
        md.append("The runbook names no column (storage.rewrite): nothing to rewrite.")
    else:
        md.append(markdown_table(rows))
    for p in previews:
        if p.examples:
            md += ["", f"## {p.name}: examples", *[f"- `{old}` -> `{new}`" for old, new in p.examples]]
        if p.unmappable_examples:
            md += ["", f"## {p.name}: left as they are (the app must change these)",
                   *[f"- `{value}`: {why}" for value, why in p.unmappable_examples]]
        if p.not_moved_examples:
            md += ["", f"## {p.name}: {p.rows_not_moved} URLs of buckets the runbook does not move, left as they "
                   "are (the target has no such bucket)", *[f"- `{value}`" for value in p.not_moved_examples]]
        if p.no_bytes_values:
            more = f" (the first {len(p.no_bytes_values)})" if p.rows_no_bytes > len(p.no_bytes_values) else ""
            md += ["", f"## {p.name}: {p.rows_no_bytes} URLs of files whose bytes are gone on the source, left as "
                   f"they are{more}", *[f"- `{value}`" for value in p.no_bytes_values]]
    publish_markdown("storage-urls-preview", "\n".join(md))
