"""The plan's Phase 0 against real servers: the stack's PostgreSQL (source, target, and the target as the
pooled endpoint), Supabase Storage's S3 backend and the target's (SeaweedFS), a bucket on the target's server
as the backup destination, a real redis-server with a password, a real sshd holding the apps' env file, an
authoritative DNS server, and the Coolify fake at the HTTP boundary. Every access good, then each one broken
in turn: one failed line naming its field, exit 2, and nothing written."""

from __future__ import annotations

import copy
import json
import stat

import paramiko
import pytest

from helpers import run_cli, seeded_storage
from liftoff.checks import FAILED, NOT_CHECKED, PASSED
from liftoff.flows.options import RunOptions
from liftoff.flows.prepare import prepare
from liftoff.runbooks.model import Runbook, forget_resolved_secrets
from liftoff.tasks.prepare.access import PROBE_PREFIX, check_access
from liftoff.tasks.prepare.steps import ENVIRONMENT_DIR, AccessReport
from liftoff_sandbox.coolify_fake import CoolifyFake
from liftoff_sandbox.dns import DnsServer
from liftoff_sandbox.redis import RedisServer
from liftoff_sandbox.ssh import SshServer

RECORD = "app.prepare.test"
BACKUP_BUCKET = "prepare-backups"
ENV_FILE_TEXT = ("# the app's environment on the VPS\nDATABASE_URL=postgresql://app:old-db-pass@db.supabase.co/postgres\n"
                 "export SESSION_SECRET='a long session secret'\nPUBLIC_NAME=Tours\n")


@pytest.fixture(scope="module")
def world(stack, module_env, tmp_path_factory):
    """Every system of the runbook, up; its secrets in the environment under PREPARE_*."""
    with seeded_storage(stack, "PREPARE", module_env) as (supabase_s3, target_s3, _), RedisServer() as redis, \
            SshServer() as vps, DnsServer({RECORD: ("A", 60, ["203.0.113.10"])}) as record:
        target_s3.client().create_bucket(Bucket=BACKUP_BUCKET)
        env_file = tmp_path_factory.mktemp("vps") / "app.env"
        env_file.write_text(ENV_FILE_TEXT)
        for name, value in {"PREPARE_REDIS": redis.password, "PREPARE_SSH_KEY": vps.client_key_text}.items():
            module_env.setenv(name, value)
        data = stack.runbook_data()
        data["name"] = "prepare-test"
        data["target"]["pooled"] = dict(data["target"]["direct"])
        data["target"]["redis"] = {"host": redis.host, "port": redis.port, "password": {"env": "PREPARE_REDIS"}}
        s3_keys = {"access_key_id": {"env": "PREPARE_TARGET_S3_KEY"}, "secret_access_key": {"env": "PREPARE_TARGET_S3_SECRET"}}
        data["storage"].update(
            source={"project_url": "http://127.0.0.1:1", "s3": {"endpoint_url": supabase_s3.endpoint_url,
                    "access_key_id": {"env": "PREPARE_SUPABASE_S3_KEY"},
                    "secret_access_key": {"env": "PREPARE_SUPABASE_S3_SECRET"}}},
            target={"endpoint_url": target_s3.endpoint_url, "public_url": "http://files.localhost", **s3_keys})
        data["backups"] = {"destination": {"endpoint_url": target_s3.endpoint_url, "bucket": BACKUP_BUCKET, **s3_keys}}
        data["ssh"] = {"host": vps.host, "port": vps.port, "user": vps.user, "private_key": {"env": "PREPARE_SSH_KEY"},
                       "known_hosts": str(vps.known_hosts_path)}
        data["cutover"] = {"switch": {"driver": "ssh", "ssh": {"env_file": str(env_file), "restart": "true"},
                                      "env": {"DATABASE_URL": "postgresql://app@target/postgres"}},
                           "checklist": {"dns": {"name": RECORD, "resolver": record.resolver}}}
        yield {"data": data, "target_s3": target_s3, "vps": vps, "env_file": env_file, "record": record}


