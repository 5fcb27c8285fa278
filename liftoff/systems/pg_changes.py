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

``three_way`` tells two sides' changes apart from a baseline they shared (a table the source kept writing).

``apply_changes`` writes a change set to the other side (the rollback: to the source; the catch-up: to the
target): each table in one transaction, in foreign-key order (inserts and updates parents first, then
deletes children first), each row in a savepoint, so a row the destination refuses (a key taken since, a
constraint, a row changed there since it was counted) is a conflict named by its key and the others still
go; then the destination's sequences are moved past the origin's (carried rows bring their ids). Values
travel as text and are cast to each column's type; generated columns are left to the destination.
``write_changes`` writes the same change set, values included, as JSON lines to a file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from liftoff.systems.postgres import Table

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
    # each changed key's row hash, when counted, on the side the changes are for (None: no row there): a row
    # that changed there since is not overwritten
    before: dict[tuple, str | None] = field(default_factory=dict)

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
    refused: dict[tuple[str, tuple, str], str] = field(default_factory=dict)  # (table, key, op): why
    sequences: dict[str, int] = field(default_factory=dict)
    triggers_fired: bool = False

    @property
    def conflicts(self) -> list[str]:
        return [f"{table} key {key_label(key)}: {op}: {why}" for (table, key, op), why in self.refused.items()]

    @property
    def failed(self) -> dict[str, set[tuple]]:
        """Per table, the keys not written."""
        out: dict[str, set[tuple]] = {}
        for table, key, _ in self.refused:
            out.setdefault(table, set()).add(key)
        return out


def key_label(key: tuple) -> str:
    """A key as a report names it: the value, or (a, b) for a composite key."""
    return "(" + ", ".join("NULL" if v is None else str(v) for v in key) + ")" if len(key) != 1 else str(key[0])


def _row_hash(columns: list[str], skip: set[str] = frozenset(), alias: str = "t") -> sql.Composable:
    kept = [c for c in columns if c not in skip]
    return sql.SQL("md5(ROW({})::text)").format(sql.SQL(", ").join(sql.Identifier(alias, c) for c in kept))


def row_hashes(conn: psycopg.Connection, table: Table, skip: set[str] = frozenset(),
               columns: list[str] | None = None) -> dict[tuple, str]:
    """{key: md5 of the row's text} for every row (the key's values as text), over ``columns`` in that order
    (pass the source's, so a side whose columns stand in another order hashes alike; default: this side's).
    A table without a primary key is a multiset: each distinct row is keyed (its hash, n) for its n-th copy,
    so a copy more or less is one insert or delete."""
    columns = columns or [c[0] for c in table_columns(conn, table)]
    if not table.pk:
        q = sql.SQL("SELECT {h} FROM ONLY {t} t").format(h=_row_hash(columns, skip), t=table.ident)
        seen: Counter = Counter()
        out = {}
        for (h,) in conn.execute(q):
            seen[h] += 1
            out[(h, str(seen[h]))] = h
        return out
    q = sql.SQL("SELECT {k}, {h} FROM ONLY {t} t").format(
        k=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in table.pk),
        h=_row_hash(columns, skip), t=table.ident)
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
    skip, columns = set(rewritten or {}), [c[0] for c in table_columns(base, table)]
    old, new = row_hashes(base, table, skip, columns), row_hashes(changed, table, skip, columns)
    out = changes_between(table, old, new)
    if rewritten:
        updated = set(out.updates)
        for column, expected in rewritten.items():
            before, after = _column_values(base, table, column), _column_values(changed, table, column)
            updated |= {k for k, v in after.items() if k in before and v != expected(before[k])}
        out.updates = sorted(updated, key=_sortable)
        out.before.update({k: old.get(k) for k in out.updates})
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
    out.before = {k: old.get(k) for k in out.inserts + out.updates + out.deletes}
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
    to_target = changes_between(table, baseline, source, moved_source - moved_target)
    to_source = changes_between(table, baseline, target, moved_target - moved_source)
    to_target.before = {k: target.get(k) for k in to_target.before}  # as the side written to holds them now
    to_source.before = {k: source.get(k) for k in to_source.before}
    return ThreeWay(to_target, to_source, sorted(both, key=_sortable))


def _sortable(key: tuple):
    return tuple((v is None, str(v)) for v in key)


def _column_values(conn: psycopg.Connection, table: Table, column: str) -> dict[tuple, str | None]:
    q = sql.SQL("SELECT {k}, {c}::text FROM ONLY {t} t").format(
        k=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in table.pk),
        c=sql.Identifier("t", column), t=table.ident)
    return {tuple(row[:-1]): row[-1] for row in conn.execute(q)}


