"""SSH to the VPS and the env-file switch driver, against a real OpenSSH sshd on a loopback port, a real
PostgreSQL with two databases, and the stand-in CRM app whose health endpoint says which database it uses."""

from __future__ import annotations

import hashlib
import itertools
import json
import shlex
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from liftoff.errors import ConnectionRefused, StepFailed
from liftoff.redaction import register_secret
from liftoff_sandbox.crm_app import read_env_file
from liftoff_sandbox.postgres import PostgresServer, free_port, pg15_bin_dir
from liftoff_sandbox.ssh import SshServer, new_key_pair
from liftoff.runbooks.model import SshAccess, SshSwitch
from liftoff.systems.remote import EnvFileSwitch, Remote, apply_env_changes

_n = itertools.count()
KEY_ENV = "LIFTOFF_TEST_REMOTE_KEY"


@pytest.fixture(scope="module")
def vps(module_env):
    server = SshServer().start()
    module_env.setenv(KEY_ENV, server.client_key_text)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer(pg15_bin_dir()).start()
    server.execute("CREATE DATABASE crm_a")
    server.execute("CREATE DATABASE crm_b")
    yield server
    server.stop()


def access(vps, known_hosts: Path | None = None, key_env: str = KEY_ENV, port: int | None = None) -> SshAccess:
    return SshAccess(host=vps.host, port=port or vps.port, user=vps.user, private_key={"env": key_env},
                     known_hosts=known_hosts or vps.known_hosts_path)


@pytest.fixture
def remote(vps):
    with Remote(access(vps)) as r:
        yield r


@pytest.fixture
def workdir(vps):
    """A directory on the 'VPS' (the same machine: the test checks files directly)."""
    path = vps.root / f"work{next(_n)}"
    path.mkdir()
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- commands and files ------------------------------------------------------------------------------------

def test_run_returns_exit_code_stdout_and_stderr(remote):
    result = remote.run("echo out; echo err >&2")
    assert (result.rc, result.stdout, result.stderr) == (0, "out\n", "err\n")
    assert remote.run("exit 3", check=False).rc == 3


def test_failing_command_names_host_command_and_last_stderr_line_without_secret(remote, vps):
    secret = "Zq8-remote-secret-value"
    register_secret(secret)
    with pytest.raises(StepFailed) as err:
        remote.run(f"sh -c 'echo first >&2; echo \"cannot reach db with {secret}\" >&2; exit 4'")
    message = str(err.value)
    assert f"{vps.host}:{vps.port}" in message and "`sh -c`" in message and "exited 4" in message
    assert "cannot reach db with ***" in message and secret not in message and "first" not in message


def test_command_running_past_its_timeout_is_reported(remote):
    with pytest.raises(StepFailed, match=r"`sleep 5` did not finish within 0.5 s"):
        remote.run("sleep 5", timeout=0.5)


def test_atomic_write_keeps_the_previous_file_as_a_backup(remote, workdir):
    target = workdir / "app.env"
    assert remote.write_file_atomic(str(target), "FIRST=1\n") is None  # nothing to back up
    assert target.read_text() == "FIRST=1\n" and (target.stat().st_mode & 0o777) == 0o600
    backup = remote.write_file_atomic(str(target), "SECOND=2\n", mode=0o640)
    assert target.read_text() == "SECOND=2\n" and (target.stat().st_mode & 0o777) == 0o640
    assert backup.startswith(f"{target}.liftoff-") and backup.endswith(".bak")
    assert Path(backup).read_text() == "FIRST=1\n" and (Path(backup).stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in workdir.iterdir()) == sorted(["app.env", Path(backup).name])  # no temp file left


def test_read_file_returns_content_or_none_when_missing(remote, workdir):
    (workdir / "present.txt").write_text("héllo\n")
    assert remote.read_file(str(workdir / "present.txt")) == "héllo\n"
    assert remote.read_file(str(workdir / "absent.txt")) is None


# --- refusals ---------------------------------------------------------------------------------------------

def test_unknown_host_key_is_refused_naming_host_and_known_hosts_file(vps, workdir):
    empty = workdir / "known_hosts"
    empty.write_text("")
    with pytest.raises(ConnectionRefused) as err, Remote(access(vps, known_hosts=empty)) as r:
        r.run("true")
    message = str(err.value)
    assert f"{vps.host}:{vps.port}" in message and str(empty) in message
    assert "ssh-keyscan" in message and vps.host_key_fingerprint in message
    assert empty.read_text() == ""  # never added


