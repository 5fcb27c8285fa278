"""Prefect state hooks of the phase flows: a failed or crashed run posts one line to the runbook's webhook."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from liftoff.errors import LiftoffError
from liftoff.redaction import redact, register_secret
from liftoff.logs import get_logger
from liftoff.runbooks.model import IDENTIFIER_FIELDS, SecretRef
from liftoff.systems.webhook import notify

_EXCEPTION_PREFIX = "Flow run encountered an exception: "
# A failure of these is critical (notifications.urls with severity critical, SMS in the plan): the apps may be
# frozen or half switched, or no restorable backup is being made.
CRITICAL_FLOWS = frozenset({"cutover", "rollback", "catch-up", "resync", "backup", "restore-test"})


def ui_link(flow_run_id) -> str | None:
    """The flow run's page in the Prefect UI (``PREFECT_UI_URL``, by default the API URL's server), or None
    when no UI is configured (an ephemeral, in-process API)."""
    if not flow_run_id:
        return None
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=str(flow_run_id)) or None



def _runbook_path(parameters: dict[str, Any]) -> str | None:
    """The runbook path of a phase flow's parameters: ``options`` (a ``RunOptions``, or its dict as the API
    stores it), else any parameter carrying a ``runbook`` field."""
    candidates = [parameters.get("options")] + [v for k, v in parameters.items() if k != "options"]
    for value in candidates:
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(value.get("runbook"), str):
            return value["runbook"]
    return None


def _register_runbook_secrets(value: Any, field: str | None = None) -> None:
    """Registers for redaction every secret of the runbook held in an environment variable, so a failure
    message quoting one is masked even when the code that failed never resolved it (a Prefect Secret block is
    not fetched here: code that used one resolved, and registered, it in this process)."""
    import os

    if isinstance(value, SecretRef):
        if value.env and field not in IDENTIFIER_FIELDS:
            register_secret(os.environ.get(value.env))
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _register_runbook_secrets(getattr(value, name), name)
    elif isinstance(value, dict):
        for item in value.values():
            _register_runbook_secrets(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _register_runbook_secrets(item)


def _failure_line(state) -> str:
    message = (getattr(state, "message", None) or getattr(state, "name", None) or "no message").strip()
    first = message.splitlines()[0] if message else "no message"
    return first.removeprefix(_EXCEPTION_PREFIX)


def notify_on_failure(flow, flow_run, state) -> None:
    """Prefect state hook (``on_failure``, ``on_crashed``): posts "<flow> failed for runbook <name>: <the
    state's message, first line>" with the run's UI link. A subflow's failure is left to the run it belongs
    to (the failure propagates there, and one failure makes one message). Without a readable runbook in the
    run's parameters it gives up quietly."""
    from liftoff.runbooks.model import load_runbook, resolve_runbook_path

    try:
        if getattr(flow_run, "parent_task_run_id", None) is not None:
            get_logger(system="notify").debug("subflow failed; its parent run notifies", flow=flow.name)
            return
        path = _runbook_path(dict(getattr(flow_run, "parameters", None) or {}))
        if path is None:
            get_logger(system="notify").debug("no runbook in the flow run's parameters; notification not sent", flow=flow.name)
            return
        try:
            rb = load_runbook(resolve_runbook_path(path))
        except LiftoffError:
            get_logger(system="notify").debug("runbook not readable; notification not sent", flow=flow.name)
            return
        if rb.notifications.webhook is None and not rb.notifications.urls:
            return
        _register_runbook_secrets(rb)
        verb = "crashed" if state.is_crashed() else "failed"
        text = f"{flow.name} {verb} for runbook {rb.name}: {_failure_line(state)}"
        notify(rb, text, flow_run_url=ui_link(getattr(flow_run, "id", None)),
               severity="critical" if flow.name in CRITICAL_FLOWS else "error")
    except Exception as exc:  # noqa: BLE001 - a hook must not add a failure to the one it reports
        get_logger(system="notify").warning("notification hook failed", flow=getattr(flow, "name", "?"),
                    reason=redact(f"{type(exc).__name__}: {exc}")[:300])
