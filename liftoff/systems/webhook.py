"""Failure notifications: one short message to each Apprise URL of the runbook (``notifications.urls``: email,
SMS, Slack, Discord ..., each taking alerts from its severity up) and to its incoming webhook (Slack- or
Discord-compatible JSON, every alert).

``notify`` posts a text, with the flow run's UI link, to ``notifications.webhook``; ``notify_on_failure`` is
the Prefect state hook that phase flows attach (``@flow(on_failure=[notify_on_failure],
on_crashed=[notify_on_failure])``). A notification never raises and never hides the failure it reports:
anything that goes wrong here is logged as a warning and the run's own state stands.

The webhook URL is the credential (whoever has it can post to the channel): it is resolved as a secret,
registered for redaction, and never logged; warnings name the runbook field instead.
"""

from __future__ import annotations


import httpx
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from liftoff.errors import LiftoffError
from liftoff.logs import get_logger
from liftoff.redaction import redact
from liftoff.runbooks.model import SEVERITIES, Runbook

WEBHOOK_FIELD = "notifications.webhook"
# Discord refuses content over 2000 characters; Slack truncates long texts. The link comes on top.
MAX_TEXT = 1500
_ATTEMPTS = 4
_GIVE_UP_AFTER_S = 6.0  # a notification must not hold up the end of a failed run for long
_TIMEOUT = httpx.Timeout(4.0, connect=2.0)
_EXCEPTION_PREFIX = "Flow run encountered an exception: "


def _log():
    return get_logger(system="notify")  # at call time: a module-level bound logger keeps an old configuration


class _Retryable(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _worth_retrying(exc: BaseException) -> bool:
    return isinstance(exc, (_Retryable, httpx.TransportError))


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


def notify(rb: Runbook, text: str, *, flow_run_url: str | None = None, severity: str = "error") -> bool:
    """Sends ``text`` to every Apprise URL of ``notifications.urls`` whose severity is at or below
    ``severity`` (warning < error < critical), and posts it to the webhook (which takes every alert). True when
    at least one place accepted it; never raises (what could not be delivered is logged)."""
    sent = [_apprise(rb, entry, i, text, flow_run_url) for i, entry in enumerate(rb.notifications.urls)
            if SEVERITIES.index(entry.severity) <= SEVERITIES.index(severity)]
    return _webhook(rb, text, flow_run_url) or any(sent)


def _apprise(rb: Runbook, entry, index: int, text: str, flow_run_url: str | None) -> bool:
    """One Apprise URL: title and body redacted (the body with the run's link); Apprise's own logging is
    silenced, since its messages may quote the URL, which holds credentials."""
    import logging

    import apprise

    field = f"notifications.urls[{index}].url"
    try:
        url = entry.url.resolve(field)
    except LiftoffError as exc:
        _log().warning("notification not sent", runbook=rb.name, reason=redact(str(exc)))
        return False
    body = _shorten(redact(text)) + (f"\n{flow_run_url}" if flow_run_url else "")
    title = _shorten(redact(text.splitlines()[0] if text.strip() else "Liftoff"))[:200]
    sender = apprise.Apprise()
    if not sender.add(url):
        _log().warning("notification not sent", runbook=rb.name, url=entry.url.label,
                       reason=f"{field} ({entry.url.label}) is not an Apprise URL Apprise can use")
        return False
    logger = logging.getLogger("apprise")
    level, logger.level = logger.level, logging.CRITICAL + 1
    try:
        ok = bool(sender.notify(title=title, body=body))
    except Exception as exc:  # noqa: BLE001 - a notification never raises; its text may hold the URL
        ok, why = False, type(exc).__name__
    else:
        why = "the service refused it or could not be reached"
    finally:
        logger.level = level
    if ok:
        _log().info("notification sent", runbook=rb.name, url=entry.url.label, severity=entry.severity)
    else:
        _log().warning("notification not delivered", runbook=rb.name, url=entry.url.label, reason=why)
    return ok


def _webhook(rb: Runbook, text: str, flow_run_url: str | None) -> bool:
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
