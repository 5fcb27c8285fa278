"""The rehearsal: the whole migration, dry, on scratch resources, measured and compared with the last ones.

The real target is never touched: the phase flows run with a scratch runbook (the real one pointed at a
scratch database on the target server, scratch buckets and a state_dir of its own), and what the rehearsal
created is torn down afterwards, also when a phase fails. Only the real ledger's event log is written to.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import Ledger, current_run_id
from liftoff.logs import get_logger
from liftoff.phases import PHASES, all_flows
from liftoff.redaction import first_line, redact
from liftoff.reports import for_runbook, markdown_table, publish_markdown
from liftoff.runbooks.model import Runbook
from liftoff.systems import postgres
from liftoff.tasks.rehearsal import estimate
from liftoff.tasks.rehearsal import scratch as scratch_tasks

log = get_logger(phase="rehearsal")


@dataclass(frozen=True)
class RehearsedPhase:
    phase: str  # the registry's phase: its steps are what the final sync repeats
    flow: str  # the registry's flow that runs it whole
    configured: object  # (Runbook) -> bool


# The phases a rehearsal runs, in order, when the runbook configures them. The cutover is not rehearsed
# here (the scratch runbook has no switch); later phases join this list.
REHEARSED = (
    RehearsedPhase("database", "database", lambda rb: True),
    RehearsedPhase("storage", "storage", lambda rb: rb.storage.configured),
)


@dataclass
class RehearsalPlan:
    scratch: Runbook
    phases: list[RehearsedPhase]
    buckets: list[str]

    def as_dict(self) -> dict:
        ep = self.scratch.target.direct
        return {"scratch_database": ep.database, "server": f"{ep.host}:{ep.port}", "buckets": self.buckets,
                "state_dir": str(self.scratch.state_dir), "phases": [p.flow for p in self.phases]}


@dataclass
class Measured:
    phases: dict = field(default_factory=dict)  # phase: {seconds, steps, gate, ok, error}
    sizes: dict = field(default_factory=dict)
    estimate: dict = field(default_factory=dict)
    failed: str | None = None  # the one line of what failed


@flow(name="rehearsal")
def rehearse(options: RunOptions) -> dict:
    """Succeeds when every configured phase (database, then storage) ran whole against scratch resources on
    the real target's servers (a scratch database, scratch buckets, a state_dir of its own) with every gate
    passing, the scratch resources were torn down again, and the rehearsal (each phase's duration, data
    sizes, gate results, the estimated cutover downtime) is in the real ledger's event log and in a report
    comparing it with the previous rehearsals. Tears down also when a phase fails; the real target and the
    real ledger's steps are never touched. A dry run says what it would create and run, and touches
    nothing."""
    real = open_runbook(options, "rehearsal")
    plan = plan_rehearsal(real)
    publish_plan(plan, options.dry_run)
    if options.dry_run:
        return {"dry_run": True, **plan.as_dict()}
    scratch_options = RunOptions(runbook=str(scratch_tasks.write_scratch_runbook(plan.scratch)))
    measured = Measured()
    error: BaseException | None = None
    teardown: dict = {}
    try:
        scratch_tasks.prepare_scratch(plan.scratch, real)
        for phase in plan.phases:
            run_phase(phase, scratch_options, measured)
    except BaseException as exc:  # a failed phase, or the run stopped: tear down all the same
        error = exc
        measured.failed = first_line(exc, type(exc).__name__)
    finally:
        for_runbook(real.name)  # the phase flows published under the scratch runbook's name
        try:
            teardown = scratch_tasks.tear_down_scratch(plan.scratch, real)
        except Exception as exc:
            teardown = {"problems": [first_line(exc, type(exc).__name__)]}
            if error is None:
                error, measured.failed = exc, first_line(exc, type(exc).__name__)
    try:
        measure(real, plan, measured)
    except Exception as exc:  # the rehearsal is still recorded, with what could be measured
        log.warning("rehearsal measurements incomplete", reason=first_line(exc, type(exc).__name__))
    outcome = record(real, plan, measured, teardown)
    publish_report(real)
    notify_if_needed(real, measured)
    if error is not None:
        raise error
    return outcome


def plan_rehearsal(real: Runbook) -> RehearsalPlan:
    scratch = scratch_tasks.scratch_runbook(real, scratch_tasks.new_scratch_state_dir(real))
    phases = [p for p in REHEARSED if p.configured(real)]
    buckets = scratch_tasks.scratch_buckets(real) if real.storage.configured else []
    return RehearsalPlan(scratch, phases, buckets)


def run_phase(phase: RehearsedPhase, options: RunOptions, measured: Measured) -> None:
    """Runs one phase's flow on the scratch runbook, timing it; a failure is recorded, then re-raised."""
    started = time.monotonic()
    measured.phases[phase.phase] = entry = {"flow": phase.flow}
    try:
        entry["result"] = all_flows()[phase.flow].load()(options)
        entry["ok"] = True
    except BaseException as exc:
        entry.update(ok=False, error=first_line(exc, type(exc).__name__))
        raise
    finally:
        entry["seconds"] = round(time.monotonic() - started, 2)


