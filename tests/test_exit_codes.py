"""One meaning per exit code, in every flow: a credential, a secret or a host the operator must fix is exit 2
(``ChecksBlocked`` when a gate's check could not run), never "a gate found a difference" (3), and it leaves no
failed gate in the ledger for the cutover's checklist to read. Real servers: the session's PostgreSQL stack, one
sshd, one PgBouncer, one Redis and one S3 server shared by the whole module. The database flows' own bad inputs
are tests/test_errors.py's; the differences (exit 3) are each phase's own tests."""

from __future__ import annotations

import base64
import contextlib
import itertools
import logging
import stat

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helpers import run_cli
from liftoff import errors
from liftoff.flows.backup import backup, restore_test
from liftoff.flows.cache import setup_cache
from liftoff.flows.cutover import cutover
from liftoff.flows.health import check_health
from liftoff.flows.options import RunOptions
from liftoff.flows.pooler import setup_pooler
from liftoff.flows.security import check_security
from liftoff.ledger import Ledger
from liftoff.runbooks.model import load_runbook
from liftoff_sandbox.pgbouncer import PgBouncerServer, scram_userlist
from liftoff_sandbox.postgres import free_port
from liftoff_sandbox.redis import RedisServer
from liftoff_sandbox.s3 import S3Server
from liftoff_sandbox.ssh import SshServer
from liftoff_sandbox.stack import APP_ROLE

KEY_ENV, WRONG_ENV, UNSET_ENV = "LIFTOFF_EXIT_SSH_KEY", "LIFTOFF_EXIT_WRONG", "LIFTOFF_EXIT_NEVER_SET"
REDIS_ENV, B2_KEY, B2_SECRET = "LIFTOFF_EXIT_REDIS", "LIFTOFF_EXIT_B2_KEY", "LIFTOFF_EXIT_B2_SECRET"
DATABASE = "exitcodes"
_n = itertools.count()


@pytest.fixture(scope="module")
def servers(stack, module_env):
    """One of each: sshd (the VPS), Redis, an S3 server standing in for B2, PgBouncer in front of the target."""
    stack.new_target_database(DATABASE)
    pg = stack.target
    with SshServer() as vps, RedisServer() as redis, S3Server() as b2:
        bouncer = PgBouncerServer(databases={DATABASE: f"host={pg.host} port={pg.port} dbname={DATABASE}"},
                                  userlist=scram_userlist(pg, [APP_ROLE, "postgres"])).start()
        other_key = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
        for name, value in {KEY_ENV: vps.client_key_text, WRONG_ENV: "not-the-password-" + other_key[40:52],
                            "LIFTOFF_EXIT_OTHER_KEY": other_key, REDIS_ENV: redis.password,
                            B2_KEY: b2.access_key, B2_SECRET: b2.secret_key}.items():
            module_env.setenv(name, value)
        module_env.setenv(f"{stack.env_prefix}_APP_PASSWORD", stack.passwords["app"])
        module_env.delenv(UNSET_ENV, raising=False)
        try:
            yield {"vps": vps, "redis": redis, "b2": b2, "bouncer": bouncer}
        finally:
            bouncer.stop()


def runbook(stack, servers, change=lambda data: None) -> str:
    """A runbook naming every server of the module, each with working credentials until ``change`` breaks one."""
    name = f"exit{next(_n)}"
    vps, redis, b2, bouncer = servers["vps"], servers["redis"], servers["b2"], servers["bouncer"]
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=DATABASE)
    data["name"] = f"crm-{name}"
    data["target"]["pooled"] = {"host": bouncer.host, "port": bouncer.port, "database": DATABASE, "user": APP_ROLE,
                                "password": {"env": f"{stack.env_prefix}_APP_PASSWORD"}, "sslmode": "disable"}
    data["target"]["redis"] = {"host": redis.host, "port": redis.port, "password": {"env": REDIS_ENV}}
    data["ssh"] = {"host": vps.host, "port": vps.port, "user": vps.user, "private_key": {"env": KEY_ENV},
                   "known_hosts": str(vps.known_hosts_path)}
    data["pooler"] = {"config_dir": str(bouncer.root), "listen_addr": bouncer.host, "settings": {"unix_socket_dir": ""},
                      "gate": {"clients": 5}}
    data["health"] = {"disk_paths": ["/"]}
    data["backups"] = {"destination": {"endpoint_url": b2.endpoint_url, "bucket": f"{name}-backups",
                                       "access_key_id": {"env": B2_KEY}, "secret_access_key": {"env": B2_SECRET}},
                       "restore_test_database": f"restore_{name}"}
    b2.client().create_bucket(Bucket=f"{name}-backups")
    change(data)
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def operator_error(flow, path: str, *, dry_run: bool = False) -> errors.LiftoffError:
    """What the flow raised, asserted to be an operator's error (exit 2) on lines that each stand alone."""
    with pytest.raises(errors.LiftoffError) as raised:
        flow(RunOptions(runbook=path, dry_run=dry_run))
    error = raised.value
    assert error.exit_code == errors.EXIT_BAD_INPUT, (type(error).__name__, str(error))
    assert all(len(line) < 600 for line in str(error).splitlines()), str(error)
    return error


