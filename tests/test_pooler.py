"""The pooler phase against a real PgBouncer (Debian's 1.18, run as postgres) in front of the stack's target
PostgreSQL 15 (SCRAM), started as the plan left it: Debian's ``auth_type = md5`` and an md5 userlist entry for
the app's role. The flow rewrites its config (locally, or over SSH to a real sshd) and the gate runs 100
clients through it."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import run_cli
from liftoff.flows.options import RunOptions
from liftoff.flows.pooler import setup_pooler
from liftoff.errors import GateFailed, PreflightFailed
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff_sandbox.pgbouncer import PgBouncerServer, scram_userlist
from liftoff_sandbox.stack import APP_ROLE
from liftoff.runbooks.model import load_runbook
from liftoff.systems.pgbouncer import plan_pooler, preflight_pooler, read_current, read_server_auth

DATABASE = "pooler"
APP_PASSWORD_ENV = "LIFTOFF_POOLER_APP_PASSWORD"
SSH_KEY_ENV = "LIFTOFF_POOLER_SSH_KEY"
_n = itertools.count()


@pytest.fixture(scope="module")
def target(stack, module_env):
    stack.new_target_database(DATABASE)
    module_env.setenv(APP_PASSWORD_ENV, stack.passwords["app"])
    return stack


def md5_entry(user: str, password: str) -> str:
    return f'"{user}" "md5{hashlib.md5((password + user).encode()).hexdigest()}"\n'


@pytest.fixture
def bouncer(target):
    """PgBouncer as the plan left it: Debian's auth_type md5, the app's role as an md5 hash (the admin's SCRAM
    secret, so the admin console answers)."""
    pg = target.target
    server = PgBouncerServer(
        databases={DATABASE: f"host={pg.host} port={pg.port} dbname={DATABASE}"},
        userlist=md5_entry(APP_ROLE, target.passwords["app"]) + scram_userlist(pg, ["postgres"]),
        settings={"auth_type": "md5"}).start()
    yield server
    server.stop()


def write_runbook(stack, bouncer: PgBouncerServer, *, ssh=None, database_url_port: int | None = None,
                  **pooler) -> Path:
    name = f"pooler-{next(_n)}"
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=DATABASE)
    data["target"]["pooled"] = {"host": bouncer.host, "port": bouncer.port, "database": DATABASE, "user": APP_ROLE,
                                "password": {"env": APP_PASSWORD_ENV}, "sslmode": "disable"}
    data["pooler"] = {"config_dir": str(bouncer.root), "listen_addr": bouncer.host,
                      "settings": {"unix_socket_dir": ""}, **pooler}
    if ssh is not None:
        data["ssh"] = {"host": ssh.host, "port": ssh.port, "user": ssh.user, "private_key": {"env": SSH_KEY_ENV},
                       "known_hosts": str(ssh.known_hosts_path)}
    if database_url_port:  # the apps' DATABASE_URL, as the cutover would set it
        url = f"postgresql://{APP_ROLE}:${{password}}@127.0.0.1:{database_url_port}/{DATABASE}?sslmode=disable"
        data["cutover"] = {"switch": {"driver": "ssh", "ssh": {"env_file": "/nonexistent/.env", "restart": "true"},
                                      "env": {"DATABASE_URL": {"template": url,
                                                               "secrets": {"password": {"env": APP_PASSWORD_ENV}}}}}}
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def connect_as_app(stack, bouncer):
    return psycopg.connect(bouncer.conninfo(DATABASE, APP_ROLE, stack.passwords["app"]), prepare_threshold=None,
                           connect_timeout=5)


def test_md5_userlist_against_scram_gives_wrong_password_type_and_preflight_names_it_first(target, bouncer):
    with pytest.raises(psycopg.OperationalError, match="server login failed: wrong password type"):
        connect_as_app(target, bouncer).close()

    runbook = write_runbook(target, bouncer)
    plan = plan_pooler(load_runbook(runbook))
    preflight = preflight_pooler(plan, read_server_auth(plan), read_current(plan, load_runbook(runbook))["userlist.txt"])
    first = preflight.failures()[0]
    assert first.startswith("current userlist:") and f"md5 hash for {APP_ROLE}" in first
    assert "wrong password type" in first and "SCRAM secret from pg_authid" in first
    assert preflight.ok  # the run itself fixes it

    before = bouncer.userlist_path.read_bytes()
    assert setup_pooler(RunOptions(runbook=str(runbook), dry_run=True))["dry_run"]
    assert bouncer.userlist_path.read_bytes() == before  # a dry run writes nothing
    summary = last_markdown("pooler-summary")
    assert "md5 hash for crm_app" in summary and "without --dry-run" in summary
    assert f'"{APP_ROLE}" "<scram secret from pg_authid>"' in summary and "SCRAM-SHA-256$" not in summary
    assert "pool_mode = transaction" in summary and "max_client_conn = 100" in summary


def test_clean_run_replaces_the_md5_userlist_and_100_clients_pass_the_gate(target, bouncer):
    runbook = write_runbook(target, bouncer, database_url_port=bouncer.port)
    result = setup_pooler(RunOptions(runbook=str(runbook)))

    assert result["clients"] == 100 and result["errors"] == 0 and result["transactions"] == 100 * 20
    assert 1 <= result["max_server_connections"] <= 25 and result["tps"] > 0
    print(f"pooler gate: {result['clients']} clients, max {result['max_server_connections']} server connections, "
          f"{result['transactions']} transactions, {result['tps']} per s, {result['errors']} errors")
    userlist = bouncer.userlist_path.read_text()
    assert f'"{APP_ROLE}" "SCRAM-SHA-256$4096:' in userlist and "md5" not in userlist
    with connect_as_app(target, bouncer) as conn:  # the app's own login works now
        assert conn.execute("SELECT current_user").fetchone()[0] == APP_ROLE

    rb = load_runbook(runbook)
    ledger = Ledger(rb.state_dir)
    step = ledger.steps()["pooler.config"]
    assert step.status == "done" and all(f["written"] for f in step.detail["files"])
    assert step.detail["files"][1]["sha256"] == hashlib.sha256(userlist.encode()).hexdigest()
    gate = ledger.latest_gate("pooler")
    assert gate.passed and gate.summary.startswith("passed: 100 clients")
    secret = userlist.split('" "')[1]
    assert secret not in (rb.state_dir / "ledger.sqlite").read_bytes().decode(errors="replace")

    assert "| DATABASE_URL | works through PgBouncer (prepare_threshold=None) |" in last_markdown("pooler-summary")

    again = setup_pooler(RunOptions(runbook=str(runbook)))  # idempotent: nothing rewritten, no reload
    assert not any(f["written"] for f in again["config"]["files"])
    assert again["config"]["reloaded"].startswith("no")


def test_a_password_stored_as_md5_in_pg_authid_stops_the_preflight(target, bouncer):
    pg = target.target
    pg.execute("SET password_encryption = 'md5'; CREATE ROLE legacy_app LOGIN PASSWORD 'legacy-pass-1'; "
               f"GRANT CONNECT ON DATABASE {DATABASE} TO legacy_app")
    try:
        runbook = write_runbook(target, bouncer, users=[APP_ROLE, "legacy_app"])
        before = bouncer.ini_path.read_bytes()
        with pytest.raises(PreflightFailed) as failed:
            setup_pooler(RunOptions(runbook=str(runbook)))
        assert "pg_authid holds an md5 hash for legacy_app" in str(failed.value)
        assert "SET password_encryption = 'scram-sha-256'" in str(failed.value)
        assert bouncer.ini_path.read_bytes() == before
    finally:
        pg.execute(f"REVOKE CONNECT ON DATABASE {DATABASE} FROM legacy_app; DROP ROLE legacy_app")


def test_max_client_conn_below_the_gate_clients_fails_the_gate_naming_it(target, bouncer):
    runbook = write_runbook(target, bouncer, max_client_conn=60)
    with pytest.raises(GateFailed) as failed:
        setup_pooler(RunOptions(runbook=str(runbook)))
    message = str(failed.value)
    assert "40 of 100 clients failed" in message and "no more connections allowed (max_client_conn)" in message
    assert "raise pooler.max_client_conn" in message
    ledger = Ledger(load_runbook(runbook).state_dir)
    assert ledger.steps()["verify-pooler"].status == "failed"
    assert not ledger.latest_gate("pooler").passed


def test_an_exhausted_pool_fails_the_gate_with_the_waiting_clients(target, bouncer):
    runbook = write_runbook(target, bouncer, default_pool_size=2, min_pool_size=0, reserve_pool_size=0,
                            settings={"unix_socket_dir": "", "query_wait_timeout": "1"},
                            gate={"clients": 20, "transactions_per_client": 2, "transaction_ms": 200})
    with pytest.raises(GateFailed) as failed:
        setup_pooler(RunOptions(runbook=str(runbook)))
    assert "query_wait_timeout" in str(failed.value) and "the pool was exhausted" in str(failed.value)


def test_a_database_url_that_bypasses_pgbouncer_fails_the_gate(target, bouncer):
    runbook = write_runbook(target, bouncer, database_url_port=target.target.port, gate={"clients": 5})
    with pytest.raises(GateFailed) as failed:
        setup_pooler(RunOptions(runbook=str(runbook)))
    assert (f"cutover.switch.env.DATABASE_URL: does not use PgBouncer: it points at 127.0.0.1:{target.target.port}, "
            f"target.pooled is 127.0.0.1:{bouncer.port}") in str(failed.value)


def test_the_cli_runs_the_pooler_and_records_its_step_and_gate(target, bouncer):
    runbook = write_runbook(target, bouncer)
    done = run_cli("run", "pooler", "--runbook", str(runbook))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pooler (PASSED)" in done.stdout and "transactions per second" in done.stdout
    steps = Ledger(load_runbook(runbook).state_dir).steps()
    assert steps["pooler.config"].status == "done" and steps["verify-pooler"].status == "done"
    scram = bouncer.userlist_path.read_text().split('" "')[1].split('"')[0]
    assert target.passwords["app"] not in done.stdout + done.stderr and scram not in done.stdout + done.stderr


def test_config_written_over_ssh_keeps_the_owner_and_passes_the_gate(target, bouncer, monkeypatch):
    from liftoff_sandbox.ssh import SshServer

    with SshServer() as vps:
        monkeypatch.setenv(SSH_KEY_ENV, vps.client_key_text)
        runbook = write_runbook(target, bouncer, ssh=vps, write_via="ssh")
        result = setup_pooler(RunOptions(runbook=str(runbook)))
    assert result["errors"] == 0 and all(f["written"] for f in result["config"]["files"])
    owner = bouncer.userlist_path.stat()
    assert (owner.st_uid, oct(owner.st_mode & 0o777)) == (bouncer.ini_path.stat().st_uid, "0o600")
    assert owner.st_uid != 0  # PgBouncer's user keeps its files
    assert "SCRAM-SHA-256$" in bouncer.userlist_path.read_text()
