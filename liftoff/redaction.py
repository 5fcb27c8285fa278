"""One place that keeps secrets out of every log line, exception text and artifact.

Every secret that Liftoff resolves is registered here; ``redact`` replaces registered values and any
password embedded in a DSN or conninfo string. ``install`` hooks the stdlib log-record factory so that
Prefect's own loggers (and thus the run logs shipped to the Prefect API) are redacted too.

A weak secret (shorter than ``MIN_STRONG_LENGTH`` or one of ``COMMON_WORDS``) is masked only where it
stands as a credential: ``password=...``, ``PGPASSWORD=...``, a URL's ``user:PW@``, ``"password": "..."``,
``--password PW``. Replacing it everywhere would mangle the output it hides in: with the password
``postgres`` every path, user name and hint would read ``***``. Preflight warns about such passwords
(``is_weak_secret``).
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"
MIN_STRONG_LENGTH = 8
# Words that are also everyday output (user names, paths, product names) or top entries of leaked-password
# lists. Compared case-insensitively; anything shorter than MIN_STRONG_LENGTH is weak anyway.
COMMON_WORDS = frozenset({
    "postgres", "postgresql", "supabase", "password", "passw0rd", "password1", "secret", "admin",
    "administrator", "root", "test", "changeme", "letmein", "welcome", "qwerty", "qwertyuiop", "iloveyou",
    "12345678", "123456789", "1234567890",
})

_lock = threading.Lock()
_strong: set[str] = set()
_weak: set[str] = set()

# A key that names a credential: password, PGPASSWORD, LIFTOFF_SOURCE_PASSWORD, secret_access_key, token ...
_KEY = r"[\w.-]*(?:password|passwd|secret|token|secret_access_key)"
_CREDENTIAL_KEY = re.compile(rf"^{_KEY}$", re.I)

_PATTERNS = [
    # scheme://user:password@host; the userinfo ends before the first "/", "?" or "#" (RFC 3986), so an "@"
    # in a path (a key like a@2x.png) is not taken for one
    re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)(?P<secret>[^@\s/?#]+)(?P<tail>@)", re.I),
    # conninfo / env / query-string style: password=..., PGPASSWORD=..., secret_access_key=...
    re.compile(rf"(?P<head>\b{_KEY}\s*=\s*['\"]?)(?P<secret>[^'\"\s,;&]+)(?P<tail>)", re.I),
    # JSON / Python dict style: "password": "...", 'secret_access_key': '...'
    re.compile(rf"(?P<head>(?P<q>['\"]){_KEY}(?P=q)\s*:\s*(?P<v>['\"]))(?P<secret>[^'\"]+)(?P<tail>(?P=v))", re.I),
]


def is_weak_secret(value: str) -> bool:
    """True for a secret short or common enough to occur in ordinary output (and to be guessed)."""
    return len(value) < MIN_STRONG_LENGTH or value.lower() in COMMON_WORDS


def register_secret(value: str | None) -> None:
    if not value:
        return
    with _lock:
        (_weak if is_weak_secret(value) else _strong).add(value)


def _weak_in_context(values: list[str]) -> re.Pattern | None:
    """The weak secrets where they stand as a credential, in the forms the generic patterns do not cover
    (a YAML-ish ``password: PW``, ``--password PW``, ``user:PW@host`` without a scheme)."""
    if not values:
        return None
    alternatives = "|".join(re.escape(v) for v in values)
    end = r"(?=$|[\s'\",;&}\])])"
    return re.compile(
        rf"(?P<head>(?:\b{_KEY}['\"]?\s*[:=]|--{_KEY}\s)\s*['\"]?)(?P<secret>{alternatives}){end}(?P<tail>)"
        rf"|(?P<uhead>[^\s:/@'\"]+:)(?P<usecret>{alternatives})(?P<utail>@)",
        re.I,
    )


def _mask(m: re.Match) -> str:
    if m.groupdict().get("uhead") is not None:
        return f"{m.group('uhead')}{MASK}{m.group('utail')}"
    return f"{m.group('head')}{MASK}{m.group('tail')}"


def redact(text: str) -> str:
    if not isinstance(text, str) or not text:
        return text
    with _lock:
        strong = sorted(_strong, key=len, reverse=True)
        weak = sorted(_weak, key=len, reverse=True)
    for value in strong:
        if value in text:
            text = text.replace(value, MASK)
    weak_pattern = _weak_in_context([v for v in weak if v in text])
    if weak_pattern is not None:
        text = weak_pattern.sub(_mask, text)
    for pattern in _PATTERNS:
        text = pattern.sub(_mask, text)
    return text


def one_line(text: object, empty: str = "failed without a message", *, limit: int | None = None) -> str:
    """``text`` redacted and folded onto one line (whitespace runs become one space), for a report's line;
    with ``limit``, cut to that many characters (the last one an ellipsis)."""
    folded = " ".join(redact(str(text)).split()) or empty
    return folded if limit is None or len(folded) <= limit else folded[: limit - 1] + "…"


def error_line(exc: BaseException, *, limit: int | None = None) -> str:
    """An error on one line as ``Type: message`` (its type alone when it has no message), redacted: for an
    error whose type says what happened (a ``ConnectError``, a ``ReadTimeout``)."""
    return one_line(f"{type(exc).__name__}: {exc}" if str(exc).strip() else type(exc).__name__, limit=limit)


def first_line(text: object, empty: str = "failed without a message") -> str:
    """The first line of ``text``, redacted: what a caller keeps of an error that lists details on the lines
    after (a gate's failure names its first differences on its first line)."""
    lines = redact(str(text)).strip().splitlines()
    return lines[0].strip() if lines else empty


def redact_value(value, key: str | None = None):
    """Redacts strings inside nested dicts, lists and tuples; a string under a credential key (``password``,
    ``secret_access_key``, ...) is masked whole."""
    if isinstance(value, str):
        return MASK if key is not None and value and _CREDENTIAL_KEY.match(key) else redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v, k if isinstance(k, str) else None) for k, v in value.items()}
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
