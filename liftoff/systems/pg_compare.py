"""The database gate: proves the target holds what the source holds. A plain function of the two sides that
returns a report (what matched, what differed, with numbers); the flow decides what a failed report means.

Checks, per migrated table: exact row count and a content checksum computed inside each database (the sum
of a 64-bit hash of each row's text form, in chunks of key ranges taken from the source);
when a chunk differs, the rows of that key range are compared to name the first differing keys. Then:
owned sequences at or above their column's max, every schema object of the source present on the
target, and for objects on both sides the same definition (``liftoff.systems.pg_definitions``: function bodies and
attributes, triggers and their enabled state, constraints, indexes, views, columns, policies, row-level
security flags and replica identities, sequence parameters, enum values in order, domains with their
constraints); policies, triggers, constraints, columns and indexes on the target only are differences too;
with a role map, the same effective privileges per mapped role and the same default privileges for objects
created later. Both sides run with the same text-shaping session settings (``liftoff.systems.postgres.TEXT_SETTINGS``).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

import psycopg

from liftoff.checks import GateReport
from liftoff.systems.pg_definitions import (
    PLACEMENT, Definitions, Identity, columns_with_acl, qualified_names, read_definitions, read_privileges,
)
from liftoff.systems.postgres import (
    CHUNK_ROWS, TYPED_DIGEST_SINCE, Chunk, Table, chunk_bounds, chunk_digest_in_range, column_names,
    column_values_in_range, digest_columns, row_hashes_in_range, schema_objects, sequence_states,
)
from liftoff.systems.pg_privileges import PUBLIC, DefaultPrivilege, read_default_privileges, restored_default_grantee

MAX_KEYS_REPORTED = 5


@dataclass
class TableCheck:
    table: str
    source_rows: int
    target_rows: int
    source_checksum: str
    target_checksum: str
    missing_keys: list[str] = field(default_factory=list)  # in source, not on target
    extra_keys: list[str] = field(default_factory=list)  # on target, not in source
    changed_keys: list[str] = field(default_factory=list)  # on both, content differs
    # columns rewritten on purpose (the storage URLs) whose target value is not the expected rewrite
    rewritten_differs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.source_rows == self.target_rows and self.source_checksum == self.target_checksum
                and not self.rewritten_differs)

    @property
    def status(self) -> str:
        if self.ok:
            return "match"
        return "row count differs" if self.source_rows != self.target_rows else "content differs"

    def summary(self) -> str:
        parts = [f"table {self.table}: {self.status} (source {self.source_rows} rows, target {self.target_rows})"]
        for label, keys in (("missing on target", self.missing_keys), ("extra on target", self.extra_keys),
                            ("changed", self.changed_keys)):
            if keys:
                parts.append(f"{label}: key {', '.join(keys)}")
        parts += self.rewritten_differs
        return "; ".join(parts)


@dataclass
class SequenceCheck:
    sequence: str
    column: str
    target_next: int | None
    column_max: int | None
    source_next: int | None

    @property
    def ok(self) -> bool:
        if self.target_next is None:
            return False
        if self.column_max is not None and self.target_next <= self.column_max:
            return False
        return self.source_next is None or self.target_next >= self.source_next

    def summary(self) -> str:
        if self.target_next is None:
            return f"sequence {self.sequence}: missing on target"
        return (f"sequence {self.sequence}: next value {self.target_next} is not above max({self.column}) = "
                f"{self.column_max} or below the source's next value {self.source_next}")


VALUE_CHARS = 60  # how much of a differing value a report line shows
_VALUES_NOT_SHOWN = {"body"}  # function bodies are code: a line only says that they differ


@dataclass
class DefinitionDiff:
    """One way an object present on both sides differs, or an object that exists on the target only
    (``what`` "exists"); for kinds "privilege" and "default privileges", ``what`` is "access widened" or
    "access narrowed" and the values are the privileges one side grants and the other does not."""

    kind: str
    object: str
    what: str
    source: str | None
    target: str | None

    def summary(self) -> str:
        if self.kind in ("privilege", "default privileges"):
            if self.what == "access widened":
                return (f"{self.kind} {self.object}: target grants {self.target}, the source does not "
                        f"(access widened)")
            return (f"{self.kind} {self.object}: the source grants {self.source}, the target does not "
                    f"(access narrowed)")
        if self.what == "exists":
            shown = "" if self.target == "present" else f" ({self.target})"
            return f"{self.kind} {self.object}: on the target only, not on the source{shown}"
        if self.what in _VALUES_NOT_SHOWN:
            return f"{self.kind} {self.object}: {self.what} differs"
        return f"{self.kind} {self.object}: {self.what} differs (source {self.source}, target {self.target})"


@dataclass
class DatabaseReport(GateReport):
    tables: list[TableCheck] = field(default_factory=list)
    sequences: list[SequenceCheck] = field(default_factory=list)
    missing_objects: dict[str, list[str]] = field(default_factory=dict)
    left_out_by_policy: list[str] = field(default_factory=list)
    definitions: list[DefinitionDiff] = field(default_factory=list)
    # Tables whose rows this gate left to the cutover's catch-up (written on the source during the freeze)
    deferred: list[str] = field(default_factory=list)

    def defer(self, tables: set[str]) -> None:
        """Leaves the rows of ``tables`` (and their sequences) out of this report: the catch-up compares them."""
        self.deferred = sorted(tables)
        self.tables = [t for t in self.tables if t.table not in tables]
        self.sequences = [s for s in self.sequences if s.column.rsplit(".", 1)[0] not in tables]

    def summary(self) -> str:
        """One line for the ledger and status: what passed, or the first differences."""
        if self.ok:
            return (f"passed: {len(self.tables)} tables ({sum(t.target_rows for t in self.tables):,} rows), "
                    f"{len(self.sequences)} sequences, definitions and privileges equal")
        failures = self.failures()
        return "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")

    def failures(self) -> list[str]:
        lines = [t.summary() for t in self.tables if not t.ok]
        lines += [s.summary() for s in self.sequences if not s.ok]
        for kind, names in sorted(self.missing_objects.items()):
            if names:
                lines.append(f"{kind} missing on target: {', '.join(names)}")
        lines += [d.summary() for d in self.definitions]
        return lines


def _checksum(chunks: list[Chunk]) -> str:
    return hashlib.md5("".join(c.digest for c in chunks).encode()).hexdigest()


@dataclass(frozen=True)
class RewrittenColumn:
    """A column the migration changes on purpose (the storage phase's URL rewrite): the target must hold
    ``expected(source value)`` in it, row by row, instead of the source's value."""

    column: str
    expected: Callable[[str | None], str | None]


def compare_table(source: psycopg.Connection, target: psycopg.Connection, table: Table,
                  chunk_rows: int = CHUNK_ROWS, rewritten: list[RewrittenColumn] = (),
                  typed_digest: bool = True) -> TableCheck:
    """Digests the whole table on both sides at the same time (the two servers work in parallel): one
    sequential scan per side. Only when they differ, digests the same key ranges of ``chunk_rows`` on both
    sides and narrows each differing range to its keys. ``rewritten`` columns are left out of the digests and
    compared value by value against what the rewrite makes of the source's value. ``typed_digest``: hash each
    column by its type where both servers can (``postgres.digest_columns``); False: hash the rows' text."""
    if rewritten and table.pk:
        skip = {r.column for r in rewritten}
        table = replace(table, hashed=tuple(c for c in column_names(source, table) if c not in skip))
    else:
        rewritten = []
    if min(source.info.server_version, target.info.server_version) >= TYPED_DIGEST_SINCE and typed_digest:
        table = replace(table, digest=digest_columns(source, table) or None)

    def both_sides(bounds: list[tuple]) -> tuple[list[Chunk], list[Chunk] | None]:
        """The chunks' digests on the source and on the target (None: the target has no such table)."""
        def digests(conn: psycopg.Connection) -> list[Chunk]:
            return [chunk_digest_in_range(conn, table, low, high) for low, high in bounds]

        with ThreadPoolExecutor(max_workers=1) as other_side:
            on_target = other_side.submit(digests, target)
            on_source = digests(source)
            try:
                return on_source, on_target.result()
            except psycopg.errors.UndefinedTable:
                return on_source, None

    # A whole-table digest is a sequential scan; ranges are index scans, and finding their bounds walks the
    # key: about 4x the work for a table that matches (bench/README.md), so ranges only narrow a difference.
    try:
        src_whole, tgt_whole = both_sides([(None, None)])
    except psycopg.errors.UndefinedColumn:
        # The typed digest names the source's columns, and the target lacks one: compare the rows' text
        # instead, which differs and narrows to the keys (the definitions check names the column).
        if table.digest is None:
            raise
        return compare_table(source, target, replace(table, digest=None), chunk_rows, rewritten,
                             typed_digest=False)
    if tgt_whole is None:
        return TableCheck(table.qualified, src_whole[0].rows, 0, _checksum(src_whole), "(table missing)")
    check = TableCheck(
        table=table.qualified,
        source_rows=src_whole[0].rows,
        target_rows=tgt_whole[0].rows,
        source_checksum=_checksum(src_whole),
        target_checksum=_checksum(tgt_whole),
    )
    bounds = chunk_bounds(source, table, chunk_rows) if (rewritten or not check.ok) else []
    src_chunks, tgt_chunks = both_sides(bounds) if not check.ok else ([], [])
    for s, t in zip(src_chunks, tgt_chunks):
        if (s.rows, s.digest) == (t.rows, t.digest):
            continue
        src_rows = row_hashes_in_range(source, table, s.low, s.high)
        tgt_rows = row_hashes_in_range(target, table, s.low, s.high)
        check.missing_keys += [k for k in src_rows if k not in tgt_rows]
        check.extra_keys += [k for k in tgt_rows if k not in src_rows]
        check.changed_keys += [k for k, h in src_rows.items() if k in tgt_rows and tgt_rows[k] != h]
        if sum(map(len, (check.missing_keys, check.extra_keys, check.changed_keys))) >= MAX_KEYS_REPORTED:
            break
    for name in ("missing_keys", "extra_keys", "changed_keys"):
        setattr(check, name, getattr(check, name)[:MAX_KEYS_REPORTED])
    for r in rewritten:
        check.rewritten_differs += _compare_rewritten(source, target, table, r, bounds)
    return check


def _compare_rewritten(source, target, table: Table, r: RewrittenColumn, bounds) -> list[str]:
    """Lines naming rows whose ``r.column`` on the target is not the rewrite of the source's value (rows on
    one side only are the digests' business)."""
    wrong, first = 0, []
    for low, high in bounds:
        src = column_values_in_range(source, table, r.column, low, high)
        tgt = column_values_in_range(target, table, r.column, low, high)
        for key, value in src.items():
            if key in tgt and tgt[key] != (want := r.expected(value)):
                wrong += 1
                if len(first) < MAX_KEYS_REPORTED:
                    first.append(f"key {key} holds {tgt[key]!r}, expected {want!r}")
    if not wrong:
        return []
    return [f"column {r.column} (rewritten storage URLs) differs in {wrong} rows: " + "; ".join(first)]


def compare_sequences(source: psycopg.Connection, target: psycopg.Connection, schemas: list[str]) -> list[SequenceCheck]:
    src = {s.sequence: s for s in sequence_states(source, schemas)}
    tgt = {s.sequence: s for s in sequence_states(target, schemas)}
    checks = []
    for name, s in sorted(src.items()):
        t = tgt.get(name)
        checks.append(SequenceCheck(
            sequence=name, column=f"{s.table}.{s.column}",
            target_next=t.next_value if t else None, column_max=t.column_max if t else s.column_max,
            source_next=s.next_value,
        ))
    return checks


def compare_objects(source: psycopg.Connection, target: psycopg.Connection, schemas: list[str],
                    left_out: set[str], ignored_extensions: frozenset[str]) -> dict[str, list[str]]:
    """Objects of the source missing on the target, by kind; ``left_out`` holds "kind name" entries that the
    runbook's policy chose not to migrate."""
    src = schema_objects(source, schemas)
    tgt = schema_objects(target, schemas)
    src["extension"] = {e for e in src["extension"] if e not in ignored_extensions}
    missing = {}
    for kind, names in src.items():
        gone = sorted(n for n in names - tgt.get(kind, set()) if f"{kind} {n}" not in left_out)
        if gone:
            missing[kind] = gone
    return missing


def _display(identity: Identity) -> str:
    """public.tours."active tours are public": a name part that is not a plain lower-case word is quoted."""
    return ".".join(p if _plain_name(p) else '"' + p.replace('"', '""') + '"' for p in identity)


def _plain_name(part: str) -> bool:
    head = part.split("(", 1)[0] if part.endswith(")") else part  # function: name(args)
    return bool(head) and (head[0].islower() or head[0] == "_") and all(
        c.islower() or c.isdigit() or c in "_$" for c in head)


def _shown(value, other) -> str:
    """A value shortened for a report line: long ones from a little before where they start to differ."""
    def text_of(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return ", ".join(map(str, v)) or "(none)"
        return " ".join(str(v).split()) if v is not None else "(none)"

    text, other_text = text_of(value), text_of(other)
    if len(text) <= VALUE_CHARS:
        return text
    same = next((i for i, (a, b) in enumerate(zip(text, other_text)) if a != b), min(len(text), len(other_text)))
    start = max(0, min(same - 15, len(text) - VALUE_CHARS))
    cut = text[start:start + VALUE_CHARS]
    return ("…" if start else "") + cut + ("…" if start + VALUE_CHARS < len(text) else "")


def map_policy_roles(roles: list[str], role_map: dict[str, str | None]) -> list[str]:
    """The TO-list a source policy should have on the target: each role through the map (unmapped roles keep
    their name, roles mapped to None are dropped)."""
    return sorted(role_map.get(r, r) for r in roles if role_map.get(r, r) is not None)


def policies_without_roles(source: Definitions, role_map: dict[str, str | None]) -> set[str]:
    """"policy schema.table.name" of the source's policies whose every role the map drops: expected absent."""
    return {"policy " + ".".join(ident) for ident, fields in source.get("policy", {}).items()
            if fields["roles"] and not map_policy_roles(fields["roles"], role_map)}


# Kinds where an object the source does not have, on a table the source has, changes what the app sees or
# may do (a permissive policy widens access, a trigger or constraint changes writes, a column changes rows,
# an index changes plans and write cost, and a unique one refuses writes the source accepts); extra
# functions, views or sequences on the target are left alone. No extra index is accepted: one wanted on the
# new server is created first on the source, or after the cutover's last catch-up (README, "Extra objects").
_EXTRA_ON_TARGET_MATTERS = ("policy", "trigger", "constraint", "column", "index")


def _on_table(kind: str, ident: Identity, fields: dict) -> Identity:
    """(schema, table) of an object that belongs to a table: its identity's first two parts, or for an index
    (named schema.index) the table it indexes."""
    return (ident[0], fields["on table"]) if kind == "index" else ident[:2]


def compare_definitions(source: Definitions, target: Definitions, *, left_out: set[str] = frozenset(),
                        roles: dict[str, str | None] = {}) -> list[DefinitionDiff]:
    """For each object on both sides (and not ``left_out``), each field that differs, either side's (a field
    one side lacks, like a domain's constraint, is "(none)" there); policies' roles are compared through
    ``roles`` (see ``map_policy_roles``). Objects on the target only, of the kinds in
    ``_EXTRA_ON_TARGET_MATTERS``, are differences too (an index that backs a constraint is reported as the
    constraint). Missing objects are ``compare_objects``' business."""
    diffs = []
    for kind, src_objects in source.items():
        tgt_objects = target.get(kind, {})
        for ident in sorted(src_objects.keys() & tgt_objects.keys()):
            if f"{kind} {'.'.join(ident)}" in left_out:
                continue
            src, tgt = dict(src_objects[ident]), tgt_objects[ident]
            if kind == "policy":
                src["roles"] = map_policy_roles(src["roles"], roles)
            for what in [*src, *(w for w in tgt if w not in src)]:
                value, other = src.get(what), tgt.get(what)
                if what not in PLACEMENT and value != other:
                    diffs.append(DefinitionDiff(kind, _display(ident), what, _shown(value, other),
                                                _shown(other, value)))
        if kind in _EXTRA_ON_TARGET_MATTERS:
            tables_of_source = source.get("table", {})
            for ident in sorted(tgt_objects.keys() - src_objects.keys()):
                fields = tgt_objects[ident]
                if _on_table(kind, ident, fields) not in tables_of_source:  # on a table the source does not have
                    continue
                if fields.get("backs constraint"):  # the constraint's own line says it
                    continue
                # An index's line shows its definition: whether it is unique is what the operator needs first.
                diffs.append(DefinitionDiff(kind, _display(ident), "exists", None,
                                            fields["definition"] if kind == "index" else "present"))
    return sorted(diffs, key=lambda d: (d.kind, d.object, d.what))


def compare_privileges(source: psycopg.Connection, target: psycopg.Connection, schemas: list[str],
                       roles: dict[str, str | None], withheld: list[dict] = ()) -> list[DefinitionDiff]:
    """Effective privileges of each source role of ``roles`` on the source against those of the role it maps to
    on the target, for the objects on both sides: more on the target is "access widened", less is "access
    narrowed". Roles mapped to None are not compared. ``withheld``: write grants a freeze in force took from
    the source (its record): the source is compared as it was before the freeze."""
    mapped = {s: t for s, t in roles.items() if t is not None}
    if not mapped:
        return []
    columns = columns_with_acl(source, schemas) | columns_with_acl(target, schemas)
    src = read_privileges(source, schemas, sorted(mapped), columns)
    give_back(src, withheld)
    tgt = read_privileges(target, schemas, sorted(set(mapped.values())), columns)
    diffs = []
    for obj in sorted(src.keys() & tgt.keys()):
        for s_role, t_role in sorted(mapped.items()):
            who = s_role if s_role == t_role else f"{s_role} (target {t_role})"
            granted, allowed = tgt[obj][t_role], src[obj][s_role]
            if granted - allowed:
                diffs.append(DefinitionDiff("privilege", f"{who} on {obj}", "access widened", None,
                                            ", ".join(sorted(granted - allowed))))
            if allowed - granted:
                diffs.append(DefinitionDiff("privilege", f"{who} on {obj}", "access narrowed",
                                            ", ".join(sorted(allowed - granted)), None))
    return diffs


def compare_default_privileges(source: psycopg.Connection, target: psycopg.Connection, schemas: list[str],
                               roles: dict[str, str | None]) -> list[DefinitionDiff]:
    """What objects created later will grant (``privileges.read_default_privileges``: in the schemas, and
    global), compared as the restore gives them (``privileges.restored_default_grantee``: the source's owners'
    go to the restoring user, the connected user on ``target``, grantees through the role map): on the target,
    every owner's towards PUBLIC and the mapped roles. More on the target is "access widened", less "access
    narrowed". Roles mapped to None are not compared; an empty map compares nothing (as ``compare_privileges``).
    Global entries are compared though the restore carries only the schemas' (``plan_default_grants``): a
    source's global entry shows as a difference until the same is given on the target."""
    mapped = {t for t in roles.values() if t is not None}
    if not mapped:
        return []
    owner = target.execute("SELECT current_user").fetchone()[0]
    in_scope = ({PUBLIC} | mapped) - {owner}

    def by_entry(rows: list[DefaultPrivilege]) -> dict[DefaultPrivilege, set[str]]:
        """{entry (its privilege left blank): privileges}, for the grantees in scope."""
        out: dict[DefaultPrivilege, set[str]] = {}
        for d in rows:
            if d.grantee in in_scope:
                out.setdefault(replace(d, privilege=""), set()).add(d.privilege)
        return out

    as_restored = [replace(d, owner=owner, grantee=grantee) for d in read_default_privileges(source, schemas)
                   if (grantee := restored_default_grantee(d.owner, d.grantee, roles, owner))]
    want, have = by_entry(as_restored), by_entry(read_default_privileges(target, schemas))
    diffs = []
    for key in sorted(want.keys() | have.keys(), key=lambda k: (k.owner, k.schema or "", k.objects, k.grantee,
                                                                    k.granted)):
        more, fewer = have.get(key, set()) - want.get(key, set()), want.get(key, set()) - have.get(key, set())
        if not key.granted:  # what the built-in default gives and a global entry takes away
            more, fewer = fewer, more
        if more:
            diffs.append(DefinitionDiff("default privileges", key.label, "access widened", None,
                                        ", ".join(sorted(more))))
        if fewer:
            diffs.append(DefinitionDiff("default privileges", key.label, "access narrowed",
                                        ", ".join(sorted(fewer)), None))
    return diffs


def give_back(privileges: dict[str, dict[str, set[str]]], withheld: list[dict]) -> None:
    """Adds back to effective privileges read on a frozen source the grants its freeze revoked: a table grant
    on the table (or view) and, for INSERT and UPDATE, on each of its columns compared; a column grant on
    that column."""
    for g in withheld:
        if g["column"] is not None:
            labels = [f"column {g['schema']}.{g['table']}.{g['column']}"]
        else:
            labels = [f"{kind} {g['schema']}.{g['table']}" for kind in ("table", "view")]
            if g["privilege"] in ("INSERT", "UPDATE"):
                prefix = f"column {g['schema']}.{g['table']}."
                labels += [label for label in privileges if label.startswith(prefix)
                           and "." not in label[len(prefix):]]
        for label in labels:
            if g["grantee"] in privileges.get(label, {}):
                privileges[label][g["grantee"]].add(g["privilege"])


def compare_databases(
    open_source: Callable[[], psycopg.Connection],
    open_target: Callable[[], psycopg.Connection],
    tables: list[Table],
    schemas: list[str],
    *,
    left_out: set[str] = frozenset(),
    ignored_extensions: frozenset[str] = frozenset(),
    roles: dict[str, str | None] = {},
    jobs: int = 2,
    on_table_done: Callable[[TableCheck], None] | None = None,
    outside_triggers: list[tuple[str, str, str]] = (),
    rewritten: dict[str, list[RewrittenColumn]] = {},
    withheld: list[dict] = (),
) -> DatabaseReport:
    """Compares the two sides; tables in parallel (``jobs`` pairs of connections). Reads only.

    ``left_out``: "kind schema.table.name" entries the runbook chose not to migrate (neither their presence
    nor their definition is compared). ``roles``: source role -> target role, or None for a role whose
    references the runbook drops; the effective privileges of the mapped roles and their default privileges
    (``compare_default_privileges``) are compared, and policies' TO-lists are compared through it (a policy
    whose every role is dropped is expected absent). Empty: privileges are not compared and policy roles are
    compared by name. ``rewritten``: per table, columns the migration changed on purpose
    (``RewrittenColumn``). ``withheld``: write grants a freeze in force took from the source
    (``compare_privileges``)."""

    def one(table: Table) -> TableCheck:
        with open_source() as s, open_target() as t:
            check = compare_table(s, t, table, rewritten=rewritten.get(table.qualified, []))
        if on_table_done:
            on_table_done(check)
        return check

    report = DatabaseReport()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        report.tables = list(pool.map(one, tables))
    with open_source() as s, open_target() as t:
        report.sequences = compare_sequences(s, t, schemas)
        src_defs, tgt_defs = read_definitions(s, schemas), read_definitions(t, schemas)
        left = set(left_out) | policies_without_roles(src_defs, roles)
        report.left_out_by_policy = sorted(left)
        report.missing_objects = compare_objects(s, t, schemas, left, ignored_extensions)
        report.definitions = compare_definitions(src_defs, tgt_defs, left_out=left, roles=roles)
        report.definitions += compare_privileges(s, t, schemas, roles, withheld)
        report.definitions += compare_default_privileges(s, t, schemas, roles)
        report.definitions += compare_outside_triggers(s, t, list(outside_triggers))
    return report


_TRIGGER = """SELECT pg_get_triggerdef(g.oid), g.tgenabled FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = %s AND c.relname = %s AND g.tgname = %s"""


def compare_outside_triggers(source: psycopg.Connection, target: psycopg.Connection,
                             triggers: list[tuple[str, str, str]]) -> list[DefinitionDiff]:
    """Triggers the restore recreates on a table outside the migrated schemas ((schema, table, name), e.g.
    the app's sign-up trigger on the shim's auth.users): definition and enabled state as on the source."""
    diffs = []
    with qualified_names(source), qualified_names(target):
        for schema, table, name in triggers:
            src = source.execute(_TRIGGER, (schema, table, name)).fetchone()
            tgt = target.execute(_TRIGGER, (schema, table, name)).fetchone()
            label = f"{schema}.{table}.{name}"
            if src is None:
                continue
            if tgt is None:
                diffs.append(DefinitionDiff("trigger", label, "presence", "present", "missing"))
                continue
            if src[0] != tgt[0]:
                diffs.append(DefinitionDiff("trigger", label, "definition", src[0], tgt[0]))
            if src[1] != tgt[1]:
                diffs.append(DefinitionDiff("trigger", label, "enabled", src[1], tgt[1]))
    return diffs
