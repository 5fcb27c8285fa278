"""The durable record of what a migration has done: the source of truth for resume, status and rollback.

A SQLite file in the runbook's state directory, beside the dump archive it describes (as pgcopydb keeps
its catalog beside its work): it survives a killed process, needs no server (the target may be the thing
that is down), writes nothing into the target database, and does not vanish with Prefect's database.

What every phase records here, the same way:
- ``steps``: each step of each phase (``export``, ``restore.data``, ``storage.copy`` ...): running, done or
  failed, when, how long, by which flow run, and what it did (``liftoff.steps.recorded`` writes them);
- ``gates``: every verification gate's result, passed or failed, with its summary and flow run; the cutover
  reads the latest of each phase;
- ``items``: per-object progress (a table, a storage object): status, size, checksum, written in batches
  (one transaction per batch, not one per item: storage has 10^5 of them);
- ``events``: an append-only log of what changed on a system, before and after, by which run: the rollback
  replays it backwards.

The database phase also keeps here, typed, what restore needs from its export: ``export`` (the archive,
the source's major, the tools, the runbook settings it was made for, the snapshot's time) and the
``export_*`` tables (the source's grants, the role decisions, the policies and auth triggers restore
recreates, the auth shim ...), replaced whole by each new export.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from liftoff.errors import RunbookInvalid, StepFailed

_SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    step TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    started_at REAL, finished_at REAL,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS items (
    phase TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    size INTEGER,
    checksum TEXT,
    updated_at REAL,
    PRIMARY KEY (phase, kind, key)
);
CREATE TABLE IF NOT EXISTS gates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    phase TEXT NOT NULL,
    passed INTEGER NOT NULL,
    at REAL NOT NULL,
    summary TEXT NOT NULL,
    flow_run_id TEXT
);
CREATE INDEX IF NOT EXISTS gates_by_phase ON gates (phase, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    phase TEXT NOT NULL,
    what TEXT NOT NULL,
    before TEXT,
    after TEXT,
    flow_run_id TEXT
);
CREATE TABLE IF NOT EXISTS targets (
    identity TEXT PRIMARY KEY,
    claimed_at REAL
);
CREATE TABLE IF NOT EXISTS setup (  -- whose ledger this is (pgcopydb's catalog "setup" row): checked on every start
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    runbook TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS archive_entries (
    dump_id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    schema TEXT,
    table_name TEXT,
    name TEXT NOT NULL,
    arguments TEXT
);
-- What restore reads from the export, written together in one transaction (a new export replaces them
-- whole): the export itself (one row), and what the source's catalog said in the export's snapshot.
CREATE TABLE IF NOT EXISTS export (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    archive TEXT NOT NULL,
    archive_bytes INTEGER NOT NULL,
    source_major INTEGER NOT NULL,
    tools TEXT NOT NULL,
    strategy TEXT NOT NULL,
    -- JSON: the runbook's database.schemas in their order, one setting compared whole with the runbook's
    schemas TEXT NOT NULL,
    supabase_leftovers TEXT NOT NULL,
    auth_triggers TEXT NOT NULL,
    auth_shim INTEGER NOT NULL,
    snapshot_at REAL NOT NULL,
    flow_run_id TEXT,
    recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS export_role_settings (  -- the runbook's database.roles the export was made with
    role TEXT PRIMARY KEY,
    decision TEXT NOT NULL,
    map_to TEXT
);
CREATE TABLE IF NOT EXISTS export_grants (  -- privileges.Grant, on the migrated schemas or the auth shim
    scope TEXT NOT NULL CHECK (scope IN ('schemas', 'auth_shim')),
    kind TEXT NOT NULL,
    schema TEXT NOT NULL,
    name TEXT NOT NULL,
    detail TEXT,
    grantee TEXT NOT NULL,
    privilege TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS export_default_grants (  -- privileges.DefaultGrant
    owner TEXT NOT NULL,
    schema TEXT NOT NULL,
    objects TEXT NOT NULL,
    grantee TEXT NOT NULL,
    privilege TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS export_extensions (
    name TEXT PRIMARY KEY,
    schema TEXT,
    needed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS export_index_tables (
    index_name TEXT PRIMARY KEY,
    table_name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS export_roles (  -- supabase.RolePlan per role the migrated objects name
    role TEXT PRIMARY KEY,
    decision TEXT CHECK (decision IN ('create', 'drop_references', 'map_to')),  -- NULL: the runbook has none
    target TEXT,
    inherit INTEGER NOT NULL,
    bypassrls INTEGER NOT NULL,
    is_default INTEGER NOT NULL,
    -- JSON: the places naming the role, a list of labels the plans print and nothing queries
    uses TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS export_decisions (  -- supabase.Assessment's objects with what was decided and why
    category TEXT NOT NULL CHECK (category IN ('left_out', 'kept_with_warning', 'needs_decision', 'not_migrated')),
    object TEXT NOT NULL,
    why TEXT NOT NULL,
    PRIMARY KEY (category, object)
);
CREATE TABLE IF NOT EXISTS export_policies (  -- policies restore creates with the mapped roles
    schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    name TEXT NOT NULL,
    permissive INTEGER NOT NULL,
    cmd TEXT NOT NULL,
    -- JSON: the policy's TO list (target roles, then the source's), each one value of the policy, kept in order
    roles TEXT NOT NULL,
    source_roles TEXT NOT NULL,
    qual TEXT,
    with_check TEXT,
    PRIMARY KEY (schema, table_name, name)
);
CREATE TABLE IF NOT EXISTS export_auth_triggers (  -- the app's triggers on auth.users, recreated on the shim
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    enabled TEXT NOT NULL,
    function TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS export_auth_columns (  -- the auth shim's auth.users, as the source defines it
    position INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    not_null INTEGER NOT NULL,
    default_expr TEXT
);
CREATE TABLE IF NOT EXISTS export_auth_functions (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL
);
"""
# Columns added since the first ledgers; an older ledger gains them when opened.
_ADDED_COLUMNS = {"steps": {"flow_run_id": "TEXT", "seconds": "REAL"},
                  # per item, what its copy's write said (JSON; the storage copy's PUT and the target's answer)
                  "items": {"detail": "TEXT"}}


