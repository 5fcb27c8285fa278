"""The durable record of what a migration has done: the source of truth for resume.

A SQLite file in the runbook's state directory, beside the dump archive it describes (as pgcopydb keeps
its catalog beside its work): it survives a killed process, needs no server (the target may be the thing
that is down), writes nothing into the target database, and does not vanish with Prefect's database.
Every write is its own committed transaction.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from liftoff.errors import StepFailed

_SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    step TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    started_at REAL, finished_at REAL,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS tables (
    phase TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    rows INTEGER,
    updated_at REAL,
    PRIMARY KEY (phase, name)
);
CREATE TABLE IF NOT EXISTS targets (
    identity TEXT PRIMARY KEY,
    claimed_at REAL
);
CREATE TABLE IF NOT EXISTS archive_entries (
    dump_id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    schema TEXT,
    table_name TEXT,
    name TEXT NOT NULL,
    arguments TEXT
);
"""


class Ledger:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "ledger.sqlite"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.executescript(_SCHEMA)
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

    def start_step(self, step: str) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO steps (step, status, started_at) VALUES (?, 'running', ?) "
                "ON CONFLICT (step) DO UPDATE SET status='running', started_at=excluded.started_at, finished_at=NULL",
                (step, time.time()),
            )

    def finish_step(self, step: str, detail: dict | None = None) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE steps SET status='done', finished_at=?, detail=? WHERE step=?",
                (time.time(), json.dumps(detail or {}), step),
            )

    def fail_step(self, step: str, reason: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE steps SET status='failed', finished_at=?, detail=? WHERE step=?",
                (time.time(), json.dumps({"reason": reason}), step),
            )

    def forget_steps(self, prefix: str) -> None:
        """Forgets every step and table record of a phase, so it runs again from scratch."""
        with self._db() as db:
            db.execute("DELETE FROM steps WHERE step = ? OR step LIKE ?", (prefix, prefix + ".%"))
            db.execute("DELETE FROM tables WHERE phase = ?", (prefix,))

    # per-table records -------------------------------------------------------------------------------
    def set_table(self, phase: str, name: str, status: str, rows: int | None = None) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO tables (phase, name, status, rows, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (phase, name) DO UPDATE SET status=excluded.status, rows=excluded.rows, "
                "updated_at=excluded.updated_at",
                (phase, name, status, rows, time.time()),
            )

    def tables(self, phase: str) -> dict[str, tuple[str, int | None]]:
        with self._db() as db:
            rows = db.execute("SELECT name, status, rows FROM tables WHERE phase = ? ORDER BY name", (phase,))
            return {name: (status, n) for name, status, n in rows}

    # targets -----------------------------------------------------------------------------------------
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


@contextmanager
def exclusive(state_dir: Path):
    """Holds the runbook's write lock (a file lock in state_dir) so two runs of one runbook, say one from
    the UI and one from the CLI, never load the same target at once. Released when the process dies."""
    path = Path(state_dir) / "liftoff.lock"
    Ledger(state_dir)  # creates state_dir, or says clearly why it cannot
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StepFailed(f"another run of this runbook is writing now (lock {path} is held); wait for it "
                             "to finish or stop it, then re-run") from None
        yield
    finally:
        os.close(fd)