def runbook(world, tmp_path, **changes) -> Runbook:
    data = copy.deepcopy(world["data"])
    data["state_dir"] = str(tmp_path / "state")
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    return Runbook.model_validate(data)


def write(rb: Runbook, tmp_path) -> str:
    import yaml

    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump(json.loads(rb.model_dump_json(exclude_none=True))))
    return str(path)


def probes_left(world) -> list[str]:
    listed = world["target_s3"].client().list_objects_v2(Bucket=BACKUP_BUCKET, Prefix=PROBE_PREFIX)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_every_access_answers_and_the_apps_environment_is_kept_owner_only(world, tmp_path):
    rb = runbook(world, tmp_path)
    result = prepare(RunOptions(runbook=write(rb, tmp_path)))
    assert result["access"].startswith("access checks passed: 9 of 10 lines passed; not checked: Coolify API")
    kept = rb.state_dir / ENVIRONMENT_DIR
    [snapshot] = list(kept.iterdir())
    assert str(snapshot) == result["environment"]
    assert stat.S_IMODE(kept.stat().st_mode) == 0o700 and stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    env = json.loads(snapshot.read_text())["environment"]
    where = next(iter(env))
    assert env[where] == {"DATABASE_URL": "postgresql://app:old-db-pass@db.supabase.co/postgres",
                          "SESSION_SECRET": "a long session secret", "PUBLIC_NAME": "Tours"}
    # What the run returns (and publishes) is names only
    assert result["apps"] == {where: ["DATABASE_URL", "PUBLIC_NAME", "SESSION_SECRET"]}
    assert "old-db-pass" not in json.dumps(result) and "session secret" not in json.dumps(result)
    assert probes_left(world) == []  # the backup destination's probe object was deleted


BREAKAGES = {
    # what is broken -> (the runbook change, the line that must fail, a word its detail or fix must hold)
    "source password": ({"source.password": {"env": "PREPARE_WRONG"}}, "source PostgreSQL answers", "source"),
    "Storage S3 secret": ({"storage.source.s3.secret_access_key": {"env": "PREPARE_WRONG"}},
                          "source Storage answers", "storage.source"),
    "target password": ({"target.direct.password": {"env": "PREPARE_WRONG"}}, "target PostgreSQL answers",
                        "target.direct"),
    "PgBouncer port": ({"target.pooled.port": 1}, "PgBouncer answers", "target.pooled"),
    "Redis password": ({"target.redis.password": {"env": "PREPARE_WRONG"}}, "Redis answers", "target.redis"),
    "target S3 secret": ({"storage.target.secret_access_key": {"env": "PREPARE_WRONG"}},
                         "target S3 server answers", "storage.target"),
    "backup secret": ({"backups.destination.secret_access_key": {"env": "PREPARE_WRONG"}},
                      "backup destination writable", "backups.destination"),
    "SSH host key": ({"ssh.known_hosts": "WRONG_KNOWN_HOSTS"}, "SSH to the VPS", "known_hosts"),
    "DNS record": ({"cutover.checklist.dns.name": "missing.prepare.test"}, "DNS record", "cutover.checklist.dns"),
}