def _where_key(conn: psycopg.Connection, table: Table, alias: str = "d") -> sql.Composable:
    """The key's columns equal to the key's text values, each cast to its column's type (the index serves)."""
    types = {name: typ for name, typ, _, _ in table_columns(conn, table)}
    return sql.SQL(" AND ").join(sql.SQL("{} = %s::{}").format(sql.Identifier(alias, c), sql.SQL(types[c]))
                                 for c in table.pk)


def read_rows(conn: psycopg.Connection, table: Table, keys: Iterable[tuple],
              hashed: list[str] | None = None) -> Iterable[tuple[tuple, dict]]:
    """(key, {column: value as text}) of each row of ``keys`` that is there, read as the rows stand now (a
    table without a key: as many rows of each hash as keys name it, hashed over ``hashed``, the columns
    ``row_hashes`` was given)."""
    columns = [c[0] for c in table_columns(conn, table)]
    select = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in columns)
    if not table.pk:
        wanted = [k for k in keys]
        for h, n in Counter(k[0] for k in wanted).items():
            q = sql.SQL("SELECT {s} FROM ONLY {t} t WHERE {h} = %s LIMIT {n}").format(
                s=select, t=table.ident, h=_row_hash(hashed or columns), n=sql.Literal(n))
            mine = iter([k for k in wanted if k[0] == h])
            for values in conn.execute(q, (h,)).fetchall():
                yield next(mine), dict(zip(columns, values))
        return
    q = sql.SQL("SELECT {s} FROM ONLY {t} t WHERE {w}").format(s=select, t=table.ident,
                                                            w=_where_key(conn, table, alias="t"))
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


@dataclass
class Carry:
    """How ``apply_changes`` writes one table's changes: ``columns`` (the origin's, in its order) hash a row
    alike on both sides; ``expected`` is each changed key's hash on the destination when the changes were
    counted (None: no row), so a row changed there since is a conflict, never overwritten; ``rewritten``
    maps a column the storage phase rewrites to its rewrite (source value -> target value), and
    ``to_target`` says which way the rows go."""

    columns: list[str]
    expected: dict[tuple, str | None] = field(default_factory=dict)
    rewritten: dict[str, Callable[[str | None], str | None]] = field(default_factory=dict)
    to_target: bool = False


def apply_changes(dest: psycopg.Connection, origin: psycopg.Connection, tables: list[Table],
                  changes: dict[str, TableChanges], how: dict[str, Carry]) -> Applied:
    """Writes ``changes`` (found on ``origin``, whose rows they take) to ``dest``; see the module's docstring.
    ``dest``: a connection in autocommit mode as a user who may write every table (the owner). A row that
    fails (a key taken, a constraint, changed on ``dest`` since it was counted, gone from ``origin``) is a
    conflict named by its key; inserts and updates that failed are tried once more after the deletes (a row
    deleted and inserted again with the same unique value)."""
    done = Applied()
    ordered = [t for t in foreign_key_order(dest, tables) if changes.get(t.qualified) and changes[t.qualified].total]
    retry: list[tuple[Table, str, list[tuple]]] = []
    for t in ordered:
        done.carried[t.qualified] = 0
    for table in ordered:  # parents first: a child's new row may need its parent's
        change, carry = changes[table.qualified], how[table.qualified]
        carry.expected = {**change.before, **carry.expected}
        failed = _write_rows(dest, origin, table, carry, done, [("insert", change.inserts), ("update", change.updates)])
        retry += [(table, op, keys) for op, keys in failed.items() if keys]
    for table in reversed(ordered):  # children first: a parent's row goes after its children's
        if changes[table.qualified].deletes:
            _write_rows(dest, origin, table, how[table.qualified], done, [("delete", changes[table.qualified].deletes)])
    for table, op, keys in retry:
        for k in keys:
            done.refused.pop((table.qualified, k, op), None)
        _write_rows(dest, origin, table, how[table.qualified], done, [(op, keys)])
    done.sequences = move_sequences_past(dest, origin, sorted({t.schema for t in tables}))
    return done


