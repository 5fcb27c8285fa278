"""The app's columns that hold Supabase Storage URLs (or bare object keys), rewritten in PostgreSQL to the
target's public base, reversibly.

This module knows one system, the app's URL columns in PostgreSQL, and the URL forms Supabase Storage
serves (storage-api's routes, as storage-js builds them with ``encodeURI``)::

    {project}/storage/v1/object/public/<bucket>/<key>            public: mapped
    {project}/storage/v1/object/sign/<bucket>/<key>?token=...    signed: expires, carries a token
    {project}/storage/v1/object/authenticated/<bucket>/<key>     needs the caller's Supabase token
    {project}/storage/v1/object/<bucket>/<key>                   the same, the short route
    {project}/storage/v1/render/image/{public,sign,authenticated}/<bucket>/<key>?width=..  image transforms

Only the public form (with no query string) and bare keys of a known bucket have an equivalent on the
target: ``{public_base}/<bucket>/<key>``. The others are left as they are and counted, with the reason, so
the operator sees what the app must change (presigned URLs from the target; no image renderer there). So
are URLs of a bucket the migration does not move (the target has no such bucket) and of files whose bytes
are gone on the source (not migrated, so not on the target either): each counted, the latter listed.

The key keeps its encoding: the URL's path is copied as it was, and only what a URL path cannot carry
unambiguously is escaped (a literal ``+``, which some S3 servers read as a space, a space, a bare ``%``,
non-ASCII); the decoded key is always the same, which the tests prove for every key they use.

``rewrite`` changes every column in one transaction and returns each row it changed (primary key values
as text, old value, new value) as plain JSON data, so the ledger's event log can keep it and ``inverse``
can put back exactly the old values later, only where the value is still what the rewrite wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import psycopg
from psycopg import sql

from liftoff.errors import StepFailed

# One UPDATE per this many rows: set-based, yet bounded in the size of the arrays sent.
BATCH_ROWS = 5000

# What may stay as is in a URL path besides letters, digits and "-._~": the RFC 3986 sub-delimiters
# except "+" (AWS S3 reads a "+" in a path as a space), and ":" "@" "/".
_PATH_SAFE = "/!$&'()*,;=:@"
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")

# (route prefix after /storage/v1/, form); the first that matches wins, so the short route comes last.
_ROUTES = [
    ("object/public/", "public"),
    ("object/sign/", "sign"),
    ("object/authenticated/", "authenticated"),
    ("object/info/", "info"),
    ("render/image/public/", "render"),
    ("render/image/sign/", "render"),
    ("render/image/authenticated/", "render"),
    ("object/", "authenticated"),
]

UNMAPPABLE = {
    "sign": "signed URL: it expires and carries a token; the app must hand out presigned URLs of the target",
    "authenticated": "authenticated URL: needs a Supabase token; the bucket stays private on the target "
                     "(presigned URLs)",
    "render": "image transform URL: the target has no image renderer",
    "info": "object info URL: an API call, not a file",
    "other": "a Storage API URL that is not an object's",
    "query": "public URL with a query string (?download, a cache nonce): no equivalent on the target",
    "no key": "no object key",
}


@dataclass(frozen=True)
class ColumnSpec:
    """An app column: ``kind`` url (Supabase Storage URLs) or key (bare object keys of ``bucket``)."""

    table: str  # schema.table
    column: str
    kind: str = "url"
    bucket: str | None = None

    def __post_init__(self):
        if self.kind not in ("url", "key"):
            raise ValueError(f"{self.table}.{self.column}: kind must be url or key, not {self.kind!r}")
        if self.kind == "key" and not self.bucket:
            raise ValueError(f"{self.table}.{self.column}: a column of kind key needs the bucket its keys are in")
        if "." not in self.table:
            raise ValueError(f"{self.table}: expected schema.table")

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


@dataclass(frozen=True)
class ParsedUrl:
    """One value taken apart: ``form`` public, sign, authenticated, render, info, other (Supabase URLs),
    key (a bare key) or target (already on the public base). ``bucket`` and ``key`` are decoded;
    ``raw_path`` is ``<bucket>/<key>`` exactly as the URL spelled it (None for a bare key)."""

    form: str
    bucket: str
    key: str
    query: str = ""
    fragment: str = ""
    raw_path: str | None = None


def _base(url: str) -> tuple[str, str]:
    parts = urlsplit(url.strip())
    return parts.netloc.lower(), parts.path.rstrip("/")


def _project_hosts(project_url: str) -> tuple[set[str], str]:
    host, path = _base(project_url)
    hosts = {host}
    # Supabase also serves Storage from <ref>.storage.supabase.co (its direct hostname).
    if host.endswith(".supabase.co") and host.count(".") == 2:
        hosts.add(host.replace(".supabase.co", ".storage.supabase.co"))
    return hosts, path + "/storage/v1/"


def parse_supabase_url(url: str, project_url: str) -> ParsedUrl | None:
    """A Supabase Storage URL of this project taken apart, or None for anything else (another project,
    another host, not a URL)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https"):
        return None
    hosts, prefix = _project_hosts(project_url)
    if parts.netloc.lower() not in hosts or not parts.path.startswith(prefix):
        return None
    rest = parts.path[len(prefix):]
    for route, form in _ROUTES:
        if rest.startswith(route):
            raw_path = rest[len(route):]
            break
    else:
        return ParsedUrl("other", "", "", parts.query, parts.fragment, None)
    raw_bucket, _, raw_key = raw_path.partition("/")
    return ParsedUrl(form, unquote(raw_bucket), unquote(raw_key), parts.query, parts.fragment, raw_path)


