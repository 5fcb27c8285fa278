"""The plan's "Recovery Procedures" as one flow: production's database back from a chosen backup.

List the backups, show what will be lost, ask; then stop the apps, keep a safety dump, restore, compare,
start the apps. A failure after the stop puts the safety dump back and starts the apps again.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from prefect import flow
from prefect.input import RunInput
from pydantic import Field

from liftoff.errors import NotApproved, RunbookInvalid, StepFailed
from liftoff.flows.backup import BACKUP_LOCK
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import Ledger, current_run_id, exclusive
from liftoff.redaction import one_line
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.runbooks.model import Runbook
from liftoff.tasks.backup.recover import (
    PHASE,
    RecoveryPlan,
    clean_downloads,
    compare_with_backup,
    fetch_backup,
    plan_recovery,
    put_back,
    restore_backup,
    safety_dump,
    start_apps,
    stop_apps,
)
from liftoff.tasks.backup.pitr import pitr_info, restore_to_time
from liftoff.tasks.cutover.approval import safe_text, wait_for_answer
from liftoff.flows.hooks import notify_on_failure


class RecoverOptions(RunOptions):
    backup: str | None = Field(None, description="The backup to restore: its object name in the backup bucket "
                               "(a dry run lists them, newest first). Default: the newest backup whose restore "
                               "test did not fail.", examples=["tour_crm_2026-12-07_03-00-00.dump"])
    target_time: datetime | None = Field(None, description="Point-in-time recovery (backups.pitr): the moment the "
                                         "database goes back to, with its time zone; pgBackRest restores the newest "
                                         "backup before it and replays the WAL up to it. Empty: restore a dump.",
                                         examples=["2026-12-07T10:15:00+01:00"])


class RecoveryApproval(RunInput):
    approver: str = Field(..., min_length=1, description="Your name: it goes to the audit trail")
    database: str = Field("", description="Type the name of the database that will be replaced, to confirm")
    approve: bool = Field(False, description="Tick to stop the apps and replace the database with the backup")
    reason: str = Field("", description="Why")


@flow(name="recover", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def recover(options: RecoverOptions) -> dict:
    """Succeeds when target.direct's database is the chosen backup again: the backup downloaded with the
    SHA-256 its metadata records and made by a pg_dump as new as its server; what will be lost (per table,
    the rows written since the backup) shown and approved by a named operator typing the database's name;
    the apps stopped; a safety dump of the database as it was in the backup bucket; the database recreated
    from the backup with every table holding the rows counted at backup time; the apps started, healthy,
    and the smoke queries answered. A failure after the stop puts the safety dump back and starts the apps.
    The downtime (the RTO) is published."""
    runbook = open_runbook(options, PHASE)
    if options.target_time is not None:
        return _recover_to_time(runbook, options)
    plan = plan_recovery(runbook, options.backup)
    if options.dry_run:
        publish_recovery_plan(plan, None, dry_run=True)
        return {"dry_run": True, "backup": plan.key, "backups": [b.key for b in plan.backups], "lost": plan.lost}
    try:
        fetched = fetch_backup(runbook, plan.key)
        text = publish_recovery_plan(plan, fetched, dry_run=False)
        answer = _approve(runbook, plan, text)
        with exclusive(runbook.state_dir), exclusive(runbook.state_dir, lock=BACKUP_LOCK):
            return _recover(runbook, plan, fetched, answer)
    finally:
        clean_downloads(runbook)


def _recover(runbook: Runbook, plan: RecoveryPlan, fetched: dict, answer: RecoveryApproval, restore=None) -> dict:
    timings: dict[str, float] = {}
    started = time.monotonic()

    def timed(name: str, step, *args):
        at = time.monotonic()
        try:
            return step(runbook, *args)
        finally:
            timings[name] = round(time.monotonic() - at, 2)

    timed("stop the apps", stop_apps)
    safety = None
    try:
        safety = timed("safety dump", safety_dump)
        if restore is None:
            timed("restore", restore_backup, fetched)
            compared = timed("compare", compare_with_backup, fetched)
        else:  # to a point in time: nothing was counted then
            timed("restore", restore)
            compared = {"tables": []}
    except Exception as exc:
        reason = one_line(str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__)
        if safety is not None:
            try:
                timed("put the safety dump back", put_back, safety)
            except Exception as second:  # the apps stay stopped: the database is not what they knew
                both = (f"{reason}; putting the safety dump {safety['key']} back failed too: "
                        f"{one_line(str(second).splitlines()[0] if str(second).strip() else type(second).__name__)}; "
                        "the apps stay stopped")
                publish_rto(plan, fetched, timings, time.monotonic() - started, failed=both, put_back=False)
                raise StepFailed(both) from None
        # else: nothing replaced yet, the database is as it was
        timed("start the apps", start_apps)
        publish_rto(plan, fetched, timings, time.monotonic() - started, failed=reason)
        raise
    timed("start the apps", start_apps)
    downtime = round(time.monotonic() - started, 2)
    Ledger(runbook.state_dir).record_event(PHASE, "recover.done", before={"safety_dump": safety["key"]}, after={
        "backup": plan.key, "approver": answer.approver, "reason": answer.reason, "downtime_s": downtime,
        "timings": timings, "lost": plan.lost}, flow_run_id=current_run_id())
    publish_rto(plan, fetched, timings, downtime)
    return {"backup": plan.key, "safety_dump": safety["key"], "downtime_s": downtime, "timings": timings,
            "download_s": fetched["download_s"], "tables": compared["tables"], "lost_at_plan": plan.lost,
            "rows_before": {t["table"]: t["rows now"] for t in plan.tables}}


def _recover_to_time(runbook: Runbook, options: RecoverOptions) -> dict:
    """The same recovery, the database back to ``target_time`` by pgBackRest: no counts were taken at that
    moment, so what will be lost is shown as every table's rows now, and nothing is compared after."""
    target = options.target_time
    if target.tzinfo is None:
        raise RunbookInvalid("target_time: give the time zone too (e.g. 2026-12-07T10:15:00+01:00): the VPS and "
                             "the operator may not share one")
    plan = plan_recovery(runbook, options.backup, counts_only=True)
    info = pitr_info(runbook)
    earliest = info.earliest_s
    if earliest is None or target.timestamp() < earliest or target.timestamp() > time.time():
        reach = (f"between {datetime.fromtimestamp(earliest, timezone.utc).isoformat()} and now" if earliest
                 else "nowhere: no pgBackRest backup yet (liftoff run pitr)")
        raise RunbookInvalid(f"target_time: {target.isoformat()} is out of reach; a point-in-time recovery reaches "
                             f"{reach}")
    plan.key = f"point in time {target.isoformat()} (pgBackRest stanza {runbook.backups.pitr.stanza})"
    fetched = {"summary": f"pgBackRest: {len(info.backups)} backup(s), WAL {info.archive_min} .. {info.archive_max}",
               "download_s": 0.0, "key": plan.key}
    text = publish_recovery_plan(plan, fetched, dry_run=options.dry_run)
    if options.dry_run:
        return {"dry_run": True, "target_time": target.isoformat()}
    answer = _approve(runbook, plan, text)
    with exclusive(runbook.state_dir), exclusive(runbook.state_dir, lock=BACKUP_LOCK):
        return _recover(runbook, plan, fetched, answer, restore=lambda rb: restore_to_time(rb, target))