@dataclass(frozen=True)
class Setup:
    """Whose ledger it is: the runbook's name and its source and target (host:port/database)."""

    runbook: str
    source: str
    target: str

    def describe(self) -> str:
        return f"runbook '{self.runbook}' (source {self.source}, target {self.target})"


def setup_of(rb) -> Setup:
    """The setup a runbook (``name``, ``source``, ``target.direct``) claims its state_dir's ledger with."""
    def at(ep) -> str:
        return f"{ep.host}:{ep.port}/{ep.database}"

    return Setup(rb.name, at(rb.source), at(rb.target.direct))


@dataclass(frozen=True)
class StepRecord:
    step: str
    status: str
    started_at: float | None
    finished_at: float | None
    seconds: float | None
    flow_run_id: str | None
    detail: dict


@dataclass(frozen=True)
class GateRecord:
    phase: str
    passed: bool
    at: float
    summary: str
    flow_run_id: str | None

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.at)


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    phase: str
    what: str
    before: object
    after: object
    flow_run_id: str | None


@dataclass(frozen=True)
class ExportRecord:
    """The export the archive in state_dir came from: where it is, what made it, the runbook settings it was
    made for (restore refuses others), and when its snapshot was taken."""

    archive: str
    archive_bytes: int
    source_major: int
    tools: str
    strategy: str
    schemas: list[str]
    supabase_leftovers: str
    auth_triggers: str
    auth_shim: bool
    snapshot_at: float
    flow_run_id: str | None


