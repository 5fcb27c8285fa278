"""The database export (the runbook's `source` and `database` sections): export the Supabase database with pg_dump."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import exclusive
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.tasks.database.export import ExportPlan, dump_source, plan_export
from liftoff.flows.hooks import notify_on_failure


@flow(name="export", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def export_database(options: RunOptions) -> dict:
    """Succeeds when the state directory holds a complete pg_dump archive (directory format) of the runbook's
    schemas, taken from one consistent snapshot, and the ledger records each table's row count in that
    snapshot. Re-running after success reuses the archive; after a crash, starts the dump again."""
    runbook = open_runbook(options, "export")
    plan = plan_export(runbook)
    publish_export_plan(plan, options.dry_run)
    if options.dry_run:
        return {"dry_run": True, "tables": plan.tables}
    with exclusive(runbook.state_dir):
        result = dump_source(runbook)
    rows = [{"table": t, "rows at export": n} for t, n in result["tables"].items()]
    publish_table("export-tables", rows, "Rows per table in the export snapshot")
    publish_markdown("export-summary", f"# Export {'reused' if result.get('skipped') else 'done'}\n\n"
                     f"Archive `{result['archive']}`, {result['archive_bytes']:,} bytes, {result['seconds']} s.\n\n"
                     + markdown_table(rows))
    return result


def publish_export_plan(plan: ExportPlan, dry_run: bool) -> None:
    needed = ", ".join(f"{n} (schema {s})" for n, s in plan.extensions_needed.items()) or "none"
    md = [f"# Export plan{' (dry run: nothing written)' if dry_run else ''}",
          f"Source size: {plan.source_bytes:,} bytes; tools: {plan.tools}", "", f"`{plan.command}`", "",
          "## Left out (Supabase rules)", markdown_table([{"what": w, "rule": r} for w, r in plan.rules]),
          "## Roles (database.roles)", markdown_table(plan.roles) if plan.roles else "No role is named.",
          f"Objects owned by {', '.join(plan.owners) or 'nobody'} on the source are owned by the target's "
          "restoring user (target.direct.user) after the restore (pg_restore --no-owner).",
          f"## Objects that use Supabase (supabase_leftovers: {plan.leftovers_policy})",
          markdown_table(plan.decisions) if plan.decisions else "None.",
          "## Extensions", f"Needed by migrated objects: {needed}. "
          f"Installed but not needed: {', '.join(plan.extensions_unused) or 'none'}.",
          "## Tables", markdown_table([{"table": t} for t in plan.tables])]
    publish_markdown("export-plan", "\n".join(md))
