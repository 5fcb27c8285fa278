"""What changed on one side since two PostgreSQL databases were equal, row by row, and carrying it back.

The rollback's question is "what did the apps write on the target since the switch?". When the switch
happened the final sync's gate had proven the target equal to the frozen source, and the source has stayed
frozen since (the apps wrote only to the target): so the difference between the two, now, is exactly what
the apps did on the target. ``diff_table`` reads one hash per row on both sides (one ordered scan each) and
names every inserted, updated and deleted row by its primary key; a table without a key is compared as a
multiset of whole rows (an update there shows as one delete and one insert). Nothing else is needed on the
target: no replication slot (``wal_level=logical`` and a restart), no trigger on the apps' tables (which the
gate would see). What it cannot tell: a table that something else also wrote on the source since the
switch (the runbook's writers the freeze cannot stop): its differences have two authors.

``apply_changes`` writes a change set to the source: each table in one transaction, in foreign-key order
(inserts and updates parents first, then deletes children first), each row in a savepoint, so a row the
source refuses (a key taken since, a constraint) is a conflict named by its key and the others still go;
then the source's sequences are moved past the target's (carried rows bring their ids). Values travel as
text and are cast to each column's type on the source; generated columns are left to the source.
``write_changes`` writes the same change set, values included, as JSON lines to a file instead.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from liftoff.redaction import one_line
from tasks.postgres import Table

SAMPLE_KEYS = 5


@dataclass
class TableChanges:
    """One table's changes on the changed side: keys (tuples of the key's values) of inserted, updated and
    deleted rows; for a table without a primary key, the rows' hashes, each repeated as often as it
    changed."""

    table: str
    key: tuple[str, ...]
    inserts: list[tuple] = field(default_factory=list)
    updates: list[tuple] = field(default_factory=list)
    deletes: list[tuple] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.inserts) + len(self.updates) + len(self.deletes)

    def row(self) -> dict:
        """The approval's and the report's line for this table."""
        return {"table": self.table, "key": ", ".join(self.key) or "(no key: whole rows)",
                "inserts": len(self.inserts), "updates": len(self.updates), "deletes": len(self.deletes),
                "some keys": sample(self)}


def sample(change: TableChanges) -> str:
    """A few keys of each kind of change, for a report's line."""
    def few(keys: list[tuple]) -> str:
        shown = ", ".join(key_label(k) for k in keys[:SAMPLE_KEYS])
        return shown + (f" (+{len(keys) - SAMPLE_KEYS})" if len(keys) > SAMPLE_KEYS else "")

    return "; ".join(f"{op} {few(keys)}" for op, keys in
                     (("ins", change.inserts), ("upd", change.updates), ("del", change.deletes)) if keys)


@dataclass
class Applied:
    """What ``apply_changes`` did: rows carried per table, conflicts named by key, sequences moved."""

    carried: dict[str, int] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    sequences: dict[str, int] = field(default_factory=dict)
    triggers_fired: bool = False


def key_label(key: tuple) -> str:
    """A key as a report names it: the value, or (a, b) for a composite key."""
    return "(" + ", ".join("NULL" if v is None else str(v) for v in key) + ")" if len(key) != 1 else str(key[0])


def _row_hash(table: Table, skip: set[str], columns: list[str]) -> sql.Composable:
    kept = [c for c in columns if c not in skip]
    return sql.SQL("md5(ROW({})::text)").format(sql.SQL(", ").join(sql.Identifier("t", c) for c in kept))


def row_hashes(conn: psycopg.Connection, table: Table, skip: set[str] = frozenset()) -> dict[tuple, str]:
    """{key: md5 of the row's text} for every row (the key's values as text). A table without a primary key
    is a multiset: each distinct row is keyed (its hash, n) for its n-th copy, so a copy more or less is
    one insert or delete."""
    columns = [c[0] for c in table_columns(conn, table)]
    if not table.pk:
        q = sql.SQL("SELECT {h} FROM ONLY {t} t").format(h=_row_hash(table, skip, columns), t=table.ident)
        seen: Counter = Counter()
        out = {}
        for (h,) in conn.execute(q):
            seen[h] += 1
            out[(h, str(seen[h]))] = h
        return out
    q = sql.SQL("SELECT {k}, {h} FROM ONLY {t} t").format(
        k=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in table.pk),
        h=_row_hash(table, skip, columns), t=table.ident)
    return {tuple(row[:-1]): row[-1] for row in conn.execute(q)}