def parse_key(value: str, bucket: str) -> ParsedUrl:
    """A bare object key of ``bucket``; leading slashes dropped, as Supabase's clients do."""
    return ParsedUrl("key", bucket, value.lstrip("/"))


def parse_target_url(url: str, public_base: str) -> ParsedUrl | None:
    """A URL on the target's public base (what ``new_url`` writes) taken apart, or None."""
    base = public_base.rstrip("/") + "/"
    if not url.startswith(base):
        return None
    parts = urlsplit(url)
    raw_path = url[len(base):].split("?", 1)[0].split("#", 1)[0]
    raw_bucket, _, raw_key = raw_path.partition("/")
    return ParsedUrl("target", unquote(raw_bucket), unquote(raw_key), parts.query, parts.fragment, raw_path)


def _escape_raw(raw: str) -> str:
    """A path as the URL spelled it, with only what a path cannot carry unambiguously escaped; existing
    %XX escapes stay as they are, so the decoded path is unchanged."""
    return quote(_STRAY_PERCENT.sub("%25", raw), safe=_PATH_SAFE + "%")


def new_url(parsed: ParsedUrl, public_base: str, bucket_prefix: str = "") -> str | None:
    """``{public_base}/<bucket_prefix><bucket>/<key>`` for a public URL without a query or a bare key;
    None for a form the target cannot serve (see ``unmappable_reason``)."""
    if unmappable_reason(parsed) is not None:
        return None
    base = public_base.rstrip("/")
    prefix = quote(bucket_prefix, safe="")
    if parsed.form == "key":
        path = quote(parsed.bucket, safe="") + "/" + quote(parsed.key, safe=_PATH_SAFE)
    else:
        path = _escape_raw(parsed.raw_path)
    return f"{base}/{prefix}{path}" + (f"#{parsed.fragment}" if parsed.fragment else "")


def unmappable_reason(parsed: ParsedUrl) -> str | None:
    """Why ``new_url`` has no equivalent for this value, or None when it has one."""
    if parsed.form not in ("public", "key"):
        return UNMAPPABLE.get(parsed.form, UNMAPPABLE["other"])
    if not parsed.bucket or not parsed.key or parsed.key.endswith("/"):
        return UNMAPPABLE["no key"]
    if parsed.query:
        return UNMAPPABLE["query"]
    return None


