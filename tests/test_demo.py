"""`liftoff demo`, the README's first command, end to end: exit 0 only when both gates passed."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from helpers import run_cli
from liftoff_sandbox import kept


def test_demo_migrates_database_and_files_prints_both_gates_then_cuts_over_and_rolls_back(prefect_api):
    done = run_cli("demo", "--bookings", "300", "--keep")
    workdir = _kept_workdir(done.stdout)
    try:
        _check_demo(done, prefect_api)
        _check_kept_stack_is_usable(done, workdir)
    finally:
        if workdir is not None and (workdir / kept.PROCESSES).exists():
            stopped = run_cli("demo", "--stop", str(workdir))
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    # --stop stopped exactly what the demo started, by pid, and took its secrets away
    assert all(not kept._alive(k) for k in _recorded) and not (workdir / kept.ENV_FILE).exists()
    assert "stopped" in stopped.stdout and len(stopped.stdout.splitlines()) == len(_recorded) + 1


_recorded: list = []


def _kept_workdir(stdout: str) -> Path | None:
    found = re.search(r"liftoff demo --stop (\S+)", stdout)
    return Path(found.group(1)) if found else None


def _check_kept_stack_is_usable(done, workdir: Path) -> None:
    """Every process it started still runs; the env file (0600) holds what a flow needs; a flow run with it
    alone (no other secret in its environment) reaches both databases."""
    _recorded[:] = [kept.Kept(**k) for k in json.loads((workdir / kept.PROCESSES).read_text())]
    names = {k.name for k in _recorded}
    assert {"source PostgreSQL", "target PostgreSQL", "Supabase Storage's S3 server", "target S3 server",
            "Storage API fake", "the VPS's sshd", "the app"} <= names, names
    assert all(kept._alive(k) for k in _recorded), [(k.name, k.pid) for k in _recorded if not kept._alive(k)]
    env_file, runbook = workdir / kept.ENV_FILE, workdir / "local.yaml"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert f". {env_file} && liftoff status --runbook {runbook}" in done.stdout
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIFTOFF_LOCAL_")}
    preflight = subprocess.run(["bash", "-c", f". {env_file} && {Path(sys.executable).parent}/liftoff run preflight "
                                f"--runbook {runbook}"], env=clean, capture_output=True, text=True, timeout=300)
    assert preflight.returncode == 0, preflight.stdout[-2000:] + preflight.stderr[-2000:]


def _check_demo(done, prefect_api) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Error logging to API" not in done.stderr + done.stdout
    assert "Database gate PASSED" in done.stdout
    assert "public.bookings" in done.stdout and "match" in done.stdout
    assert "Storage gate PASSED" in done.stdout and "tour-images" in done.stdout and "waivers" in done.stdout
    assert f"{prefect_api.ui_url}/runs" in done.stdout
    # then the cutover, measured, and the rollback
    assert "Downtime (writes frozen until the apps were healthy on the target)" in done.stdout
    assert "cutover: the app is now connected to database 'postgres' on port" in done.stdout
    assert "(the target); " in done.stdout and "rolling back, carrying them to the source" in done.stdout
    # sign-ups and uploads kept arriving on Supabase through the cutover: the catch-up carried them
    assert "Catch-up after the switch: passed" in done.stdout and "table auth.users" in done.stdout
    # the app's two inserts, one update and one delete on the target went back to the source
    assert "Changes from the target: 4" in done.stdout and "applied to the source (4 carried, 0 conflict(s))" in done.stdout
    assert "(the source) again, which takes writes again" in done.stdout
