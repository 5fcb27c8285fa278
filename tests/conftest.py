"""Real servers for the suite: one Prefect server, and PostgreSQL clusters started by fixtures.

Every server runs on a free loopback port in a temp directory and is stopped at the end of its scope.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from liftoff_sandbox.postgres import stop_started

ROOT = Path(__file__).resolve().parent.parent


_server = None


def pytest_configure(config):
    """Starts a real `prefect server start` before any test module imports Prefect: Prefect reads its API
    URL once, at import. Flows run in-process and in CLI subprocesses report to it."""
    global _server
    config.addinivalue_line("markers", "servers: starts real servers (PostgreSQL, S3, SSH, Prefect ...); "
                            "`pytest -m 'not servers'` runs the others in seconds, with no server at all")
    if getattr(config, "workerinput", None) is not None:
        return
    if (config.option.markexpr or "").replace(" ", "") == "notservers" or not _selected_modules_start_servers(config):
        return  # no test that runs needs it
    from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir
    from liftoff.prefect_server import PrefectServer

    # Its records in PostgreSQL, as a production Prefect server keeps them: with SQLite, two workers, serving
    # processes and the browser tests' clicks writing at once got 503s the UI does not retry.
    _server = PrefectServer(database=PostgresServer(pg15_bin_dir(), settings={"max_connections": "200"})).start()
    os.environ.update(_server.env())
    # Stopped at exit (with its database), after Prefect's own exit handlers (registered later, so run earlier)
    # have shipped the queued run logs and events; stopping it sooner makes them retry for a minute. The
    # clusters tests started and left are stopped after it.
    atexit.register(stop_started)
    atexit.register(_server.stop)


def _selected_modules_start_servers(config) -> bool:
    """Whether any test module the command line names (all of tests/ when it names none) starts servers: one
    whose source does not say ``SERVERS = False``. Read from the files, before any collection (the xdist
    controller collects nothing), so `pytest tests/test_runbook.py` starts no Prefect server either."""
    named = [Path(arg.split("::")[0]) for arg in config.args] or [ROOT / "tests"]
    modules = []
    for path in named:
        path = path if path.is_absolute() else Path(config.invocation_params.dir) / path
        modules += sorted(path.rglob("test_*.py")) if path.is_dir() else [path]
    return any(not m.exists() or "\nSERVERS = False" not in m.read_text() for m in modules)


def pytest_collection_modifyitems(config, items):
    """Every test is a ``servers`` test unless its module says ``SERVERS = False`` (it starts none, and runs
    no flow: the Prefect server is not started for ``-m 'not servers'``)."""
    for item in items:
        if getattr(item.module, "SERVERS", True):
            item.add_marker(pytest.mark.servers)


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


@pytest.fixture(scope="session")
def prefect_api():
    """The suite's Prefect server. Under pytest-xdist (``make test``) the controller started it and each
    worker inherited its environment: a worker gets a handle on the same server, it does not start one."""
    if _server is not None:
        return _server
    from urllib.parse import urlsplit

    from liftoff.prefect_server import PrefectServer

    return PrefectServer(home=Path(os.environ["PREFECT_HOME"]), port=urlsplit(os.environ["PREFECT_API_URL"]).port)


@pytest.fixture(scope="session")
def stack(prefect_api):
    """A Supabase-shaped PostgreSQL 15 source with a small CRM dataset, and an empty PostgreSQL 15 target.
    ``LIFTOFF_TEST_BOOKINGS`` sizes it otherwise (the acceptance test at the demo's 2,000, say); the suite's
    own figures assume the default."""
    from liftoff_sandbox.stack import LocalStack

    s = LocalStack(bookings=int(os.environ.get("LIFTOFF_TEST_BOOKINGS", "400"))).start()
    yield s
    s.stop()


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


@pytest.fixture(scope="session")
def migrated(stack):
    """The stack's source migrated once into target database `migrated`; gate tests copy it (TEMPLATE).
    ``counts``: the source's rows per table of ``stack.counts`` when it was migrated: tests before this one on
    the same worker may have written to the shared source (the cutover's writers sign users up)."""
    from liftoff.flows.database import migrate_database
    from liftoff.flows.options import RunOptions

    stack.new_target_database("migrated")
    runbook = stack.write_runbook("migrated.yaml", state_dir="state-migrated", target_database="migrated")
    counts = source_counts(stack)
    result = migrate_database(RunOptions(runbook=str(runbook)))
    return {"runbook": runbook, "result": result, "counts": counts}


def source_counts(stack) -> dict[str, int]:
    """The stack's source's rows now, per table the stack generated."""
    return {table: stack.source.execute(f"SELECT count(*) FROM {table}")[0][0] for table in stack.counts}


def fresh_runbook(stack, name: str, template: str | None = None, **database) -> Path:
    """A new target database (empty, or a copy of ``template``) and a runbook with its own state dir."""
    stack.new_target_database(name, template)
    return stack.write_runbook(f"{name}.yaml", state_dir=f"state-{name}", target_database=name, **database)


@pytest.fixture(scope="module")
def module_env():
    """Environment a module's fixtures set (its servers' secrets, read by the runbooks it writes), put back when
    the module ends: nothing leaks into the next module on the same worker."""
    with pytest.MonkeyPatch.context() as env:
        yield env


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