# ---------------------------------------------------------------------------------------------------
# One value of a column: what the rewrite does with it

MAPPED, UNMAPPABLE_ROW, REWRITTEN, OTHER, NULL = "mapped", "unmappable", "already rewritten", "other", "null"
NOT_MOVED, NO_BYTES = "bucket not moved", "no bytes on the source"
LISTED = 20  # values of files with no bytes that a preview or a rewrite names


@dataclass(frozen=True)
class UrlMapping:
    """``moved``: the source buckets the migration moves (None: any); ``gone``: per bucket, the keys whose
    bytes are gone on the source, which are not migrated."""

    project_url: str
    public_base: str
    bucket_prefix: str = ""
    moved: frozenset[str] | None = None
    gone: Mapping[str, frozenset[str]] = field(default_factory=dict, hash=False)

    def classify(self, value: str | None, spec: ColumnSpec) -> tuple[str, str | None]:
        """(status, the new value for mapped, the reason for unmappable, else None)."""
        if value is None:
            return NULL, None
        if value.startswith(self.public_base.rstrip("/") + "/"):
            return REWRITTEN, None
        if spec.kind == "key" and not value.lower().startswith(("http://", "https://")):
            parsed = parse_key(value, spec.bucket)
        else:
            parsed = parse_supabase_url(value, self.project_url)
            if parsed is None:
                return OTHER, None
        if self.moved is not None and parsed.bucket and parsed.bucket not in self.moved:
            return NOT_MOVED, None
        reason = unmappable_reason(parsed)
        if reason is not None:
            return UNMAPPABLE_ROW, reason
        if parsed.key in self.gone.get(parsed.bucket, ()):
            return NO_BYTES, None
        return MAPPED, new_url(parsed, self.public_base, self.bucket_prefix)

    def expected(self, value: str | None, spec: ColumnSpec) -> str | None:
        """What a value of the source should read on the target once the rewrite ran: its new URL when the
        rewrite maps it, else the value itself."""
        status, detail = self.classify(value, spec)
        return detail if status == MAPPED else value


# ---------------------------------------------------------------------------------------------------
# The columns in PostgreSQL


@dataclass(frozen=True)
class _Column:
    spec: ColumnSpec
    table: sql.Composable
    column: sql.Identifier
    key_columns: list[str]
    key_types: list[str]


def _split(table: str) -> tuple[str, str]:
    schema, _, name = table.partition(".")
    return schema, name


def _resolve(conn: psycopg.Connection, spec: ColumnSpec) -> _Column:
    """The spec's table, column and primary key on this database; one line naming what is missing."""
    schema, name = _split(spec.table)
    row = conn.execute("SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                       "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')", (schema, name)).fetchone()
    if row is None:
        raise StepFailed(f"storage URL rewrite: table {spec.table} does not exist on the target; "
                         "fix storage.rewrite in the runbook")
    oid = row[0]
    col = conn.execute("SELECT t.typcategory, a.attgenerated FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                       "WHERE a.attrelid = %s AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped",
                       (oid, spec.column)).fetchone()
    if col is None:
        raise StepFailed(f"storage URL rewrite: column {spec.name} does not exist on the target; "
                         "fix storage.rewrite in the runbook")
    if col[0] != "S" or col[1]:
        raise StepFailed(f"storage URL rewrite: column {spec.name} is not a plain text column; "
                         "only text columns can hold the URLs")
    keys = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_index i "
        "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.n", (oid,)).fetchall()
    if not keys:
        raise StepFailed(f"storage URL rewrite: table {spec.table} has no primary key; the rewrite needs one "
                         "to record and restore each row")
    return _Column(spec, sql.Identifier(schema, name), sql.Identifier(spec.column),
                   [k[0] for k in keys], [k[1] for k in keys])


def _key_types(conn: psycopg.Connection, table: str, key_columns: list[str]) -> list[str]:
    schema, name = _split(table)
    types = dict(conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (schema, name)).fetchall())
    missing = [k for k in key_columns if k not in types]
    if missing:
        raise StepFailed(f"storage URL inverse: {table} has no column {missing[0]} any more; "
                         "its rows cannot be found to restore")
    return [types[k] for k in key_columns]


