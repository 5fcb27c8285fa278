"""Bad input gets one actionable line, a distinct exit code, no stack trace, and leaves the source as it was."""

from __future__ import annotations

import subprocess
import uuid

import pytest
import yaml

from helpers import fresh_runbook, run_cli
from liftoff_sandbox.postgres import PostgresServer, free_port, pg16_bin_dir

SOURCE_TABLES = ("bookings", "customers", "payments", "tours")


def _source_fingerprint(stack) -> dict:
    return {t: stack.source.execute(f"SELECT count(*), md5(string_agg(x::text, '' ORDER BY x::text)) FROM public.{t} x")[0]
            for t in SOURCE_TABLES}


@pytest.fixture(scope="module")
def untouched_source(stack):
    """Asserts, after every test of this module, that the source's data did not change."""
    before = _source_fingerprint(stack)
    yield
    assert _source_fingerprint(stack) == before


def _runbook(stack, name: str, mutate) -> str:
    path = fresh_runbook(stack, name)
    data = yaml.safe_load(path.read_text())
    mutate(data)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _operator_error(done: subprocess.CompletedProcess, code: int = 2) -> str:
    assert done.returncode == code, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr + done.stdout
    errors = [l for l in done.stderr.splitlines() if l.startswith("error: ")]
    assert errors, done.stderr
    return "\n".join(errors)


def _name() -> str:
    return "err" + uuid.uuid4().hex[:8]


def test_wrong_password_names_host_and_user_never_the_password(stack, untouched_source):
    runbook = _runbook(stack, _name(), lambda d: d["source"].update(password={"env": "WRONG_SOURCE_PW"}))
    done = run_cli("run", "preflight", "--runbook", runbook, env={"WRONG_SOURCE_PW": "not-the-password-42"})
    message = _operator_error(done)
    assert f"source (127.0.0.1:{stack.source.port}): password authentication failed for user 'postgres'" in message
    assert "env:WRONG_SOURCE_PW" in message
    assert "not-the-password-42" not in done.stderr + done.stdout


def test_unreachable_target_names_the_field_and_port(stack, untouched_source):
    port = free_port()
    runbook = _runbook(stack, _name(), lambda d: d["target"]["direct"].update(port=port))
    message = _operator_error(run_cli("run", "database", "--runbook", runbook))
    assert f"target.direct (127.0.0.1:{port}): cannot reach the server" in message


def test_unset_secret_variable_is_named(stack, untouched_source):
    runbook = _runbook(stack, _name(), lambda d: d["source"].update(password={"env": "LIFTOFF_UNSET_VAR"}))
    message = _operator_error(run_cli("run", "export", "--runbook", runbook))
    assert "source.password: environment variable LIFTOFF_UNSET_VAR is not set" in message


def test_target_holding_foreign_data_is_refused(stack, untouched_source):
    name = _name()
    runbook = _runbook(stack, name, lambda d: None)
    stack.target.execute("CREATE TABLE public.legacy_bookings (id int)", dbname=name)
    message = _operator_error(run_cli("run", "database", "--runbook", runbook))
    assert "already holds data this runbook did not write (public.legacy_bookings)" in message
    assert stack.target.execute("SELECT count(*) FROM pg_tables WHERE schemaname='public'", dbname=name)[0][0] == 1


def test_dump_directory_not_writable_is_named(stack, tmp_path, untouched_source):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    runbook = _runbook(stack, _name(), lambda d: d.update(state_dir=str(blocker / "state")))
    assert f"dump directory {blocker / 'state'} is not writable (state_dir)" in _operator_error(
        run_cli("run", "preflight", "--runbook", runbook))
    assert f"state_dir {blocker / 'state'} is not writable" in _operator_error(
        run_cli("run", "export", "--runbook", runbook))


def test_not_enough_disk_by_threshold_is_refused_before_any_write(stack, untouched_source):
    runbook = _runbook(stack, _name(), lambda d: d["database"].update(min_free_disk_mb=10**9))
    message = _operator_error(run_cli("run", "database", "--runbook", runbook))
    assert "MiB free, need" in message and "database.min_free_disk_mb 1000000000" in message