def table_columns(conn: psycopg.Connection, table: Table) -> list[tuple[str, str, str, str]]:
    """(name, type as format_type writes it, attidentity, attgenerated) of each column, in order."""
    return [tuple(r) for r in conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attidentity, attgenerated FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table.ident.as_string(conn),))]


def diff_table(base: psycopg.Connection, changed: psycopg.Connection, table: Table,
               rewritten: dict[str, Callable[[str | None], str | None]] | None = None) -> TableChanges:
    """The rows of ``table`` that differ on ``changed`` from ``base``. ``rewritten``: columns the migration
    changed on purpose (column -> what the base's value becomes): such a column counts as changed only where
    the changed side holds something else than the rewrite of the base's value."""
    rewritten = rewritten if table.pk else {}
    skip = set(rewritten or {})
    old, new = row_hashes(base, table, skip), row_hashes(changed, table, skip)
    out = changes_between(table, old, new)
    if rewritten:
        updated = set(out.updates)
        for column, expected in rewritten.items():
            before, after = _column_values(base, table, column), _column_values(changed, table, column)
            updated |= {k for k, v in after.items() if k in before and v != expected(before[k])}
        out.updates = sorted(updated, key=_sortable)
    return out


def changes_between(table: Table, old: dict[tuple, str], new: dict[tuple, str],
                    only: set[tuple] | None = None) -> TableChanges:
    """What turns ``old`` (row hashes by key) into ``new``; ``only``: these keys alone."""
    out = TableChanges(table.qualified, table.pk)
    keys = (old.keys() | new.keys()) if only is None else only
    for k in keys:
        if k in new and k not in old:
            out.inserts.append(k)
        elif k in old and k not in new:
            out.deletes.append(k)
        elif k in old and old[k] != new[k]:
            out.updates.append(k)
    for name in ("inserts", "updates", "deletes"):
        getattr(out, name).sort(key=_sortable)
    return out


@dataclass
class ThreeWay:
    """Both sides' changes since a baseline they shared: ``source`` (changed there only), ``target``
    (changed there only) and ``both`` (keys changed on both sides to different rows: a conflict)."""

    source: TableChanges
    target: TableChanges
    both: list[tuple]


def three_way(table: Table, baseline: dict[tuple, str], source: dict[tuple, str],
              target: dict[tuple, str]) -> ThreeWay:
    """Splits the differences of ``source`` and ``target`` (row hashes by key) from ``baseline`` by who made
    them. A key both changed to the same row is no change to carry."""
    missing = object()
    moved_source = {k for k in baseline.keys() | source.keys() if baseline.get(k, missing) != source.get(k, missing)}
    moved_target = {k for k in baseline.keys() | target.keys() if baseline.get(k, missing) != target.get(k, missing)}
    both = {k for k in moved_source & moved_target if source.get(k, missing) != target.get(k, missing)}
    return ThreeWay(changes_between(table, baseline, source, moved_source - moved_target),
                    changes_between(table, baseline, target, moved_target - moved_source),
                    sorted(both, key=_sortable))


def _sortable(key: tuple):
    return tuple((v is None, str(v)) for v in key)


def _column_values(conn: psycopg.Connection, table: Table, column: str) -> dict[tuple, str | None]:
    q = sql.SQL("SELECT {k}, {c}::text FROM ONLY {t} t").format(
        k=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in table.pk),
        c=sql.Identifier("t", column), t=table.ident)
    return {tuple(row[:-1]): row[-1] for row in conn.execute(q)}


def _where_key(conn: psycopg.Connection, table: Table) -> sql.Composable:
    """The key's columns equal to the key's text values, each cast to its column's type (the index serves)."""
    types = {name: typ for name, typ, _, _ in table_columns(conn, table)}
    return sql.SQL(" AND ").join(sql.SQL("{} = %s::{}").format(sql.Identifier("t", c), sql.SQL(types[c]))
                                 for c in table.pk)


