"""Helpers the test modules share (fixtures stay in conftest.py)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def copied_objects(ledger: Path) -> int:
    """Objects the storage phase's ledger records as copied (0 before the ledger exists), read-only."""
    if not ledger.exists():
        return 0
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5) as db:
        try:
            return db.execute("SELECT count(*) FROM items WHERE phase = 'storage' AND status = 'copied'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def kill_storage_run_mid_copy(runbook: Path, ledger: Path, *, after: int, timeout: float = 120) -> int:
    """Runs `liftoff run storage` as an operator would and SIGKILLs it (its whole process group) once the
    ledger records ``after`` objects copied; returns how many it records after the kill."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "liftoff"), "run", "storage", "--runbook", str(runbook)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and copied_objects(ledger) < after:
        time.sleep(0.05)
    assert proc.poll() is None, "the copy ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return copied_objects(ledger)
