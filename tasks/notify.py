"""Failure notifications: one short message to the runbook's incoming webhook (Slack- or Discord-compatible).

``notify`` posts a text, with the flow run's UI link, to ``notifications.webhook``; ``notify_on_failure`` is
the Prefect state hook that phase flows attach (``@flow(on_failure=[notify_on_failure],
on_crashed=[notify_on_failure])``). A notification never raises and never hides the failure it reports:
anything that goes wrong here is logged as a warning and the run's own state stands.

The webhook URL is the credential (whoever has it can post to the channel): it is resolved as a secret,
registered for redaction, and never logged; warnings name the runbook field instead.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import BaseModel
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from liftoff.errors import LiftoffError
from liftoff.logs import get_logger
from liftoff.redaction import redact, register_secret
from liftoff.runbooks.model import Runbook, SecretRef

WEBHOOK_FIELD = "notifications.webhook"
# Discord refuses content over 2000 characters; Slack truncates long texts. The link comes on top.
MAX_TEXT = 1500
_ATTEMPTS = 4
_GIVE_UP_AFTER_S = 6.0  # a notification must not hold up the end of a failed run for long
_TIMEOUT = httpx.Timeout(4.0, connect=2.0)
_EXCEPTION_PREFIX = "Flow run encountered an exception: "
# Resolved only as identifiers, never masked: errors elsewhere name them (liftoff.runbooks.model SecretRef.resolve).
_NOT_SENSITIVE = frozenset({"access_key_id"})


def _log():
    return get_logger(system="notify")  # at call time: a module-level bound logger keeps an old configuration


class _Retryable(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _worth_retrying(exc: BaseException) -> bool:
    return isinstance(exc, (_Retryable, httpx.TransportError))


def ui_link(flow_run_id) -> str | None:
    """The flow run's page in the Prefect UI (``PREFECT_UI_URL``, by default the API URL's server), or None
    when no UI is configured (an ephemeral, in-process API)."""
    if not flow_run_id:
        return None
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=str(flow_run_id)) or None


def _shorten(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1].rstrip() + "…"


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>): a failure message must not ping anyone.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_payload(style: str, text: str, flow_run_url: str | None) -> dict:
    """The JSON body for ``style`` (``slack`` or ``discord``): the text redacted and shortened, then the link."""
    text = _shorten(redact(text))
    if style == "discord":
        content = f"{text}\n[flow run](<{flow_run_url}>)" if flow_run_url else text
        return {"content": content, "allowed_mentions": {"parse": []}}
    body = _slack_escape(text)
    return {"text": f"{body}\n<{flow_run_url}|flow run>" if flow_run_url else body}


def notify(rb: Runbook, text: str, *, flow_run_url: str | None = None) -> bool:
    """Posts ``text`` to the runbook's webhook. True when the webhook accepted it; False when none is
    configured or it could not be delivered (logged, never raised). 5xx, 429 and connection errors are
    retried for a few seconds."""
    settings = rb.notifications
    if settings.webhook is None:
        _log().debug("no webhook configured; notification not sent", runbook=rb.name)
        return False
    try:
        url = settings.webhook.resolve(WEBHOOK_FIELD)
    except LiftoffError as exc:  # the variable is not set, the Prefect Secret block cannot be loaded
        _log().warning("notification not sent", runbook=rb.name, reason=redact(str(exc)))
        return False
    if not url.startswith(("https://", "http://")):
        _log().warning("notification not sent", runbook=rb.name,
                    reason=f"{WEBHOOK_FIELD} ({settings.webhook.label}): not an http(s) URL")
        return False
    payload = webhook_payload(settings.style, text, flow_run_url)
    try:
        with httpx.Client(timeout=_TIMEOUT, follow_redirects=False) as client:
            for attempt in Retrying(retry=retry_if_exception(_worth_retrying), reraise=True,
                                    stop=stop_after_attempt(_ATTEMPTS) | stop_after_delay(_GIVE_UP_AFTER_S),
                                    wait=wait_exponential(multiplier=0.25, max=2)):
                with attempt:
                    response = client.post(url, json=payload)
                    if response.status_code >= 500 or response.status_code == 429:
                        raise _Retryable(response.status_code)
    except _Retryable as exc:
        _log().warning("notification not delivered", runbook=rb.name, webhook=settings.webhook.label,
                    status=exc.status, reason=f"the webhook kept answering {exc.status}")
        return False
    except httpx.HTTPError as exc:  # the exception's text may hold the URL: only its type is logged
        _log().warning("notification not delivered", runbook=rb.name, webhook=settings.webhook.label,
                    reason=f"the webhook could not be reached ({type(exc).__name__})")
        return False
    if not 200 <= response.status_code < 300:
        _log().warning("notification not delivered", runbook=rb.name, webhook=settings.webhook.label,
                    status=response.status_code,
                    reason=f"the webhook refused it ({response.status_code}); check {WEBHOOK_FIELD}")
        return False
    _log().info("notification sent", runbook=rb.name, webhook=settings.webhook.label)
    return True


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
        if value.env and field not in _NOT_SENSITIVE:
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
            _log().debug("subflow failed; its parent run notifies", flow=flow.name)
            return
        path = _runbook_path(dict(getattr(flow_run, "parameters", None) or {}))
        if path is None:
            _log().debug("no runbook in the flow run's parameters; notification not sent", flow=flow.name)
            return
        try:
            rb = load_runbook(resolve_runbook_path(path))
        except LiftoffError:
            _log().debug("runbook not readable; notification not sent", flow=flow.name)
            return
        if rb.notifications.webhook is None:
            return
        _register_runbook_secrets(rb)
        verb = "crashed" if state.is_crashed() else "failed"
        text = f"{flow.name} {verb} for runbook {rb.name}: {_failure_line(state)}"
        notify(rb, text, flow_run_url=ui_link(getattr(flow_run, "id", None)))
    except Exception as exc:  # noqa: BLE001 - a hook must not add a failure to the one it reports
        _log().warning("notification hook failed", flow=getattr(flow, "name", "?"),
                    reason=redact(f"{type(exc).__name__}: {exc}")[:300])
