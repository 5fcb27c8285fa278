"""Point-in-time recovery with pgBackRest against real servers: a dedicated PostgreSQL cluster (15: Debian 12's
pgbackrest 2.45 refuses PostgreSQL 16's control file, see liftoff/systems/pgbackrest.py), its WAL archived into
a SeaweedFS bucket over HTTPS (pgBackRest speaks S3 only over TLS; the server's certificate is self-signed and
trusted through backups.pitr.ca_file), pgBackRest run on the 'VPS' over a real sshd, and the stand-in app
stopped and started around the recovery."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from liftoff.flows.pitr import PitrOptions, pitr
from liftoff.errors import StepFailed
from liftoff.flows.recover import RecoverOptions, recover
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff.runbooks.model import load_runbook
from liftoff_sandbox.crm_app import CrmApp
from liftoff_sandbox.operator import answer_when_paused
from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir
from liftoff_sandbox.s3 import S3Server
from helpers import run_cli


def _pg_ctl(pg: PostgresServer, *args: str) -> str:
    return " ".join(["runuser", "-u", "postgres", "--", str(pg.bin_dir / "pg_ctl"), "-D", str(pg.datadir), *args])


@pytest.fixture(scope="module")
def pitr_setup(stack):
    from liftoff_sandbox.ssh import SshServer

    import pwd

    pg = PostgresServer(pg15_bin_dir(), password="pitr-" + os.urandom(6).hex()).start()
    hba = pg.datadir / "pg_hba.conf"  # the cluster's OS user reaches it over the socket without a password
    hba.write_text("local all postgres peer\n" + hba.read_text())
    pg.execute("SELECT pg_reload_conf()")
    pg.execute("CREATE DATABASE crm")
    pg.execute("CREATE TABLE visits (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())",
                dbname="crm")
    b2, vps = S3Server(tls=True).start(), SshServer().start()
    b2.client().create_bucket(Bucket="pitr-backups")
    work = Path(tempfile.mkdtemp(prefix="liftoff-pitr-"))
    work.chmod(0o755)
    shutil.copy(b2.ca_file, work / "ca.pem")
    (work / "ca.pem").chmod(0o644)
    postgres_user = pwd.getpwnam("postgres")
    os.chown(work, postgres_user.pw_uid, postgres_user.pw_gid)
    url = f"postgresql://postgres:{pg.password}@{pg.host}:{pg.port}/crm"
    app = CrmApp(work, url).start()
    saved = {k: os.environ.get(k) for k in ("AWS_CA_BUNDLE",)}
    os.environ.update({"LIFTOFF_PITR_PG": pg.password, "LIFTOFF_PITR_SSH_KEY": vps.client_key_text,
                       "LIFTOFF_PITR_B2_KEY": b2.access_key, "LIFTOFF_PITR_B2_SECRET": b2.secret_key,
                       "AWS_CA_BUNDLE": str(b2.ca_file)})  # Liftoff's own S3 client (the safety dump) trusts it too
    data = stack.runbook_data(state_dir=str(work / "state"), target_database="crm")
    data["name"] = "crm-pitr"
    data["storage"] = {}
    data["target"]["direct"].update(host=pg.host, port=pg.port, user="postgres", password={"env": "LIFTOFF_PITR_PG"})
    start_options = f'"-c port={pg.port} -c listen_addresses={pg.host} -c unix_socket_directories={pg.sockdir}"'
    data["backups"] = {
        "destination": {"endpoint_url": f"https://localhost:{b2.https_port}", "bucket": "pitr-backups",
                        "access_key_id": {"env": "LIFTOFF_PITR_B2_KEY"},
                        "secret_access_key": {"env": "LIFTOFF_PITR_B2_SECRET"}},
        "files": [], "restore_test_database": "pitr_restore_test",
        "pitr": {"stanza": "crm", "pg_path": str(pg.datadir), "pg_port": pg.port, "pg_socket_path": str(pg.sockdir),
                 "config": str(work / "pgbackrest.conf"), "work_dir": str(work / "pgbackrest"),
                 "ca_file": str(work / "ca.pem"), "timeout_s": 120,
                 "restart_command": _pg_ctl(pg, "-l", str(pg.root / "server.log"), "-w", "-t", "60", "restart"),
                 "stop_command": _pg_ctl(pg, "-m", "fast", "-w", "stop"),
                 "start_command": _pg_ctl(pg, "-l", str(pg.root / "server.log"), "-o", start_options, "-w", "-t",
                                          "60", "start")}}
    data["ssh"] = {"host": vps.host, "port": vps.port, "user": vps.user, "private_key": {"env": "LIFTOFF_PITR_SSH_KEY"},
                   "known_hosts": str(vps.known_hosts_path)}
    data["cutover"] = {"switch": {"driver": "ssh", "env": {}, "ssh": {
        "env_file": str(app.env_file), "restart": app.restart_command, "stop": app.stop_command}},
        "apps": [{"name": "crm", "health_url": app.health_url}], "health_timeout_s": 30,
        "smoke_queries": ["SELECT count(*) FROM public.visits"], "approval_timeout_s": 120}
    runbook = work / "pitr.yaml"
    runbook.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        yield {"runbook": runbook, "rb": load_runbook(runbook), "pg": pg, "b2": b2, "app": app}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        app.stop()
        vps.stop()
        b2.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_pgbackrest_archives_into_the_s3_bucket_and_its_check_is_the_gate(pitr_setup):
    done = pitr(PitrOptions(runbook=str(pitr_setup["runbook"]), backup_type="full"))
    assert done["configured"]["restarted"]  # archive_mode was off: the cluster was restarted for it
    assert [c["status"] for c in done["checks"]] == ["passed"] * 3
    assert pitr_setup["pg"].execute("SHOW archive_mode")[0][0] == "on"
    keys = [o["Key"] for o in pitr_setup["b2"].client().list_objects_v2(Bucket="pitr-backups").get("Contents", [])]
    assert any(k.startswith("pgbackrest/archive/crm/") for k in keys)  # WAL segments
    assert any(k.startswith("pgbackrest/backup/crm/") and "F/" in k for k in keys)  # the full backup's files
    gate = Ledger(pitr_setup["rb"].state_dir).latest_gate("pitr")
    assert gate.passed and "WAL archiving into the bucket works" in gate.summary
    shown = run_cli("status", "--runbook", str(pitr_setup["runbook"]))  # beside the backup phase's own gate
    assert shown.returncode == 0 and "latest pitr gate: passed" in shown.stdout, shown.stdout + shown.stderr
    assert "latest backup gate: never run" in shown.stdout
    assert "ready" in last_markdown("pitr-summary")


def test_recover_to_a_time_between_two_writes_brings_back_exactly_the_first(pitr_setup):
    pg, runbook = pitr_setup["pg"], pitr_setup["runbook"]
    pg.execute("INSERT INTO visits (id) SELECT generate_series(1, 10)", dbname="crm")  # t1
    time.sleep(1.1)
    target = pg.execute("SELECT now()", dbname="crm")[0][0]
    time.sleep(1.1)
    pg.execute("INSERT INTO visits (id) SELECT generate_series(11, 25)", dbname="crm")  # t2
    resumer = answer_when_paused("recover", {"approver": "Ada (ops)", "database": "crm", "approve": True},
                                 under=runbook.parent)
    result = recover(RecoverOptions(runbook=str(runbook), target_time=target))
    resumer.join(5)
    assert pg.execute("SELECT array_agg(id ORDER BY id) FROM visits", dbname="crm")[0][0] == list(range(1, 11))
    assert result["rows_before"]["public.visits"] == 25
    # What was replaced is kept: the safety dump counted all 25.
    safety = Ledger(pitr_setup["rb"].state_dir).step_detail("recover.safety-dump")
    assert safety["counts"]["public.visits"] == 25
    assert pitr_setup["app"].database() == "crm" and result["downtime_s"] > 0
    assert pg.execute("SELECT pg_is_in_recovery()")[0][0] is False  # promoted: takes writes again
    pg.execute("INSERT INTO visits (id) VALUES (100)", dbname="crm")



def test_a_restore_to_a_time_failing_part_way_brings_the_cluster_and_the_safety_dump_back(pitr_setup):
    """A backup set missing one of its files in the bucket: pgBackRest has already removed pg_control and
    overwritten files when it fails, so PostgreSQL cannot start on the data directory. The cluster comes back
    to the end of its WAL archive from an intact set, the safety dump goes back in, the apps start."""
    pg, runbook, rb = pitr_setup["pg"], pitr_setup["runbook"], pitr_setup["rb"]
    pg.execute("INSERT INTO visits (id) SELECT generate_series(1000, 1010)", dbname="crm")
    label = pitr(PitrOptions(runbook=str(runbook), backup_type="full"))["backup"]["label"]
    pg.execute("INSERT INTO visits (id) SELECT generate_series(2000, 2010)", dbname="crm")  # the file differs now
    time.sleep(1.1)
    target = pg.execute("SELECT now()", dbname="crm")[0][0]
    relation = pg.execute("SELECT pg_relation_filepath('visits')", dbname="crm")[0][0]
    client = pitr_setup["b2"].client()
    client.delete_object(Bucket="pitr-backups", Key=f"pgbackrest/backup/crm/{label}/pg_data/{relation}.gz")
    rows_before = pg.execute("SELECT array_agg(id ORDER BY id) FROM visits", dbname="crm")[0][0]

    resumer = answer_when_paused("recover", {"approver": "Ada (ops)", "database": "crm", "approve": True},
                                 under=runbook.parent)
    with pytest.raises(StepFailed) as caught:
        recover(RecoverOptions(runbook=str(runbook), target_time=target))
    resumer.join(5)
    message = str(caught.value)
    assert "pgbackrest restore" in message and relation in message, message  # pgBackRest's own error line
    assert "brought back to the end of its WAL archive" in message and "backup set" in message
    steps = Ledger(rb.state_dir).steps()
    assert steps["recover.pitr-restore"].status == "failed"
    assert steps["recover.put-back"].status == "done" and steps["recover.start-apps"].status == "done"
    assert pg.execute("SELECT array_agg(id ORDER BY id) FROM visits", dbname="crm")[0][0] == rows_before
    safety = Ledger(rb.state_dir).step_detail("recover.safety-dump")
    assert safety["counts"]["public.visits"] == len(rows_before)
    assert pg.execute("SELECT pg_is_in_recovery()")[0][0] is False
    assert pitr_setup["app"].database() == "crm"
    assert "Recovery FAILED, the database as before it is back" in last_markdown("recover-summary")
