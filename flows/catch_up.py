"""The cutover's catch-up, runnable again after it: what the freeze could not stop (Supabase Auth's
sign-ups, Supabase Storage's uploads, the runbook's unfrozen tables) carried from the source to the target."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.errors import StepFailed
from liftoff.ledger import exclusive
from liftoff.reports import publish_markdown
from liftoff.tasks.cutover.catch_up import catch_up, switched_and_kept
from liftoff.flows.hooks import notify_on_failure


@flow(name="catch-up", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def catch_up_after_switch(options: RunOptions) -> dict:
    """Succeeds when every row the source's unfrozen writers added, changed or deleted since the last
    catch-up (``auth.users`` with the shim, ``cutover.unfrozen_tables``) and every object new or changed in
    the source's Storage inventory is on the target, rows changed on both sides are named (the target's
    kept), and the gates passed again: definitions and access of every migrated object, every carried row,
    every inventory object. Needs a kept cutover (the apps on the target). Run it while Supabase Auth or
    Storage still take writes for the project."""
    runbook = open_runbook(options, "catch-up")
    if not switched_and_kept(runbook):
        raise StepFailed(f"runbook {runbook.name}: no kept cutover to catch up after (the ledger in "
                         f"{runbook.state_dir} holds no completed switch since the last rollback)")
    if options.dry_run:
        publish_markdown("cutover-catch-up", "# Catch-up (dry run: nothing changed)\n\nWould carry the rows of "
                         "the unfrozen tables and the objects the source took since the last catch-up.")
        return {"dry_run": True}
    with exclusive(runbook.state_dir):
        report = catch_up(runbook)
    return {"since": report.since, "until": report.until, "tables": report.tables, "buckets": report.buckets,
            "conflicts": report.conflicts}
