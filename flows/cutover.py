"""The cutover (the runbook's `cutover` section): checklist, approval, write freeze, final sync, switch, smoke
test; the downtime measured from the freeze to the apps' health; an automatic rollback if anything after the
freeze fails."""

from __future__ import annotations

import time

from prefect import flow

from liftoff.flows.final_sync import STRATEGIES
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.flows.rollback import automatic_rollback
from liftoff.errors import GateFailed, LiftoffError, NotApproved, StepFailed
from liftoff.ledger import Ledger, current_run_id, exclusive
from liftoff.redaction import first_line
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.runbooks.model import Runbook, load_runbook, resolve_runbook_path
from liftoff.tasks.backup.steps import restore_test_newest_if_untested
from liftoff.tasks.cutover import approval
from liftoff.tasks.cutover.catch_up import catch_up, record_baseline
from liftoff.tasks.cutover.common import COMPLETED, PHASE, STARTED, require_switch
from liftoff.tasks.cutover.freeze import freeze_source, lift_target_freeze
from liftoff.tasks.cutover.gate import check_before_cutover
from liftoff.tasks.cutover.maintenance import leave_maintenance, maintenance_off, maintenance_on
from liftoff.tasks.cutover.replication import stop_replication
from liftoff.tasks.cutover.smoke import smoke_test
from liftoff.tasks.cutover.sync import refuse_while_changes_stranded
from liftoff.tasks.cutover.switch import switch_apps
from liftoff.flows.hooks import notify_on_failure
from liftoff.tasks.storage.plan import not_migrated


