"""The one-click rollback: the cutover undone from the ledger's event log, newest change first."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.input import RunInput
from pydantic import Field

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.errors import NotApproved, StepFailed
from liftoff.ledger import exclusive
from liftoff.redaction import one_line
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.runbooks.model import Runbook
from liftoff.systems.pg_changes import key_label
from liftoff.tasks.cutover.approval import safe_text, wait_for_answer
from liftoff.tasks.cutover.replication import stop_replication
from liftoff.tasks.cutover.freeze import freeze_target, lift_target_freeze
from liftoff.tasks.cutover.rollback import (
    ChangeSet,
    RollbackPlan,
    carry_changes,
    changes_on_target,
    finish_rollback,
    lift_source_freeze,
    plan_rollback,
    restore_storage_urls,
    switch_apps_back,
    wait_healthy_again,
)
from liftoff.flows.hooks import notify_on_failure


class ChangesApproval(RunInput):
    approver: str = Field(..., min_length=1, description="Your name: it goes to the audit trail")
    approve: bool = Field(False, description="Tick to roll back; leave unticked to keep the apps on the target "
                          "(the target is unfrozen again)")
    carry: Literal["apply", "file"] = Field(
        "apply", description="apply: write the changes above to the source (one transaction per table, conflicts "
        "named by key); file: write them to a file in state_dir and leave the source as it was")
    reason: str = Field("", description="Why")


@flow(name="rollback", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def rollback(options: RunOptions) -> dict:
    """Succeeds when everything the cutover changed since the last rollback is undone and nothing the apps
    wrote on the target is lost: the target frozen for the apps, every change they made there since the
    switch found (inserts, updates, deletes, per table, by key) and, as the approver chose, applied to the
    source or written to a file in state_dir; then the source's write freeze lifted, the apps' environment
    from before the cutover back and the apps redeployed and healthy, the storage URLs on the target put
    back. Refuses when there is nothing to roll back; a rejection unfreezes the target and changes nothing
    else."""
    return _roll_back(options, ask=True)


@flow(name="automatic-rollback", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def automatic_rollback(options: RunOptions) -> dict:
    """The rollback as a failed cutover runs it, by itself: the same steps; the changes the apps made on the
    target since the switch are written to a file (never applied unasked) and the result says where."""
    return _roll_back(options, ask=False)


def _roll_back(options: RunOptions, ask: bool) -> dict:
    runbook = open_runbook(options, "rollback")
    plan = plan_rollback(runbook)
    if plan.nothing:
        raise StepFailed(f"nothing to roll back for runbook {runbook.name}: the ledger in {runbook.state_dir} holds "
                         "no freeze, switch or URL rewrite since the last rollback")
    if options.dry_run:  # nothing frozen: the apps may still be writing, so the count is an estimate
        found = changes_on_target(runbook, frozen=False) if plan.switch else ChangeSet()
        publish_rollback_plan(plan, found, True)
        return {"dry_run": True, "would": plan.lines(), "changes": found.counts()}
    found = ChangeSet(frozen=True)
    if plan.switch:
        try:
            with exclusive(runbook.state_dir):
                unstoppable = freeze_target(runbook).get("unstoppable") or []
                found = changes_on_target(runbook, frozen=not unstoppable)
                found.unstoppable = unstoppable
        except Exception as exc:  # noqa: BLE001 - the target may be what failed: the apps must still get back
            found = ChangeSet(unknown=one_line(exc, type(exc).__name__))
    text = publish_rollback_plan(plan, found, False)
    how = "file"
    if (found.total or found.both or found.unknown) and ask:
        how = _approve_changes(runbook, text, found).carry
    with exclusive(runbook.state_dir):
        done: dict = {}
        if found.total or found.both:
            done["changes"] = carry_changes(runbook, found, how)
        done["unfreeze"] = lift_source_freeze(runbook, plan)
        done["switch"] = switch_apps_back(runbook, plan)
        if plan.rewrites:
            done["urls"] = restore_storage_urls(runbook)
        if plan.switch is not None:
            done["health"] = wait_healthy_again(runbook)
        if found.unknown:
            done["changes"] = {**done.get("changes", {}), "unknown": found.unknown}
            done["changes"].setdefault("total", None)
        finish_rollback(runbook, plan, done)
    if runbook.cutover.final_sync == "replicate":  # before the switch, the rollback drops replication too
        try:
            done["replication dropped"] = stop_replication(runbook, "rollback")
        except Exception as exc:  # noqa: BLE001 - the apps are back; the line names `liftoff run cleanup`
            done["replication dropped"] = one_line(exc, type(exc).__name__)
    publish_changes_carried(done.get("changes"))
    return done


def _approve_changes(runbook: Runbook, text: str, found: ChangeSet) -> ChangesApproval:
    answer = wait_for_answer(runbook, ChangesApproval, text,
                             f" for the rollback over {found.total} change(s) on the target",
                             "nothing was rolled back, the target takes the apps' writes again",
                             before_raising=lambda: lift_target_freeze(runbook))
    if not answer.approve:
        lift_target_freeze(runbook)
        raise NotApproved(f"rollback rejected by {safe_text(answer.approver)}: "
                          f"{safe_text(answer.reason) or 'no reason given'}; nothing was rolled back, the apps stay "
                          "on the target, which takes their writes again")
    return answer


def publish_rollback_plan(plan: RollbackPlan, found: ChangeSet, dry_run: bool) -> str:
    md = [f"# Rollback{' (dry run: nothing changed)' if dry_run else ''}", "", "## What it does",
          *[f"{i}. {line}" for i, line in enumerate(plan.lines(), start=1)]]
    if found.total:
        md += ["", f"## Changes the apps made on the target since the switch: {found.total}",
               ("Counted with the target frozen: this is all of them." if found.frozen else
                f"Roles {', '.join(found.unstoppable)} still write on the target (a superuser, or Liftoff's own "
                "user: no freeze stops them): what they write after this count is not carried." if found.unstoppable
                else "Counted while the apps still write there (a dry run): the rollback freezes the target first "
                "and counts again."),
               "Choose **apply** to write them to the source, or **file** to keep them in a file in state_dir "
               "and leave the source as it was.", "", markdown_table(found.rows())]
        if found.objects:
            md += ["", f"{len(found.objects)} object change(s) in the target's buckets (the bucket rows above): "
                   "**apply** uploads them to (or deletes them from) Supabase Storage; either way they are listed "
                   "in the file and stay on the target's S3 server."]
    if found.both:
        md += ["", "## Changed on both sides since the catch-up (not carried; in the file, with the target's row)",
               *[f"- {name} key {key_label(key)}" for name, key in found.both[:20]]]
    if found.unknown:
        md += ["", "## Changes on the target since the switch: NOT (ALL) COUNTED",
               f"The target could not be frozen or read ({found.unknown}). Whatever the apps wrote there (in those "
               "tables) since the switch stays on the target only; approving rolls back without it."]
    elif plan.switch and not found.total and not found.both:
        md += ["", "## Changes on the target since the switch", "None: every migrated table equals the source."]
    text = "\n".join(md)
    publish_markdown("rollback-plan", text)
    return text


def publish_changes_carried(carried: dict | None) -> None:
    """What the rollback did with the target's changes: per table, and where the file is."""
    if not carried or carried.get("total") is None:
        return
    rows = [{"table": name, **counts} for name, counts in carried["tables"].items()]
    publish_table("rollback-changes", rows, f"Rollback: {carried['total']} change(s) from the target")
    what = (f"applied to the source ({carried['carried']} carried, {len(carried['conflicts'])} conflict(s))"
            if carried["how"] == "apply" else "written to the file only; the source is as it was")
    md = [f"# Changes from the target: {carried['total']}", "", f"{what}. Every change, with its values: "
          f"`{carried['file']}`.", "", markdown_table(rows)]
    if carried.get("conflicts"):
        md += ["", "## Conflicts (not applied; in the file)", *[f"- {c}" for c in carried["conflicts"][:50]]]
    if carried.get("triggers_fired"):
        md += ["", "The source's triggers fired on the carried rows (turning them off needs a superuser)."]
    publish_markdown("rollback-changes", "\n".join(md))