def test_changed_host_key_is_refused_as_a_possible_attack(vps, workdir):
    _, other_public = new_key_pair(workdir, "impostor")
    known = workdir / "known_hosts"
    known.write_text(f"[{vps.host}]:{vps.port} {' '.join(other_public.split()[:2])}\n")
    with pytest.raises(ConnectionRefused) as err, Remote(access(vps, known_hosts=known)) as r:
        r.run("true")
    message = str(err.value)
    assert "HOST KEY CHANGED" in message and f"{vps.host}:{vps.port}" in message and str(known) in message
    assert vps.host_key_fingerprint in message


def test_missing_known_hosts_file_is_refused_naming_the_field(vps, workdir):
    with pytest.raises(ConnectionRefused, match=r"^ssh.known_hosts: .*does not exist"), \
            Remote(access(vps, known_hosts=workdir / "nope")) as r:
        r.run("true")


def test_wrong_client_key_is_refused_naming_user_host_and_field(vps, workdir, monkeypatch):
    private, _ = new_key_pair(workdir, "stranger")
    monkeypatch.setenv("LIFTOFF_TEST_REMOTE_WRONG_KEY", private.read_text())
    with pytest.raises(ConnectionRefused) as err, \
            Remote(access(vps, key_env="LIFTOFF_TEST_REMOTE_WRONG_KEY")) as r:
        r.run("true")
    message = str(err.value)
    assert f"{vps.user}@{vps.host}:{vps.port}" in message and "ssh.private_key" in message
    assert "PRIVATE KEY" not in message


def test_text_that_is_not_a_key_is_refused_naming_the_field(vps, monkeypatch):
    monkeypatch.setenv("LIFTOFF_TEST_REMOTE_NOT_A_KEY", "just some text that is long")
    with pytest.raises(ConnectionRefused, match=r"^ssh.private_key: not a private key"), \
            Remote(access(vps, key_env="LIFTOFF_TEST_REMOTE_NOT_A_KEY")) as r:
        r.run("true")


def test_closed_port_is_refused_naming_host_and_port(vps):
    port = free_port()
    with pytest.raises(ConnectionRefused, match=rf"cannot connect to {vps.host}:{port} \(connection refused\)"), \
            Remote(access(vps, port=port)) as r:
        r.run("true")


# --- the env file -----------------------------------------------------------------------------------------

def test_env_file_edit_keeps_other_lines_and_quotes_values_as_compose_reads_them(tmp_path):
    original = ("# the CRM\r\nexport DATABASE_URL=postgresql://a@h/db  # old one\r\n\r\nAPP_NAME='crm app'\r\n"
                "S3_ENDPOINT=http://old\r\nS3_ENDPOINT=http://older\r\n")
    values = {"DATABASE_URL": "postgresql://u:p$w#d'x\\y@h:5432/db", "S3_ENDPOINT": "http://minio:9000",
              "REDIS_URL": "redis://:s3cret pass@h:6379/0", "APP_NAME": "crm app"}
    edited = apply_env_changes(original, values)
    lines = edited.split("\r\n")
    assert lines[0] == "# the CRM" and lines[2] == "" and lines[3] == "APP_NAME='crm app'"  # kept as written
    assert lines[1].startswith("export DATABASE_URL=") and lines[1].endswith("  # old one")
    assert lines[4] == lines[5] == "S3_ENDPOINT=http://minio:9000"
    assert edited.endswith("\nREDIS_URL='redis://:s3cret pass@h:6379/0'\n")
    env_file = tmp_path / "app.env"
    env_file.write_bytes(edited.encode())
    assert {k: v for k, v in read_env_file(env_file).items()} == values  # an independent reader agrees
    assert apply_env_changes(edited, values) == edited


class CrmApp:
    """The stand-in app on the 'VPS', restarted with its own restart command."""

    def __init__(self, workdir: Path, database_url: str):
        self.port = free_port()
        self.env_file = workdir / "crm.env"
        self.env_file.write_text(f"# the CRM's environment\nAPP_NAME=crm\nDATABASE_URL={database_url}\n"
                                 "LOG_LEVEL=info # not a secret\n")
        self.env_file.chmod(0o640)
        self.pid_file = workdir / "crm.pid"
        self.restart = " ".join(shlex.quote(a) for a in [
            sys.executable, "-m", "liftoff_sandbox.crm_app", "restart", "--env-file", str(self.env_file),
            "--port", str(self.port), "--pid-file", str(self.pid_file), "--log-file", str(workdir / "crm.log")])

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def database(self) -> str:
        code, body = self.health()
        assert code == 200 and body["status"] == "healthy", body
        return body["checks"]["database"]["database"]

    def stop(self) -> None:
        from liftoff_sandbox.crm_app import stop

        stop(self.pid_file)