@dataclass
class ExportFacts:
    """What restore reads from the source's catalog as the export saw it: one list of rows per ledger table
    ``export_<field>``, each row its columns in order (a JSON column holds a list)."""

    role_settings: list[tuple] = field(default_factory=list)  # role, decision, map_to
    grants: list[tuple] = field(default_factory=list)  # scope, kind, schema, name, detail, grantee, privilege
    default_grants: list[tuple] = field(default_factory=list)  # owner, schema, objects, grantee, privilege
    extensions: list[tuple] = field(default_factory=list)  # name, schema, needed
    index_tables: list[tuple] = field(default_factory=list)  # index_name, table_name
    roles: list[tuple] = field(default_factory=list)  # role, decision, target, inherit, bypassrls, is_default, uses
    decisions: list[tuple] = field(default_factory=list)  # category, object, why
    policies: list[tuple] = field(default_factory=list)  # schema, table_name, name, permissive, cmd, roles,
    #                                                       source_roles, qual, with_check
    auth_triggers: list[tuple] = field(default_factory=list)  # name, definition, enabled, function
    auth_columns: list[tuple] = field(default_factory=list)  # position, name, type, not_null, default_expr
    auth_functions: list[tuple] = field(default_factory=list)  # name, definition


_EXPORT_JSON_COLUMNS = {"export": {"schemas"}, "export_roles": {"uses"}, "export_policies": {"roles", "source_roles"}}


