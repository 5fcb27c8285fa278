"""A run killed in the middle of the restore is re-run and continues: no duplicate, no lost row."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.runbooks.model import load_runbook


@pytest.fixture(scope="module")
def big_stack(prefect_api):
    """Big enough that loading the largest tables takes a moment to interrupt."""
    from liftoff_sandbox.stack import LocalStack

    s = LocalStack(bookings=60_000, env_prefix="LIFTOFF_RESUME").start()
    yield s
    s.stop()


def _restore_states(ledger: Path) -> dict[str, str]:
    if not ledger.exists():
        return {}
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5) as db:
        try:
            return dict(db.execute("SELECT key, status FROM items WHERE phase = 'restore' AND kind = 'table'"))
        except sqlite3.OperationalError:
            return {}


@pytest.mark.parametrize("strategy", ["dump", "stream"])
def test_sigkill_during_restore_then_rerun_gives_exact_counts(big_stack, strategy):
    big_stack.new_target_database(f"resume_{strategy}")
    runbook = big_stack.write_runbook(f"resume-{strategy}.yaml", state_dir=f"state-resume-{strategy}",
                                      target_database=f"resume_{strategy}", strategy=strategy)
    ledger = load_runbook(runbook).state_dir / "ledger.sqlite"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "liftoff"), "run", "database", "--runbook", str(runbook)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    states: dict[str, str] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        states = _restore_states(ledger)
        if "loading" in states.values():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the restore could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pg_restore children, mid-load
    proc.wait()
    states = _restore_states(ledger)
    interrupted = {t for t, s in states.items() if s == "loading"}
    loaded_before = {t for t, s in states.items() if s == "loaded"}
    assert interrupted, states

    result = migrate_database(RunOptions(runbook=str(runbook)))

    assert result["export"].get("skipped") is True
    reloaded = set(result["restore"]["loaded"]["loaded"])
    assert interrupted <= reloaded
    assert not (loaded_before & reloaded), "tables loaded before the kill were loaded again"
    for table, rows in big_stack.counts.items():
        if table.startswith("public."):
            assert big_stack.target.execute(f"SELECT count(*) FROM {table}", dbname=f"resume_{strategy}")[0][0] == rows
    assert result["verify"]["rows"] == sum(n for t, n in big_stack.counts.items() if t.startswith("public.")) \
        + big_stack.counts["auth.users"]  # the gate compares the shim's auth.users too