def _write_rows(dest, origin, table: Table, carry: Carry, done: Applied, work: list[tuple[str, list[tuple]]]):
    """One transaction on ``dest`` for ``table``: each row in a savepoint. Returns the keys that failed, by op."""
    columns = table_columns(dest, table)
    where = _where_key(dest, table)
    check = _row_hash(carry.columns, set(carry.rewritten) if table.pk else set(), alias="d")
    failed: dict[str, list[tuple]] = {}
    with _table_transaction(dest, table, done):
        for op, keys in work:
            failed[op] = []
            if op == "delete":
                rows = [(k, None) for k in keys]
            else:
                found = dict(read_rows(origin, table, keys, carry.columns))
                for k in keys:
                    if k not in found:
                        _conflict(done, table, k, op, "the row is gone from where it was counted", failed)
                rows = [(k, found[k]) for k in keys if k in found]
            for key, values in rows:
                try:
                    with dest.transaction():
                        if _write_one(dest, table, carry, columns, where, check, op, key, values) == 0:
                            raise _Moved
                    done.carried[table.qualified] += 1
                except _Moved:
                    _conflict(done, table, key, op, "changed on this side since it was counted; left as it is", failed)
                except psycopg.Error as exc:
                    _conflict(done, table, key, op, _error_line(exc), failed)
    return failed


def _conflict(done: Applied, table: Table, key: tuple, op: str, why: str, failed: dict) -> None:
    done.refused[(table.qualified, key, op)] = why
    failed.setdefault(op, []).append(key)


def _error_line(exc: psycopg.Error) -> str:
    """What refused a row, without the row's values (psycopg's DETAIL quotes them: an e-mail, a hash)."""
    diag = exc.diag
    primary = (diag.message_primary or type(exc).__name__).split(" DETAIL")[0]
    constraint = f" (constraint {diag.constraint_name})" if diag.constraint_name else ""
    return f"{diag.sqlstate or ''} {primary}{constraint}".strip()


class _Moved(Exception):
    """The destination's row is not the one counted (or is gone): written over, it would lose a change."""


def _write_one(conn, table: Table, carry: Carry, columns, where, check, op: str, key: tuple, values) -> int:
    expected = carry.expected.get(key)
    if op == "insert":
        return _insert(conn, table, carry, columns, values)
    guard, params = sql.SQL(""), []
    if table.pk:  # a keyless row's key is its hash: the DELETE finds it by that already
        guard = (sql.SQL(" AND {} = %s").format(check) if expected is not None else sql.SQL(" AND false"))
        params = [expected] if expected is not None else []
    if op == "delete":
        if not table.pk:
            q = sql.SQL("DELETE FROM ONLY {t} WHERE ctid = (SELECT ctid FROM ONLY {t} t WHERE {h} = %s LIMIT 1)").format(
                t=table.ident, h=_row_hash(carry.columns))
            return conn.execute(q, key[:1]).rowcount
        return conn.execute(sql.SQL("DELETE FROM ONLY {t} d WHERE {w}{g}").format(t=table.ident, w=where, g=guard),
                            [*key, *params]).rowcount
    return _update(conn, table, carry, columns, where, guard, key, values, params)


def _insert(conn, table: Table, carry: Carry, columns, values: dict) -> int:
    kept = [(name, typ) for name, typ, _, generated in columns if not generated and name in values]
    given = [_to_dest(carry, name, values[name]) for name, _ in kept]
    q = sql.SQL("INSERT INTO {t} ({c}) OVERRIDING SYSTEM VALUE VALUES ({v})").format(
        t=table.ident, c=sql.SQL(", ").join(sql.Identifier(n) for n, _ in kept),
        v=sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(typ)) for _, typ in kept))
    return conn.execute(q, given).rowcount


def _to_dest(carry: Carry, column: str, value: str | None) -> str | None:
    """A value as the destination holds it: a rewritten column going to the target takes the rewrite."""
    rewrite = carry.rewritten.get(column)
    return rewrite(value) if rewrite is not None and carry.to_target else value


def _update(conn, table: Table, carry: Carry, columns, where, guard, key: tuple, values: dict, params) -> int:
    """Sets only the columns whose value differs on the destination (a rewritten column going back to the
    source is left as it is where the target holds just the rewrite of the source's value)."""
    select = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("d", c)) for c, *_ in columns)
    now = conn.execute(sql.SQL("SELECT {s} FROM ONLY {t} d WHERE {w}{g} FOR UPDATE").format(
        s=select, t=table.ident, w=where, g=guard), [*key, *params]).fetchone()
    if now is None:
        return 0
    now = dict(zip((c for c, *_ in columns), now))
    changed = []
    for name, typ, identity, generated in columns:
        if generated or identity == "a" or name in table.pk or name not in values:
            continue
        want = _to_dest(carry, name, values[name])
        rewrite = carry.rewritten.get(name)
        if rewrite is not None and not carry.to_target and values[name] == rewrite(now[name]):
            continue
        if want != now[name]:
            changed.append((name, typ, want))
    if not changed:
        return 1
    q = sql.SQL("UPDATE ONLY {t} d SET {s} WHERE {w}").format(
        t=table.ident, w=where,
        s=sql.SQL(", ").join(sql.SQL("{} = %s::{}").format(sql.Identifier(n), sql.SQL(typ)) for n, typ, _ in changed))
    return conn.execute(q, [v for *_, v in changed] + list(key)).rowcount