def measure(real: Runbook, plan: RehearsalPlan, measured: Measured) -> None:
    """Step durations and gates from the scratch ledger, data sizes, and the estimated cutover downtime."""
    ledger = Ledger(plan.scratch.state_dir)
    steps = ledger.steps()
    registry = {p.name: p for p in PHASES}
    final_sync: dict[str, float] = {}
    for name, entry in measured.phases.items():
        phase = registry[name]
        entry["steps"] = estimate.step_seconds(steps, phase.steps)
        gate = ledger.latest_gate(phase.gate)
        entry["gate"] = None if gate is None else {"passed": gate.passed, "summary": gate.summary}
        final_sync.update({s: v for s, v in entry["steps"].items() if s != "storage.copy"})
        # The final sync runs the phase's flow whole: its planning and Prefect's own time count too.
        outside = round(entry["seconds"] - sum(entry["steps"].values()), 2)
        if entry.get("ok") and outside > 0:
            final_sync[f"{name} phase outside its steps (plans, Prefect)"] = outside
        result = entry.pop("result", None) or {}
        if name == "database":
            export = result.get("export") or steps.get("export") and steps["export"].detail or {}
            tables = export.get("tables") or {}
            measured.sizes["database"] = {"tables": len(tables) if tables else None,
                                          "rows": sum(n or 0 for n in tables.values()) if tables else None,
                                          "archive_bytes": export.get("archive_bytes"),
                                          "source_bytes": _source_bytes(real)}
        if name == "storage":
            verified = result.get("verify") or steps.get("verify-storage") and steps["verify-storage"].detail or {}
            copied = result.get("copy") or {}
            measured.sizes["storage"] = {"objects": verified.get("objects", copied.get("copied")),
                                         "bytes": verified.get("bytes", copied.get("bytes"))}
    copy_s, share, share_note = 0.0, 0.0, None
    if "storage" in measured.phases and measured.phases["storage"].get("ok"):
        copy_s = measured.phases["storage"]["steps"].get("storage.copy", 0.0)
        try:
            share, share_note = estimate.changed_share(real)
        except Exception as exc:  # the estimate is still useful with the whole copy counted
            share = 1.0
            share_note = f"the real storage progress could not be read ({first_line(exc, type(exc).__name__)}): whole copy counted"
    switch = None
    if (real.state_dir / "ledger.sqlite").exists():
        switch = estimate.last_cutover_switch(Ledger(real.state_dir).events("cutover"))
    if measured.failed:  # a phase that did not finish measures nothing worth comparing
        measured.estimate = {"downtime_s": None, "parts": final_sync,
                             "assumption": "a phase failed, so there is no estimate from this rehearsal"}
        return
    measured.estimate = estimate.estimate_downtime(final_sync, copy_s, share, switch)
    measured.estimate["storage_changed"] = share_note


def _source_bytes(real: Runbook) -> int | None:
    try:
        with postgres.session(real.source, "source") as conn:
            return postgres.server_info(conn, real.source).database_bytes
    except Exception:  # a size is a nice-to-have in the report; the phase's own error says more
        return None


def record(real: Runbook, plan: RehearsalPlan, measured: Measured, teardown: dict) -> dict:
    """The rehearsal in the real ledger's event log (only there), and a small summary in its state_dir."""
    outcome = {"passed": measured.failed is None, "failed": measured.failed, "phases": measured.phases,
               "sizes": measured.sizes, "estimate": measured.estimate, "state_dir": str(plan.scratch.state_dir),
               "scratch_database": plan.scratch.target.direct.database, "buckets": plan.buckets,
               "teardown": teardown}
    Ledger(real.state_dir).record_event(scratch_tasks.PHASE, scratch_tasks.DONE if outcome["passed"]
                                        else scratch_tasks.FAILED, after=outcome, flow_run_id=current_run_id())
    (plan.scratch.state_dir / scratch_tasks.SUMMARY).write_text(redact(json.dumps(outcome, indent=2, default=str)))
    log.info("rehearsal recorded", passed=outcome["passed"], downtime_s=measured.estimate.get("downtime_s"))
    return outcome


