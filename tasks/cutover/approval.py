"""The cutover's approval (the runbook's `cutover.approval_timeout_s`), its parts: the approval form (a typed
Prefect RunInput), the evidence it shows, and the audit trail of who decided what, with what in front of them."""

from __future__ import annotations

import re
from collections.abc import Callable

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field, create_model

from liftoff.errors import NotApproved
from liftoff.ledger import Ledger, current_run_id
from liftoff.reports import markdown_table
from liftoff.runbooks.model import Runbook
from liftoff.tasks.cutover.common import APPROVAL, PHASE

APPROVAL_POLL_S = 2  # how often a paused run asks the server for the operator's answer

# The steps the final sync and the switch repeat: their last recorded durations estimate the downtime.
DOWNTIME_STEPS = ("export", "restore.pre-data", "restore.data", "restore.post-data", "restore.grants", "verify",
                  "storage.copy", "verify-storage", "storage.rewrite", "cutover.switch", "cutover.smoke")
# With final_sync replicate: the wait for the last changes instead of the export and restore ("verify" is then the
# full gate's time until a replicated cutover recorded its switch-time gate: an estimate on the high side).
REPLICATED_DOWNTIME_STEPS = ("cutover.replicated-sync", *DOWNTIME_STEPS[5:])


def confirmation_field(i: int) -> str:
    return f"confirm_{i}"


def approval_form(rb: Runbook) -> type[RunInput]:
    """The form the operator fills in the Prefect UI: one checkbox per manual checklist line, approve or not,
    who, and why (required for a rejection)."""
    fields = {
        "approver": (str, Field(..., min_length=1, description="Your name: it goes to the audit trail")),
        "approve": (bool, Field(False, description="Tick to freeze the source and switch the apps now")),
        "reason": (str, Field("", description="Why you reject (or a note on the approval)")),
    }
    for i, line in enumerate(rb.cutover.checklist.manual, start=1):
        fields[confirmation_field(i)] = (bool, Field(False, description=f"Confirmed: {line}"))
    return create_model("CutoverApproval", __base__=RunInput, **fields)


def unconfirmed(rb: Runbook, answer: RunInput) -> list[str]:
    return [line for i, line in enumerate(rb.cutover.checklist.manual, start=1)
            if not getattr(answer, confirmation_field(i), False)]


def last_durations(ledger: Ledger, final_sync: str = "full") -> dict[str, float]:
    steps = ledger.steps()
    names = REPLICATED_DOWNTIME_STEPS if final_sync == "replicate" else DOWNTIME_STEPS
    return {name: steps[name].seconds for name in names if name in steps and steps[name].seconds}


def evidence(rb: Runbook, checklist_rows: list[dict], ledger: Ledger) -> tuple[str, dict]:
    """The approval form's description (markdown) and the same evidence as plain data for the audit trail."""
    durations = last_durations(ledger, rb.cutover.final_sync)
    expected = round(sum(durations.values()), 1)
    md = ["# Approve the cutover?",
          f"Runbook **{rb.name}**. Approving freezes writes on the source ("
          + "; ".join(f"{m.method}: {', '.join(m.roles)}" for m in rb.cutover.freeze)
          + "), runs the final sync and switches the apps. A failed switch or smoke test rolls back by itself.", "",
          "## Checklist", markdown_table(checklist_rows), "",
          "## Expected downtime",
          (f"About **{expected} s**, from the last recorded run of each step:" if durations else
           "No step has a recorded duration yet: run a rehearsal first to know the downtime."), ""]
    if durations:
        md.append(markdown_table([{"step": k, "seconds": v} for k, v in durations.items()]))
    if rb.cutover.checklist.manual:
        md += ["", "## Confirm each line below before approving",
               *[f"- {line}" for line in rb.cutover.checklist.manual]]
    return "\n".join(md), {"checklist": checklist_rows, "durations": durations, "expected_downtime_s": expected}


def record_decision(rb: Runbook, shown: dict, answer: RunInput | None, outcome: str) -> None:
    """The audit trail: the evidence shown and the operator's input (or the timeout), by flow run."""
    given = answer.model_dump(exclude={"metadata"}) if answer is not None else None
    Ledger(rb.state_dir).record_event(PHASE, APPROVAL, before=shown, after={"input": given, "outcome": outcome},
                                      flow_run_id=current_run_id())


def safe_text(text: str, limit: int = 200) -> str:
    """An operator's free text as one short line (it goes into messages and the run's state)."""
    return re.sub(r"\s+", " ", text).strip()[:limit]


def wait_for_answer(rb: Runbook, form: type[RunInput], text: str, waiting_for: str, then: str,
                    before_raising: Callable[[], None] | None = None) -> RunInput:
    """Pauses the flow run for the operator's ``form`` (the UI shows ``text`` above it) until the runbook's
    ``cutover.approval_timeout_s``, and returns the answer. Without one in time: ``before_raising()`` (puts
    back what the flow changed before asking), then NotApproved "no approval within ... {waiting_for}; {then}".
    Every approval of every flow (cutover, rollback, recover, decommission) waits through here."""
    timeout = rb.cutover.approval_timeout_s
    try:
        return pause_flow_run(wait_for_input=form.with_initial_data(description=text), timeout=timeout,
                              poll_interval=APPROVAL_POLL_S)
    except FlowPauseTimeout:
        if before_raising is not None:
            before_raising()
        raise NotApproved(f"no approval within {timeout} s (cutover.approval_timeout_s){waiting_for}; {then}") from None
