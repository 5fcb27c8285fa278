"""The cutover's checklist (the runbook's `cutover.checklist`): the pre-cutover checklist as a gate
(``liftoff.tasks.cutover.checklist``), recorded in the ledger."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.reports import publish_markdown, publish_table
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.tasks.cutover.checklist import ChecklistReport, run_checklist


def publish_checklist(report: ChecklistReport, rb: Runbook) -> None:
    publish_table("cutover-checklist", report.rows(), "Pre-cutover checklist")
    publish_markdown("cutover-checklist", report.markdown())


@task(name="pre-cutover checklist (gate)", cache_policy=NO_CACHE)
@recorded("cutover.checklist", gate="cutover", title="cutover checklist", publish=publish_checklist)
def check_before_cutover(rb: Runbook) -> ChecklistReport:
    return run_checklist(rb)
