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

from liftoff.errors import GateFailed, LiftoffError
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

    def error(self, gate: str) -> LiftoffError:
        """What a failed gate raises: "<gate> gate failed: <the first differences>", then every one (exit 3);
        the report travels with it (``error.report``) for a caller that shows more than the message."""
        error = GateFailed.of(gate, self.failures())
        error.report = self
        return error


@dataclass(frozen=True)
class CheckLine:
    name: str
    status: Status
    detail: str
    fix: str = ""  # what to do when it failed or was not checked


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