def _values(conn: psycopg.Connection, col: _Column) -> Iterator[tuple[list[str], str | None]]:
    """(primary key values as text, the column's value) of every row, streamed through a server-side
    cursor (needs a transaction, which the callers hold)."""
    keys = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in col.key_columns)
    query = sql.SQL("SELECT {}, {} FROM {}").format(keys, col.column, col.table)
    n = len(col.key_columns)
    with conn.cursor(name="liftoff_storage_urls") as cur:
        cur.itersize = BATCH_ROWS
        cur.execute(query)
        for row in cur:
            yield list(row[:n]), row[n]


@contextmanager
def _in_transaction(conn: psycopg.Connection, read_only: bool = False):
    """A transaction that commits at the end of the block (a savepoint if the caller already holds one)."""
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if read_only and idle:
            conn.execute("SET TRANSACTION READ ONLY")
        yield


def _failed(action: str, spec: ColumnSpec, exc: psycopg.Error) -> StepFailed:
    message = (exc.diag.message_primary or str(exc)).splitlines()[0]
    return StepFailed(f"storage URL {action} of {spec.name} failed, nothing was changed: {message}")


# ---------------------------------------------------------------------------------------------------
# The dry run


@dataclass
class ColumnPreview:
    """What the rewrite would do to one column; ``examples`` are (old, new), ``unmappable_examples``
    (value, reason), ``other_examples`` values that are no Storage URL of this project (left alone)."""

    table: str
    column: str
    kind: str
    rows_total: int = 0
    rows_mapped: int = 0
    rows_unmappable: int = 0
    rows_already_rewritten: int = 0
    rows_other: int = 0
    rows_null: int = 0
    rows_not_moved: int = 0
    rows_no_bytes: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)
    unmappable_examples: list[tuple[str, str]] = field(default_factory=list)
    other_examples: list[str] = field(default_factory=list)
    not_moved_examples: list[str] = field(default_factory=list)
    no_bytes_values: list[str] = field(default_factory=list)  # the first LISTED of them

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


def preview_rewrite(conn: psycopg.Connection, specs: Iterable[ColumnSpec], project_url: str, public_base: str,
                    examples: int = 3, bucket_prefix: str = "", *, moved: Iterable[str] | None = None,
                    gone: Mapping[str, Iterable[str]] | None = None) -> list[ColumnPreview]:
    """Per column: rows in all, rows the rewrite would change, rows it cannot map (and why), rows already
    rewritten, values that are not this project's Storage URLs, URLs of buckets not moved, URLs of files
    without bytes, NULLs, with a few examples of each. Reads only (in a read-only transaction when the
    connection is idle)."""
    mapping = _mapping(project_url, public_base, bucket_prefix, moved, gone)
    previews = []
    with _in_transaction(conn, read_only=True):
        for spec in specs:
            col = _resolve(conn, spec)
            p = ColumnPreview(spec.table, spec.column, spec.kind)
            for _, value in _values(conn, col):
                p.rows_total += 1
                status, detail = mapping.classify(value, spec)
                if status == MAPPED:
                    p.rows_mapped += 1
                    if len(p.examples) < examples:
                        p.examples.append((value, detail))
                elif status == UNMAPPABLE_ROW:
                    p.rows_unmappable += 1
                    if len(p.unmappable_examples) < examples:
                        p.unmappable_examples.append((value, detail))
                elif status == REWRITTEN:
                    p.rows_already_rewritten += 1
                elif status == OTHER:
                    p.rows_other += 1
                    if len(p.other_examples) < examples:
                        p.other_examples.append(value)
                elif status == NOT_MOVED:
                    p.rows_not_moved += 1
                    if len(p.not_moved_examples) < examples:
                        p.not_moved_examples.append(value)
                elif status == NO_BYTES:
                    p.rows_no_bytes += 1
                    if len(p.no_bytes_values) < LISTED:
                        p.no_bytes_values.append(value)
                else:
                    p.rows_null += 1
            previews.append(p)
    return previews


