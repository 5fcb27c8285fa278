"""Runbook step 6a: the pre-cutover checklist as a gate (``liftoff.tasks.cutover.checklist``), recorded in the ledger."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.tasks.cutover.checklist import ChecklistReport, run_checklist


@task(name="pre-cutover checklist (gate)", cache_policy=NO_CACHE)
@recorded("cutover.checklist", gate="cutover")
def check_before_cutover(rb: Runbook) -> ChecklistReport:
    return run_checklist(rb)