class _table_transaction:
    """One transaction on ``dest`` for one table, writable even where read-only is the default (a frozen login
    role), with the table's own triggers off so a carried row is not written twice (a profile-on-sign-up
    trigger) nor rewritten (an updated_at trigger): ``session_replication_role = replica`` where the user may
    (a superuser), else each enabled trigger disabled for the transaction by the table's owner and put back
    as it was before commit; where neither is allowed, the triggers run (recorded)."""

    def __init__(self, conn: psycopg.Connection, table: Table, done: Applied):
        self.conn, self.table, self.done, self.tx, self.restore = conn, table, done, None, []

    def __enter__(self):
        self.tx = self.conn.transaction()
        self.tx.__enter__()
        self.conn.execute("SET TRANSACTION READ WRITE")
        try:
            with self.conn.transaction():
                self.conn.execute("SET LOCAL session_replication_role = replica")
            return self
        except psycopg.errors.InsufficientPrivilege:
            pass
        triggers = self.conn.execute(
            "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal "
            "AND tgenabled <> 'D'", (self.table.ident.as_string(self.conn),)).fetchall()
        try:
            with self.conn.transaction():
                for name, _ in triggers:
                    self.conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(self.table.ident,
                                                                                       sql.Identifier(name)))
            self.restore = triggers
        except psycopg.errors.InsufficientPrivilege:
            if triggers:
                self.done.triggers_fired = True
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            for name, mode in self.restore:
                how = {"A": "ENABLE ALWAYS TRIGGER", "R": "ENABLE REPLICA TRIGGER"}.get(mode, "ENABLE TRIGGER")
                self.conn.execute(sql.SQL("ALTER TABLE {} {} {}").format(self.table.ident, sql.SQL(how),
                                                                         sql.Identifier(name)))
        return self.tx.__exit__(kind, exc, tb)


def move_sequences_past(dest: psycopg.Connection, origin: psycopg.Connection, schemas: list[str]) -> dict[str, int]:
    """Each sequence of the schemas on ``dest`` moved to ``origin``'s position where that is ahead (carried rows
    bring ids ``dest``'s sequences have not handed out); never moved back, even while apps draw from it.
    {sequence: new position}."""
    q = "SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences WHERE schemaname = ANY(%s)"
    ahead = {name: value for name, value in origin.execute(q, (schemas,)) if value is not None}
    moved = {}
    for name, value in dest.execute(q, (schemas,)).fetchall():
        if name in ahead and (value is None or ahead[name] > value):
            with dest.transaction():
                dest.execute("SET TRANSACTION READ WRITE")
                ident = sql.Identifier(*name.split(".", 1))
                dest.execute(sql.SQL("SELECT setval(%s::regclass, greatest(%s, (SELECT last_value FROM {})))").format(
                    ident), (name, ahead[name]))
            moved[name] = ahead[name]
    return moved


def write_changes(path: Path, target: psycopg.Connection, tables: list[Table], changes: dict[str, TableChanges],
                  extra: Iterable[dict] = (), hashed: dict[str, list[str]] | None = None) -> int:
    """The change set as JSON lines (``table``, ``op``, ``key``, ``row``: the target's values as text; a
    delete's row is absent: it is the source's), then ``extra`` lines; returns the lines written. The file
    holds the apps' data: created for its owner only (0600), never over an existing one, flushed to disk
    and renamed into place, so a file that exists is whole. ``hashed``: per table, the columns its
    ``row_hashes`` covered (a keyless table's key is such a hash)."""
    partial = path.with_name(path.name + ".partial")
    lines = 0
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        for table in tables:
            change = changes.get(table.qualified)
            if not change or not change.total:
                continue
            for op, keys in (("insert", change.inserts), ("update", change.updates)):
                for key, values in read_rows(target, table, keys, (hashed or {}).get(table.qualified)):
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
        out.flush()
        os.fsync(out.fileno())
    os.rename(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return lines


def _key_json(table: Table, key: tuple) -> dict:
    return dict(zip(table.pk, key)) if table.pk else {"row_md5": key[0], "copy": key[1]}


__all__ = ["Applied", "TableChanges", "ThreeWay", "apply_changes", "changes_between", "diff_table",
           "foreign_key_order", "key_label", "move_sequences_past", "read_rows", "row_hashes", "sample", "three_way",
           "write_changes"]
