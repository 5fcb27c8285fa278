"""An app's health endpoint, in the plan's JSON shape:

    {"status": "healthy", "timestamp": "...",
     "checks": {"database": {"status": "up", ...}, "redis": {"status": "up"}, "storage": {"status": "down", "error": "..."}}}

Healthy means: HTTP 200, ``status`` is ``healthy`` and every check is ``up``. Anything else is not healthy,
and the result's ``detail`` says why in one line (the failing checks by name, with their own message).
Knows nothing of runbooks or Prefect; a body's text passes the redaction module before it is kept.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from liftoff.redaction import error_line, one_line, redact, redact_value

_MAX_BODY = 1024 * 1024  # a health answer is small; never read an endless one whole
_MAX_MESSAGE = 120  # characters of a failing check's own message kept in the detail


@dataclass(frozen=True)
class HealthResult:
    url: str
    healthy: bool
    status_code: int | None  # None when nothing answered
    body: dict | None  # the answer's JSON (redacted), when it was a JSON object
    detail: str  # one line: why healthy or why not


def _check_message(check: object) -> str:
    if not isinstance(check, dict):
        return ""
    for key in ("error", "message", "detail", "reason"):
        if check.get(key):
            return one_line(check[key], limit=_MAX_MESSAGE)
    return ""


def judge(status_code: int, body: object) -> tuple[bool, str]:
    """Whether an answer (status code and parsed JSON) is healthy in the plan's shape, and why (one line)."""
    if not isinstance(body, dict):
        return False, f"HTTP {status_code}, but the body is not a JSON object with status and checks"
    status = body.get("status")
    checks = body.get("checks")
    problems = []
    if status_code != 200:
        problems.append(f"HTTP {status_code}")
    if status != "healthy":
        problems.append(f"status {status!r}" if status is not None else "no status")
    if checks is not None and not isinstance(checks, dict):
        problems.append("checks is not an object")
        checks = {}
    down = []
    for name, check in (checks or {}).items():
        state = check.get("status") if isinstance(check, dict) else check
        if state != "up":
            message = _check_message(check)
            down.append(f"{name} ({state}{': ' + message if message else ''})" if state is not None
                        else f"{name} (no status{': ' + message if message else ''})")
    if down:
        problems.append("checks not up: " + ", ".join(down))
    if problems:
        return False, "; ".join(problems)
    names = ", ".join(checks) if checks else "none reported"
    return True, f"HTTP 200, status healthy, checks up: {names}"


def check_health(url: str, timeout: float = 5) -> HealthResult:
    """One GET of ``url``. Never raises for what the app answers or fails to: the result says it."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "liftoff"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            code, raw = response.status, response.read(_MAX_BODY)
    except urllib.error.HTTPError as exc:  # a 503 with the JSON is the usual "unhealthy"
        code = exc.code
        try:
            raw = exc.read(_MAX_BODY)
        except OSError:
            raw = b""
        finally:
            exc.close()
    except TimeoutError:
        return HealthResult(url, False, None, None, f"{redact(url)}: no answer within {timeout:g} s")
    except urllib.error.URLError as exc:
        reason = exc.reason
        why = getattr(reason, "strerror", None) or str(reason)
        if isinstance(reason, TimeoutError):
            why = f"no answer within {timeout:g} s"
        return HealthResult(url, False, None, None,
                            f"{redact(url)}: cannot reach it ({one_line(why, limit=_MAX_MESSAGE)})")
    except (OSError, ValueError) as exc:  # a connection reset mid-answer, a malformed URL
        return HealthResult(url, False, None, None, f"{redact(url)}: {error_line(exc, limit=_MAX_MESSAGE)}")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        start = raw[:60].decode("utf-8", "replace")
        return HealthResult(url, False, code, None,
                            f"HTTP {code}, but the body is not JSON ({one_line(start, 'empty', limit=_MAX_MESSAGE)})")
    body = redact_value(body)
    healthy, detail = judge(code, body)
    return HealthResult(url, healthy, code, body if isinstance(body, dict) else None, detail)


def wait_healthy(url: str, timeout_s: float, interval_s: float = 2) -> HealthResult:
    """Polls ``url`` until it is healthy or ``timeout_s`` passed; returns the first healthy result, or the
    last one (whose ``detail`` says why not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        result = check_health(url, timeout=max(0.5, min(5.0, left)))
        left = deadline - time.monotonic()
        if result.healthy or left <= 0:
            return result
        time.sleep(min(interval_s, left))


def error_rate_percent(body: dict | None) -> float | None:
    """The error rate an app's health JSON reports, in percent, or None when it reports none. Read from
    ``error_rate_percent`` (percent) or ``error_rate`` (a fraction, 0 to 1), at the top or under ``metrics``."""
    for where in (body or {}, (body or {}).get("metrics") or {}):
        if not isinstance(where, dict):
            continue
        if isinstance(where.get("error_rate_percent"), (int, float)):
            return float(where["error_rate_percent"])
        if isinstance(where.get("error_rate"), (int, float)):
            return float(where["error_rate"]) * 100
    return None
