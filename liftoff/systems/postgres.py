"""PostgreSQL: connections that fail with a clear message, and what we read from a catalog.

Everything here talks to one server through psycopg and knows nothing of Prefect flows or of the other
side of a migration; the gates in ``liftoff/systems/pg_compare.py`` compare what these functions return.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from liftoff.errors import ConnectionRefused, StepFailed
from liftoff.redaction import redact
from liftoff.runbooks.model import Endpoint

# Settings that shape the text form of values (identical on both sides of every comparison), and RLS off.
TEXT_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    # Never let RLS silently filter what we copy or compare: error out instead, as pg_dump does.
    "row_security": "off",
}


def _transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, psycopg.OperationalError) and (
        "connection refused" in text or "timeout" in text or "could not receive" in text or "server closed" in text
    )


def _explain_connect_error(exc: psycopg.OperationalError, ep: Endpoint, field_name: str) -> str:
    text = redact(str(exc)).strip()
    low = text.lower()
    where = f"{field_name} ({ep.host}:{ep.port})"
    if "password authentication failed" in low or "no password supplied" in low:
        return (f"{where}: password authentication failed for user '{ep.user}'; check the secret behind "
                f"{field_name}.password ({ep.password.label})")
    if "does not exist" in low and "database" in low:
        return f"{where}: database '{ep.database}' does not exist; check {field_name}.database"
    if "role" in low and "does not exist" in low:
        return f"{where}: user '{ep.user}' does not exist; check {field_name}.user"
    if "could not translate host name" in low or "name or service not known" in low:
        return f"{where}: host name '{ep.host}' does not resolve; check {field_name}.host"
    if "connection refused" in low or "timeout" in low or "no route" in low:
        return (f"{where}: cannot reach the server (connection refused or timed out); check {field_name}.host, "
                f"{field_name}.port and that PostgreSQL is running")
    first = text.splitlines()[-1] if text else type(exc).__name__
    return f"{where}: cannot connect as '{ep.user}': {first}"


def conninfo(ep: Endpoint, field_name: str, **extra) -> str:
    """A libpq conninfo string, password included: hand it only to psycopg or a child's environment."""
    password = ep.password.resolve(f"{field_name}.password")
    return psycopg.conninfo.make_conninfo(
        host=ep.host, port=ep.port, dbname=ep.database, user=ep.user, password=password,
        sslmode=ep.sslmode, connect_timeout=10, application_name="liftoff", **extra,
    )


def libpq_env(ep: Endpoint, field_name: str) -> dict[str, str]:
    """Environment for pg_dump/pg_restore: the password travels here, never on a command line."""
    return {
        "PGHOST": ep.host, "PGPORT": str(ep.port), "PGDATABASE": ep.database, "PGUSER": ep.user,
        "PGPASSWORD": ep.password.resolve(f"{field_name}.password"), "PGSSLMODE": ep.sslmode,
        "PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "liftoff",
    }


def connect(ep: Endpoint, field_name: str, *, autocommit: bool = True, text_settings: bool = True,
            attempts: int = 3, pooled: bool = False) -> psycopg.Connection:
    """Opens a connection, retrying dropped or refused ones; raises ConnectionRefused with one line.
    ``pooled``: through PgBouncer's transaction pooling, where server-side prepared statements break (a
    statement prepared on one server connection is run on another), so psycopg never prepares."""

    @retry(retry=retry_if_exception(_transient), stop=stop_after_attempt(attempts),
           wait=wait_exponential(multiplier=0.3, max=3), reraise=True)
    def _open():
        conn = psycopg.connect(conninfo(ep, field_name), autocommit=autocommit)
        if pooled:
            conn.prepare_threshold = None
        return conn

    try:
        conn = _open()
    except psycopg.OperationalError as exc:
        raise ConnectionRefused(_explain_connect_error(exc, ep, field_name)) from None
    if text_settings:
        for name, value in TEXT_SETTINGS.items():
            conn.execute(sql.SQL("SELECT set_config({}, {}, false)").format(sql.Literal(name), sql.Literal(value)))
        if not autocommit:
            conn.commit()
    return conn


