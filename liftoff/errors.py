"""Errors an operator can act on. Each message is one line naming the field, host or path, and what to
do next; none carries a secret. The CLI maps each family to its exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2  # the runbook, the environment or a server refused: fix and re-run
EXIT_GATE_FAILED = 3  # a verification gate found a difference
EXIT_NOT_APPROVED = 4  # an approval was rejected, left unconfirmed or not given in time: nothing changed


class LiftoffError(Exception):
    """Base of the errors whose message is meant for the operator, as is."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


class RunbookInvalid(LiftoffError):
    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class SecretUnavailable(LiftoffError):
    pass


class ConnectionRefused(LiftoffError):
    """A server could not be reached or refused our login."""


class ToolMissing(LiftoffError):
    """A binary (pg_dump, pg_restore) of the needed version is not installed."""


class PreflightFailed(LiftoffError):
    """The environment is not ready; the message lists each failed check."""


class StepFailed(LiftoffError):
    """A step (pg_dump, pg_restore, a SQL statement) failed; source data was not touched."""


class GateFailed(LiftoffError):
    """A verification gate found the two sides different."""

    exit_code = EXIT_GATE_FAILED
    report = None  # the gate's report, when a gate step raised it (liftoff.checks.GateReport.error)

    @classmethod
    def of(cls, gate: str, failures: list[str], shown: int = 3) -> "GateFailed":
        """The first line names the gate and its first differences, so a caller that keeps one line (the
        cutover's reason, a step's record) still says why; every difference follows, one per line."""
        first = "; ".join(failures[:shown]) or "no difference was named"
        more = f" (and {len(failures) - shown} more)" if len(failures) > shown else ""
        return cls("\n".join([f"{gate} gate failed: {first}{more}", *failures]))


class ChecksBlocked(LiftoffError):
    """A gate could not make some of its checks: an input, a credential or a host the operator must fix (exit 2).
    Not a gate result: the ledger records the step as failed, not the gate (unless a difference was found too)."""

    report = None  # the gate's report (liftoff.checks.GateReport.error)

    @classmethod
    def of(cls, gate: str, blocked: list[str], differences: list[str]) -> "ChecksBlocked":
        """A one-line summary first (what a caller that keeps one line keeps), then one line per check that could
        not run (each naming its field and fix), then any difference found meanwhile."""
        head = (f"{gate}: {len(blocked)} check{'s' if len(blocked) != 1 else ''} could not run (input, credentials "
                f"or reachability: fix each line below and run again)")
        if differences:
            head += f"; and {len(differences)} difference{'s' if len(differences) != 1 else ''} found"
        return cls("\n".join([head, *blocked, *differences]))


def needs_operator(exc: BaseException) -> bool:
    """Whether ``exc`` says a check could not run for what only the operator can fix: the runbook, a secret, a
    credential, a host that cannot be reached, a tool not installed (exit 2), as opposed to a check that ran
    and found a difference (exit 3)."""
    return isinstance(exc, (RunbookInvalid, SecretUnavailable, ConnectionRefused, ToolMissing, ChecksBlocked))


class NotApproved(LiftoffError):
    """An approval was rejected, given with a line unconfirmed, or not given in time; nothing was changed."""

    exit_code = EXIT_NOT_APPROVED
