"""One place that keeps secrets out of every log line, exception text and artifact.

Every secret that Liftoff resolves is registered here; ``redact`` replaces registered values and any
password embedded in a DSN or conninfo string. ``install`` hooks the stdlib log-record factory so that
Prefect's own loggers (and thus the run logs shipped to the Prefect API) are redacted too.
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"
_lock = threading.Lock()
_secrets: set[str] = set()

_PATTERNS = [
    # scheme://user:password@host
    (re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)(?P<tail>@)", re.I), None),
    # conninfo / env / query-string style: password=..., PGPASSWORD=..., secret_access_key=...
    (re.compile(r"(?P<head>\b(?:password|pgpassword|secret|token|secret_access_key)\s*=\s*['\"]?)"
                r"(?P<secret>[^'\"\s,;&]+)(?P<tail>)", re.I), None),
]


def register_secret(value: str | None) -> None:
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    if not isinstance(text, str) or not text:
        return text
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    for pattern, _ in _PATTERNS:
        text = pattern.sub(lambda m: f"{m.group('head')}{MASK}{m.group('tail')}", text)
    return text


def redact_value(value):
    """Redacts strings inside nested dicts, lists and tuples."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


_installed = False


def install() -> None:
    """Redacts every stdlib log record at creation, whichever logger or handler sees it later."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return record
        clean = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Prefect formats the traceback later; freeze a redacted copy now.
            import traceback

            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
