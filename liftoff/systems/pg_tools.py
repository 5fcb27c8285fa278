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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import psycopg
from psycopg import sql

from liftoff.errors import StepFailed, ToolMissing
from liftoff.redaction import redact


@dataclass(frozen=True)
class PgTools:
    bin_dir: Path
    major: int
    version: str = ""  # "15.18", as --version prints it

    @property
    def pg_dump(self) -> str:
        return str(self.bin_dir / "pg_dump")

    @property
    def pg_restore(self) -> str:
        return str(self.bin_dir / "pg_restore")

    @property
    def psql(self) -> str:
        return str(self.bin_dir / "psql")


def tool_version(binary: Path | str) -> tuple[int, str] | None:
    """(major, "major.minor") of a PostgreSQL client binary, from ``--version``; None if it does not run."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\)\s+(\d+)((?:\.\d+)?)", out)
    return (int(m.group(1)), m.group(1) + m.group(2)) if m else None


def default_search_dirs() -> list[Path]:
    dirs = [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    on_path = shutil.which("pg_dump")
    if on_path:
        dirs.append(Path(os.path.realpath(on_path)).parent)
    return dirs


def installed_pg_tools(search_dirs: list[Path] | None = None) -> list[PgTools]:
    """Every pg_dump/pg_restore pair of one major in ``search_dirs`` (default: Debian's and PATH's)."""
    found = []
    for d in (default_search_dirs() if search_dirs is None else search_dirs):
        d = Path(d)
        if (d / "pg_dump").exists() and (d / "pg_restore").exists():
            dump, restore = tool_version(d / "pg_dump"), tool_version(d / "pg_restore")
            if dump and restore and dump[0] == restore[0]:
                found.append(PgTools(d, dump[0], dump[1]))
    return found


def find_pg_tools(min_major: int, search_dirs: list[Path] | None = None) -> PgTools:
    """The oldest pg_dump/pg_restore pair whose major version is at least ``min_major``: pg_dump refuses a
    newer server, and a pg_restore older than its archive cannot read it."""
    found = installed_pg_tools(search_dirs)
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


class CopyOut:
    """``COPY (query) TO STDOUT`` run by psql, in the exported snapshot ``snapshot_id``; iterating gives its
    output in large blocks: the rows pass through C, not one Python call per row as a psycopg COPY read
    does (``read`` is a row per call there), which on two cores was the stream strategy's own bottleneck.
    Leaving the ``with`` block without an error checks psql's exit: a copy cut short (the source dropped the
    connection, a query error) raises StepFailed before the caller commits what it loaded; with an error,
    psql is stopped."""

    BLOCK = 1 << 17

    def __init__(self, tools: PgTools, env: dict[str, str], query: str, snapshot_id: str,
                 settings: dict[str, str], what: str):
        commands = [f"SET {name} = {sql.Literal(value).as_string()}" for name, value in settings.items()]
        commands += ["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                     f"SET TRANSACTION SNAPSHOT {sql.Literal(snapshot_id).as_string()}", f"COPY ({query}) TO STDOUT",
                     "COMMIT"]
        argv = [tools.psql, "--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1"]
        for command in commands:
            argv += ["--command", command]
        self.what = what
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: psql never blocks on its notices
        try:
            self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=self.stderr)
        except OSError as exc:
            raise ToolMissing(f"{what}: cannot run {tools.psql} ({exc.strerror}); install the PostgreSQL "
                              f"client (psql) of version {tools.major} beside pg_dump") from None

    def __iter__(self):
        while block := self.proc.stdout.read(self.BLOCK):
            yield block

    def __enter__(self) -> CopyOut:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.proc.kill()
        self.proc.stdout.close()
        code = self.proc.wait()
        self.stderr.seek(0)
        stderr = self.stderr.read().decode(errors="replace")
        self.stderr.close()
        if exc_type is None and code != 0:
            lines = [l for l in stderr.splitlines() if "error" in l.lower() or "fatal" in l.lower()]
            first = (lines or stderr.splitlines() or ["no output"])[0]
            raise StepFailed(f"{self.what} failed (psql exit {code}): {redact(first.strip())}")


# ---------------------------------------------------------------------------------------------------
# The table of contents of a dump archive (pg_restore -l)

_DESCS = sorted(
    [
        "TABLE DATA", "SEQUENCE SET", "SEQUENCE OWNED BY", "FK CONSTRAINT", "CONSTRAINT", "INDEX ATTACH",
        "INDEX", "TRIGGER", "EVENT TRIGGER", "POLICY", "ROW SECURITY", "RULE", "PUBLICATION TABLE",
        "PUBLICATION TABLES IN SCHEMA", "PUBLICATION", "SUBSCRIPTION", "MATERIALIZED VIEW DATA",
        "MATERIALIZED VIEW", "DEFAULT ACL", "DEFAULT", "ACL", "COMMENT", "SCHEMA", "EXTENSION", "TYPE", "DOMAIN",
        "FUNCTION", "PROCEDURE", "AGGREGATE", "SEQUENCE", "TABLE ATTACH", "TABLE", "VIEW", "STATISTICS",
        "BLOBS", "BLOB", "LARGE OBJECT", "CHECK CONSTRAINT", "SHELL TYPE", "PROCEDURAL LANGUAGE",
        "OPERATOR CLASS", "OPERATOR FAMILY", "ACCESS METHOD", "TRANSFORM", "ENCODING", "STDSTRINGS", "SEARCHPATH",
        "DATABASE", "CAST", "COLLATION", "CONVERSION", "OPERATOR", "TEXT SEARCH CONFIGURATION",
        "TEXT SEARCH DICTIONARY",
        "SERVER", "USER MAPPING", "FOREIGN TABLE", "FOREIGN DATA WRAPPER",
    ],
    key=len,
    reverse=True,
)
_ENTRY = re.compile(r"^(?P<id>\d+);\s+(?P<cat>\d+)\s+(?P<oid>\d+)\s+(?P<rest>.*)$")
DATA_DESCS = {"TABLE DATA", "SEQUENCE SET", "BLOBS", "BLOB", "LARGE OBJECT"}
# pg_dump files materialized view data under post-data: it is a REFRESH that needs the indexes first.
POST_DATA_DESCS = {"INDEX", "INDEX ATTACH", "CONSTRAINT", "CHECK CONSTRAINT", "FK CONSTRAINT", "TRIGGER",
                   "EVENT TRIGGER", "POLICY", "ROW SECURITY", "RULE", "PUBLICATION TABLE",
                   "PUBLICATION TABLES IN SCHEMA", "STATISTICS", "MATERIALIZED VIEW DATA"}


class Identity(NamedTuple):
    """What an archive entry creates, named from the source catalog at export: exact, whatever the names
    hold (spaces, quotes, unicode, upper case). A TOC tag cannot say this: pg_dump's tag for a constraint,
    trigger or policy is "table name", both raw, so a space in either makes it ambiguous."""

    kind: str  # table, view, index, constraint, trigger, policy, function, type, ..., or the data entry's kind
    schema: str | None
    table: str | None  # the table (or view, domain) a per-table object belongs to; None for the others
    name: str
    arguments: str | None = None  # a function's identity arguments, as pg_get_function_identity_arguments


@dataclass(frozen=True)
class TocEntry:
    line: str
    desc: str
    schema: str
    tag: str  # name, or "table name" for per-table objects (constraints, triggers, policies): ambiguous
    dump_id: int = 0
    catalog_id: int = 0  # the oid of the system catalog holding the object (its tableoid); 0 for some kinds
    oid: int = 0
    identity: Identity | None = None  # from the source catalog (or, for an older archive, from the tag)

    @property
    def section(self) -> str:
        if self.desc in DATA_DESCS:
            return "data"
        if self.desc in POST_DATA_DESCS:
            return "post-data"
        return "pre-data"

    @property
    def table(self) -> str | None:
        return self.identity.table if self.identity else None

    @property
    def name(self) -> str | None:
        return self.identity.name if self.identity else None

    @property
    def table_and_name(self) -> tuple[str, str]:
        if self.identity and self.identity.table is not None:
            return self.identity.table, self.identity.name
        table, _, name = self.tag.partition(" ")
        return table, name


def parse_toc(listing: str, identities: dict[int, Identity] | None = None) -> list[TocEntry]:
    """The entries of a ``pg_restore -l`` listing. Each line is ``dumpId; tableoid oid DESC schema tag
    owner``: the numbers are unambiguous, the words are not (a tag or an owner may hold spaces).
    ``identities`` (by dump id) name each object exactly; without them (an archive exported before they were
    recorded) names are taken from the tag as before."""
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
        dump_id = int(m.group("id"))
        identity = identities.get(dump_id) if identities else _identity_from_tag(desc, schema, tag)
        entries.append(TocEntry(line.strip(), desc, schema, tag, dump_id, int(m.group("cat")), int(m.group("oid")),
                                identity))
    return entries


# What the tag alone says, for an archive without recorded identities (the parsing used before them).
_TAG_KINDS = {"TABLE": "table", "VIEW": "view", "MATERIALIZED VIEW": "materialized view", "SEQUENCE": "sequence",
              "TYPE": "type", "DOMAIN": "domain", "INDEX": "index", "STATISTICS": "statistics",
              "TABLE DATA": "table data"}
_TAG_PER_TABLE_KINDS = {"CONSTRAINT": "constraint", "FK CONSTRAINT": "constraint", "TRIGGER": "trigger",
                        "POLICY": "policy", "RULE": "rule"}


def _identity_from_tag(desc: str, schema: str, tag: str) -> Identity | None:
    if desc in _TAG_PER_TABLE_KINDS:
        table, _, name = tag.partition(" ")
        return Identity(_TAG_PER_TABLE_KINDS[desc], schema, table, name)
    if desc in _TAG_KINDS:
        return Identity(_TAG_KINDS[desc], schema, tag if desc == "TABLE DATA" else None, tag)
    return None


def list_archive(tools: PgTools, dump_dir: Path) -> str:
    out = subprocess.run([tools.pg_restore, "-l", str(dump_dir)], capture_output=True, text=True)
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no output"])[0]
        raise StepFailed(f"pg_restore -l {dump_dir} failed: {redact(first)}")
    return out.stdout


def entry_statements(tools: PgTools, dump_dir: Path, entries: list[TocEntry], workdir: Path) -> list[str]:
    """The SQL each of ``entries`` runs, in order, as ``pg_restore --no-owner --no-acl`` would send it,
    without the script's SET lines, comment lines and psql meta-commands (``\\restrict`` since 15.14): for
    entries of one statement without multi-line literals (constraints, indexes). pg_restore writes an entry's
    SQL under a ``-- Name: ...`` header in list order; headers that do not match the entries raise rather
    than pair statements wrongly."""
    if not entries:
        return []
    listing, script = workdir / ".statements.list", workdir / ".statements.sql"
    listing.write_text("".join(e.line + "\n" for e in entries))
    try:
        out = subprocess.run([tools.pg_restore, "--no-owner", "--no-acl", f"--use-list={listing}",
                              f"--file={script}", str(dump_dir)], capture_output=True, text=True)
        if out.returncode != 0:
            first = (out.stderr.strip().splitlines() or ["no output"])[0]
            raise StepFailed(f"pg_restore --file of {len(entries)} entries of {dump_dir} failed: {redact(first)}")
        text = script.read_text()
    finally:
        listing.unlink(missing_ok=True)
        script.unlink(missing_ok=True)
    parts = re.split(r"^--\n-- Name: ([^\n]*)\n--\n", text, flags=re.MULTILINE)[1:]
    headers, blocks = parts[0::2], parts[1::2]
    expected = [f"{e.tag}; Type: {e.desc}; Schema: {e.schema};" for e in entries]
    if len(headers) != len(entries) or any(not h.startswith(x) for h, x in zip(headers, expected)):
        raise StepFailed(f"pg_restore wrote {len(headers)} entries of {dump_dir} in another order than the "
                         f"{len(entries)} listed")
    return ["\n".join(l for l in b.splitlines() if l.strip() and not l.startswith(("--", "\\"))) for b in blocks]


def read_toc(tools: PgTools, dump_dir: Path, identities: dict[int, Identity] | None = None) -> list[TocEntry]:
    """The archive's entries, each named by its identity recorded at export (the ledger's
    ``archive_entries``); without identities, names come from the tags."""
    return parse_toc(list_archive(tools, dump_dir), identities)


# ---------------------------------------------------------------------------------------------------
# Identities from the source catalog, read in the export's snapshot

# Per system catalog: (oid, kind, schema, table, name, arguments) of the objects whose oid is in %(oids)s.
_IDENTITY_QUERIES = {
    "pg_class": """
        SELECT c.oid, CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
                   WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence' WHEN 'f' THEN 'foreign table'
                   WHEN 'i' THEN 'index' WHEN 'I' THEN 'index' WHEN 'c' THEN 'type' ELSE 'relation' END,
               n.nspname, t.relname, c.relname, NULL
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_index x ON x.indexrelid = c.oid LEFT JOIN pg_class t ON t.oid = x.indrelid
        WHERE c.oid = ANY(%(oids)s)""",
    "pg_constraint": """
        SELECT k.oid, CASE WHEN k.conrelid <> 0 THEN 'constraint' ELSE 'domain constraint' END,
               n.nspname, coalesce(t.relname, d.typname), k.conname, NULL
        FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
        LEFT JOIN pg_class t ON t.oid = k.conrelid AND k.conrelid <> 0
        LEFT JOIN pg_type d ON d.oid = k.contypid AND k.contypid <> 0
        WHERE k.oid = ANY(%(oids)s)""",
    "pg_trigger": """
        SELECT g.oid, 'trigger', n.nspname, t.relname, g.tgname, NULL
        FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE g.oid = ANY(%(oids)s)""",
    "pg_policy": """
        SELECT p.oid, 'policy', n.nspname, t.relname, p.polname, NULL
        FROM pg_policy p JOIN pg_class t ON t.oid = p.polrelid JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE p.oid = ANY(%(oids)s)""",
    "pg_rewrite": """
        SELECT r.oid, 'rule', n.nspname, t.relname, r.rulename, NULL
        FROM pg_rewrite r JOIN pg_class t ON t.oid = r.ev_class JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE r.oid = ANY(%(oids)s)""",
    "pg_statistic_ext": """
        SELECT s.oid, 'statistics', n.nspname, t.relname, s.stxname, NULL
        FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace JOIN pg_class t ON t.oid = s.stxrelid
        WHERE s.oid = ANY(%(oids)s)""",
    "pg_proc": """
        SELECT p.oid, CASE p.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate' ELSE 'function' END,
               n.nspname, NULL, p.proname, pg_get_function_identity_arguments(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.oid = ANY(%(oids)s)""",
    "pg_type": """
        SELECT y.oid, CASE y.typtype WHEN 'd' THEN 'domain' ELSE 'type' END, n.nspname, NULL, y.typname, NULL
        FROM pg_type y JOIN pg_namespace n ON n.oid = y.typnamespace
        WHERE y.oid = ANY(%(oids)s)""",
    "pg_namespace": "SELECT oid, 'schema', NULL, NULL, nspname, NULL FROM pg_namespace WHERE oid = ANY(%(oids)s)",
    "pg_extension": "SELECT oid, 'extension', NULL, NULL, extname, NULL FROM pg_extension WHERE oid = ANY(%(oids)s)",
    "pg_attrdef": """
        SELECT d.oid, 'default', n.nspname, t.relname, a.attname, NULL
        FROM pg_attrdef d JOIN pg_class t ON t.oid = d.adrelid JOIN pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
        WHERE d.oid = ANY(%(oids)s)""",
}
# Entries about a table's data or flags carry no catalog id, and the table's own oid.
_OF_A_TABLE = {"TABLE DATA": "table data", "ROW SECURITY": "row security",
               "MATERIALIZED VIEW DATA": "materialized view data"}


def resolve_identities(conn: psycopg.Connection, entries: list[TocEntry]) -> dict[int, Identity]:
    """{dump id: Identity} for every entry whose object the catalog on ``conn`` still describes; run it in
    the snapshot the archive was dumped from, so an oid means what it meant to pg_dump. Entries that name
    no catalog object (SEQUENCE SET, COMMENT, ACL, ...) have none."""
    catalogs = dict(conn.execute(
        "SELECT c.oid::bigint, c.relname::text FROM pg_class c WHERE c.relnamespace = 'pg_catalog'::regnamespace "
        "AND c.relname = ANY(%s)", (list(_IDENTITY_QUERIES),)).fetchall())
    wanted: dict[str, dict[int, list[int]]] = {}  # catalog -> oid -> dump ids
    for e in entries:
        catalog = catalogs.get(e.catalog_id) or ("pg_class" if e.desc in _OF_A_TABLE and e.oid else None)
        if catalog:
            wanted.setdefault(catalog, {}).setdefault(e.oid, []).append(e.dump_id)
    descs = {e.dump_id: e.desc for e in entries}
    identities: dict[int, Identity] = {}
    for catalog, by_oid in wanted.items():
        for oid, kind, schema, table, name, arguments in conn.execute(
                _IDENTITY_QUERIES[catalog], {"oids": list(by_oid)}).fetchall():
            for dump_id in by_oid[oid]:
                if descs[dump_id] in _OF_A_TABLE:
                    identities[dump_id] = Identity(_OF_A_TABLE[descs[dump_id]], schema, name, name)
                else:
                    identities[dump_id] = Identity(kind, schema, table, name, arguments)
    return identities


def archive_identities(conn: psycopg.Connection, tools: PgTools, dump_dir: Path) -> dict[int, Identity]:
    """Lists the archive pg_dump just wrote and names each entry from the catalog ``conn`` reads (the
    export's snapshot session)."""
    return resolve_identities(conn, parse_toc(list_archive(tools, dump_dir), {}))