@pytest.fixture
def crm(pg, workdir, remote):
    app = CrmApp(workdir, f"postgresql://postgres:{pg.password}@{pg.host}:{pg.port}/crm_a")
    remote.run(app.restart, timeout=60)
    yield app
    app.stop()


def _switch(vps, app) -> EnvFileSwitch:
    return EnvFileSwitch(Remote(access(vps)), SshSwitch(env_file=str(app.env_file), restart=app.restart))


def test_env_file_switch_moves_the_app_to_another_database_and_back(vps, pg, crm):
    assert crm.database() == "crm_a"
    url_b = f"postgresql://postgres:{pg.password}@{pg.host}:{pg.port}/crm_b"
    original = crm.env_file.read_text()
    with _switch(vps, crm) as switch:
        undo = switch.apply_env({"DATABASE_URL": url_b})
        assert set(undo) == {"env_file", "backup", "sha256_before", "sha256_after"}
        assert "crm_b" not in json.dumps(undo) and "crm_a" not in json.dumps(undo)  # no values in the ledger
        assert crm.database() == "crm_a"  # the app reads its env file when it starts
        switch.redeploy()
        assert crm.database() == "crm_b"
        _, body = crm.health()
        assert body["checks"]["database"]["server_port"] == pg.port and "T" in body["timestamp"]
        assert crm.env_file.read_text() == original.replace("/crm_a\n", "/crm_b\n")  # every other line kept
        assert (crm.env_file.stat().st_mode & 0o777) == 0o640

        switch.restore_env(undo)
        switch.redeploy()
        assert crm.database() == "crm_a"
        assert crm.env_file.read_text() == original
        switch.restore_env(undo)  # again: nothing left to do
        assert crm.env_file.read_text() == original


def test_applying_the_same_env_twice_changes_nothing_and_still_undoes_the_first(vps, pg, crm):
    url_b = f"postgresql://postgres:{pg.password}@{pg.host}:{pg.port}/crm_b"
    before = _sha(crm.env_file)
    with _switch(vps, crm) as switch:
        first = switch.apply_env({"DATABASE_URL": url_b})
        after = _sha(crm.env_file)
        backups = sorted(crm.env_file.parent.glob("crm.env.liftoff-*.bak"))
        second = switch.apply_env({"DATABASE_URL": url_b})
        assert second == first and _sha(crm.env_file) == after
        assert sorted(crm.env_file.parent.glob("crm.env.liftoff-*.bak")) == backups  # no new backup
        switch.restore_env(second)
    assert _sha(crm.env_file) == before == first["sha256_before"]


def test_restore_refuses_when_the_env_file_was_edited_after_the_switch(vps, pg, crm):
    url_b = f"postgresql://postgres:{pg.password}@{pg.host}:{pg.port}/crm_b"
    with _switch(vps, crm) as switch:
        undo = switch.apply_env({"DATABASE_URL": url_b})
        edited = crm.env_file.read_text() + "FEATURE_FLAG=on\n"
        crm.env_file.write_text(edited)
        with pytest.raises(StepFailed) as err:
            switch.restore_env(undo)
    message = str(err.value)
    assert "was edited since the switch" in message and str(crm.env_file) in message and undo["backup"] in message
    assert crm.env_file.read_text() == edited  # left alone for the operator


def test_restore_refuses_when_the_backup_is_gone(vps, pg, crm):
    url_b = f"postgresql://postgres:{pg.password}@{pg.host}:{pg.port}/crm_b"
    with _switch(vps, crm) as switch:
        undo = switch.apply_env({"DATABASE_URL": url_b})
        Path(undo["backup"]).unlink()
        with pytest.raises(StepFailed, match=r"its backup .* is gone"):
            switch.restore_env(undo)


def test_failing_restart_command_names_the_host_and_the_app_error(vps, pg, crm):
    crm.env_file.unlink()
    with pytest.raises(StepFailed) as err, _switch(vps, crm) as switch:
        switch.redeploy()
    assert f"{vps.host}:{vps.port}" in str(err.value) and f"env file {crm.env_file} does not exist" in str(err.value)


def test_app_health_is_unhealthy_when_its_database_is_gone(vps, pg, crm, remote):
    crm.env_file.write_text(f"DATABASE_URL=postgresql://postgres:{pg.password}@{pg.host}:{pg.port}/no_such_db\n")
    remote.run(crm.restart)
    code, body = crm.health()
    assert code == 503 and body["status"] == "unhealthy" and body["checks"]["database"]["status"] == "down"
    assert "no_such_db" in body["checks"]["database"]["error"]