def state(path: str) -> Ledger:
    return Ledger(load_runbook(path).state_dir)


def ssh_key_unset(data):
    data["ssh"]["private_key"] = {"env": UNSET_ENV}


def ssh_key_wrong(data):
    data["ssh"]["private_key"] = {"env": "LIFTOFF_EXIT_OTHER_KEY"}


def known_hosts_missing(data):
    data["ssh"]["known_hosts"] = "/nonexistent/known_hosts"


def ssh_port_closed(data):
    data["ssh"]["port"] = free_port()


SSH_CASES = {"ssh key variable unset": (ssh_key_unset, UNSET_ENV), "ssh key refused": (ssh_key_wrong, "refused the key"),
             "known_hosts missing": (known_hosts_missing, "ssh.known_hosts"),
             "ssh port closed": (ssh_port_closed, "check ssh.host and ssh.port")}


@pytest.mark.parametrize("case", SSH_CASES)
@pytest.mark.parametrize("flow,phase", [(check_health, "health"), (check_security, "security")],
                         ids=["health", "security"])
def test_an_ssh_problem_is_exit_2_one_line_per_check_and_no_failed_gate(stack, servers, flow, phase, case):
    change, named = SSH_CASES[case]
    path = runbook(stack, servers, change)
    error = operator_error(flow, path)
    assert isinstance(error, errors.ChecksBlocked), str(error)
    head, *lines = str(error).splitlines()
    assert "could not run (input, credentials or reachability" in head and "difference" not in head, head
    assert lines and all(named in line for line in lines if "ssh" in line.lower()), lines
    assert any("(fix: " in line for line in lines), lines
    assert state(path).latest_gate(phase) is None  # nothing compared: the checklist sees no failed gate


def test_a_wrong_password_through_pgbouncer_is_exit_2_not_a_pool_finding(stack, servers):
    path = runbook(stack, servers, lambda d: d["target"]["pooled"].update(password={"env": WRONG_ENV}))
    error = operator_error(setup_pooler, path)
    assert isinstance(error, errors.ChecksBlocked)
    assert "5 of 5 clients could not connect" in str(error) and "authentication failed" in str(error)
    assert "target.pooled" in str(error) and "not-the-password" not in str(error)
    ledger = state(path)
    assert ledger.latest_gate("pooler") is None and ledger.steps()["verify-pooler"].status == "failed"


def test_a_wrong_redis_password_is_exit_2_in_cache_and_health(stack, servers):
    path = runbook(stack, servers, lambda d: d["target"]["redis"].update(password={"env": WRONG_ENV}))
    assert "target.redis" in str(operator_error(setup_cache, path))
    assert "Redis refused the login" in str(operator_error(check_health, path))
    assert state(path).latest_gate("cache") is None and state(path).latest_gate("health") is None


def test_a_wrong_s3_secret_is_exit_2_in_backup_and_restore_test(stack, servers):
    path = runbook(stack, servers, lambda d: d["backups"]["destination"].update(secret_access_key={"env": WRONG_ENV}))
    for flow in (restore_test, backup):
        assert "access key id" in str(operator_error(flow, path))
    assert state(path).latest_gate("backup") is None


