"""The database gate: proves the target holds what the source holds. A plain function of the two sides that
returns a report (what matched, what differed, with numbers); the flow decides what a failed report means.

Checks, per migrated table: exact row count and a content checksum computed inside each database (md5 of
each row's text form, aggregated in primary-key order, in chunks of key ranges taken from the source);
when a chunk differs, the rows of that key range are compared to name the first differing keys. Then:
owned sequences at or above their column's max, and every schema object of the source present on the
target. Both sides run with the same text-shaping session settings (``tasks.postgres.TEXT_SETTINGS``).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import psycopg

from tasks.postgres import (
    CHUNK_ROWS, Chunk, Table, chunk_bounds, chunk_digest_in_range, row_hashes_in_range, schema_objects,
    sequence_states,
)

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

    @property
    def ok(self) -> bool:
        return self.source_rows == self.target_rows and self.source_checksum == self.target_checksum

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


@dataclass
class DatabaseReport:
    tables: list[TableCheck] = field(default_factory=list)
    sequences: list[SequenceCheck] = field(default_factory=list)
    missing_objects: dict[str, list[str]] = field(default_factory=dict)
    left_out_by_policy: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        lines = [t.summary() for t in self.tables if not t.ok]
        lines += [s.summary() for s in self.sequences if not s.ok]
        for kind, names in sorted(self.missing_objects.items()):
            if names:
                lines.append(f"{kind} missing on target: {', '.join(names)}")
        return lines


def _checksum(chunks: list[Chunk]) -> str:
    return hashlib.md5("".join(c.digest for c in chunks).encode()).hexdigest()


def compare_table(source: psycopg.Connection, target: psycopg.Connection, table: Table,
                  chunk_rows: int = CHUNK_ROWS) -> TableCheck:
    """Digests the same key ranges on both sides at the same time (the two servers work in parallel), then
    narrows each differing range to its keys."""
    bounds = chunk_bounds(source, table, chunk_rows)

    def digests(conn: psycopg.Connection) -> list[Chunk]:
        return [chunk_digest_in_range(conn, table, low, high) for low, high in bounds]

    with ThreadPoolExecutor(max_workers=1) as other_side:
        on_target = other_side.submit(digests, target)
        src_chunks = digests(source)
        try:
            tgt_chunks = on_target.result()
        except psycopg.errors.UndefinedTable:
            return TableCheck(table.qualified, sum(c.rows for c in src_chunks), 0, _checksum(src_chunks),
                              "(table missing)")
    check = TableCheck(
        table=table.qualified,
        source_rows=sum(c.rows for c in src_chunks),
        target_rows=sum(c.rows for c in tgt_chunks),
        source_checksum=_checksum(src_chunks),
        target_checksum=_checksum(tgt_chunks),
    )
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
    return check


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


def compare_databases(
    open_source: Callable[[], psycopg.Connection],
    open_target: Callable[[], psycopg.Connection],
    tables: list[Table],
    schemas: list[str],
    *,
    left_out: set[str] = frozenset(),
    ignored_extensions: frozenset[str] = frozenset(),
    jobs: int = 2,
    on_table_done: Callable[[TableCheck], None] | None = None,
) -> DatabaseReport:
    """Compares the two sides; tables in parallel (``jobs`` pairs of connections). Reads only."""

    def one(table: Table) -> TableCheck:
        with open_source() as s, open_target() as t:
            check = compare_table(s, t, table)
        if on_table_done:
            on_table_done(check)
        return check

    report = DatabaseReport(left_out_by_policy=sorted(left_out))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        report.tables = list(pool.map(one, tables))
    with open_source() as s, open_target() as t:
        report.sequences = compare_sequences(s, t, schemas)
        report.missing_objects = compare_objects(s, t, schemas, set(left_out), ignored_extensions)
    return report