def test_full_disk_during_pg_dump_fails_with_one_line(stack, tmp_path, untouched_source):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a tiny tmpfs needs root with CAP_SYS_ADMIN; the threshold test covers the check")
    try:
        runbook = _runbook(stack, _name(), lambda d: d.update(state_dir=str(mount / "state")))
        message = _operator_error(run_cli("run", "export", "--runbook", runbook))
        # pg_dump, our write of the snapshot's auth users or the ledger meets the full disk first: each says so
        assert "No space left on device" in message or "database or disk is full" in message
        assert "pg_dump from source" in message or f"{mount / 'state'}" in message and "state_dir" in message
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.fixture(scope="module")
def pg16_source():
    server = PostgresServer(pg16_bin_dir(), password="pg16-admin-pw").start()
    yield server
    server.stop()


def test_pg_dump_older_than_the_source_is_refused_naming_the_package(stack, pg16_source, untouched_source):
    def point_at_pg16(d):
        d["source"].update(port=pg16_source.port, password={"env": "PG16_SOURCE_PW"})
        d["database"]["pg_bin_dirs"] = ["/usr/lib/postgresql/15/bin"]

    runbook = _runbook(stack, _name(), point_at_pg16)
    env = {"PG16_SOURCE_PW": pg16_source.password}
    message = _operator_error(run_cli("run", "preflight", "--runbook", runbook, env=env))
    assert "pg_dump 16 or newer is needed for a PostgreSQL 16 source (found: 15 in /usr/lib/postgresql/15/bin)" in message
    assert "install postgresql-client-16" in message
    # the export flow alone refuses too, before touching anything
    assert "install postgresql-client-16" in _operator_error(run_cli("run", "export", "--runbook", runbook, env=env))


def test_gate_failure_exits_3_with_a_summary(stack, migrated):
    name = _name()
    runbook = fresh_runbook(stack, name, template="migrated")
    stack.target.execute("DELETE FROM public.tour_images WHERE id = 1", dbname=name)
    message = _operator_error(run_cli("run", "verify", "--runbook", str(runbook)), code=3)
    assert "table public.tour_images: row count differs" in message


def test_changing_the_strategy_after_export_is_refused(stack, untouched_source):
    name = _name()
    runbook = _runbook(stack, name, lambda d: d["database"].update(strategy="stream"))
    assert run_cli("run", "export", "--runbook", runbook).returncode == 0
    data = yaml.safe_load(open(runbook))
    data["database"]["strategy"] = "dump"
    open(runbook, "w").write(yaml.safe_dump(data))
    message = _operator_error(run_cli("run", "restore", "--runbook", runbook))
    assert "was made with database.strategy stream; the runbook now says dump" in message
    assert stack.target.execute("SELECT count(*) FROM pg_tables WHERE schemaname='public'", dbname=name)[0][0] == 0


def test_a_second_run_of_the_same_runbook_is_refused_while_one_is_writing(stack, untouched_source):
    from liftoff.ledger import exclusive
    from liftoff.runbooks.model import load_runbook

    runbook = _runbook(stack, _name(), lambda d: None)
    with exclusive(load_runbook(runbook).state_dir):
        message = _operator_error(run_cli("run", "export", "--runbook", runbook))
    assert "another run of this runbook is writing now" in message


def test_stream_strategy_without_psql_is_refused_by_preflight_naming_the_package(stack, tmp_path, untouched_source):
    bin_dir = tmp_path / "bin"  # pg_dump and pg_restore 15, and no psql
    bin_dir.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        (bin_dir / tool).symlink_to(f"/usr/lib/postgresql/15/bin/{tool}")

    def stream_without_psql(d):
        d["database"].update(strategy="stream", pg_bin_dirs=[str(bin_dir)])

    message = _operator_error(run_cli("run", "preflight", "--runbook", _runbook(stack, _name(), stream_without_psql)))
    assert f"{bin_dir / 'psql'} is missing: database.strategy stream reads the source with psql" in message
    assert "install postgresql-client-15" in message
