"""Secrets in files: the values behind a runbook's secret references, and whether a file holds one of them
(as is, URL-encoded, or a key spread over lines); a hit names the field and reference, never the value."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydantic import BaseModel

from liftoff.errors import LiftoffError, SecretUnavailable
from liftoff.logs import get_logger
from liftoff.redaction import is_weak_secret, redact
from liftoff.runbooks.model import Runbook, SecretRef
from liftoff.checks import FAILED, NOT_CHECKED, PASSED, CheckLine, failed_line

log = get_logger(phase="security")

# Fields holding identifiers kept as references, not credentials: a key id alone in a file is no leak.
_NOT_CREDENTIALS = {"access_key_id"}
# A key naming a credential (POSTGRES_PASSWORD, REDIS_PASS, API_TOKEN, db.secret): where a weak secret counts.
_CREDENTIAL_KEY = r"\b[\w.-]*(?:password|passwd|pass|pwd|secret|token|key)[\w.-]*"


# ---------------------------------------------------------------------------------------------------------
# Secrets in files


@dataclass(frozen=True)
class KnownSecret:
    field: str  # where the runbook holds the reference: target.direct.password
    label: str  # the reference: env:TARGET_PASSWORD
    value: str  # never shown

    @property
    def named(self) -> str:
        return f"{self.field} ({self.label})"


def secret_references(value, path: str = "") -> Iterator[tuple[str, SecretRef]]:
    """Every secret reference in a runbook (or any part of it), with its key path."""
    if isinstance(value, SecretRef):
        yield path, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            if name not in _NOT_CREDENTIALS:
                yield from secret_references(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from secret_references(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from secret_references(item, f"{path}[{i}]")


def runbook_secrets(rb: Runbook) -> tuple[list[KnownSecret], list[str]]:
    """The values behind the runbook's secret references (one per reference), and the one-line reasons of
    those that could not be resolved."""
    known: dict[str, KnownSecret] = {}
    unresolved: list[str] = []
    for path, ref in secret_references(rb):
        if ref.label in known:
            continue
        try:
            known[ref.label] = KnownSecret(path, ref.label, ref.resolve(path))
        except SecretUnavailable as exc:
            unresolved.append(str(exc))
    return list(known.values()), unresolved


def secret_in(data: bytes, secret: str) -> bool:
    """Whether ``data`` holds ``secret``: as is, URL-encoded (a password in a DATABASE_URL), or, for a key
    spread over lines, with line breaks ignored. A weak secret only where it stands as a value."""
    text = data.decode("utf-8", errors="replace")
    forms = {secret.strip(), urllib.parse.quote(secret.strip(), safe="")}
    if is_weak_secret(secret):
        alternatives = "|".join(re.escape(f) for f in forms)
        value = rf"['\"]?(?:{alternatives})['\"]?(?=$|[\s;&,])"
        return re.search(rf"{_CREDENTIAL_KEY}['\"]?[ \t]*[=:][ \t]*{value}|[^\s:/@'\"]+:(?:{alternatives})@",
                         text, re.MULTILINE | re.IGNORECASE) is not None
    if "\n" in secret.strip():
        flat = re.sub(r"\s+", "", text)
        return re.sub(r"\s+", "", secret) in flat
    return any(f in text for f in forms)


def check_files(files: list[tuple[str, Callable[[], bytes | None]]], secrets: list[KnownSecret],
                unresolved: list[str]) -> list[CheckLine]:
    """One line per file (``(name, read)``; ``read()`` returns None when the file does not exist), and a line
    for secrets that could not be resolved, so nobody reads a pass for a secret that was never compared."""
    lines = []
    if unresolved:
        lines.append(CheckLine("every secret of the runbook resolved", FAILED,
                               f"{len(unresolved)} could not be compared with the files: " + "; ".join(unresolved),
                               "make each secret available as for a migration run (export the variable, create "
                               "the Prefect Secret block), then re-run", blocked=True))
    if not files:
        lines.append(CheckLine("no secret in the named files", NOT_CHECKED,
                               "the runbook names no files (security.secret_files, security.local_secret_files)",
                               "name the files that must hold no secret: a repository's .env, docker-compose.yml"))
        return lines
    for name, read in files:
        title = f"no secret in {name}"
        try:
            data = read()
        except LiftoffError as exc:
            lines.append(failed_line(title, exc, redact(str(exc)), "make the file readable, or correct its path"))
            continue
        except OSError as exc:
            lines.append(CheckLine(title, FAILED, f"cannot read it ({exc.strerror or type(exc).__name__})",
                                   "make the file readable, or correct its path"))
            continue
        if data is None:
            lines.append(CheckLine(title, FAILED, "no such file",
                                   "correct the path in security.secret_files / local_secret_files, or remove it",
                                   blocked=True))
            continue
        hits = [s for s in secrets if secret_in(data, s.value)]
        if not hits:
            lines.append(CheckLine(title, PASSED, f"{len(data):,} bytes, none of the runbook's {len(secrets)} "
                                   "secrets in it"))
        else:
            lines.append(CheckLine(title, FAILED, "holds the value of " + ", ".join(s.named for s in hits),
                                   "; ".join(f"rotate {s.field} ({s.label}), then remove it from {name}"
                                             for s in hits) + " (and from git history if the file is committed)"))
    return lines
