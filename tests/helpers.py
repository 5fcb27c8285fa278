"""Helpers the test modules share (fixtures stay in conftest.py)."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent



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


@contextmanager
def serving_deployments():
    """Held while a test's process serves Liftoff's deployments. Deployments are named by flow, so two serving
    processes on the one Prefect server (one per xdist worker) would register the same deployments and take
    each other's runs, in the other worker's environment (its stack's secrets): they serve one at a time.
    An flock on a file in the Prefect home every worker shares, released by the kernel if a worker dies."""
    with open(Path(os.environ["PREFECT_HOME"]) / "serving-deployments.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stops a process started with start_new_session=True and everything it started: SIGTERM, then SIGKILL."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs the `liftoff` console script as an operator would."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "liftoff"), *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def source_counts(stack) -> dict[str, int]:
    """The stack's source's rows now, per table the stack generated."""
    return {table: stack.source.execute(f"SELECT count(*) FROM {table}")[0][0] for table in stack.counts}


def fresh_runbook(stack, name: str, template: str | None = None, **database) -> Path:
    """A new target database (empty, or a copy of ``template``) and a runbook with its own state dir."""
    stack.new_target_database(name, template)
    return stack.write_runbook(f"{name}.yaml", state_dir=f"state-{name}", target_database=name, **database)


@contextmanager
def seeded_storage(stack, env_prefix: str, env: pytest.MonkeyPatch):
    """Two S3 servers for a module: Supabase Storage's backend seeded with the bytes of every
    ``storage.objects`` row of the stack's source, and the target's; their keys in
    ``{env_prefix}_{SUPABASE,TARGET}_S3_{KEY,SECRET}``. Yields (supabase_s3, target, seeded objects)."""
    from liftoff_sandbox.s3 import S3Server
    from liftoff_sandbox.storage_api import seed_objects

    supabase_s3, target = S3Server().start(), S3Server().start()
    try:
        seeded = seed_objects(supabase_s3.client(), stack.source.conninfo())
        for name, value in {f"{env_prefix}_SUPABASE_S3_KEY": supabase_s3.access_key,
                            f"{env_prefix}_SUPABASE_S3_SECRET": supabase_s3.secret_key,
                            f"{env_prefix}_TARGET_S3_KEY": target.access_key,
                            f"{env_prefix}_TARGET_S3_SECRET": target.secret_key}.items():
            env.setenv(name, value)
        yield supabase_s3, target, seeded
    finally:
        supabase_s3.stop()
        target.stop()