def read_rows(conn: psycopg.Connection, table: Table, keys: Iterable[tuple]) -> Iterable[tuple[tuple, dict]]:
    """(key, {column: value as text}) of each row of ``keys`` that is there, read as the rows stand now (a
    table without a key: as many rows of each hash as keys name it)."""
    columns = [c[0] for c in table_columns(conn, table)]
    select = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in columns)
    if not table.pk:
        wanted = [k for k in keys]
        for h, n in Counter(k[0] for k in wanted).items():
            q = sql.SQL("SELECT {s} FROM ONLY {t} t WHERE md5(ROW(t.*)::text) = %s LIMIT {n}").format(
                s=select, t=table.ident, n=sql.Literal(n))
            mine = iter([k for k in wanted if k[0] == h])
            for values in conn.execute(q, (h,)).fetchall():
                yield next(mine), dict(zip(columns, values))
        return
    q = sql.SQL("SELECT {s} FROM ONLY {t} t WHERE {w}").format(s=select, t=table.ident, w=_where_key(conn, table))
    for key in keys:
        row = conn.execute(q, key).fetchone()
        if row is not None:
            yield key, dict(zip(columns, row))


def foreign_key_order(conn: psycopg.Connection, tables: list[Table]) -> list[Table]:
    """``tables`` with each table after the tables its foreign keys point to (cycles keep their order)."""
    names = {t.qualified: t for t in tables}
    edges = conn.execute(
        """SELECT cn.nspname || '.' || c.relname, fn.nspname || '.' || f.relname FROM pg_constraint k
           JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
           JOIN pg_class f ON f.oid = k.confrelid JOIN pg_namespace fn ON fn.oid = f.relnamespace
           WHERE k.contype = 'f' AND k.conrelid <> k.confrelid""").fetchall()
    parents: dict[str, set[str]] = {n: set() for n in names}
    for child, parent in edges:
        if child in names and parent in names:
            parents[child].add(parent)
    ordered, placed = [], set()
    while len(ordered) < len(names):
        ready = [n for n in names if n not in placed and parents[n] <= placed]
        if not ready:  # a cycle: the rest in name order
            ready = [n for n in names if n not in placed]
        for n in ready:
            ordered.append(names[n])
            placed.add(n)
    return ordered


def apply_changes(dest: psycopg.Connection, origin: psycopg.Connection, tables: list[Table],
                  changes: dict[str, TableChanges]) -> Applied:
    """Writes ``changes`` (found on ``origin``, whose rows they take) to ``dest``; see the module's docstring.
    ``dest``: a connection in autocommit mode as a user who may write every table (the owner)."""
    done = Applied()
    ordered = [t for t in foreign_key_order(dest, tables) if changes.get(t.qualified) and changes[t.qualified].total]
    for t in ordered:
        done.carried[t.qualified] = 0
    for table in ordered:  # parents first: a child's new row may need its parent's
        change = changes[table.qualified]
        if not (change.inserts or change.updates):
            continue
        columns = table_columns(dest, table)
        with _table_transaction(dest, done):
            for key, values in read_rows(origin, table, change.inserts):
                _row(dest, done, table, key, "insert", lambda: _insert(dest, table, columns, values))
            for key, values in read_rows(origin, table, change.updates):
                _row(dest, done, table, key, "update", lambda: _update(dest, table, columns, key, values))
    for table in reversed(ordered):  # children first: a parent's row goes after its children's
        change = changes[table.qualified]
        if not change.deletes:
            continue
        with _table_transaction(dest, done):
            for key in change.deletes:
                _row(dest, done, table, key, "delete", lambda: _delete(dest, table, key))
    done.sequences = move_sequences_past(dest, origin, sorted({t.schema for t in tables}))
    return done


class _table_transaction:
    """One transaction on the source, writable even where read-only is the default (a frozen login role),
    with the source's triggers off when the user may ask for that (a superuser), else on (recorded)."""

    def __init__(self, conn: psycopg.Connection, done: Applied):
        self.conn, self.done, self.tx = conn, done, None

    def __enter__(self):
        self.tx = self.conn.transaction()
        self.tx.__enter__()
        self.conn.execute("SET TRANSACTION READ WRITE")
        try:
            with self.conn.transaction():
                self.conn.execute("SET LOCAL session_replication_role = replica")
        except psycopg.errors.InsufficientPrivilege:
            self.done.triggers_fired = True
        return self

    def __exit__(self, *exc):
        return self.tx.__exit__(*exc)


def _row(conn: psycopg.Connection, done: Applied, table: Table, key: tuple, op: str, write: Callable) -> None:
    try:
        with conn.transaction():
            if write() == 0 and op != "insert":
                raise _Gone
        done.carried[table.qualified] += 1
    except _Gone:
        done.conflicts.append(f"{table.qualified} key {key_label(key)}: {op}: the row is not on the source")
    except psycopg.Error as exc:
        done.conflicts.append(f"{table.qualified} key {key_label(key)}: {op}: {one_line(exc)}")


