"""The gate protocol, and one line per check: every gate's report is a ``GateReport`` (``ok``, ``failures()``,
``summary()``, and the error a failed one raises); a checklist-shaped gate (the cutover's checklist, the
security checks) returns a ``CheckReport`` of ``CheckLine``s. Core: it imports nothing above it.

A line is passed, failed or "not checked" (not configured, or not checkable by a machine here): a "not checked"
line does not fail the report, but it is never shown as passed, so an approver sees what nobody checked. The
report is the gate protocol the steps record (``liftoff.steps.recorded(gate=...)``): ``ok``, ``failures()``
and ``summary()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from liftoff.errors import ChecksBlocked, GateFailed, LiftoffError, needs_operator
from liftoff.reports import check_rows

PASSED, FAILED, NOT_CHECKED = "passed", "failed", "not checked"
Status = Literal["passed", "failed", "not checked"]


class GateReport:
    """What a gate returns and ``liftoff.steps.recorded(gate=...)`` records: passed when it names no failure.
    A report with a stricter rule (every line must have passed, not only none failed) overrides ``ok``."""

    @property
    def ok(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        """One line per difference or failed check, each naming what differs (and where)."""
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError

    def blockers(self) -> list[str]:
        """One line per check that could not run for what the operator must fix (an input, a credential, a host
        that cannot be reached), each naming the field and the fix. Such a check is not a difference: the gate
        did not compare it. None by default."""
        return []

    def differences_found(self) -> list[str]:
        """The failures the gate found by comparing (``failures()`` less ``blockers()``)."""
        return self.failures()

    def error(self, gate: str) -> LiftoffError:
        """What a failed gate raises: "<gate> gate failed: <the first differences>", then every one (exit 3); or,
        when a check could not run, ``ChecksBlocked`` (exit 2): a one-line summary, then one line per such check
        with its fix. The report travels with it (``error.report``) for a caller that shows more."""
        blocked = self.blockers()
        error = (ChecksBlocked.of(gate, blocked, self.differences_found()) if blocked
                 else GateFailed.of(gate, self.failures()))
        error.report = self
        return error


@dataclass(frozen=True)
class CheckLine:
    name: str
    status: Status
    detail: str
    fix: str = ""  # what to do when it failed or was not checked
    blocked: bool = False  # failed because it could not run: an input, a credential or a host to fix (exit 2)


def blocker_line(name: str, detail: str, fix: str) -> str:
    """How a check that could not run reads on its own line: what failed, then the fix."""
    return f"{name}: {detail}" + (f" (fix: {fix})" if fix else "")


def failed_line(name: str, exc: BaseException, detail: str, fix: str) -> CheckLine:
    """A check's failed line for the error ``exc`` it raised: blocked when the operator must fix an input,
    a credential or reachability (``liftoff.errors.needs_operator``)."""
    return CheckLine(name, FAILED, detail, fix, blocked=needs_operator(exc))


@dataclass(frozen=True)
class CheckReport(GateReport):
    lines: list[CheckLine] = field(default_factory=list)
    #: what the summary calls the report ("checklist passed: ...")
    label: ClassVar[str] = "checks"

    @property
    def ok(self) -> bool:
        """No line failed ("not checked" lines do not fail the report; they are shown red)."""
        return not any(line.status == FAILED for line in self.lines)

    def failures(self) -> list[str]:
        return [f"{line.name}: {line.detail}" for line in self.lines if line.status == FAILED]

    def blockers(self) -> list[str]:
        return [blocker_line(line.name, line.detail, line.fix) for line in self.lines
                if line.status == FAILED and line.blocked]

    def differences_found(self) -> list[str]:
        return [f"{line.name}: {line.detail}" for line in self.lines if line.status == FAILED and not line.blocked]

    def not_checked(self) -> list[str]:
        return [line.name for line in self.lines if line.status == NOT_CHECKED]

    def line(self, name: str) -> CheckLine:
        return next(line for line in self.lines if line.name == name)

    def summary(self) -> str:
        counts = {s: sum(1 for line in self.lines if line.status == s) for s in (PASSED, FAILED, NOT_CHECKED)}
        head = (f"{self.label} passed: {counts[PASSED]} of {len(self.lines)} lines passed" if self.ok else
                f"{self.label} failed: {counts[FAILED]} of {len(self.lines)} lines failed "
                f"({', '.join(line.name for line in self.lines if line.status == FAILED)})")
        unchecked = self.not_checked()
        return head + (f"; not checked: {', '.join(unchecked)}" if unchecked else "")

    def rows(self) -> list[dict]:
        """One row per line, for a table artifact and an approval form."""
        return check_rows(self.lines)