MAINTENANCE_DATABASE = "postgres"  # where CREATE/DROP DATABASE is sent on a server


def maintenance_endpoint(ep: Endpoint) -> Endpoint:
    """The same server and role, connected to its maintenance database (to create or drop another)."""
    return ep.model_copy(update={"database": MAINTENANCE_DATABASE})


@contextlib.contextmanager
def session(ep: Endpoint, field_name: str, **kw):
    conn = connect(ep, field_name, **kw)
    try:
        yield conn
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------
# What a server is


@dataclass(frozen=True)
class ServerInfo:
    major: int
    version: str
    identity: str
    database_bytes: int


def server_info(conn: psycopg.Connection, ep: Endpoint) -> ServerInfo:
    num = int(conn.execute("SHOW server_version_num").fetchone()[0])
    version = conn.execute("SHOW server_version").fetchone()[0]
    size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    try:
        with conn.transaction():
            sysid = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0]
    except psycopg.Error:  # not allowed for a non-superuser on some hosts
        sysid = f"{ep.host}:{ep.port}"
    return ServerInfo(major=num // 10000, version=version, identity=f"{sysid}/{ep.database}", database_bytes=size)


@dataclass(frozen=True)
class DigestColumn:
    """A column as the row digest hashes it: by its type's own hash function (``raw``), or as its text."""

    name: str
    raw: bool


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    pk: tuple[str, ...]
    pk_types: tuple[str, ...] = ()
    # The columns a row's digest covers, in order; None: the whole row (``ROW(t.*)``).
    hashed: tuple[str, ...] | None = None
    # How the digest hashes each of those columns (``digest_columns``); None: the row's text.
    digest: tuple[DigestColumn, ...] | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)


def list_tables(conn: psycopg.Connection, schemas: list[str]) -> list[Table]:
    """Ordinary and partitioned tables of the schemas, with their primary-key columns in key order and each
    key column's type category (``pg_type.typcategory``: "S" for every string type, domains over one and
    citext included, wherever their schema)."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname,
               coalesce(array_agg(a.attname ORDER BY k.ord) FILTER (WHERE a.attname IS NOT NULL), '{}'),
               coalesce(array_agg(y.typcategory::text ORDER BY k.ord) FILTER (WHERE a.attname IS NOT NULL), '{}')
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_constraint p ON p.conrelid = c.oid AND p.contype = 'p'
        LEFT JOIN LATERAL unnest(p.conkey) WITH ORDINALITY AS k(attnum, ord) ON true
        LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
        LEFT JOIN pg_type y ON y.oid = a.atttypid
        WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(%s)
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
        GROUP BY n.nspname, c.relname
        ORDER BY n.nspname, c.relname
        """,
        (schemas,),
    ).fetchall()
    return [Table(s, n, tuple(pk), tuple(types)) for s, n, pk, types in rows]


def plain_tables(conn: psycopg.Connection, schemas: list[str]) -> set[str]:
    """Tables that hold rows themselves (not partitioned parents)."""
    return {r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname = ANY(%s)", (schemas,))}


def count_rows(conn: psycopg.Connection, table: Table) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(table.ident)).fetchone()[0]


