"""The plan's watch after the switch ("monitor for 24 hours"), ending with "safe to decommission" or what failed."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.hooks import notify_on_failure
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import Ledger, exclusive
from liftoff.reports import Progress, publish_markdown
from liftoff.tasks.watch.steps import kept_cutover, round_message, round_times, run_watch_gate, start_watch, watch_round


@flow(name="watch", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def watch(options: RunOptions) -> dict:
    """Succeeds when, for ``soak.hours`` after a kept cutover, no round of checks (every ``soak.interval_s``) found
    a check critical: the health phase's services, apps, disk and connections, CPU as a 5-minute average and
    RAM (over ssh), each app's response time and, where its health endpoint reports one, its error rate, all
    against the plan's thresholds. Alerts go to the notifications webhook by severity as checks get worse. A
    paused or killed watch resumes where the ledger says it was and ends at the time it was to end. Refuses to
    start before a kept cutover (exit 2). A dry run says what it would check, and for how long."""
    runbook = open_runbook(options, "watch")
    soak = runbook.soak
    if options.dry_run:
        why = kept_cutover(Ledger(runbook.state_dir))
        publish_markdown("watch-report", f"# Watch plan (dry run: nothing checked)\n\nEvery {soak.interval_s:g} s "
                         f"for {soak.hours:g} h: the health phase's checks, CPU (average over {soak.cpu_window_s:g} s) "
                         "and RAM over ssh, each app's response time and error rate.\n\n"
                         + (f"It would refuse to start: {why}." if why else "A kept cutover is on record."))
        return {"dry_run": True, "refused": why}
    with exclusive(runbook.state_dir):
        window = start_watch(runbook)
        progress = Progress("watch", window["rounds"])
        for n in round_times(window, Ledger(runbook.state_dir)):
            result = watch_round(runbook, n)
            progress.advance(round_message(result), by=max(1, n + 1 - progress.done))
        report = run_watch_gate(runbook)
    return {"summary": report.summary(), "rounds": len(report.rounds), "warnings": report.warnings()}