@flow(name="cutover", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def cutover(options: RunOptions) -> dict:
    """Succeeds when the pre-cutover checklist passed, a named operator approved with every manual line
    confirmed, the source was frozen for the app's writes, the final sync brought the target up to the frozen
    source with both gates passing, the apps were switched to the target and are healthy there, and the smoke
    queries answered through PgBouncer. The downtime (freeze to healthy) is published. A rejection ends the run
    with nothing changed; a failure after the freeze rolls back by itself (source writable, apps back on it)
    and fails the run with the reason."""
    runbook = open_runbook(options, PHASE)
    require_switch(runbook)
    refuse_while_changes_stranded(runbook)  # the final sync reloads the target: nothing of the apps' may be there
    if not options.dry_run:  # the checklist reads the backup gate: of the newest backup, whichever tier made it
        restore_test_newest_if_untested(runbook)
    try:
        checklist = check_before_cutover(runbook)  # a failed checklist raises (and is published) there
    except LiftoffError:  # a difference (3) or a check that could not run (2): replication is dropped either way
        _stop_replication(runbook, options, "the checklist failed")
        raise
    form_text, shown = approval.evidence(runbook, checklist.rows(), Ledger(runbook.state_dir))
    if options.dry_run:
        publish_markdown("cutover-approval", form_text)
        return {"dry_run": True, "checklist": checklist.summary(), "expected_downtime_s": shown["expected_downtime_s"]}
    try:
        answer = ask_for_approval(runbook, form_text, shown)
    except NotApproved:
        _stop_replication(runbook, options, "the cutover was not approved")
        raise
    with exclusive(runbook.state_dir):
        return _cut_over(runbook, options, answer.approver)


def _stop_replication(runbook: Runbook, options: RunOptions, why: str) -> None:
    """With ``final_sync: replicate``, a cutover that stops drops the subscription, slots and publication (a slot
    left on Supabase keeps WAL until its disk is full); ``liftoff run replicate`` starts again."""
    if runbook.cutover.final_sync == "replicate" and not options.dry_run:
        stop_replication(runbook, why)


def ask_for_approval(runbook: Runbook, form_text: str, shown: dict):
    answer = approval.wait_for_answer(
        runbook, approval.approval_form(runbook), form_text, "",
        "nothing changed, the source is writable: start the cutover again",
        before_raising=lambda: approval.record_decision(runbook, shown, None, "timed out"))
    missing = approval.unconfirmed(runbook, answer) if answer.approve else []
    outcome = "approved" if answer.approve and not missing else "rejected"
    approval.record_decision(runbook, shown, answer, outcome)
    who = approval.safe_text(answer.approver)
    if not answer.approve:
        raise NotApproved(f"cutover rejected by {who}: {approval.safe_text(answer.reason) or 'no reason given'}; "
                          "nothing changed, the source is writable and the apps stay on it")
    if missing:
        raise NotApproved(f"approved by {who} without confirming: {missing[0]}"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; nothing changed, "
                          "start the cutover again and confirm every line")
    return answer


def _cut_over(runbook: Runbook, options: RunOptions, approver: str) -> dict:
    ledger = Ledger(runbook.state_dir)
    ledger.record_event(PHASE, STARTED, after={"approver": approval.safe_text(approver)}, flow_run_id=current_run_id())
    durations: dict[str, float] = {}

    def timed(name: str, fn, *args):
        started = time.monotonic()
        try:
            return fn(*args)
        finally:
            durations[name] = round(time.monotonic() - started, 2)

    maintenance = runbook.cutover.maintenance is not None
    if maintenance:
        timed("maintenance on", maintenance_on, runbook)  # before the freeze: the site says so, not errors
    try:
        frozen = timed("freeze", freeze_source, runbook)
    except BaseException:
        if maintenance:  # nothing else changed: a freeze that failed lifted what it applied
            leave_maintenance(runbook)
        raise
    step = "final sync"
    try:
        lift_target_freeze(runbook)  # a rollback's freeze of the target; the final sync makes its grants exact
        synced = timed("final sync", STRATEGIES[runbook.cutover.final_sync].run, runbook, options)
        timed("baseline", record_baseline, runbook)  # the unfrozen tables as both sides now agree on them
        step = "switch"
        timed("switch", switch_apps, runbook)
        step = "smoke test"
        timed("smoke test", smoke_test, runbook)
        if maintenance:
            step = "maintenance off"
            timed("maintenance off", maintenance_off, runbook)
    except BaseException as exc:
        reason = first_line(exc, type(exc).__name__)
        try:
            _stop_replication(runbook, options, f"the cutover failed at the {step}")
            undone = automatic_rollback(options)
        except BaseException as undo_failed:
            raise StepFailed(f"cutover failed at the {step} ({reason}) and the automatic rollback failed too "
                             f"({first_line(undo_failed, type(undo_failed).__name__)}): run `liftoff run rollback` "
                             "once the cause is fixed") from None
        raise StepFailed(f"cutover failed at the {step} ({reason}); rolled back automatically: the source is "
                         f"writable and the apps are back on it{_changes_line(undone)}{recovery(options)}") from None
    healthy_at = time.time()  # the downtime ends here; the catch-up runs while the apps work on the target
    downtime = round(healthy_at - frozen["frozen_at"], 2)
    ledger.record_event(PHASE, COMPLETED, after={"downtime_s": downtime, "steps": durations},
                        flow_run_id=current_run_id())
    files_not_migrated = not_migrated(runbook)
    publish_downtime(downtime, durations, files_not_migrated, maintenance)
    # The apps work on the target from here: a catch-up that cannot carry everything does not roll them back
    # (what it could not carry stays on the source, named); it fails the run and is run again once fixed.
    try:
        caught_up = catch_up(runbook)
    except GateFailed as failed:
        raise GateFailed(f"{str(failed).splitlines()[0]}; the cutover stands (the apps run on the target) and what "
                         f"was not carried is still on the source: fix the cause, then run `liftoff run catch-up "
                         f"--runbook {options.runbook}`") from None
    return {"downtime_s": downtime, "steps": durations, "final_sync": synced, "maintenance": maintenance,
            "storage_not_migrated": files_not_migrated,
            "catch_up_s": round(time.time() - healthy_at, 2),
            "catch_up": {"since": caught_up.since, "until": caught_up.until, "tables": caught_up.tables,
                         "buckets": caught_up.buckets, "conflicts": caught_up.conflicts}}


# A failed final sync leaves the target loaded from the frozen source's export, which later writes on the source
# make stale: the database phase would reuse that export and its gate fail. This is the one command back.
def recovery(options: RunOptions) -> str:
    if load_runbook(resolve_runbook_path(options.runbook)).cutover.final_sync == "replicate":
        return (f"; replication was dropped: start it again with `liftoff run replicate --runbook {options.runbook}` "
                "before the next cutover")
    return (f"; before the next cutover bring the target up to the source again with `liftoff run resync "
            f"--runbook {options.runbook}` (a fresh export, every table reloaded, both gates)")


def _changes_line(undone: dict | None) -> str:
    carried = (undone or {}).get("changes") or {}
    if carried.get("unknown"):
        return f"; the changes the apps made on the target could not be counted ({carried['unknown']})"
    if not carried.get("total"):
        return ""
    where = carried.get("file") or "the source"
    return f"; {carried['total']} change(s) the apps made on the target were written to {where}"


def publish_downtime(downtime: float, durations: dict[str, float], not_migrated_files: int = 0,
                     maintenance: bool = False) -> None:
    rows = [{"step": name, "seconds": seconds} for name, seconds in durations.items()]
    publish_table("cutover-downtime", rows, f"Cutover: {downtime} s from the write freeze to healthy apps")
    gone = ([f"Files not migrated: **{not_migrated_files}** storage.objects rows have no bytes on the source "
             "(storage.missing_source_bytes: skip); the storage gate's report lists them.", ""]
            if not_migrated_files else [])
    shown = ([f"The site was in maintenance mode (cutover.maintenance) from before the freeze until after the smoke "
              f"test: {sum(durations.get(k, 0) for k in durations if k != 'catch-up')} s in all.", ""]
             if maintenance else ["The site was not put in maintenance mode (no cutover.maintenance).", ""])
    publish_markdown("cutover-downtime", "\n".join([
        "# Cutover done", f"Downtime (writes frozen until the apps were healthy on the target): **{downtime} s**.",
        "", *shown, *gone, markdown_table(rows)]))
