"""pg_dump and pg_restore: finding the right version, running them, and reading a dump's table of contents.

Passwords reach the child processes through PGPASSWORD in their environment, never their argv; whatever
they print is redacted before it reaches a log or an error.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from liftoff.errors import StepFailed, ToolMissing
from liftoff.redaction import redact


@dataclass(frozen=True)
class PgTools:
    bin_dir: Path
    major: int

    @property
    def pg_dump(self) -> str:
        return str(self.bin_dir / "pg_dump")

    @property
    def pg_restore(self) -> str:
        return str(self.bin_dir / "pg_restore")


def _major_of(binary: Path) -> int | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\)\s+(\d+)", out)
    return int(m.group(1)) if m else None


def default_search_dirs() -> list[Path]:
    dirs = [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    on_path = shutil.which("pg_dump")
    if on_path:
        dirs.append(Path(os.path.realpath(on_path)).parent)
    return dirs


def find_pg_tools(min_major: int, search_dirs: list[Path] | None = None) -> PgTools:
    """The oldest pg_dump/pg_restore pair whose major version is at least ``min_major``: pg_dump refuses a
    newer server, and a pg_restore older than its archive cannot read it."""
    dirs = search_dirs if search_dirs is not None else default_search_dirs()
    found: list[PgTools] = []
    for d in dirs:
        d = Path(d)
        if (d / "pg_dump").exists() and (d / "pg_restore").exists():
            major = _major_of(d / "pg_dump")
            if major is not None and major == _major_of(d / "pg_restore"):
                found.append(PgTools(d, major))
    usable = sorted((t for t in found if t.major >= min_major), key=lambda t: t.major)
    if not usable:
        have = ", ".join(f"{t.major} in {t.bin_dir}" for t in found) or "none"
        raise ToolMissing(
            f"pg_dump {min_major} or newer is needed for a PostgreSQL {min_major} source (found: {have}); "
            f"install postgresql-client-{min_major} or list its bin directory in database.pg_bin_dirs"
        )
    return usable[0]


def run_tool(argv: list[str], env: dict[str, str], what: str) -> str:
    """Runs pg_dump/pg_restore; raises StepFailed with its first error line, redacted."""
    full_env = {**os.environ, **env}
    try:
        proc = subprocess.run(argv, env=full_env, capture_output=True, text=True)
    except OSError as exc:
        raise ToolMissing(f"{what}: cannot run {argv[0]} ({exc.strerror})") from None
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.splitlines() if "error" in l.lower() or "fatal" in l.lower()]
        first = (lines or proc.stderr.splitlines() or ["no output"])[0]
        raise StepFailed(f"{what} failed (exit {proc.returncode}): {redact(first.strip())}")
    return proc.stderr


# ---------------------------------------------------------------------------------------------------
# The table of contents of a dump archive (pg_restore -l)

_DESCS = sorted(
    [
        "TABLE DATA", "SEQUENCE SET", "SEQUENCE OWNED BY", "FK CONSTRAINT", "CONSTRAINT", "INDEX ATTACH",
        "INDEX", "TRIGGER", "EVENT TRIGGER", "POLICY", "ROW SECURITY", "RULE", "PUBLICATION TABLE",
        "PUBLICATION TABLES IN SCHEMA", "PUBLICATION", "SUBSCRIPTION", "MATERIALIZED VIEW DATA",
        "MATERIALIZED VIEW", "DEFAULT ACL", "DEFAULT", "ACL", "COMMENT", "SCHEMA", "EXTENSION", "TYPE", "DOMAIN",
        "FUNCTION", "PROCEDURE", "AGGREGATE", "SEQUENCE", "TABLE ATTACH", "TABLE", "VIEW", "STATISTICS",
        "BLOBS", "BLOB", "LARGE OBJECT", "ENCODING", "STDSTRINGS", "SEARCHPATH", "DATABASE", "CAST",
        "COLLATION", "CONVERSION", "OPERATOR", "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY",
        "SERVER", "USER MAPPING", "FOREIGN TABLE", "FOREIGN DATA WRAPPER",
    ],
    key=len,
    reverse=True,
)
_ENTRY = re.compile(r"^(?P<id>\d+);\s+(?P<cat>\d+)\s+(?P<oid>\d+)\s+(?P<rest>.*)$")
DATA_DESCS = {"TABLE DATA", "SEQUENCE SET", "BLOBS", "BLOB", "LARGE OBJECT"}
# pg_dump files materialized view data under post-data: it is a REFRESH that needs the indexes first.
POST_DATA_DESCS = {"INDEX", "INDEX ATTACH", "CONSTRAINT", "FK CONSTRAINT", "TRIGGER", "EVENT TRIGGER", "POLICY",
                   "ROW SECURITY", "RULE", "PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA", "STATISTICS",
                   "MATERIALIZED VIEW DATA"}


@dataclass(frozen=True)
class TocEntry:
    line: str
    desc: str
    schema: str
    tag: str  # name, or "table name" for per-table objects (constraints, triggers, policies)

    @property
    def section(self) -> str:
        if self.desc in DATA_DESCS:
            return "data"
        if self.desc in POST_DATA_DESCS:
            return "post-data"
        return "pre-data"

    @property
    def table_and_name(self) -> tuple[str, str]:
        table, _, name = self.tag.partition(" ")
        return table, name


def parse_toc(listing: str) -> list[TocEntry]:
    entries = []
    for line in listing.splitlines():
        m = _ENTRY.match(line.strip())
        if not m:
            continue
        rest = m.group("rest")
        desc = next((d for d in _DESCS if rest.startswith(d + " ")), rest.split(" ")[0])
        words = rest[len(desc):].strip().split(" ")
        schema = words[0] if words else "-"
        tag = " ".join(words[1:-1]) if len(words) > 2 else (words[1] if len(words) == 2 else "")
        entries.append(TocEntry(line.strip(), desc, schema, tag))
    return entries


def read_toc(tools: PgTools, dump_dir: Path) -> list[TocEntry]:
    out = subprocess.run([tools.pg_restore, "-l", str(dump_dir)], capture_output=True, text=True)
    if out.returncode != 0:
        raise StepFailed(f"pg_restore -l {dump_dir} failed: {out.stderr.strip().splitlines()[:1]}")
    return parse_toc(out.stdout)