def extensions(conn: psycopg.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT e.extname, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"))


def available_extensions(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions")}


def existing_roles(conn: psycopg.Connection, names: list[str]) -> set[str]:
    return {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (names,))}


@dataclass(frozen=True)
class DatabaseLocale:
    """How the current database stores and orders text: what a restore takes from the target, not the dump."""

    encoding: str
    collate: str
    ctype: str
    provider: str  # libc, icu or builtin
    locale: str | None  # the ICU (15, 16: daticulocale) or builtin (17+: datlocale) locale; None for libc

    @property
    def comparable(self) -> tuple:
        return (self.encoding, _locale_key(self.collate), _locale_key(self.ctype), self.provider,
                _locale_key(self.locale) if self.provider != "libc" else None)

    def __str__(self) -> str:
        text = f"encoding {self.encoding}, collation {self.collate}, ctype {self.ctype}, provider {self.provider}"
        return text + (f" (locale {self.locale})" if self.provider != "libc" else "")


_PROVIDERS = {"c": "libc", "i": "icu", "b": "builtin"}


def _locale_key(name: str | None) -> str | None:
    # C.UTF-8 and C.utf8 (or en_US.UTF-8 and en_US.utf8) name the same glibc locale.
    return name.lower().replace("utf-8", "utf8") if name else name


def database_locale(conn: psycopg.Connection) -> DatabaseLocale:
    """Encoding, LC_COLLATE, LC_CTYPE and locale provider of the current database (PostgreSQL 12 to 18)."""
    columns = {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'pg_catalog.pg_database'::regclass "
        "AND attname IN ('datlocprovider', 'daticulocale', 'datlocale')")}
    provider = "datlocprovider::text" if "datlocprovider" in columns else "'c'"
    # The provider's own locale: daticulocale on 15 and 16, renamed datlocale on 17.
    locale = next((c for c in ("datlocale", "daticulocale") if c in columns), "NULL")
    row = conn.execute(
        f"SELECT pg_encoding_to_char(encoding), datcollate, datctype, {provider}, {locale} "
        "FROM pg_database WHERE datname = current_database()").fetchone()
    return DatabaseLocale(row[0], row[1] or "", row[2] or "", _PROVIDERS.get(row[3], row[3]), row[4])


# ---------------------------------------------------------------------------------------------------
# Content digests, compared by the gate


CHUNK_ROWS = 50_000
_STRING_CATEGORY = "S"  # pg_type.typcategory of text, varchar, char, name, citext; a domain has its base's


def _key_exprs(table: Table) -> list[sql.Composable]:
    exprs = []
    for col, category in zip(table.pk, table.pk_types):
        ident = sql.Identifier("t", col)
        # String keys sort byte-wise on both sides, whatever each server's default collation is.
        exprs.append(sql.SQL("{} COLLATE \"C\"").format(ident) if category == _STRING_CATEGORY else ident)
    return exprs


def _row_of(exprs: list[sql.Composable]) -> sql.Composable:
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(exprs))


def _row_text(table: Table) -> sql.Composable:
    """The text of a row as the digests hash it: the whole row, or only ``table.hashed``."""
    if table.hashed is None:
        return sql.SQL("ROW(t.*)::text")
    return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier("t", c) for c in table.hashed))


def column_names(conn: psycopg.Connection, table: Table) -> list[str]:
    """The table's columns in their order (dropped ones left out)."""
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum", (sql.Identifier(table.schema, table.name).as_string(conn),))]


def _key_text(table: Table) -> sql.Composable:
    """A row's primary key as one text (``1, abc``): how the gate names a row."""
    return sql.SQL("concat_ws(', ', {})").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in table.pk))


def _bound(n: int) -> sql.Composable:
    return sql.SQL("ROW({})").format(sql.SQL(", ").join([sql.Placeholder()] * n))


@dataclass
class Chunk:
    """Rows whose key is in (low, high]; None means unbounded."""

    low: tuple | None
    high: tuple | None
    rows: int = 0
    digest: str = ""


def chunk_bounds(conn: psycopg.Connection, table: Table, chunk_rows: int = CHUNK_ROWS) -> list[tuple]:
    """Key ranges (low, high] of about ``chunk_rows`` rows each, walking the primary key's index; the first
    range starts unbounded and the last ends unbounded, so the other side's rows outside the source's keys
    fall in a range too. A table without a primary key is one range."""
    if not table.pk:
        return [(None, None)]
    keys = _key_exprs(table)
    cols = sql.SQL(", ").join(sql.Identifier("t", c) for c in table.pk)
    bounds, low = [], None
    while True:
        where, params = _range_conditions(keys, low, None)
        q = sql.SQL("SELECT {cols} FROM ONLY {tbl} t {where} ORDER BY {order} OFFSET {skip} LIMIT 1").format(
            cols=cols, tbl=table.ident, where=where, order=sql.SQL(", ").join(keys),
            skip=sql.Literal(chunk_rows - 1))
        high = conn.execute(q, params).fetchone()
        if high is None:
            bounds.append((low, None))
            return bounds
        bounds.append((low, tuple(high)))
        low = tuple(high)


