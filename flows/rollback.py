"""The one-click rollback: the cutover undone from the ledger's event log, newest change first."""

from __future__ import annotations

from prefect import flow
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows.options import RunOptions, open_runbook
from liftoff.errors import StepFailed
from liftoff.ledger import exclusive
from liftoff.reports import markdown_table, publish_markdown
from runbooks.model import Runbook
from tasks.cutover.rollback import (
    RollbackPlan,
    finish_rollback,
    lift_source_freeze,
    plan_rollback,
    restore_storage_urls,
    rows_written_since_switch,
    switch_apps_back,
    wait_healthy_again,
)
from tasks.notify import notify_on_failure

APPROVAL_POLL_S = 2


class StrandedRowsApproval(RunInput):
    approver: str = Field(..., min_length=1, description="Your name: it goes to the audit trail")
    approve: bool = Field(False, description="Tick to roll back although the rows above stay on the target only")
    reason: str = Field("", description="Why")


@flow(name="rollback", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def rollback(options: RunOptions) -> dict:
    """Succeeds when everything the cutover changed since the last rollback is undone: the source's write
    freeze lifted, the apps' environment from before the cutover back and the apps redeployed and healthy, the
    storage URLs on the target put back. Refuses when there is nothing to roll back. When the apps wrote rows
    on the target since the switch, it shows their counts and waits for an approval."""
    return _roll_back(options, ask=True)


@flow(name="automatic-rollback", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def automatic_rollback(options: RunOptions) -> dict:
    """The rollback as a failed cutover runs it, by itself: the same steps, and the rows the apps wrote on the
    target since the switch are reported, not asked about (the apps there are failing)."""
    return _roll_back(options, ask=False)


def _roll_back(options: RunOptions, ask: bool) -> dict:
    runbook = open_runbook(options, "rollback")
    plan = plan_rollback(runbook)
    if plan.nothing:
        raise StepFailed(f"nothing to roll back for runbook {runbook.name}: the ledger in {runbook.state_dir} holds "
                         "no freeze, switch or URL rewrite since the last rollback")
    stranded = rows_written_since_switch(runbook, plan.switch) if plan.switch else []
    text = publish_rollback_plan(plan, stranded, options.dry_run)
    if options.dry_run:
        return {"dry_run": True, "would": plan.lines(), "stranded": stranded}
    if stranded and ask:
        answer = _approve_stranded(runbook, text)
        if not answer.approve:
            return {"rejected": True, "stranded": stranded}
    with exclusive(runbook.state_dir):
        done = {"unfreeze": lift_source_freeze(runbook, plan), "switch": switch_apps_back(runbook, plan)}
        if plan.rewrites:
            done["urls"] = restore_storage_urls(runbook)
        if plan.switch is not None:
            done["health"] = wait_healthy_again(runbook)
        done["stranded"] = stranded
        finish_rollback(runbook, plan, done)
    return done


def _approve_stranded(runbook: Runbook, text: str):
    try:
        return pause_flow_run(wait_for_input=StrandedRowsApproval.with_initial_data(description=text),
                              timeout=runbook.cutover.approval_timeout_s, poll_interval=APPROVAL_POLL_S)
    except FlowPauseTimeout:
        raise StepFailed(f"no approval within {runbook.cutover.approval_timeout_s} s (cutover.approval_timeout_s) "
                         "for rolling back over rows written on the target; nothing was rolled back") from None


def publish_rollback_plan(plan: RollbackPlan, stranded: list[dict], dry_run: bool) -> str:
    md = [f"# Rollback{' (dry run: nothing changed)' if dry_run else ''}", "", "## What it does",
          *[f"{i}. {line}" for i, line in enumerate(plan.lines(), start=1)]]
    if stranded:
        md += ["", "## Rows written on the target since the switch",
               "Rolling back leaves these on the target only: the apps will not see them on the source.",
               markdown_table(stranded)]
    text = "\n".join(md)
    publish_markdown("rollback-plan", text)
    return text