class Ledger:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "ledger.sqlite"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.executescript(_SCHEMA)
            # Owner-only: the event log holds what a rollback needs, the apps' previous environment included
            # (Coolify's variables), which may be secrets.
            if self.path.stat().st_mode & 0o077:
                os.chmod(self.path, 0o600)
            with self._db() as db:
                for table, columns in _ADDED_COLUMNS.items():
                    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                    for name, kind in columns.items():
                        if name not in have:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tables'").fetchone():
                    # per-table progress of the first ledgers: now items of kind 'table'
                    db.execute("INSERT OR IGNORE INTO items (phase, kind, key, status, size, updated_at) "
                               "SELECT phase, 'table', name, status, rows, updated_at FROM tables")
                    db.execute("DROP TABLE tables")
        except (OSError, sqlite3.Error) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise StepFailed(f"state_dir {state_dir} is not writable ({reason}); free space there or choose a "
                             "writable directory") from None

    @contextmanager
    def _db(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        except (OSError, sqlite3.OperationalError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            if "locked" in reason:  # another writer outlived the timeout: not the disk's fault
                raise
            raise StepFailed(f"the ledger {self.path} (state_dir) cannot be written ({reason}); free space there "
                             "or choose a writable state_dir, then re-run") from None
        finally:
            db.close()

    # steps -------------------------------------------------------------------------------------------
    def step_status(self, step: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT status FROM steps WHERE step = ?", (step,)).fetchone()
        return row[0] if row else None

    def is_done(self, step: str) -> bool:
        return self.step_status(step) == "done"

    def step_detail(self, step: str) -> dict:
        with self._db() as db:
            row = db.execute("SELECT detail FROM steps WHERE step = ?", (step,)).fetchone()
        return json.loads(row[0]) if row and row[0] else {}

    def start_step(self, step: str, flow_run_id: str | None = None) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO steps (step, status, started_at, flow_run_id) VALUES (?, 'running', ?, ?) "
                "ON CONFLICT (step) DO UPDATE SET status='running', started_at=excluded.started_at, "
                "finished_at=NULL, seconds=NULL, flow_run_id=excluded.flow_run_id",
                (step, time.time(), flow_run_id),
            )

    def finish_step(self, step: str, detail: dict | None = None) -> None:
        self._end_step(step, "done", detail or {})

    def fail_step(self, step: str, reason: str) -> None:
        self._end_step(step, "failed", {"reason": reason})

    def _end_step(self, step: str, status: str, detail: dict) -> None:
        now = time.time()
        with self._db() as db:
            db.execute(
                "INSERT INTO steps (step, status, started_at) VALUES (?, 'running', ?) ON CONFLICT (step) DO NOTHING",
                (step, now))
            db.execute(
                "UPDATE steps SET status=?, finished_at=?, seconds=? - started_at, detail=? WHERE step=?",
                (status, now, now, json.dumps(detail, default=str), step),
            )

    def steps(self) -> dict[str, StepRecord]:
        with self._db() as db:
            rows = db.execute("SELECT step, status, started_at, finished_at, seconds, flow_run_id, detail FROM steps")
            return {r[0]: StepRecord(*r[:6], json.loads(r[6]) if r[6] else {}) for r in rows}

    def forget_steps(self, prefix: str) -> None:
        """Forgets every step and item record of a phase, so it runs again from scratch."""
        with self._db() as db:
            db.execute("DELETE FROM steps WHERE step = ? OR step LIKE ?", (prefix, prefix + ".%"))
            db.execute("DELETE FROM items WHERE phase = ?", (prefix,))

    def forget_items(self, phase: str, kind: str | None = None) -> None:
        with self._db() as db:
            if kind is None:
                db.execute("DELETE FROM items WHERE phase = ?", (phase,))
            else:
                db.execute("DELETE FROM items WHERE phase = ? AND kind = ?", (phase, kind))

    # per-item records (a table, a storage object) ----------------------------------------------------
    def set_items(self, phase: str, kind: str, rows: Iterable[tuple]) -> int:
        """Writes (key, status, size, checksum[, detail]) rows in one transaction; returns how many. ``detail``, a
        dict stored as JSON, is what the item's write said (``item_details``); a row without one clears it."""
        now = time.time()

        def values(row: tuple) -> tuple:
            key, status, size, checksum, *rest = row
            detail = json.dumps(rest[0], separators=(",", ":")) if rest and rest[0] is not None else None
            return phase, kind, key, status, size, checksum, now, detail

        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.executemany(
                "INSERT INTO items (phase, kind, key, status, size, checksum, updated_at, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (phase, kind, key) DO UPDATE SET status=excluded.status, size=excluded.size, "
                "checksum=excluded.checksum, updated_at=excluded.updated_at, detail=excluded.detail",
                (values(row) for row in rows))
            db.execute("COMMIT")
            return cur.rowcount

    def replace_items(self, phase: str, kind: str, rows: Iterable[tuple]) -> int:
        """All (key, status, size, checksum) rows of ``phase``/``kind`` replaced by ``rows`` in one transaction:
        a crash leaves the old set or the new one, never a part of either."""
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM items WHERE phase = ? AND kind = ?", (phase, kind))
            cur = db.executemany(
                "INSERT INTO items (phase, kind, key, status, size, checksum, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((phase, kind, key, status, size, checksum, now) for key, status, size, checksum in rows))
            db.execute("COMMIT")
            return cur.rowcount

    def item_details(self, phase: str, kind: str, status: str) -> Iterator[tuple[str, str | None, dict | None]]:
        """(key, checksum, detail) of the items with ``status``, in key order (byte order), streamed."""
        with self._db() as db:
            for key, checksum, detail in db.execute(
                    "SELECT key, checksum, detail FROM items WHERE phase = ? AND kind = ? AND status = ? ORDER BY key",
                    (phase, kind, status)):
                yield key, checksum, json.loads(detail) if detail else None

    def items(self, phase: str, kind: str, status: str | None = None) -> Iterator[tuple]:
        """(key, status, size, checksum) in key order, streamed (never the whole table in a list)."""
        with self._db() as db:
            query = "SELECT key, status, size, checksum FROM items WHERE phase = ? AND kind = ?"
            args: tuple = (phase, kind)
            if status is not None:
                query, args = query + " AND status = ?", args + (status,)
            yield from db.execute(query + " ORDER BY key", args)

    def set_table(self, phase: str, name: str, status: str, rows: int | None = None) -> None:
        self.set_items(phase, "table", [(name, status, rows, None)])

    def tables(self, phase: str) -> dict[str, tuple[str, int | None]]:
        return {key: (status, size) for key, status, size, _ in self.items(phase, "table")}

    # gates -------------------------------------------------------------------------------------------
    def record_gate(self, phase: str, passed: bool, summary: str, flow_run_id: str | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO gates (phase, passed, at, summary, flow_run_id) VALUES (?, ?, ?, ?, ?)",
                       (phase, int(passed), time.time(), summary, flow_run_id))

    def latest_gate(self, phase: str) -> GateRecord | None:
        with self._db() as db:
            row = db.execute("SELECT phase, passed, at, summary, flow_run_id FROM gates WHERE phase = ? "
                             "ORDER BY id DESC LIMIT 1", (phase,)).fetchone()
        return GateRecord(row[0], bool(row[1]), row[2], row[3], row[4]) if row else None

    # events: what changed, for the rollback ----------------------------------------------------------
    def record_event(self, phase: str, what: str, before=None, after=None, flow_run_id: str | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO events (at, phase, what, before, after, flow_run_id) VALUES (?, ?, ?, ?, ?, ?)",
                       (time.time(), phase, what, json.dumps(before, default=str), json.dumps(after, default=str),
                        flow_run_id))

    def events_since(self, phase: str, marker: str) -> list[Event]:
        """The phase's events after its last ``marker`` event (all of them when there is none), oldest first:
        what is still to undo when ``marker`` records an undo."""
        events = self.events(phase)
        last = max((e.id for e in events if e.what == marker), default=0)
        return [e for e in events if e.id > last]

    def events(self, phase: str | None = None) -> list[Event]:
        with self._db() as db:
            rows = db.execute("SELECT id, at, phase, what, before, after, flow_run_id FROM events "
                              + ("WHERE phase = ? " if phase else "") + "ORDER BY id", (phase,) if phase else ())
            return [Event(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), r[6]) for r in rows]

    # targets -----------------------------------------------------------------------------------------
    # setup: whose ledger this is --------------------------------------------------------------------------

    def claim_setup(self, setup: "Setup") -> None:
        """Records ``setup`` as this ledger's owner when it has none; refuses (exit 2, naming both) a ledger
        another runbook, or the same name against another source or target, wrote."""
        with self._db() as db:
            row = db.execute("SELECT runbook, source, target FROM setup").fetchone()
            if row is None:
                db.execute("INSERT OR IGNORE INTO setup VALUES (1, ?, ?, ?, ?)",
                           (setup.runbook, setup.source, setup.target, time.time()))
                row = db.execute("SELECT runbook, source, target FROM setup").fetchone()
        owner = Setup(*row)
        if owner != setup:
            raise RunbookInvalid(
                f"state_dir {self.path.parent}: its ledger belongs to {owner.describe()}, not to {setup.describe()}; "
                f"give runbook '{setup.runbook}' its own state_dir, or, if it continues that migration (renamed, "
                f"or a server moved), hand the ledger over with `liftoff adopt --runbook FILE`")

    def setup(self) -> "Setup | None":
        with self._db() as db:
            row = db.execute("SELECT runbook, source, target FROM setup").fetchone()
        return Setup(*row) if row else None

    def adopt(self, setup: "Setup") -> "Setup | None":
        """Hands the ledger over to ``setup``; returns the owner it had."""
        before = self.setup()
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO setup VALUES (1, ?, ?, ?, ?)",
                       (setup.runbook, setup.source, setup.target, time.time()))
        self.record_event("ledger", "ledger.adopted", before=before and before.__dict__, after=setup.__dict__)
        return before

    def claim_target(self, identity: str) -> None:
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO targets VALUES (?, ?)", (identity, time.time()))

    def owns_target(self, identity: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM targets WHERE identity = ?", (identity,)).fetchone() is not None

    # archive entries ---------------------------------------------------------------------------------
    def record_archive_entries(self, entries: dict[int, tuple]) -> None:
        """Replaces, in one transaction, what each entry of the current archive creates: {dump id: (kind,
        schema, table_name, name, arguments)}, named from the source catalog at export."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM archive_entries")
            db.executemany("INSERT INTO archive_entries VALUES (?, ?, ?, ?, ?, ?)",
                           [(dump_id, *entry) for dump_id, entry in entries.items()])
            db.execute("COMMIT")

    def archive_entries(self) -> dict[int, tuple]:
        with self._db() as db:
            rows = db.execute("SELECT dump_id, kind, schema, table_name, name, arguments FROM archive_entries")
            return {dump_id: tuple(rest) for dump_id, *rest in rows}

    # the export: what restore reads from it ----------------------------------------------------------
    def record_export(self, export: ExportRecord, facts: ExportFacts) -> None:
        """Replaces, in one transaction, the recorded export and its facts: never two exports' facts mixed."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            self._forget_export(db)
            row = {**vars(export), "id": 1, "recorded_at": time.time()}
            row["schemas"] = json.dumps(row["schemas"])
            db.execute(f"INSERT INTO export ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
            for f in fields(ExportFacts):
                table, rows = f"export_{f.name}", getattr(facts, f.name)
                if not rows:
                    continue
                columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
                as_json = [c in _EXPORT_JSON_COLUMNS.get(table, ()) for c in columns]
                db.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})",
                               [[json.dumps(v) if j else v for v, j in zip(r, as_json, strict=True)] for r in rows])
            db.execute("COMMIT")

    def forget_export(self) -> None:
        """Forgets the recorded export (a new one is being made: the old archive is gone)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            self._forget_export(db)
            db.execute("COMMIT")

    @staticmethod
    def _forget_export(db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM export")
        for f in fields(ExportFacts):
            db.execute(f"DELETE FROM export_{f.name}")

    def exported(self) -> tuple[ExportRecord, ExportFacts] | None:
        """The recorded export and its facts, read in one transaction; None when none is recorded (no
        export yet, or one made by a Liftoff that kept them elsewhere)."""
        with self._db() as db:
            db.execute("BEGIN")
            try:
                cur = db.execute("SELECT * FROM export")
                row = cur.fetchone()
                if row is None:
                    return None
                record = dict(zip([d[0] for d in cur.description], row))
                record["schemas"] = json.loads(record["schemas"])
                record["auth_shim"] = bool(record["auth_shim"])
                export = ExportRecord(**{f.name: record[f.name] for f in fields(ExportRecord)})
                facts = ExportFacts()
                for f in fields(ExportFacts):
                    table = f"export_{f.name}"
                    cur = db.execute(f"SELECT * FROM {table} ORDER BY rowid")
                    as_json = [d[0] in _EXPORT_JSON_COLUMNS.get(table, ()) for d in cur.description]
                    setattr(facts, f.name, [tuple(json.loads(v) if j else v for v, j in zip(r, as_json)) for r in cur])
                return export, facts
            finally:
                db.execute("COMMIT")


_held: dict[str, int] = {}
_held_lock = threading.Lock()


@contextmanager
def exclusive(state_dir: Path, flow_run_id: str | None = None, *, lock: str = "liftoff"):
    """Holds the runbook's write lock (a file lock in state_dir) so two runs of one runbook, say one from
    the UI and one from the CLI, never write at once. Re-entrant within a process, so a composed run (say
    migrate-database) holds it across its steps; released when the process dies. The lock file names its
    holder (pid, flow run, since when), and a refused run says who holds it. ``lock``: another lock of the
    same runbook, for work that only reads what the migration writes (``backup``: two backups never run at
    once, but one runs during a migration)."""
    path = Path(state_dir) / f"{lock}.lock"
    key = str(path.resolve())
    with _held_lock:
        if _held.get(key):
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    Ledger(state_dir)  # creates state_dir, or says clearly why it cannot
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            what = "writing now" if lock == "liftoff" else f"holding its {lock} lock"
            raise StepFailed(f"another run of this runbook is {what} ({_holder(path)}; lock {path}); wait "
                             "for it to finish or stop it, then re-run") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "flow_run_id": flow_run_id or current_run_id(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        except OSError:  # a full disk: the lock holds all the same; the step that writes next says why it fails
            pass
        with _held_lock:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_lock:
                _held.pop(key, None)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "holder unknown"
    run = f", flow run {holder['flow_run_id']}" if holder.get("flow_run_id") else ""
    return f"held by pid {holder.get('pid')}{run} since {holder.get('since')}"


def current_run_id() -> str | None:
    """The Prefect flow run this code runs in, or None outside one."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # outside Prefect
        return None