# Types whose hash function sees every difference their text shows (equal hash input, equal text out).
# Hashed as their text instead: numeric (1.0 and 1.00 are equal and hash alike), jsonb (its numbers too),
# float4/8 (0 and -0), interval ('1 day' = '24 hours'), bpchar (trailing blanks are not hashed), arrays
# (their bounds are not hashed), json (no hash), citext and every other extension or domain type (their
# equality may fold case), and a column with a nondeterministic collation. tests/test_gate_edges.py changes
# a value of each of these on the target and watches the digest see it.
_HASHED_RAW = ("bool", "int2", "int4", "int8", "oid", "text", "varchar", "name", "char", "uuid",
               "date", "time", "timestamp", "timestamptz", "bytea")
TYPED_DIGEST_SINCE = 140000  # hash_record_extended: PostgreSQL 14


def digest_columns(conn: psycopg.Connection, table: Table) -> tuple[DigestColumn, ...]:
    """The columns the digest covers (``table.hashed``, or all), in order, each marked ``raw`` when its
    type's own hash is as strict as its text (``_HASHED_RAW``, built in, deterministic collation). Read on the
    source; both sides are then digested with the same expression."""
    rows = conn.execute(
        """SELECT a.attname, y.typnamespace = 'pg_catalog'::regnamespace AND y.typname = ANY(%s)
                  AND coalesce(l.collisdeterministic, true)
           FROM pg_attribute a JOIN pg_type y ON y.oid = a.atttypid
           LEFT JOIN pg_collation l ON l.oid = a.attcollation
           WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""",
        (list(_HASHED_RAW), sql.Identifier(table.schema, table.name).as_string(conn))).fetchall()
    columns = {name: DigestColumn(name, raw) for name, raw in rows}
    return tuple(columns[c] for c in (table.hashed if table.hashed is not None else columns))


def _row_digest_sum(table: Table) -> sql.Composable:
    """The digest of a set of rows: the exact (numeric) sum of a 64-bit hash of each row. A sum does not
    depend on the order rows are read in, so no sort.

    With ``table.digest`` (both servers PostgreSQL 14 or later) a row's hash is ``hash_record_extended`` over
    its columns, each hashed by its type's own hash function, the ``_HASHED_RAW`` ones as they are and the
    rest as their text in ``COLLATE "C"``: no text is built for most columns, about a third of the cost of
    hashing the row's text (bench/README.md). Without it, ``hashtextextended`` of the row's text. Both are
    PostgreSQL's own hashes, the ones hash partitioning relies on and keeps across major versions, so a 15
    and a 16 server agree."""
    if table.digest:
        exprs = [sql.Identifier("t", c.name) for c in table.digest if c.raw]
        as_text = [sql.Identifier("t", c.name) for c in table.digest if not c.raw]
        if as_text:  # one record's text, each column through its output function (a cast to text rtrims bpchar)
            exprs.append(sql.SQL("({}::text COLLATE \"C\")").format(_row_of(as_text)))
        return sql.SQL("coalesce(sum(hash_record_extended({row}, 0)), 0)::text").format(row=_row_of(exprs))
    return sql.SQL("coalesce(sum(hashtextextended({row} COLLATE \"C\", 0)), 0)::text").format(row=_row_text(table))


def chunk_digest_in_range(conn: psycopg.Connection, table: Table, low: tuple | None, high: tuple | None) -> Chunk:
    """Count and digest (``_row_digest_sum``) of the rows whose key is in (low, high]. The same query on both
    sides."""
    if not table.pk:
        return _whole_table_digest(conn, table)
    keys = _key_exprs(table)
    conds, params = _range_conditions(keys, low, high)
    q = sql.SQL("SELECT count(*), {digest} FROM ONLY {tbl} t {where}").format(
        digest=_row_digest_sum(table), tbl=table.ident, where=conds)
    rows, digest = conn.execute(q, params).fetchone()
    return Chunk(low, high, rows, digest)


