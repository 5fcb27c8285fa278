"""Real servers for the suite: one Prefect server, and PostgreSQL clusters started by fixtures.

Every server runs on a free loopback port in a temp directory and is stopped at the end of its scope.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import pytest

from helpers import ROOT, source_counts
from liftoff_sandbox.postgres import stop_started


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


@pytest.fixture(autouse=True)
def fresh_secrets():
    """Each test resolves its secrets anew (a test that changes a password's variable is read again), and
    leaves none resolved behind it."""
    from liftoff.runbooks.model import forget_resolved_secrets

    forget_resolved_secrets()
    yield
    forget_resolved_secrets()


@pytest.fixture(scope="module")
def module_env():
    """Environment a module's fixtures set (its servers' secrets, read by the runbooks it writes), put back when
    the module ends: nothing leaks into the next module on the same worker."""
    with pytest.MonkeyPatch.context() as env:
        yield env


