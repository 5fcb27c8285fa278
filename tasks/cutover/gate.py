"""Runbook step 6a: the pre-cutover checklist as a gate (``tasks.checklist``), recorded in the ledger."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.steps import recorded
from runbooks.model import Runbook
from tasks.checklist import ChecklistReport, run_checklist


@task(name="pre-cutover checklist (gate)", cache_policy=NO_CACHE)
@recorded("cutover.checklist", gate="cutover")
def check_before_cutover(rb: Runbook) -> ChecklistReport:
    return run_checklist(rb)