def _range_conditions(keys, low, high):
    parts, params = [], []
    if low is not None:
        parts.append(sql.SQL("{} > {}").format(_row_of(keys), _bound(len(keys))))
        params += list(low)
    if high is not None:
        parts.append(sql.SQL("{} <= {}").format(_row_of(keys), _bound(len(keys))))
        params += list(high)
    where = sql.SQL("WHERE ") + sql.SQL(" AND ").join(parts) if parts else sql.SQL("")
    return where, params


def _whole_table_digest(conn: psycopg.Connection, table: Table) -> Chunk:
    """A table without a primary key: one digest of all its rows (a sum: duplicate rows count each time)."""
    q = sql.SQL("SELECT count(*), {digest} FROM ONLY {tbl} t").format(digest=_row_digest_sum(table), tbl=table.ident)
    rows, digest = conn.execute(q).fetchone()
    return Chunk(None, None, rows, digest)


def row_hashes_in_range(conn: psycopg.Connection, table: Table, low: tuple | None, high: tuple | None,
                        limit: int = CHUNK_ROWS + 1) -> dict[str, str]:
    """{key as text: md5 of the row's text} for rows in (low, high]: what narrows a differing chunk."""
    if not table.pk:
        q = sql.SQL("SELECT md5({}), count(*)::text FROM ONLY {} t GROUP BY 1 ORDER BY 1 LIMIT {}").format(
            _row_text(table), table.ident, sql.Literal(limit))
        return {h: n for h, n in conn.execute(q)}
    keys = _key_exprs(table)
    where, params = _range_conditions(keys, low, high)
    key_text = _key_text(table)
    q = sql.SQL("SELECT {kt}, md5({row}) FROM ONLY {tbl} t {where} ORDER BY {order} LIMIT {limit}").format(
        kt=key_text, row=_row_text(table), tbl=table.ident, where=where, order=sql.SQL(", ").join(keys),
        limit=sql.Literal(limit))
    return {k: h for k, h in conn.execute(q, params)}


def column_values_in_range(conn: psycopg.Connection, table: Table, column: str, low: tuple | None,
                           high: tuple | None) -> dict[str, str | None]:
    """{key as text: the column's value as text} for rows in (low, high] (a table with a primary key)."""
    keys = _key_exprs(table)
    where, params = _range_conditions(keys, low, high)
    key_text = _key_text(table)
    q = sql.SQL("SELECT {kt}, {col}::text FROM ONLY {tbl} t {where}").format(
        kt=key_text, col=sql.Identifier("t", column), tbl=table.ident, where=where)
    return {k: v for k, v in conn.execute(q, params)}


# ---------------------------------------------------------------------------------------------------
# Sequences and schema objects


@dataclass(frozen=True)
class SequenceState:
    sequence: str
    table: str
    column: str
    next_value: int | None  # what nextval() would return
    column_max: int | None