def _approve(runbook: Runbook, plan: RecoveryPlan, text: str) -> RecoveryApproval:
    answer = wait_for_answer(runbook, RecoveryApproval, text, f" for the recovery from {plan.key}",
                             "nothing was changed")
    Ledger(runbook.state_dir).record_event(PHASE, "recover.approval", before={"backup": plan.key, "lost": plan.lost},
                                           after={"input": answer.model_dump(include={"approver", "database",
                                                                                      "approve", "reason"})},
                                           flow_run_id=current_run_id())
    if not answer.approve:
        raise NotApproved(f"recovery rejected by {safe_text(answer.approver)}: "
                          f"{safe_text(answer.reason) or 'no reason given'}; nothing was changed")
    if answer.database.strip() != plan.database:
        raise NotApproved(f"recovery not confirmed by {safe_text(answer.approver)}: the database typed "
                          f"({safe_text(answer.database) or 'nothing'}) is not '{plan.database}'; nothing was changed")
    return answer


def publish_recovery_plan(plan: RecoveryPlan, fetched: dict | None, dry_run: bool) -> str:
    md = [f"# Recovery of {plan.database}{' (dry run: nothing changed)' if dry_run else ''}", "",
          f"- **database**: {plan.database} on {plan.where}, replaced whole by **{plan.key}**",
          f"- **backup checked**: {fetched['summary']}" if fetched else "- **backup checked**: not yet (a dry run "
          "downloads nothing)",
          f"- **apps**: {', '.join(plan.apps) or '(none listed in cutover.apps)'}, stopped with {plan.stop_with}",
          "- **first**: a safety dump of the database as it is goes to the backup bucket; any failure after the "
          "stop puts it back and starts the apps", "",
          *(["## What will be lost: every change made after that point in time",
             "No counts were taken at that moment: here is every table's rows now, for the comparison afterwards. "
             "The safety dump keeps the database as it is when the apps are stopped.", "",
             markdown_table([{"table": t["table"], "rows now": t["rows now"]} for t in plan.tables])]
            if plan.key.startswith("point in time") else
            [f"## What will be lost: {plan.lost:,} row(s) written after the backup",
             "Counted on the live database now, per table (rows now minus rows at backup time: rows deleted since "
             "the backup come back). The apps still write until they are stopped: the safety dump keeps those rows.",
             "", markdown_table([t for t in plan.tables if t["written after the backup"]] or
                                [{"table": "(none)", "written after the backup": 0}])]),
          "", "## Backups in the bucket (newest first)", markdown_table([b.row for b in plan.backups]),
          "", f"To go on, type **{plan.database}** and tick approve."]
    text = "\n".join(md)
    publish_markdown("recover-plan", text)
    return text


def publish_rto(plan: RecoveryPlan, fetched: dict, timings: dict[str, float], downtime: float,
                failed: str | None = None, put_back: bool = True) -> None:
    rows = [{"step": name, "seconds": s} for name, s in timings.items()]
    rows.append({"step": "downtime (apps stopped to healthy): the RTO", "seconds": round(downtime, 2)})
    publish_table("recover-rto", rows, f"Recovery from {plan.key}: downtime per step "
                  f"(download before the stop: {fetched['download_s']} s)")
    head = (f"# Recovery done: {plan.database} is {plan.key} again" if not failed
            else f"# Recovery FAILED, the database as before it is back: {failed}" if put_back
            else f"# Recovery FAILED, and the database as before it is NOT back: {failed}")
    publish_markdown("recover-summary", "\n".join([head, "", f"Downtime (RTO): **{round(downtime, 2)} s**; the "
                                                   f"backup's download before the stop: {fetched['download_s']} s.",
                                                   "", markdown_table(rows)]))
