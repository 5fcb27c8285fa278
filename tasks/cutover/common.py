"""What the cutover's and the rollback's steps share: the phase name, the event kinds of the ledger's log
they write and replay, and the app's environment resolved from the runbook."""

from __future__ import annotations

from liftoff.errors import RunbookInvalid
from liftoff.ledger import Event, Ledger
from liftoff.logs import get_logger
from liftoff.runbooks.model import EnvValue, Runbook

log = get_logger(phase="cutover")
PHASE = "cutover"

# The event log's kinds (``Ledger.record_event(PHASE, what, before, after)``); the rollback replays them.
STARTED = "cutover.started"  # after the approval: a cutover attempt begins (after: who approved)
APPROVAL = "cutover.approval"  # before: the evidence shown; after: the operator's input
FROZEN = "cutover.freeze"  # before: the source's state the freeze changed; after: when writes stopped
SWITCHED = "cutover.switch"  # before: the driver's undo record; after: when, where, which keys
COMPLETED = "cutover.completed"  # after: the measured downtime and each step's duration
ROLLED_BACK = "rollback.done"  # before: the events it undid; after: what it did
TARGET_FROZEN = "rollback.target-freeze"  # before: the target's freeze records (the apps stop writing there)
TARGET_LIFTED = "cutover.target-lift"  # before: the target freeze event's id the next cutover lifted


def require_switch(rb: Runbook) -> None:
    if rb.cutover.switch is None:
        raise RunbookInvalid(f"runbook {rb.name}: the cutover needs cutover.switch (driver ssh or coolify, and the "
                             "apps' new env); see runbooks/tour-crm.yaml")
    if rb.cutover.switch.driver == "ssh" and rb.ssh is None:
        raise RunbookInvalid(f"runbook {rb.name}: cutover.switch.driver ssh needs ssh (host, user, private_key, "
                             "known_hosts)")


def resolve_env(rb: Runbook) -> dict[str, str]:
    """The apps' new environment with every secret reference resolved (and registered for redaction)."""
    values = {}
    for name, spec in rb.cutover.switch.env.items():
        field = f"cutover.switch.env.{name}"
        if isinstance(spec, str):
            values[name] = spec
        elif spec.value is not None:
            values[name] = spec.value
        elif spec.secret is not None:
            values[name] = spec.secret.resolve(field)
        else:
            values[name] = _fill(spec, field)
    return values


def _fill(spec: EnvValue, field: str) -> str:
    text = spec.template
    for part, ref in spec.secrets.items():
        text = text.replace("${" + part + "}", ref.resolve(f"{field}.secrets.{part}"))
    return text


def since_last_rollback(ledger: Ledger) -> list[Event]:
    """The cutover's events after the last rollback: what a rollback would undo, oldest first."""
    return ledger.events_since(PHASE, ROLLED_BACK)


def target_freeze_in_force(ledger: Ledger) -> Event | None:
    """The rollback's freeze of the target, when no cutover has lifted it since."""
    last = [e for e in ledger.events(PHASE) if e.what in (TARGET_FROZEN, TARGET_LIFTED)]
    return last[-1] if last and last[-1].what == TARGET_FROZEN else None