def sequence_states(conn: psycopg.Connection, schemas: list[str]) -> list[SequenceState]:
    """Sequences owned by a column (serial and identity), with the next value and the column's max."""
    owned = conn.execute(
        """
        SELECT sn.nspname, s.relname, tn.nspname, t.relname, a.attname
        FROM pg_depend d
        JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        JOIN pg_namespace sn ON sn.oid = s.relnamespace
        JOIN pg_class t ON t.oid = d.refobjid
        JOIN pg_namespace tn ON tn.oid = t.relnamespace
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
        WHERE d.deptype IN ('a', 'i') AND d.classid = 'pg_class'::regclass AND tn.nspname = ANY(%s)
        ORDER BY 1, 2
        """,
        (schemas,),
    ).fetchall()
    states = []
    for seq_schema, seq, tab_schema, tab, col in owned:
        # The column's max first, the sequence after: a sequence is read outside any snapshot, so read the other
        # way round a row an app inserts in between (its id drawn after the sequence was read) would show a
        # sequence "behind" its column on a target that is being written to. This way every row the max sees
        # drew its value before the sequence was read.
        col_max = conn.execute(
            sql.SQL("SELECT max({})::bigint FROM ONLY {}").format(sql.Identifier(col), sql.Identifier(tab_schema, tab))
        ).fetchone()[0]
        seq_ident = sql.Identifier(seq_schema, seq)
        last, called, inc = conn.execute(
            sql.SQL("SELECT s.last_value, s.is_called, p.seqincrement FROM {} s, pg_sequence p "
                    "WHERE p.seqrelid = {}::regclass").format(seq_ident, sql.Literal(f'"{seq_schema}"."{seq}"'))
        ).fetchone()
        states.append(SequenceState(f"{seq_schema}.{seq}", f"{tab_schema}.{tab}", col,
                                    last + inc if called else last, col_max))
    return states


def index_tables(conn: psycopg.Connection, schemas: list[str]) -> dict[str, str]:
    """{"schema.index": "schema.table"}: which table each index belongs to (the dump's TOC does not say)."""
    return dict(conn.execute(
        """SELECT n.nspname || '.' || i.relname, tn.nspname || '.' || t.relname FROM pg_index x
           JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_namespace n ON n.oid = i.relnamespace
           JOIN pg_class t ON t.oid = x.indrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace
           WHERE n.nspname = ANY(%s)""",
        (schemas,),
    ).fetchall())


OBJECT_QUERIES = {
    "table": """SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r','p') AND n.nspname = ANY(%(s)s)""",
    "view": """SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('v','m') AND n.nspname = ANY(%(s)s)""",
    "sequence": """SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.relkind = 'S' AND n.nspname = ANY(%(s)s)""",
    "index": """SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('i','I') AND n.nspname = ANY(%(s)s)""",
    "constraint": """SELECT n.nspname || '.' || t.relname || '.' || k.conname FROM pg_constraint k
                     JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
                     WHERE n.nspname = ANY(%(s)s)""",
    "function": """SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')'
                   FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                   WHERE n.nspname = ANY(%(s)s)
                     AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')""",
    "trigger": """SELECT n.nspname || '.' || c.relname || '.' || g.tgname FROM pg_trigger g
                  JOIN pg_class c ON c.oid = g.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE NOT g.tgisinternal AND n.nspname = ANY(%(s)s)""",
    "policy": """SELECT schemaname || '.' || tablename || '.' || policyname FROM pg_policies
                 WHERE schemaname = ANY(%(s)s)""",
    "type": """SELECT n.nspname || '.' || t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
               WHERE t.typtype IN ('e','d') AND n.nspname = ANY(%(s)s)""",
    "extension": "SELECT extname FROM pg_extension",
    "populated materialized view": """SELECT n.nspname || '.' || c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'm' AND c.relispopulated
        AND n.nspname = ANY(%(s)s)""",
}


def refresh_unpopulated_matviews(conn: psycopg.Connection, schemas: list[str]) -> list[str]:
    """Fills materialized views the restore left empty (a schema-only archive has no data for them)."""
    names = [r[0] for r in conn.execute(
        """SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind = 'm' AND NOT c.relispopulated AND n.nspname = ANY(%s)""", (schemas,))]
    for name in names:
        conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(sql.SQL(name)))
    return names


def schema_objects(conn: psycopg.Connection, schemas: list[str]) -> dict[str, set[str]]:
    return {kind: {r[0] for r in conn.execute(q, {"s": schemas})} for kind, q in OBJECT_QUERIES.items()}


# ---------------------------------------------------------------------------------------------------
# Streaming copy (strategy "stream")