class _Gone(Exception):
    pass


def _insert(conn, table: Table, columns, values: dict) -> int:
    kept = [(name, typ) for name, typ, _, generated in columns if not generated and name in values]
    q = sql.SQL("INSERT INTO {t} ({c}) OVERRIDING SYSTEM VALUE VALUES ({v})").format(
        t=table.ident, c=sql.SQL(", ").join(sql.Identifier(n) for n, _ in kept),
        v=sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(typ)) for _, typ in kept))
    return conn.execute(q, [values[n] for n, _ in kept]).rowcount


def _update(conn, table: Table, columns, key: tuple, values: dict) -> int:
    kept = [(name, typ) for name, typ, identity, generated in columns
            if not generated and identity != "a" and name in values and name not in table.pk]
    if not kept:
        return 1
    q = sql.SQL("UPDATE ONLY {t} t SET {s} WHERE {w}").format(
        t=table.ident, w=_where_key(conn, table),
        s=sql.SQL(", ").join(sql.SQL("{} = %s::{}").format(sql.Identifier(n), sql.SQL(typ)) for n, typ in kept))
    return conn.execute(q, [values[n] for n, _ in kept] + list(key)).rowcount


def _delete(conn, table: Table, key: tuple) -> int:
    if not table.pk:
        q = sql.SQL("DELETE FROM ONLY {t} WHERE ctid = (SELECT ctid FROM ONLY {t} t WHERE md5(ROW(t.*)::text) = %s "
                    "LIMIT 1)").format(t=table.ident)
        return conn.execute(q, key[:1]).rowcount
    return conn.execute(sql.SQL("DELETE FROM ONLY {t} t WHERE {w}").format(t=table.ident, w=_where_key(conn, table)),
                        key).rowcount


def move_sequences_past(dest: psycopg.Connection, origin: psycopg.Connection, schemas: list[str]) -> dict[str, int]:
    """Each sequence of the schemas on ``dest`` set to ``origin``'s position where that is ahead (carried rows
    bring ids ``dest``'s sequences have not handed out). {sequence: new position}."""
    q = "SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences WHERE schemaname = ANY(%s)"
    ahead = {name: value for name, value in origin.execute(q, (schemas,)) if value is not None}
    moved = {}
    for name, value in dest.execute(q, (schemas,)).fetchall():
        if name in ahead and (value is None or ahead[name] > value):
            with dest.transaction():
                dest.execute("SET TRANSACTION READ WRITE")
                dest.execute("SELECT setval(%s::regclass, %s)", (name, ahead[name]))
            moved[name] = ahead[name]
    return moved


def write_changes(path: Path, target: psycopg.Connection, tables: list[Table], changes: dict[str, TableChanges],
                  extra: Iterable[dict] = ()) -> int:
    """The change set as JSON lines (``table``, ``op``, ``key``, ``row``: the target's values as text; a
    delete's row is absent: it is the source's), then ``extra`` lines; returns the lines written. Written to
    a temporary name and renamed, so a file that exists is whole."""
    partial = path.with_name(path.name + ".partial")
    lines = 0
    with partial.open("w") as out:
        for table in tables:
            change = changes.get(table.qualified)
            if not change or not change.total:
                continue
            for op, keys in (("insert", change.inserts), ("update", change.updates)):
                for key, values in read_rows(target, table, keys):
                    out.write(json.dumps({"table": table.qualified, "op": op, "key": _key_json(table, key),
                                          "row": values}, default=str) + "\n")
                    lines += 1
            for key in change.deletes:
                out.write(json.dumps({"table": table.qualified, "op": "delete", "key": _key_json(table, key)},
                                     default=str) + "\n")
                lines += 1
        for line in extra:
            out.write(json.dumps(line, default=str) + "\n")
            lines += 1
    partial.rename(path)
    return lines


def _key_json(table: Table, key: tuple) -> dict:
    return dict(zip(table.pk, key)) if table.pk else {"row_md5": key[0], "copy": key[1]}


__all__ = ["Applied", "TableChanges", "ThreeWay", "apply_changes", "changes_between", "diff_table",
           "foreign_key_order", "key_label", "move_sequences_past", "read_rows", "row_hashes", "sample", "three_way",
           "write_changes"]
