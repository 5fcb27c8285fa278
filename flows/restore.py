"""The database restore (the runbook's `target` and `database` sections): restore the archive into the self-hosted
PostgreSQL with pg_restore."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import exclusive
from liftoff.reports import markdown_table, publish_markdown
from liftoff.tasks.database.common import export_done
from liftoff.tasks.database.restore import (
    RestorePlan,
    plan_restore,
    prepare_target,
    restore_data,
    restore_grants,
    restore_post_data,
    restore_pre_data,
)
from liftoff.flows.hooks import notify_on_failure


@flow(name="restore", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def restore_database(options: RunOptions) -> dict:
    """Succeeds when the target holds the archive's schema, every table's data, indexes, constraints,
    triggers and policies (pg_restore --no-owner --no-acl), the source's grants for every role database.roles
    maps (GRANT and REVOKE as on the source), the auth shim when kept, and the app roles' reported extras.
    Resumable: steps and tables the ledger records as done are skipped; a table cut off mid-load is
    truncated and loaded again."""
    runbook = open_runbook(options, "restore")
    if options.dry_run and not export_done(runbook):
        publish_markdown("restore-plan", "# Restore plan (dry run)\n\nNo archive yet: the export step comes first; "
                         "the restore plan lists the archive's entries once it exists.")
        return {"dry_run": True, "tables": []}
    plan = plan_restore(runbook)
    publish_restore_plan(plan, options.dry_run)
    if options.dry_run:
        return {"dry_run": True, "tables": plan.tables}
    with exclusive(runbook.state_dir):
        prepared = prepare_target(runbook, plan)
        restore_pre_data(runbook, plan)
        loaded = restore_data(runbook, plan)
        restore_post_data(runbook, plan)
        grants = restore_grants(runbook)
    return {"prepared": prepared, "loaded": loaded, "grants": grants}


def publish_restore_plan(plan: RestorePlan, dry_run: bool) -> None:
    md = [f"# Restore plan{' (dry run: nothing written)' if dry_run else ''}",
          f"{len(plan.keep)} archive entries to restore, {len(plan.tables)} tables.", "",
          f"## Supabase leftovers: policy `{plan.leftovers_policy}`",
          "Shims created on the target:" if plan.shims else "No shims: objects using auth are left out.",
          markdown_table([{"shim": s} for s in plan.shims]) if plan.shims else "",
          "## Roles (database.roles)", markdown_table(plan.roles) if plan.roles else "No role is named.",
          "## Objects the Supabase choices touched", markdown_table(plan.decisions) if plan.decisions else "None.",
          "## Left out of the restore", markdown_table([{"entry": e, "rule": r} for e, r in plan.left_out])]
    publish_markdown("restore-plan", "\n".join(md))