@contextlib.contextmanager
def exported_snapshot(ep: Endpoint, field_name: str):
    """A read-only repeatable-read transaction whose snapshot other sessions can join; held open until exit."""
    with session(ep, field_name, autocommit=False) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        snapshot_id = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        try:
            yield conn, snapshot_id
        finally:
            conn.rollback()


def join_snapshot(conn: psycopg.Connection, snapshot_id: str) -> None:
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id)))


def copyable_columns(conn: psycopg.Connection, schema: str, table: str) -> list[str]:
    """Columns COPY can write: not dropped, not generated."""
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "AND attgenerated = '' ORDER BY attnum",
        (sql.Identifier(schema, table).as_string(conn),),
    )]


def stream_table(target: psycopg.Connection, schema: str, table: str,
                 rows_from: Callable[[str], contextlib.AbstractContextManager[Iterable[bytes]]],
                 truncate: bool = True) -> int:
    """Loads one table's rows in one target transaction that first truncates it, and commits; returns the
    rows loaded. ``rows_from(query)`` is the source's side: a context manager giving ``COPY (query) TO
    STDOUT``'s text-format output (portable across major versions) in blocks of any size, which raises on
    leaving when the copy was cut short, so nothing partial is committed. ``target`` must not be in
    autocommit. ``truncate=False``: the caller emptied the table and commits (several tables, one transaction)."""
    ident = sql.Identifier(schema, table)
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in copyable_columns(target, schema, table))
    plain = target.execute("SELECT relkind = 'r' FROM pg_class WHERE oid = %s::regclass",
                           (ident.as_string(target),)).fetchone()[0]
    if truncate:
        target.execute(sql.SQL("TRUNCATE ONLY {}").format(ident))  # ONLY: never empty an inheriting child
    # FREEZE (allowed: the table was truncated in this transaction): the rows are written frozen and the
    # pages all-visible, so the gate's first read of the target does not write hint bits to every page, and
    # autovacuum has nothing to freeze later. A partitioned table refuses it.
    freeze = sql.SQL(" WITH (FREEZE)") if plain and truncate else sql.SQL("")
    query = sql.SQL("SELECT {} FROM ONLY {}").format(cols, ident).as_string(target)
    with rows_from(query) as blocks, target.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN{}").format(ident, cols, freeze)) as into:
            for block in blocks:
                into.write(block)
        rows = cur.rowcount
    if truncate:
        target.commit()
    return rows


def copy_sequence_values(source: psycopg.Connection, target: psycopg.Connection, schemas: list[str]) -> int:
    """Sets every sequence of the schemas on the target to the source's value (as pg_dump's SEQUENCE SET)."""
    names = [(s, n) for s, n in source.execute(
        "SELECT schemaname, sequencename FROM pg_sequences WHERE schemaname = ANY(%s)", (schemas,))]
    for schema, name in names:
        ident = sql.Identifier(schema, name)
        last, called = source.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(ident)).fetchone()
        target.execute("SELECT setval(%s::regclass, %s, %s)", (ident.as_string(target), last, called))
    return len(names)


def execute(conn: psycopg.Connection, statement: str | sql.Composable, params=None, what: str = "") -> None:
    try:
        conn.execute(statement, params)
    except psycopg.Error as exc:
        raise StepFailed(f"{what or 'SQL'} failed: {redact(str(exc)).strip().splitlines()[0]}") from None


def rls_hidden_tables(conn: psycopg.Connection, schemas: list[str]) -> dict[str, list[str]]:
    """{table: [policy names]} of the tables whose rows row-level security hides from the current user (RLS
    enabled, and the user neither owns the table, nor has BYPASSRLS, nor is a superuser): with
    ``row_security = off`` reading them fails, as pg_dump's does."""
    return {table: list(policies) for table, policies in conn.execute(
        """SELECT format('%%I.%%I', n.nspname, c.relname),
                  array(SELECT polname::text FROM pg_policy WHERE polrelid = c.oid ORDER BY 1)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND c.relrowsecurity
              AND NOT pg_has_role(c.relowner, 'USAGE')
              AND NOT (SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = current_user)
            ORDER BY 1""", (schemas,))}