def publish_plan(plan: RehearsalPlan, dry_run: bool) -> None:
    p = plan.as_dict()
    md = [f"# Rehearsal plan{' (dry run: nothing created, nothing run)' if dry_run else ''}", "",
          (f"- scratch database `{p['scratch_database']}` on the target server {p['server']} (dropped first if a "
           "crashed rehearsal left it)"),
          f"- scratch buckets: {', '.join(f'`{b}`' for b in p['buckets']) or 'none (no storage configured)'}",
          f"- state_dir `{p['state_dir']}` with its own ledger; the real ledger only gets the rehearsal's event",
          f"- phases, in order: {', '.join(p['phases'])}",
          "- then the scratch database, buckets and dump archive are removed, also when a phase fails"]
    publish_markdown("rehearsal-plan", "\n".join(md))


def publish_report(real: Runbook) -> None:
    events = [e for e in Ledger(real.state_dir).events(scratch_tasks.PHASE)
              if e.what in (scratch_tasks.DONE, scratch_tasks.FAILED)]
    latest = events[-1].after
    verdict = "PASSED" if latest["passed"] else f"FAILED: {latest['failed']}"
    est = latest.get("estimate") or {}
    downtime = est.get("downtime_s")
    md = [f"# Rehearsal {verdict}", "",
          f"Estimated cutover downtime: **{'–' if downtime is None else f'{downtime:g} s'}**"
          + (f" (over rehearsal.max_downtime_s {real.rehearsal.max_downtime_s:g} s)"
             if _over_limit(real, est) else ""), ""]
    if est.get("assumption"):
        md.append(f"Assumption: {est['assumption']}.")
    if est.get("storage_changed"):
        md.append(f"Storage copy in the final sync: {est['storage_changed']}.")
    md += ["", "## Rehearsals, oldest first", markdown_table(estimate.comparison_rows(events))]
    if len(events) > 1:
        md += ["## Against the previous rehearsal", markdown_table(estimate.changes(events[-2].after, latest))]
    md += ["## This rehearsal's downtime estimate",
           markdown_table([{"part": k, "seconds": v} for k, v in (est.get("parts") or {}).items()])]
    gates = [{"phase": name, "gate": ("passed" if e["gate"]["passed"] else "FAILED") if e.get("gate") else "not run",
              "summary": (e.get("gate") or {}).get("summary") or e.get("error") or ""}
             for name, e in latest.get("phases", {}).items()]
    md += ["## Gates", markdown_table(gates)]
    problems = (latest.get("teardown") or {}).get("problems")
    md += ["## Teardown", "Left behind: " + "; ".join(problems) if problems else
           "Scratch database, scratch buckets and the dump archive removed."]
    publish_markdown("rehearsal-report", "\n".join(md), "Rehearsals compared: durations, sizes, gates, downtime")


def _over_limit(real: Runbook, estimate: dict) -> bool:
    limit = real.rehearsal.max_downtime_s
    return bool(limit and estimate.get("downtime_s") and estimate["downtime_s"] > limit)


def notify_if_needed(real: Runbook, measured: Measured) -> None:
    """Posts to the runbook's webhook when a phase failed or the estimated downtime grew past the limit; a
    notification that cannot be sent is logged, never fails the rehearsal."""
    if measured.failed:
        text = f"Rehearsal of {real.name} FAILED: {measured.failed}"
    elif _over_limit(real, measured.estimate):
        text = (f"Rehearsal of {real.name}: estimated cutover downtime {measured.estimate['downtime_s']:g} s is over "
                f"rehearsal.max_downtime_s ({real.rehearsal.max_downtime_s:g} s)")
    else:
        return
    try:
        from prefect.runtime import flow_run

        from liftoff.systems.webhook import notify

        notify(real, redact(text), flow_run_url=flow_run.ui_url, severity="error" if measured.failed else "warning")
    except Exception as exc:  # no webhook module yet, or the webhook refused: the report still says it
        log.warning("rehearsal notification not sent", reason=first_line(exc, type(exc).__name__))