# ---------------------------------------------------------------------------------------------------
# The rewrite and its inverse


@dataclass
class RewriteResult:
    """``changes``: one plain dict per column, JSON as is (the ledger's event log keeps it)::

        {"table": "public.tour_images", "column": "public_url", "key_columns": ["id"],
         "rows": [[["17"], old, new], ...], "unmappable": 2, "already_rewritten": 0}

    Primary key values are text (``pk::text``); ``inverse`` casts them back to the column's type."""

    changes: list[dict]

    @property
    def rows_changed(self) -> int:
        return sum(len(c["rows"]) for c in self.changes)


def _update(conn: psycopg.Connection, table: sql.Composable, column: sql.Identifier, key_columns: list[str],
            key_types: list[str], rows: list, set_from: int, guard: int) -> set[tuple]:
    """One set-based UPDATE for ``rows`` ([keys, old, new]): sets the column to element ``set_from`` where
    it still holds element ``guard``; returns the keys of the rows it changed."""
    n = len(key_columns)
    names = [sql.Identifier(f"k{i}") for i in range(n)]
    arrays = sql.SQL(", ").join([sql.SQL("%s::text[]")] * (n + 2))
    alias = sql.SQL(", ").join([*names, sql.Identifier("v_set"), sql.Identifier("v_guard")])
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{} = v.{}::{}").format(sql.Identifier(k), name, sql.SQL(kt))
        for k, name, kt in zip(key_columns, names, key_types))
    returning = sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(k)) for k in key_columns)
    query = sql.SQL("UPDATE {table} AS t SET {col} = v.v_set FROM unnest({arrays}) AS v({alias}) "
                    "WHERE {match} AND t.{col} = v.v_guard RETURNING {returning}").format(
        table=table, col=column, arrays=arrays, alias=alias, match=match, returning=returning)
    params = [[r[0][i] for r in rows] for i in range(n)] + [[r[set_from] for r in rows], [r[guard] for r in rows]]
    return {tuple(r) for r in conn.execute(query, params).fetchall()}


def _mapping(project_url: str, public_base: str, bucket_prefix: str, moved: Iterable[str] | None,
             gone: Mapping[str, Iterable[str]] | None) -> UrlMapping:
    return UrlMapping(project_url, public_base, bucket_prefix, None if moved is None else frozenset(moved),
                      {bucket: frozenset(keys) for bucket, keys in (gone or {}).items()})


def rewrite(conn: psycopg.Connection, specs: Iterable[ColumnSpec], project_url: str, public_base: str,
            bucket_prefix: str = "", *, moved: Iterable[str] | None = None,
            gone: Mapping[str, Iterable[str]] | None = None) -> RewriteResult:
    """Rewrites every column of ``specs`` in one transaction (all or nothing; committed at the end unless
    the caller holds a transaction of its own). Idempotent: values already on the public base are
    recognised and left alone, as are values it cannot map; a row the app changed between the read and the
    write is left alone too (the UPDATE matches the value read); so are URLs of buckets not in ``moved`` and
    of ``gone``'s files (bytes gone on the source), counted. Returns every row it changed."""
    mapping = _mapping(project_url, public_base, bucket_prefix, moved, gone)
    specs = list(specs)
    changes = []
    with _in_transaction(conn):
        columns = [_resolve(conn, spec) for spec in specs]
        for col in columns:
            planned, unmappable, rewritten, not_moved, no_bytes = [], 0, 0, 0, []
            for keys, value in _values(conn, col):
                status, detail = mapping.classify(value, col.spec)
                if status == MAPPED:
                    planned.append([keys, value, detail])
                elif status == NO_BYTES:
                    no_bytes.append(value)
                unmappable += status == UNMAPPABLE_ROW
                rewritten += status == REWRITTEN
                not_moved += status == NOT_MOVED
            done = []
            try:
                for start in range(0, len(planned), BATCH_ROWS):
                    batch = planned[start:start + BATCH_ROWS]
                    changed = _update(conn, col.table, col.column, col.key_columns, col.key_types, batch,
                                      set_from=2, guard=1)
                    done.extend(r for r in batch if tuple(r[0]) in changed)
            except psycopg.Error as exc:
                raise _failed("rewrite", col.spec, exc) from None
            changes.append({"table": col.spec.table, "column": col.spec.column, "key_columns": col.key_columns,
                            "rows": done, "unmappable": unmappable, "already_rewritten": rewritten,
                            "not_moved": not_moved, "no_bytes": len(no_bytes), "no_bytes_values": no_bytes[:LISTED]})
    return RewriteResult(changes)


