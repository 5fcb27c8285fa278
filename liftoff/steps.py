"""One way for every step of every phase to keep its books in the ledger: skip, start, finish, fail.

    @task(name="restore table data", cache_policy=NO_CACHE)
    @recorded("restore.data", skip_if=done)
    def restore_data(rb: Runbook, plan: RestorePlan) -> dict: ...

A step done before is skipped (when its ``skip_if`` says so) and returns what it recorded, with ``skipped``;
otherwise it is marked running with the flow run's id, and marked done with what it returned and how long
it took, or failed with the one-line reason of the error it raised (which is re-raised). A gate's step
(``gate=PHASE``) also records the gate's result in the ledger's ``gates`` table, passed or not, hands the
report to its ``publish`` (the artifacts, passed or not), and when the gate did not pass is marked failed and
raises ``GateFailed`` naming the gate and every difference: no flow writes that raise by hand, and a failed
gate never reads as done. A report whose only failures are checks that could not run (``blockers()``: an
input, a credential, a host to fix) records no gate result: the step is failed and ``ChecksBlocked`` (exit 2)
is raised, one line per such check.

    @task(name="verify cache (gate)", cache_policy=NO_CACHE)
    @recorded("verify-cache", gate="cache", publish=publish_cache_gate)
    def run_cache_gate(rb: Runbook, configured: dict) -> CacheReport: ...

A gate's report follows one protocol (``liftoff.checks.GateReport``): ``ok``, ``failures()`` and ``summary()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from liftoff.ledger import Ledger, current_run_id, setup_of
from liftoff.redaction import redact


def done(rb, ledger: Ledger, step: str) -> bool:
    """The usual ``skip_if``: the ledger records the step as done."""
    return ledger.is_done(step)


def recorded(step: str, *, skip_if: Callable | None = None, on_skip: Callable | None = None, gate: str | None = None,
             title: str | None = None, publish: Callable | None = None, read_only: bool = False):
    """Decorates ``fn(rb, ...)`` (``rb`` has ``state_dir``). ``skip_if(rb, ledger, step)``: whether the work is
    done and still usable (default: never skip, the step is idempotent and runs each time).
    ``on_skip(rb, detail)`` may check the recorded work is still usable (raise) and shape what a skipped call
    returns. ``gate``: the phase whose gate this step is; ``fn`` then returns a report (``ok``, ``failures()``,
    ``summary()``), which ``publish(report, rb, *args, **kwargs)`` shows, and a report that did not pass raises
    ``GateFailed`` ("<title> gate failed: ...", ``title`` defaulting to ``gate``). ``read_only``: a step that writes
    nothing anywhere (preflight, also in a dry run) records itself only in a ledger that exists already."""

    def wrap(fn):
        def judged(result, rb, args, kwargs, ledger: Ledger | None, run_id):
            """A gate's report recorded (when there is a ledger), shown, and raised when it did not pass."""
            blocked, differences = result.blockers(), result.differences_found()
            if ledger is not None:
                summary = ("; ".join(differences[:5]) + (f"; and {len(differences) - 5} more"
                                                         if len(differences) > 5 else "")
                           if differences else result.summary())
                if blocked and not differences:  # nothing was compared wrong: no gate result, a failed step
                    ledger.fail_step(step, redact(str(result.error(title or gate)).splitlines()[0]))
                else:
                    ledger.record_gate(gate, result.ok, redact(summary), run_id)
                    if result.ok:
                        ledger.finish_step(step, _as_detail(result))
                    else:
                        ledger.fail_step(step, redact(f"gate failed: {summary}"))
            if publish is not None:
                publish(result, rb, *args, **kwargs)
            if not result.ok:
                raise result.error(title or gate)
            return result

        @functools.wraps(fn)
        def run(rb, *args, **kwargs):
            if read_only and not (rb.state_dir / "ledger.sqlite").exists():
                result = fn(rb, *args, **kwargs)
                return judged(result, rb, args, kwargs, None, None) if gate is not None else result
            ledger = Ledger(rb.state_dir)
            ledger.claim_setup(setup_of(rb))  # a ledger another runbook wrote is refused, naming both
            if skip_if is not None and _call_skip_if(skip_if, rb, ledger, step):
                detail = ledger.step_detail(step)
                return on_skip(rb, detail) if on_skip else {**detail, "skipped": True}
            run_id = current_run_id()
            ledger.start_step(step, run_id)
            try:
                result = fn(rb, *args, **kwargs)
            except BaseException as exc:
                reason = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                try:
                    ledger.fail_step(step, reason)
                except Exception:  # the ledger's disk may be the full one; the raised error says what happened
                    pass
                raise
            if gate is not None:
                return judged(result, rb, args, kwargs, ledger, run_id)
            ledger.finish_step(step, _as_detail(result))
            return result

        return run

    return wrap


def _call_skip_if(skip_if: Callable, rb, ledger: Ledger, step: str) -> bool:
    try:
        return bool(skip_if(rb, ledger, step))
    except TypeError:  # a skip_if(rb, ledger) that does not need the step's name
        return bool(skip_if(rb, ledger))


def _as_detail(result) -> dict:
    if isinstance(result, dict):
        return result
    if hasattr(result, "summary"):
        return {"summary": result.summary()}
    return {"result": result} if isinstance(result, (list, str, int, float)) else {}