def test_an_unset_password_in_the_cutover_checklist_is_exit_2_one_line_per_check(stack, servers):
    def change(data):
        data["target"]["direct"]["password"] = {"env": UNSET_ENV}
        data["cutover"] = {"switch": {"driver": "ssh", "ssh": {"env_file": "/nonexistent/.env", "restart": "true"},
                                      "env": {"APP_MODE": "live"}}}

    path = runbook(stack, servers, change)
    error = operator_error(cutover, path, dry_run=True)
    head, *lines = str(error).splitlines()
    assert isinstance(error, errors.ChecksBlocked) and head.startswith("cutover checklist: "), head
    assert any(line.startswith("target PostgreSQL answers: ") and UNSET_ENV in line for line in lines), lines
    # the lines that did run found what they found (no database gate yet): that, and only that, is the gate's record
    assert "could not run" in head and "difference" in head
    assert any(line.startswith("database gate passed: no database gate") for line in lines), lines
    gate = state(path).latest_gate("cutover")
    assert not gate.passed and "database gate passed" in gate.summary and UNSET_ENV not in gate.summary


def test_the_cli_prints_the_summary_then_a_line_per_check_and_exits_2(stack, servers, tmp_path):
    """...and the exception Prefect persists for the failed run lands in the runbook's state dir, owner only,
    not in $PREFECT_HOME/storage (mode 0644 there)."""
    path = runbook(stack, servers, ssh_port_closed)
    home = tmp_path / "prefect-home"
    done = run_cli("run", "security", "--runbook", path, timeout=180, env={"PREFECT_HOME": str(home)})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert lines[0].startswith("error: security: ") and "could not run" in lines[0], lines
    assert len(lines) >= 3 and "Traceback" not in done.stderr + done.stdout
    results = load_runbook(path).state_dir / "prefect-results"
    assert stat.S_IMODE(results.stat().st_mode) == 0o700
    kept = [f for f in results.iterdir() if b"ChecksBlocked" in base64.b64decode(f.read_bytes())]  # a pickle
    assert kept, f"no persisted exception of the failed run in {results}: {list(results.iterdir())}"
    assert not list((home / "storage").glob("*")), "Prefect kept a result outside the runbook's state dir"


def test_a_ledger_belongs_to_one_runbook_and_is_handed_over_only_by_adopt(stack, servers):
    """pgcopydb's setup row: another runbook name, or the same name against another target, pointed at a
    state_dir is refused before it runs (exit 2, naming both); ``liftoff adopt`` hands the ledger over."""
    first = runbook(stack, servers)
    with contextlib.suppress(errors.GateFailed):  # the sandbox's Redis may differ from the plan: either way it ran
        setup_cache(RunOptions(runbook=first))
    owner = state(first).setup()
    assert owner.runbook == load_runbook(first).name

    state_dir = str(load_runbook(first).state_dir)
    other = runbook(stack, servers, lambda d: d.update(state_dir=state_dir))
    moved = runbook(stack, servers, lambda d: (d.update(state_dir=state_dir, name=owner.runbook),
                                               d["target"]["direct"].update(database="postgres")))
    for path, named in ((other, load_runbook(other).name), (moved, f"target {stack.target.host}:{stack.target.port}/postgres)")):
        error = operator_error(setup_cache, path)
        assert isinstance(error, errors.RunbookInvalid) and "\n" not in str(error)
        assert f"runbook '{owner.runbook}' (source {owner.source}, target {owner.target})" in str(error)
        assert named in str(error) and "liftoff adopt --runbook" in str(error)
    assert state(first).setup() == owner  # nothing was written by the refused runs

    done = run_cli("adopt", "--runbook", other)
    assert done.returncode == 0 and owner.runbook in done.stdout, done.stdout + done.stderr
    assert state(other).setup().runbook == load_runbook(other).name
    assert "its ledger belongs to" in str(operator_error(setup_cache, first))


def test_a_check_that_could_not_run_is_logged_as_its_summary_not_a_traceback(stack, servers):
    """What the run's Logs tab in the UI shows: Prefect's failure records carry the one-line summary."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        operator_error(check_security, runbook(stack, servers, ssh_port_closed))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert {r.name for r in records} == {"prefect.task_runs", "prefect.flow_runs"}, records
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records), "\n".join(r.getMessage() for r in records)
    failed = [r.getMessage() for r in records if " run failed" in r.getMessage()]
    assert len(failed) == 2 and all(m.endswith(": security: 2 checks could not run (input, credentials or "
                                               "reachability: fix each line below and run again)") for m in failed), failed