@dataclass
class InverseResult:
    """``restored``: rows put back; ``already_restored``: rows that held the old value already (an inverse
    run twice); ``kept``: rows whose value changed since the rewrite (the app wrote it), left as they are;
    ``missing``: rows deleted since. ``kept`` and ``missing`` are dicts (table, column, key, rewritten,
    current), JSON as is."""

    restored: int = 0
    already_restored: int = 0
    kept: list[dict] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)


def inverse(conn: psycopg.Connection, changes: RewriteResult | Iterable[dict]) -> InverseResult:
    """Puts back the exact old value of every row a rewrite changed, in one transaction, newest change
    first, only where the row still holds what the rewrite wrote; reports the others, never overwrites
    them. ``changes``: a ``RewriteResult`` or its ``changes`` as recorded in the ledger."""
    if isinstance(changes, RewriteResult):
        changes = changes.changes
    result = InverseResult()
    with _in_transaction(conn):
        for change in reversed(list(changes)):
            table, column = change["table"], change["column"]
            key_columns = list(change["key_columns"])
            rows = [[list(r[0]), r[1], r[2]] for r in change["rows"]]
            if not rows:
                continue
            key_types = _key_types(conn, table, key_columns)
            target = sql.Identifier(*_split(table))
            try:
                for start in range(0, len(rows), BATCH_ROWS):
                    batch = rows[start:start + BATCH_ROWS]
                    restored = _update(conn, target, sql.Identifier(column), key_columns, key_types, batch,
                                       set_from=1, guard=2)
                    result.restored += len(restored)
                    left = [r for r in batch if tuple(r[0]) not in restored]
                    if left:
                        current = _current(conn, target, sql.Identifier(column), key_columns, key_types, left)
                        for keys, old, new in left:
                            if tuple(keys) not in current:
                                result.missing.append({"table": table, "column": column, "key": keys,
                                                       "rewritten": new, "current": None})
                            elif current[tuple(keys)] == old:
                                result.already_restored += 1
                            else:
                                result.kept.append({"table": table, "column": column, "key": keys,
                                                    "rewritten": new, "current": current[tuple(keys)]})
            except psycopg.Error as exc:
                raise _failed("inverse", ColumnSpec(table, column), exc) from None
    return result


def _current(conn, table, column, key_columns, key_types, rows) -> dict[tuple, str | None]:
    """The column's value now, by primary key, for ``rows``; rows deleted since are absent."""
    n = len(key_columns)
    names = [sql.Identifier(f"k{i}") for i in range(n)]
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{} = v.{}::{}").format(sql.Identifier(k), name, sql.SQL(kt))
        for k, name, kt in zip(key_columns, names, key_types))
    query = sql.SQL("SELECT {keys}, t.{col} FROM {table} AS t JOIN unnest({arrays}) AS v({alias}) ON {match}").format(
        keys=sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(k)) for k in key_columns),
        col=column, table=table, arrays=sql.SQL(", ").join([sql.SQL("%s::text[]")] * n),
        alias=sql.SQL(", ").join(names), match=match)
    params = [[r[0][i] for r in rows] for i in range(n)]
    return {tuple(r[:n]): r[n] for r in conn.execute(query, params).fetchall()}