@pytest.mark.parametrize("broken", sorted(BREAKAGES))
def test_each_broken_access_fails_its_own_line_only_naming_the_field(world, tmp_path, monkeypatch, broken):
    changes, line_name, field = BREAKAGES[broken]
    monkeypatch.setenv("PREPARE_WRONG", "not-the-secret-" + broken.replace(" ", "-"))
    if "ssh.known_hosts" in changes:  # the VPS's address pinned to another host key
        other = paramiko.RSAKey.generate(2048)
        wrong = tmp_path / "known_hosts"
        wrong.write_text(f"[{world['vps'].host}]:{world['vps'].port} ssh-rsa {other.get_base64()}\n")
        changes = {"ssh.known_hosts": str(wrong)}
    rb = runbook(world, tmp_path, **changes)
    lines = {line.name: line for line in check_access(rb)}
    failed = [name for name, line in lines.items() if line.status == FAILED]
    assert failed == [line_name], {n: lines[n].detail for n in failed}
    line = lines[line_name]
    assert field in line.detail + line.fix and "\n" not in line.detail
    assert "not-the-secret" not in line.detail + line.fix
    error = AccessReport(list(lines.values())).error("prepare")
    assert error.exit_code == 2 and str(error).splitlines()[0].startswith(f"prepare: 1 of 10 accesses failed ({line_name})")
    assert probes_left(world) == []


def test_the_cli_stops_on_a_broken_access_with_exit_2_and_keeps_nothing(world, tmp_path):
    rb = runbook(world, tmp_path, **{"target.redis.port": 1})
    shown = run_cli("run", "prepare", "--runbook", write(rb, tmp_path))
    assert shown.returncode == 2, shown.stdout + shown.stderr
    assert "Redis answers" in shown.stderr and "target.redis" in shown.stderr
    assert not (rb.state_dir / ENVIRONMENT_DIR).exists()


def test_a_dry_run_checks_every_access_and_writes_nothing(world, tmp_path):
    rb = runbook(world, tmp_path)
    before = world["target_s3"].client().list_objects_v2(Bucket=BACKUP_BUCKET).get("KeyCount", 0)
    result = prepare(RunOptions(runbook=write(rb, tmp_path), dry_run=True))
    assert result["environment"] is None and result["apps"]
    assert not (rb.state_dir / ENVIRONMENT_DIR).exists()
    assert world["target_s3"].client().list_objects_v2(Bucket=BACKUP_BUCKET).get("KeyCount", 0) == before


def test_the_environment_is_kept_through_coolify_and_an_unreadable_value_is_named(world, tmp_path, monkeypatch):
    apps = {"a1": {"name": "crm-web", "envs": {"DATABASE_URL": "postgresql://old", "API_KEY": {
        "value": "shown-once-value", "is_shown_once": True}}}}
    with CoolifyFake("coolify-token", apps) as fake:
        monkeypatch.setenv("PREPARE_COOLIFY", "coolify-token")
        switch = {"driver": "coolify", "env": {"DATABASE_URL": "postgresql://new"},
                  "coolify": {"url": fake.url, "token": {"env": "PREPARE_COOLIFY"}, "applications": ["a1"]}}
        rb = runbook(world, tmp_path, **{"cutover.switch": switch})
        lines = {line.name: line.status for line in check_access(rb)}
        assert lines["Coolify API"] == PASSED
        result = prepare(RunOptions(runbook=write(rb, tmp_path)))
        env = json.loads(open(result["environment"]).read())["environment"]
        assert env == {"crm-web (a1)": {"DATABASE_URL": "postgresql://old", "API_KEY": None}}
        monkeypatch.setenv("PREPARE_COOLIFY", "another-teams-token")
        forget_resolved_secrets()
        refused = {line.name: line for line in check_access(rb)}["Coolify API"]
        assert refused.status == FAILED and "cutover.switch.coolify.token" in refused.detail + refused.fix


def test_what_the_runbook_does_not_name_is_not_checked_never_passed(stack, tmp_path):
    rb = Runbook.model_validate({**stack.runbook_data(), "state_dir": str(tmp_path / "state")})
    lines = {line.name: line.status for line in check_access(rb)}
    assert lines["source PostgreSQL answers"] == lines["target PostgreSQL answers"] == PASSED
    assert {n for n, s in lines.items() if s == NOT_CHECKED} == {
        "source Storage answers", "PgBouncer answers", "Redis answers", "target S3 server answers",
        "backup destination writable", "SSH to the VPS", "Coolify API", "DNS record"}
