"""The plan's backup tiers against real servers: the migrated CRM on the stack's target, a SeaweedFS server as
B2, a real sshd as the VPS whose folder holds the local tiers, and a real redis-server snapshotted with
redis-cli --rdb. Each tier's destination and retention, and the deployment's schedule per tier."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from liftoff.flows.backup import BackupOptions, backup
from liftoff.runbooks.model import load_runbook
from liftoff.systems import backups as archive
from liftoff.tasks.backup.tiers import tier_retention
from liftoff_sandbox.redis import RedisServer
from liftoff_sandbox.s3 import S3Server

TIERS = [
    {"name": "daily", "what": ["database"], "schedule": "0 3 * * *", "where": "destination", "keep": "30d"},
    {"name": "hourly", "what": ["database"], "schedule": "0 9-18 * * 1-5", "where": "ssh:LOCAL", "keep": "24h"},
    {"name": "redis", "what": ["redis"], "schedule": "*/15 * * * *", "where": "ssh:LOCAL", "keep": "24h"},
    {"name": "redis-b2", "what": ["redis"], "schedule": "*/15 * * * *", "where": "destination", "keep": "24h"},
]


@pytest.fixture(scope="module")
def tiered(stack, migrated, tmp_path_factory):
    from liftoff_sandbox.ssh import SshServer

    name = f"tier{os.getpid()}"
    stack.new_target_database(name, "migrated")
    vps, b2, redis = SshServer().start(), S3Server().start(), RedisServer().start()
    local = tmp_path_factory.mktemp("vps-backups")
    os.environ.update({"LIFTOFF_TIER_SSH_KEY": vps.client_key_text, "LIFTOFF_TIER_B2_KEY": b2.access_key,
                       "LIFTOFF_TIER_B2_SECRET": b2.secret_key, "LIFTOFF_TIER_REDIS": redis.password})
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=name)
    data["name"] = f"crm-{name}"
    data["storage"] = {}
    data["target"]["redis"] = {"host": redis.host, "port": redis.port, "password": {"env": "LIFTOFF_TIER_REDIS"}}
    data["ssh"] = {"host": vps.host, "port": vps.port, "user": vps.user, "private_key": {"env": "LIFTOFF_TIER_SSH_KEY"},
                   "known_hosts": str(vps.known_hosts_path)}
    data["backups"] = {"destination": {"endpoint_url": b2.endpoint_url, "bucket": f"{name}-backups",
                                       "access_key_id": {"env": "LIFTOFF_TIER_B2_KEY"},
                                       "secret_access_key": {"env": "LIFTOFF_TIER_B2_SECRET"}},
                       "files": [], "keep_newest": 1, "timezone": "Europe/Berlin",
                       "tiers": [{**t, "where": t["where"].replace("LOCAL", str(local))} for t in TIERS]}
    b2.client().create_bucket(Bucket=f"{name}-backups")
    runbook = stack.workdir / f"{name}.yaml"
    runbook.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        yield {"runbook": runbook, "rb": load_runbook(runbook), "local": local, "b2": b2, "redis": redis, "name": name}
    finally:
        vps.stop()
        b2.stop()
        redis.stop()


def _objects(tiered) -> dict[str, dict]:
    client = tiered["b2"].client()
    listed = client.list_objects_v2(Bucket=tiered["rb"].backups.destination.bucket).get("Contents", [])
    return {o["Key"]: o for o in listed}


def test_each_tier_backs_up_what_it_names_to_where_it_says(stack, tiered):
    runbook, rb, local = tiered["runbook"], tiered["rb"], tiered["local"]
    prefix = rb.name.replace("-", "_")
    daily = backup(BackupOptions(runbook=str(runbook), tier="daily"))
    key = daily["database"]["key"]
    assert key.startswith(f"{prefix}_") and key.endswith("_daily.dump")
    assert set(_objects(tiered)) == {key, archive.counts_key(key)}  # the bucket, nothing on the VPS
    assert not list(local.iterdir())
    assert "restore_test" not in daily  # a tier's run restore-tests nothing: the restore test has its own schedule

    hourly = backup(BackupOptions(runbook=str(runbook), tier="hourly"))
    name = hourly["database"]["key"]
    assert name.endswith("_hourly.dump") and hourly["where"].startswith("ssh ")
    data = (local / name).read_bytes()
    assert data[:5] == b"PGDMP" and hashlib.sha256(data).hexdigest() == hourly["database"]["sha256"]
    sidecar = json.loads((local / archive.counts_key(name)).read_text())
    assert sidecar["tables"]["public.bookings"] == stack.target.execute(
        "SELECT count(*) FROM public.bookings", dbname=tiered["name"])[0][0]
    assert not [p for p in local.iterdir() if ".partial" in p.name or "liftoff-tmp" in p.name]
    assert set(_objects(tiered)) == {key, archive.counts_key(key)}  # the local tier wrote nothing to B2

    tiered["redis"].client().set("booking:42", "confirmed")
    snap = backup(BackupOptions(runbook=str(runbook), tier="redis"))["redis"]
    rdb = (local / snap["key"]).read_bytes()
    assert snap["key"].endswith("_redis.rdb") and rdb[:5] == b"REDIS" and b"booking:42" in rdb
    assert hashlib.sha256(rdb).hexdigest() == snap["sha256"]
    assert not snap["saves_often"] and "none: RDB off" in snap["summary"]  # the sandbox's Redis: save ""
    tiered["redis"].client().config_set("save", "900 1 300 10")
    to_b2 = backup(BackupOptions(runbook=str(runbook), tier="redis-b2"))["redis"]
    stored = tiered["b2"].client().get_object(Bucket=rb.backups.destination.bucket, Key=to_b2["key"])
    body = stored["Body"].read()
    assert body[:5] == b"REDIS" and stored["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert to_b2["saves_often"] and "at least every 15 min" in to_b2["summary"]


def test_each_tier_keeps_its_own_backups_for_its_own_time(stack, tiered):
    runbook, rb, local = tiered["runbook"], tiered["rb"], tiered["local"]
    prefix = rb.name.replace("-", "_")
    # On the VPS: two older hourly dumps, one 25 h old (past the tier's 24 h), one 2 h old; a daily-named file
    # as old is another tier's and stays.
    for stem, hours in (("2026-01-01_09-00-00_hourly", 25), ("2026-01-02_09-00-00_hourly", 2),
                        ("2026-01-01_03-00-00_daily", 25)):
        path = local / f"{prefix}_{stem}.dump"
        path.write_bytes(b"PGDMP old")
        (local / archive.counts_key(path.name)).write_text("{}")
        for p in (path, local / archive.counts_key(path.name)):
            os.utime(p, (time.time() - hours * 3600,) * 2)
    done = backup(BackupOptions(runbook=str(runbook), tier="hourly"))
    assert done["retention"]["deleted"] == [f"{prefix}_2026-01-01_09-00-00_hourly.dump"]
    names = {p.name for p in local.iterdir()}
    assert f"{prefix}_2026-01-01_09-00-00_hourly.dump" not in names
    assert f"{prefix}_2026-01-01_09-00-00_hourly.dump.json" not in names
    assert {f"{prefix}_2026-01-02_09-00-00_hourly.dump", f"{prefix}_2026-01-01_03-00-00_daily.dump",
            done["database"]["key"]} <= names
    # In the bucket, judged by LastModified: a day from now the 24 h Redis snapshot goes, the 30-day daily
    # dump stays (keep_newest 1 keeps the newest of each tier).
    backup(BackupOptions(runbook=str(runbook), tier="redis-b2"))
    before = set(_objects(tiered))
    tomorrow = time.time() + 25 * 3600
    gone = tier_retention(rb, "redis-b2", now=tomorrow)["deleted"]
    assert len(gone) == 1 and gone[0].endswith("_redis-b2.rdb")
    assert tier_retention(rb, "daily", now=tomorrow)["deleted"] == []
    assert set(_objects(tiered)) == before - set(gone)
    in_31_days = time.time() + 31 * 86400
    assert tier_retention(rb, "daily", now=in_31_days)["deleted"] == []  # the tier's newest is always kept


def test_the_backup_deployment_runs_each_tier_on_its_schedule_and_the_restore_test_on_its_own(tiered):
    from liftoff.deployments.serve import backup_schedules, restore_test_schedules

    schedules = backup_schedules(str(tiered["runbook"]))
    assert sorted((s.cron, s.timezone, s.parameters["options"]["tier"]) for s in schedules) == sorted(
        (t["schedule"], "Europe/Berlin", t["name"]) for t in TIERS)
    assert all(s.parameters["options"]["runbook"] == str(tiered["runbook"]) for s in schedules)
    assert [(s.cron, s.timezone) for s in restore_test_schedules(str(tiered["runbook"]))] == [("30 4 * * *",
                                                                                               "Europe/Berlin")]
    plan = load_runbook(Path(__file__).resolve().parent.parent / "runbooks" / "tour-crm.yaml").backups.tiers
    assert [(t.name, t.what, t.schedule, t.where, t.keep) for t in plan] == [
        ("daily", ["database"], "0 3 * * *", "destination", "30d"),
        ("hourly", ["database"], "0 9-18 * * 1-5", "ssh:/var/backups/liftoff", "24h"),
        ("redis", ["redis"], "*/15 * * * *", "ssh:/var/backups/liftoff", "24h"),
        ("files", ["files"], "0 4 * * *", "destination", "30d")]


def test_the_newest_backup_is_restore_tested_before_the_cutover_checklist_reads_it(tiered):
    from liftoff.ledger import Ledger
    from liftoff.tasks.backup.steps import restore_test_newest_if_untested

    rb = tiered["rb"]
    made = backup(BackupOptions(runbook=str(tiered["runbook"]), tier="daily"))["database"]["key"]
    report = restore_test_newest_if_untested(rb)  # what the cutover runs before its checklist
    assert report is not None and report.ok and report.key == made
    gate = Ledger(rb.state_dir).latest_gate("backup")
    assert gate.passed and made in gate.summary
    assert restore_test_newest_if_untested(rb) is None  # tested already: not again
