"""The backup phase against real servers: the stack's migrated CRM on its PostgreSQL 15 target (and a
PostgreSQL 16 server for the version refusal), a SeaweedFS server as Backblaze B2 and another as the VPS's
S3 server (MinIO's stand-in) holding the files. Each test uses its own bucket, state_dir and scratch database."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import run_cli, serving_deployments, stop_process_group
from liftoff.flows.backup import backup, restore_test
from liftoff.flows.options import RunOptions
from liftoff.errors import GateFailed, ToolMissing
from liftoff.ledger import Ledger
from liftoff_sandbox.postgres import DEBIAN_PG_BIN, PostgresServer, pg16_bin_dir
from liftoff_sandbox.s3 import S3Server
from liftoff.runbooks.model import load_runbook
from liftoff.systems import backups as archive
from liftoff.tasks.backup.steps import apply_retention, backup_files, plan_backup
from liftoff.tasks.backup.tiers import tier_retention

_n = itertools.count()
SERVE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def s3_servers(module_env):
    b2, minio = S3Server().start(), S3Server().start()
    for name, value in {"LIFTOFF_BK_B2_KEY": b2.access_key, "LIFTOFF_BK_B2_SECRET": b2.secret_key,
                        "LIFTOFF_BK_MINIO_KEY": minio.access_key, "LIFTOFF_BK_MINIO_SECRET": minio.secret_key}.items():
        module_env.setenv(name, value)
    try:
        yield b2, minio
    finally:
        b2.stop()
        minio.stop()


def backup_runbook(stack, s3_servers, *, database: str | None = None, files: list[str] | None = None,
                   server: PostgresServer | None = None, pg_bin_dirs: list[str] | None = None, **backups) -> Path:
    """A runbook whose target.direct is ``database`` on the stack's target (or on ``server``), backed up to its
    own bucket on the B2 stand-in; ``files``: buckets of the MinIO stand-in to back up."""
    b2, minio = s3_servers
    name = f"bk{next(_n)}"
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=database or "postgres")
    if server is not None:
        data["target"]["direct"].update(port=server.port, user=server.superuser, password={"env": "LIFTOFF_BK_PG16"})
        os.environ["LIFTOFF_BK_PG16"] = server.password
    if pg_bin_dirs is not None:
        data["database"]["pg_bin_dirs"] = pg_bin_dirs
    data["name"] = f"crm-{name}"
    data["storage"] = {"buckets": [{"name": b} for b in files or []], "bucket_prefix": f"{name}-",
                       "target": {"endpoint_url": minio.endpoint_url, "access_key_id": {"env": "LIFTOFF_BK_MINIO_KEY"},
                                  "secret_access_key": {"env": "LIFTOFF_BK_MINIO_SECRET"},
                                  "public_url": "https://files.example.com"}}
    data["backups"] = {"destination": {"endpoint_url": b2.endpoint_url, "bucket": f"{name}-backups",
                                       "access_key_id": {"env": "LIFTOFF_BK_B2_KEY"},
                                       "secret_access_key": {"env": "LIFTOFF_BK_B2_SECRET"}},
                       "files": files or [], "restore_test_database": f"restore_{name}", **backups}
    b2.client().create_bucket(Bucket=f"{name}-backups")
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _databases(stack) -> set[str]:
    return {r[0] for r in stack.target.execute("SELECT datname FROM pg_database")}


def _counts(stack, database: str) -> dict[str, int]:
    rows = stack.target.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg_toast%'", dbname=database)
    return {t: stack.target.execute(f"SELECT count(*) FROM ONLY {'.'.join(chr(34) + p + chr(34) for p in t.split('.'))}",
                                    dbname=database)[0][0] for (t,) in rows}


@pytest.fixture(scope="module")
def backed_up(stack, migrated, s3_servers):
    """One clean run of the backup flow over a copy of the migrated CRM, with two buckets of files."""
    _, minio = s3_servers
    database = stack.new_target_database("backed_up", "migrated")
    runbook = backup_runbook(stack, s3_servers, database=database, files=["tour-images", "waivers"])
    client = minio.client()
    for bucket in ("tour-images", "waivers"):
        client.create_bucket(Bucket=f"{runbook.stem}-{bucket}")
        for i in range(3):
            client.put_object(Bucket=f"{runbook.stem}-{bucket}", Key=f"dir/{bucket}-{i}.bin", Body=os.urandom(1000 + i))
    result = backup(RunOptions(runbook=str(runbook)))
    return {"runbook": runbook, "rb": load_runbook(runbook), "result": result, "database": database}


def test_a_backup_is_stored_with_its_checksum_and_counts_and_passes_its_restore_test(stack, s3_servers, backed_up):
    b2, _ = s3_servers
    rb, result = backed_up["rb"], backed_up["result"]
    bucket = rb.backups.destination.bucket
    key = result["backup"]["key"]
    prefix = rb.name.replace("-", "_")
    assert key.startswith(f"{prefix}_") and key.endswith(".dump") and len(key) == len(prefix) + len("_2026-11-27_10-00-00.dump")
    body = b2.client().get_object(Bucket=bucket, Key=key)
    data = body["Body"].read()
    assert data[:5] == b"PGDMP"  # pg_dump's custom format
    assert body["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["Metadata"]["size"] == str(len(data))
    # The counts travel beside the dump, taken in its snapshot: exactly the live database's.
    sidecar = archive.get_json(b2.client(), bucket, archive.counts_key(key))
    assert sidecar["tables"] == _counts(stack, backed_up["database"])
    assert sidecar["tables"]["public.bookings"] == 400 and sidecar["sha256"] == hashlib.sha256(data).hexdigest()
    assert not [o for o in b2.client().list_objects_v2(Bucket=bucket).get("Contents", []) if o["Key"].endswith(".partial")]
    # The restore test passed, is the backup gate the cutover checklist reads, and recorded its RTO.
    ledger = Ledger(rb.state_dir)
    gate = ledger.latest_gate("backup")
    assert gate.passed and key in gate.summary and "RTO" in gate.summary
    assert result["restore_test"]["rto_s"] > 0
    assert ledger.steps()["backup.restore-test"].status == "done"
    assert rb.backups.restore_test_database not in _databases(stack)  # the scratch database is gone
    # The files: every object of both buckets is in the backup bucket under files/<bucket>/.
    backed = {o["Key"] for o in b2.client().list_objects_v2(Bucket=bucket, Prefix="files/").get("Contents", [])}
    assert backed == {f"files/{b}/dir/{b}-{i}.bin" for b in ("tour-images", "waivers") for i in range(3)}
    assert result["files"]["copied"] == 6


def test_one_byte_changed_in_a_stored_backup_fails_its_restore_test(stack, s3_servers, backed_up):
    b2, _ = s3_servers
    good = backed_up["rb"]
    key = backed_up["result"]["backup"]["key"]
    runbook = backup_runbook(stack, s3_servers, database=backed_up["database"])
    rb = load_runbook(runbook)
    client = b2.client()
    stored = client.get_object(Bucket=good.backups.destination.bucket, Key=key)
    data = bytearray(stored["Body"].read())
    data[len(data) // 2] ^= 0x01
    mine = rb.name.replace("-", "_") + key[len(good.name):]
    client.put_object(Bucket=rb.backups.destination.bucket, Key=mine, Body=bytes(data), Metadata=stored["Metadata"])
    sidecar = archive.get_json(client, good.backups.destination.bucket, archive.counts_key(key))
    archive.put_json(client, rb.backups.destination.bucket, archive.counts_key(mine), sidecar)

    with pytest.raises(GateFailed) as caught:
        restore_test(RunOptions(runbook=str(runbook)))
    assert "SHA-256 as stored" in str(caught.value) and mine in str(caught.value)
    gate = Ledger(rb.state_dir).latest_gate("backup")
    assert not gate.passed and "SHA-256" in gate.summary
    assert rb.backups.restore_test_database not in _databases(stack)


def test_an_archive_made_by_a_pg_dump_older_than_its_server_fails_the_restore_test(stack, s3_servers, backed_up):
    """What GitLab's 2017 backups were: the archive's header says which pg_dump made it, from which server."""
    b2, _ = s3_servers
    good = backed_up["rb"]
    key = backed_up["result"]["backup"]["key"]
    runbook = backup_runbook(stack, s3_servers, database=backed_up["database"])
    rb = load_runbook(runbook)
    client = b2.client()
    data = client.get_object(Bucket=good.backups.destination.bucket, Key=key)["Body"].read()
    version = backed_up["result"]["backup"]["server_version"].split()[0]  # "15.18"
    newer = str(int(version.split(".")[0]) + 1) + version[version.index("."):]
    # The header holds the server's version, then pg_dump's: say the server was one major newer.
    forged = data.replace(version.encode(), newer.encode(), 1)
    assert forged != data
    mine = rb.name.replace("-", "_") + key[len(good.name):]
    client.put_object(Bucket=rb.backups.destination.bucket, Key=mine, Body=forged,
                      Metadata={"sha256": hashlib.sha256(forged).hexdigest(), "size": str(len(forged))})
    archive.put_json(client, rb.backups.destination.bucket, archive.counts_key(mine),
                     archive.get_json(client, good.backups.destination.bucket, archive.counts_key(key)))

    with pytest.raises(GateFailed) as caught:
        restore_test(RunOptions(runbook=str(runbook)))
    message = str(caught.value)
    assert "made by a pg_dump as new as its server" in message
    assert f"dumped from PostgreSQL {newer}" in message and f"by pg_dump {version}" in message
    assert not Ledger(rb.state_dir).latest_gate("backup").passed


def test_a_pg_dump_older_than_the_server_is_refused_before_anything_is_written(stack, s3_servers):
    b2, _ = s3_servers
    with PostgresServer(pg16_bin_dir(), password="pg16-backup-test") as pg16:
        runbook = backup_runbook(stack, s3_servers, server=pg16, pg_bin_dirs=[str(DEBIAN_PG_BIN)])
        rb = load_runbook(runbook)
        with pytest.raises(ToolMissing) as caught:
            backup(RunOptions(runbook=str(runbook)))
    message = str(caught.value)
    assert "\n" not in message
    assert f"{DEBIAN_PG_BIN}/pg_dump is pg_dump 15." in message and "(PostgreSQL 16." in message
    assert "install postgresql-client-16" in message and f"127.0.0.1:{pg16.port}" in message
    assert "Contents" not in b2.client().list_objects_v2(Bucket=rb.backups.destination.bucket)


def test_retention_keeps_the_newest_n_by_their_timestamps_even_when_the_clock_is_wrong(stack, s3_servers):
    b2, _ = s3_servers
    runbook = backup_runbook(stack, s3_servers, keep_newest=2, retention_days=30)
    rb = load_runbook(runbook)
    bucket, prefix = rb.backups.destination.bucket, rb.name.replace("-", "_")
    client = b2.client()
    # Uploaded oldest first; the names lie (the oldest claims the latest date): only LastModified counts.
    keys = [f"{prefix}_2099-01-01_00-00-00.dump", f"{prefix}_2026-01-01_00-00-00.dump",
            f"{prefix}_2026-01-02_00-00-00.dump", f"{prefix}_2020-01-01_00-00-00.dump"]
    for i, key in enumerate(keys):
        if i:
            time.sleep(1.05)  # LastModified has one-second resolution
        client.put_object(Bucket=bucket, Key=key, Body=b"dump")
        archive.put_json(client, bucket, archive.counts_key(key), {"tables": {}})
    listed = [b.key for b in archive.list_backups(client, bucket, prefix)]
    assert listed == keys[::-1]

    decade_ahead = time.time() + 10 * 365 * 86400  # a clock far in the future makes every backup "old"
    plan = plan_backup(rb, now=decade_ahead)  # the dry run's list: what would go, nothing deleted
    assert [b.key for b in plan.would_delete] == [keys[1], keys[0]]
    assert [b.key for b in archive.list_backups(client, bucket, prefix)] == keys[::-1]

    assert apply_retention(rb, now=time.time())["deleted"] == []  # none is 30 days old yet
    Ledger(rb.state_dir).set_items("backup", "dump", [(keys[0], "restore-tested", 4, None)])
    done = apply_retention(rb, now=decade_ahead)
    assert done["deleted"] == [keys[1]]  # the newest restore-tested one is kept too
    remaining = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    kept = (keys[3], keys[2], keys[0])
    assert remaining == set(kept) | {archive.counts_key(k) for k in kept}


def test_the_incremental_file_backup_copies_only_new_or_changed_objects(stack, s3_servers):
    b2, minio = s3_servers
    runbook = backup_runbook(stack, s3_servers, files=["docs"])
    rb = load_runbook(runbook)
    source, client = f"{runbook.stem}-docs", minio.client()
    client.create_bucket(Bucket=source)
    for i in range(4):
        client.put_object(Bucket=source, Key=f"a/{i}.pdf", Body=b"v1-%d" % i * 100)
    assert backup_files(rb)["copied"] == 4
    assert backup_files(rb)["copied"] == 0  # nothing changed: nothing copied
    client.put_object(Bucket=source, Key="a/1.pdf", Body=b"v2-1" * 100)  # same size, other bytes
    client.put_object(Bucket=source, Key="a/new.pdf", Body=b"new")
    client.delete_object(Bucket=source, Key="a/3.pdf")
    done = backup_files(rb)
    assert done["copied"] == 2 and done["objects"] == 4
    dest = b2.client()
    read = lambda k: dest.get_object(Bucket=rb.backups.destination.bucket, Key=f"files/docs/{k}")["Body"].read()
    assert read("a/1.pdf") == b"v2-1" * 100 and read("a/new.pdf") == b"new"
    assert read("a/3.pdf") == b"v1-3" * 100  # deleted on the source, kept in the backup


def test_a_files_tier_keeps_what_the_mirror_replaces_for_its_keep_then_purges_it(stack, s3_servers):
    """The mirror holds each object's newest version; the files tier keeps the versions it replaces (an
    overwrite, a deletion on the source) under a dated prefix, and its retention purges them after keep (30d)."""
    b2, minio = s3_servers
    tiers = [{"name": "daily", "what": ["database"], "schedule": "0 3 * * *", "keep": "30d"},
             {"name": "files", "what": ["files"], "schedule": "0 4 * * *", "keep": "30d"}]
    runbook = backup_runbook(stack, s3_servers, files=["docs"], tiers=tiers)
    rb = load_runbook(runbook)
    source, client, dest = f"{runbook.stem}-docs", minio.client(), b2.client()
    client.create_bucket(Bucket=source)
    for i in range(3):
        client.put_object(Bucket=source, Key=f"a/{i}.pdf", Body=b"v1-%d" % i * 100)
    assert backup_files(rb, keep_replaced=True)["replaced"] == {"overwritten": 0, "deleted": 0}
    client.put_object(Bucket=source, Key="a/1.pdf", Body=b"v2-1" * 100)
    client.delete_object(Bucket=source, Key="a/2.pdf")
    done = backup_files(rb, keep_replaced=True)
    assert done["replaced"] == {"overwritten": 1, "deleted": 1}
    bucket = rb.backups.destination.bucket
    listed = lambda prefix: {o["Key"]: o for o in dest.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
    read = lambda key: dest.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert set(listed("files/docs/")) == {"files/docs/a/0.pdf", "files/docs/a/1.pdf"}  # the source as it is
    assert read("files/docs/a/1.pdf") == b"v2-1" * 100
    under = done["replaced_under"]
    assert set(listed("files/_replaced/")) == {f"{under}docs/a/1.pdf", f"{under}docs/a/2.pdf"}
    assert read(f"{under}docs/a/1.pdf") == b"v1-1" * 100 and read(f"{under}docs/a/2.pdf") == b"v1-2" * 100
    assert backup_files(rb, keep_replaced=True)["replaced"] == {"overwritten": 0, "deleted": 0}  # nothing twice

    day = 86400
    assert tier_retention(rb, "files", now=time.time() + 29 * day)["purged_files"] == []
    assert len(listed("files/_replaced/")) == 2
    purged = tier_retention(rb, "files", now=time.time() + 31 * day)["purged_files"]
    assert sorted(purged) == [f"{under}docs/a/1.pdf", f"{under}docs/a/2.pdf"]
    assert listed("files/_replaced/") == {} and set(listed("files/docs/")) == {"files/docs/a/0.pdf", "files/docs/a/1.pdf"}


def test_the_served_backup_deployment_runs_on_the_daily_and_hourly_schedules(stack, s3_servers, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    runbook = backup_runbook(stack, s3_servers, timezone="Europe/Berlin")
    log = tmp_path / "serve.log"
    with serving_deployments():  # one serving process at a time on the suite's server (conftest)
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "liftoff.deployments.serve", "--runbook", str(runbook), "--only",
                                     "backup", "restore-test"], cwd="/", env=os.environ.copy(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + SERVE_TIMEOUT_S
                while True:
                    try:
                        deployment = client.read_deployment_by_name("backup/backup")
                        tested = client.read_deployment_by_name("restore-test/restore-test")
                        if deployment.schedules:
                            break
                    except ObjectNotFound:
                        pass
                    assert proc.poll() is None, f"liftoff.deployments.serve exited: {log.read_text()[-2000:]}"
                    assert time.monotonic() < deadline, "the backup deployment never appeared"
                    time.sleep(0.5)
        finally:
            stop_process_group(proc)
    assert sorted((s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules) == \
        [("0 3 * * *", "Europe/Berlin", True), ("0 9-18 * * 1-5", "Europe/Berlin", True)]
    assert not tested.schedules
    assert deployment.parameters["options"] == {"runbook": str(runbook)}


def test_the_restore_test_runs_from_the_cli_and_prints_its_rto(stack, backed_up):
    done = run_cli("run", "restore-test", "--runbook", str(backed_up["runbook"]))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    assert "Restore test PASSED" in out and "RTO" in out and backed_up["result"]["backup"]["key"] in out
    tested = [e.after for e in Ledger(backed_up["rb"].state_dir).events("backup") if e.what == "backup.restore-tested"]
    assert len(tested) == 2 and all(t["passed"] and t["rto_s"] > 0 for t in tested)


def _held_by_another_process(lock: Path) -> bool:
    import fcntl

    if not lock.exists():
        return False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_backup_runs_while_a_database_migration_holds_the_runbooks_lock(stack, s3_servers, migrated):
    """The backup reads the target only: it takes its own lock, so the daily backup is not refused while a
    migration (or a cutover) of the same runbook writes."""
    database = stack.new_target_database(f"during{os.getpid()}")
    runbook = backup_runbook(stack, s3_servers, database=database)
    rb = load_runbook(runbook)
    migration = subprocess.Popen([str(Path(sys.executable).parent / "liftoff"), "run", "database", "--runbook",
                                  str(runbook)], env=os.environ.copy(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _held_by_another_process(rb.state_dir / "liftoff.lock"):
            assert migration.poll() is None, f"the migration ended before it took its lock: {migration.stdout.read()[-2000:]}"
            assert time.monotonic() < deadline, "the migration never took the runbook's lock"
            time.sleep(0.05)
        result = backup(RunOptions(runbook=str(runbook)))  # during the migration: not refused
        assert result["restore_test"]["rto_s"] > 0
        out, _ = migration.communicate(timeout=300)
    finally:
        stop_process_group(migration)
    assert migration.returncode == 0, out[-2000:]
    assert Ledger(rb.state_dir).latest_gate("backup").passed and Ledger(rb.state_dir).latest_gate("database").passed
