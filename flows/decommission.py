"""The plan's "Disable Supabase (don't delete yet, keep as backup)": a final archive of the project, proven, then
what Liftoff left on it dropped, then the steps only the operator can take in Supabase's dashboard."""

from __future__ import annotations

from prefect import flow
from prefect.input import RunInput
from pydantic import Field

from liftoff.errors import NotApproved
from liftoff.flows.hooks import notify_on_failure
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import Ledger, current_run_id, exclusive
from liftoff.reports import markdown_table, publish_markdown
from liftoff.tasks.cutover.approval import safe_text, wait_for_answer
from liftoff.tasks.decommission.steps import (
    PHASE,
    archive_database,
    archive_files,
    drop_leftovers,
    operator_steps,
    plan_archive,
    start_decommission,
    verify_archive,
    watch_not_passed,
    write_manifest,
)


class DecommissionOptions(RunOptions):
    force_reason: str = Field("", description="Only to decommission without a passing watch: why Supabase may be "
                              "archived now (it goes to the audit trail). Empty: the watch's gate must have passed.")


class DecommissionApproval(RunInput):
    approver: str = Field(..., min_length=1, description="Your name: it goes to the audit trail")
    source_host: str = Field("", description="Type the Supabase database's host (source.host) to confirm")
    approve: bool = Field(False, description="Tick to drop Liftoff's slots and publications on Supabase (its data, "
                          "buckets and files are not touched)")
    reason: str = Field("", description="Why")


@flow(name="decommission", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def decommission(options: DecommissionOptions) -> dict:
    """Succeeds when, after a passing watch (or forced with a reason, recorded), the Supabase project is archived
    in backups.destination (the database as pg_dump -Fc, every bucket's objects) and the archive is proven (the
    dump restored into a scratch database with every table's rows as counted at the dump; every object's
    count, bytes and MD5 against Supabase's listing), a manifest lists each file with its size, SHA-256 and
    what proved it, and, approved by a named operator typing the source's host, Liftoff's replication slots
    and publications on the source are dropped. The steps left to the operator (pause the project in
    Supabase's dashboard, keep it) are printed. Nothing on Supabase is deleted."""
    runbook = open_runbook(options, PHASE)
    if options.dry_run:
        why = watch_not_passed(Ledger(runbook.state_dir)) if (runbook.state_dir / "ledger.sqlite").exists() \
            else "no watch on record (liftoff run watch)"
        plan = plan_archive(runbook)
        publish_markdown("decommission-plan", _plan_markdown(runbook, plan, why, options.force_reason))
        return {"dry_run": True, "refused": why if not options.force_reason.strip() else None, **plan}
    with exclusive(runbook.state_dir):
        start_decommission(runbook, options.force_reason)
        archive_database(runbook)
        archive_files(runbook)
        report = verify_archive(runbook)
        write_manifest(runbook, report)
    plan = plan_archive(runbook)
    _approve(runbook, plan)
    with exclusive(runbook.state_dir):
        cleanup = drop_leftovers(runbook)
    steps = operator_steps(runbook, report, cleanup)
    publish_markdown("decommission-next-steps", "\n".join(
        ["# Supabase archived: the steps left to you", "", *[f"{i}. {s}" for i, s in enumerate(steps, 1)], "",
         f"Dropped on the source: {', '.join(cleanup['dropped']) or 'nothing (none left)'}."]))
    return {"summary": report.summary(), "archive": f"s3://{report.bucket}/{report.prefix}",
            "dropped": cleanup["dropped"], "kept": cleanup["kept"], "next_steps": steps}


def _plan_markdown(runbook, plan: dict, why: str | None, force_reason: str) -> str:
    refusal = (f"It would refuse: {why}." if why and not force_reason.strip() else
               f"Forced without a passing watch ({why}): {force_reason}." if why else "The watch passed.")
    return "\n".join([
        "# Decommission plan (dry run: nothing written)", "", refusal, "",
        f"- **archive to**: s3://{runbook.backups.destination.bucket if runbook.backups else '(no backups section)'}/"
        f"{runbook.decommission.archive_prefix}<UTC time>/",
        f"- **schemas dumped**: {', '.join(plan['schemas'])}",
        f"- **left out (the source user may not read them)**: "
        f"{', '.join(plan['left_out_schemas'] + plan['left_out_tables']) or 'none'}",
        f"- **would drop on the source (after your approval)**: {', '.join(plan['liftoff_on_source']) or 'nothing'}",
        "", "## Buckets", markdown_table(plan["buckets"])])


def _approve(runbook, plan: dict) -> DecommissionApproval:
    text = "\n".join([
        "# Drop what Liftoff left on Supabase", "",
        f"The archive is proven. Type **{runbook.source.host}** to confirm dropping, on the source: "
        f"{', '.join(plan['liftoff_on_source']) or 'nothing (none left)'}; and this runbook's subscription on "
        "the target. Supabase's data, buckets and files are not touched; the write freeze stays."])
    answer = wait_for_answer(runbook, DecommissionApproval, text, " to drop Liftoff's objects on the source",
                             "the archive is made and proven, nothing was dropped")
    Ledger(runbook.state_dir).record_event(PHASE, "decommission.approval", before={"would_drop": plan["liftoff_on_source"]},
                                           after={"input": answer.model_dump(include={"approver", "source_host",
                                                                                      "approve", "reason"})},
                                           flow_run_id=current_run_id())
    if not answer.approve:
        raise NotApproved(f"decommission rejected by {safe_text(answer.approver)}: "
                          f"{safe_text(answer.reason) or 'no reason given'}; the archive is made, nothing was dropped")
    if answer.source_host.strip() != runbook.source.host:
        raise NotApproved(f"decommission not confirmed by {safe_text(answer.approver)}: the host typed "
                          f"({safe_text(answer.source_host) or 'nothing'}) is not '{runbook.source.host}'; "
                          "nothing was dropped")
    return answer
