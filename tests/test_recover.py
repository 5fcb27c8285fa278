"""The recovery against real servers: a copy of the migrated CRM on the stack's target, a SeaweedFS server as
the backup bucket (Backblaze B2's stand-in), a real sshd as the VPS on which the stand-in app runs and writes a
row every 50 ms until it is stopped (its stop, start and restart are commands over SSH, as the switch driver
runs them), and the suite's Prefect server through which the test approves the paused run as an operator
does in the UI. Faults are real: a backup object in the S3 server whose bytes end early. The same app is also
run by the Coolify fake (its stop stops the process, its start's deployment starts it again)."""

from __future__ import annotations

import hashlib
import os
import re
import time

import pytest
import yaml

from liftoff.errors import NotApproved, StepFailed
from liftoff.flows.backup import BackupOptions, backup
from liftoff.flows.options import RunOptions
from liftoff.flows.recover import RecoverOptions, recover
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff.runbooks.model import load_runbook
from liftoff.systems import backups as archive
from liftoff_sandbox.coolify_fake import CoolifyFake
from liftoff_sandbox.crm_app import CrmApp
from liftoff_sandbox.operator import answer_when_paused
from liftoff_sandbox.s3 import S3Server

from helpers import run_cli

WRITES = "public.app_writes"


@pytest.fixture(scope="module")
def setup(stack, migrated):
    """A database copied from the migrated CRM with a table the app writes to, the app running on it over
    the 'VPS', and a runbook backing it up to its own bucket and recovering it through the ssh driver."""
    from liftoff_sandbox.ssh import SshServer

    name = f"rec{os.getpid()}"
    stack.new_target_database(name, "migrated")
    stack.target.execute(f"CREATE TABLE {WRITES} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                         "at timestamptz NOT NULL DEFAULT clock_timestamp())", dbname=name)
    vps, b2 = SshServer().start(), S3Server().start()
    url = f"postgresql://{stack.target.superuser}:{stack.target.password}@{stack.target.host}:{stack.target.port}/{name}"
    app = CrmApp(stack.workdir, url, write_table=WRITES).start()
    os.environ.update({"LIFTOFF_REC_SSH_KEY": vps.client_key_text, "LIFTOFF_REC_B2_KEY": b2.access_key,
                       "LIFTOFF_REC_B2_SECRET": b2.secret_key})
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=name)
    data["name"] = f"crm-{name}"
    data["storage"] = {}
    data["backups"] = {"destination": {"endpoint_url": b2.endpoint_url, "bucket": f"{name}-backups",
                                       "access_key_id": {"env": "LIFTOFF_REC_B2_KEY"},
                                       "secret_access_key": {"env": "LIFTOFF_REC_B2_SECRET"}},
                       "files": [], "restore_test_database": f"restore_{name}"}
    data["ssh"] = {"host": vps.host, "port": vps.port, "user": vps.user, "private_key": {"env": "LIFTOFF_REC_SSH_KEY"},
                   "known_hosts": str(vps.known_hosts_path)}
    data["cutover"] = {"switch": {"driver": "ssh", "env": {}, "ssh": {
        "env_file": str(app.env_file), "restart": app.restart_command, "stop": app.stop_command}},
        "apps": [{"name": "crm", "health_url": app.health_url}], "health_timeout_s": 30,
        "smoke_queries": ["SELECT count(*) FROM public.bookings"], "approval_timeout_s": 120}
    b2.client().create_bucket(Bucket=f"{name}-backups")
    runbook = stack.workdir / f"{name}.yaml"
    runbook.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        yield {"runbook": runbook, "rb": load_runbook(runbook), "name": name, "app": app, "b2": b2}
    finally:
        app.stop()
        vps.stop()
        b2.stop()


def _rows(stack, name: str, where: str = "") -> int:
    return stack.target.execute(f"SELECT count(*) FROM {WRITES} {where}", dbname=name)[0][0]


def _wait_rows(stack, name: str, more_than: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (n := _rows(stack, name)) <= more_than:
        assert time.monotonic() < deadline, f"the app wrote no row past {more_than} in {timeout} s"
        time.sleep(0.1)
    return n


def _grants(stack, name: str) -> list:
    tables = stack.target.execute("SELECT c.oid::regclass::text, c.relacl::text FROM pg_class c JOIN pg_namespace n "
                                  "ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
                                  "AND c.relkind IN ('r', 'v', 'S') ORDER BY 1", dbname=name)
    database = stack.target.execute(f"SELECT datacl::text, encoding, datcollate FROM pg_database WHERE datname = '{name}'")
    return [tables, database]


def _approve(name: str, under) -> object:
    return answer_when_paused("recover", {"approver": "Ada (ops)", "database": name, "approve": True,
                                          "reason": "bad deploy wiped bookings"}, under=under)


def test_recover_restores_the_backup_and_the_rows_written_after_it_are_shown_then_gone(stack, setup):
    runbook, rb, name = setup["runbook"], setup["rb"], setup["name"]
    _wait_rows(stack, name, 5)
    made = backup(RunOptions(runbook=str(runbook)))["backup"]
    at_backup = made["counts"][WRITES]
    _wait_rows(stack, name, at_backup + 20)  # the app keeps writing after the backup

    planned = recover(RecoverOptions(runbook=str(runbook), dry_run=True))
    assert planned["backup"] == made["key"] and planned["lost"] >= 20
    assert _wait_rows(stack, name, at_backup + 25)  # a dry run stops nothing

    grants = _grants(stack, name)
    resumer = _approve(name, stack.workdir)
    result = recover(RecoverOptions(runbook=str(runbook)))
    resumer.join(5)

    assert _grants(stack, name) == grants  # the apps' roles keep their privileges, the database its settings
    # The approval showed the rows written after the backup, counted on the live database.
    shown = last_markdown("recover-plan")
    lost = int(re.search(rf"\| {re.escape(WRITES)} \| {at_backup} \| \d+ \| (\d+) \|", shown).group(1))
    assert lost >= 20 and made["key"] in shown and "restore test" in shown and "passed" in shown
    # The safety dump holds every row the app wrote until it was stopped ...
    ledger = Ledger(rb.state_dir)
    safety = ledger.step_detail("recover.safety-dump")
    assert safety["key"] == result["safety_dump"] and safety["key"].endswith("_before-recover.dump")
    at_stop = safety["counts"][WRITES]
    assert at_stop - at_backup >= lost
    # ... and the database holds exactly the backup's rows again: those written after it are gone.
    restarted = ledger.steps()["recover.start-apps"].started_at
    assert _rows(stack, name, f"WHERE at < to_timestamp({restarted})") == at_backup
    assert all(t["status"] == "match" for t in result["tables"])
    assert {t["table"]: t["rows restored"] for t in result["tables"]} == made["counts"]
    # The apps are back, healthy, and write again; the RTO is published.
    assert setup["app"].database() == name
    _wait_rows(stack, name, at_backup)
    assert result["downtime_s"] > 0 and "Downtime (RTO)" in last_markdown("recover-summary")
    steps = ledger.steps()
    for step in ("recover.fetch", "recover.stop-apps", "recover.safety-dump", "recover.restore", "recover.compare",
                 "recover.start-apps"):
        assert steps[step].status == "done", (step, steps[step])
    approval = [e for e in ledger.events("backup") if e.what == "recover.approval"][-1]
    assert approval.after["input"]["approver"] == "Ada (ops)"
    assert not list((rb.state_dir / "recover").glob("*"))  # the downloads are gone


def test_a_restore_failing_after_the_stop_brings_the_safety_dump_back(stack, setup):
    runbook, rb, name, b2 = setup["runbook"], setup["rb"], setup["name"], setup["b2"]
    bucket = rb.backups.destination.bucket
    good = archive.list_backups(b2.client(), bucket, rb.name.replace("-", "_"))
    good = next(b for b in good if not b.key.endswith("_before-recover.dump"))
    client = b2.client()
    data = client.get_object(Bucket=bucket, Key=good.key)["Body"].read()
    # A backup whose bytes end early, with a SHA-256 matching them: it passes every check before the stop
    # (its table of contents is whole) and fails half-way through the restore, after the old database is gone.
    cut = data[: int(len(data) * 0.7)]
    broken = good.key.replace(".dump", "_cut.dump")
    client.put_object(Bucket=bucket, Key=broken, Body=cut,
                      Metadata={"sha256": hashlib.sha256(cut).hexdigest(), "size": str(len(cut))})
    archive.put_json(client, bucket, archive.counts_key(broken),
                     archive.get_json(client, bucket, archive.counts_key(good.key)))
    _wait_rows(stack, name, 0)

    resumer = _approve(name, stack.workdir)
    with pytest.raises(StepFailed) as caught:
        recover(RecoverOptions(runbook=str(runbook), backup=broken))
    resumer.join(5)
    assert "pg_restore" in str(caught.value) and name in str(caught.value)

    ledger = Ledger(rb.state_dir)
    steps = ledger.steps()
    assert steps["recover.restore"].status == "failed"
    assert steps["recover.put-back"].status == "done" and steps["recover.start-apps"].status == "done"
    safety = ledger.step_detail("recover.safety-dump")
    # Every table holds what it held when the apps were stopped (the app's table: until it was started again).
    restarted = steps["recover.start-apps"].started_at
    assert _rows(stack, name, f"WHERE at < to_timestamp({restarted})") == safety["counts"][WRITES]
    others = {t: n for t, n in safety["counts"].items() if t != WRITES}
    put_back = {t["table"]: t["rows restored"] for t in ledger.step_detail("recover.put-back")["tables"]}
    assert {t: put_back[t] for t in others} == others
    assert stack.target.execute("SELECT count(*) FROM public.bookings", dbname=name)[0][0] == others["public.bookings"]
    assert setup["app"].database() == name  # started again, on the database as it was
    assert "FAILED" in last_markdown("recover-summary")


def test_a_recovery_typed_for_another_database_changes_nothing(stack, setup):
    runbook, name = setup["runbook"], setup["name"]
    before = _wait_rows(stack, name, 0)
    stops = lambda: sum(e.what == "recover.apps-stopped" for e in Ledger(setup["rb"].state_dir).events("backup"))
    stopped = stops()
    resumer = answer_when_paused("recover", {"approver": "Bob", "database": "postgres", "approve": True},
                                 under=stack.workdir)
    with pytest.raises(NotApproved) as caught:
        recover(RecoverOptions(runbook=str(runbook)))
    resumer.join(5)
    assert f"is not '{name}'" in str(caught.value) and "nothing was changed" in str(caught.value)
    assert _wait_rows(stack, name, before) > before  # the app was never stopped
    assert stops() == stopped


def test_recover_through_coolify_stops_the_app_during_the_restore_and_starts_it_healthy(stack, setup):
    """tour-crm.yaml's driver: Coolify stops the app (its stop job ends the process) before the database is
    touched, and starts it (a deployment) after the restore; the app is healthy and writing again."""
    runbook, name, app = setup["runbook"], setup["name"], setup["app"]
    uuid = "crm0app0uuid0000000000a1"
    seen: list[tuple[str, float]] = []

    def stopped(app_uuid: str) -> None:
        app.stop()
        seen.append(("stopped", time.time()))

    def deployed(app_uuid: str, envs: dict) -> None:
        seen.append(("starting", time.time()))
        app.start()

    made = backup(RunOptions(runbook=str(runbook)))["backup"]
    with CoolifyFake("coolify-rec-token", {uuid: {"name": "booking-crm", "envs": {}}}, deployed,
                     on_stop=stopped) as fake:
        os.environ["LIFTOFF_REC_COOLIFY_TOKEN"] = "coolify-rec-token"
        data = yaml.safe_load(runbook.read_text())
        data["cutover"]["switch"] = {"driver": "coolify", "env": {}, "coolify": {
            "url": fake.url, "token": {"env": "LIFTOFF_REC_COOLIFY_TOKEN"}, "applications": [uuid],
            "deploy_timeout_s": 30}}
        through_coolify = runbook.with_name(f"{name}-coolify.yaml")
        through_coolify.write_text(yaml.safe_dump(data, sort_keys=False))
        _wait_rows(stack, name, made["counts"][WRITES] + 5)
        resumer = _approve(name, stack.workdir)
        # As the operator types it (the newest backup by default would be the truncated one of the test above)
        ran = run_cli("run", "recover", "--runbook", str(through_coolify), "--backup", made["key"])
        resumer.join(5)
        statuses = fake.applications[uuid]["status"], fake.requests["POST /api/v1/applications/{uuid}/stop"]

    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert statuses == ("running:healthy", 1)
    assert [what for what, _ in seen] == ["stopped", "starting"]
    ledger = Ledger(setup["rb"].state_dir)
    restore = ledger.steps()["recover.restore"]
    assert made["key"] in restore.detail["summary"]
    # The process was gone before the database was dropped, and started only once the restore was over.
    assert seen[0][1] <= restore.started_at and restore.finished_at <= seen[1][1]
    assert all(t["status"] == "match" for t in ledger.step_detail("recover.compare")["tables"])
    assert _rows(stack, name, f"WHERE at < to_timestamp({seen[1][1]})") == made["counts"][WRITES]
    assert app.database() == name
    _wait_rows(stack, name, made["counts"][WRITES])  # writing again


def test_the_cli_passes_the_target_time_to_recover_and_names_the_flag_a_flow_lacks(setup):
    naive = run_cli("run", "recover", "--runbook", str(setup["runbook"]), "--dry-run",
                    "--target-time", "2026-12-07T10:15:00")
    assert naive.returncode == 2 and "target_time: give the time zone too" in naive.stderr, naive.stderr
    wrong = run_cli("run", "recover", "--runbook", str(setup["runbook"]), "--tier", "daily")
    assert wrong.returncode == 2 and "--tier does not apply to recover; it is for: backup" in wrong.stderr


def test_recover_from_a_dump_of_the_local_tier_on_the_vps(stack, setup):
    """The plan's hourly dumps kept on the VPS: listed beside the bucket's (named ssh:<folder>/<file>),
    downloaded over SFTP with the SHA-256 their counts file records, and restored like any other."""
    runbook, name = setup["runbook"], setup["name"]
    folder = stack.workdir / f"{name}-local-backups"
    data = yaml.safe_load(runbook.read_text())
    data["backups"]["tiers"] = [
        {"name": "daily", "what": ["database"], "schedule": "0 3 * * *", "keep": "30d"},
        {"name": "hourly", "what": ["database"], "schedule": "0 9-18 * * 1-5", "where": f"ssh:{folder}", "keep": "24h"}]
    tiered = runbook.with_name(f"{name}-tiers.yaml")
    tiered.write_text(yaml.safe_dump(data, sort_keys=False))
    made = backup(BackupOptions(runbook=str(tiered), tier="hourly"))["database"]
    key = f"ssh:{folder}/{made['key']}"
    at_backup = made["counts"][WRITES]
    _wait_rows(stack, name, at_backup + 5)

    planned = recover(RecoverOptions(runbook=str(tiered), dry_run=True, backup=key))
    assert key in planned["backups"] and planned["backup"] == key
    resumer = _approve(name, stack.workdir)
    result = recover(RecoverOptions(runbook=str(tiered), backup=key))
    resumer.join(5)
    assert {t["table"]: t["rows restored"] for t in result["tables"]} == made["counts"]
    assert all(t["status"] == "match" for t in result["tables"])
    fetched = Ledger(setup["rb"].state_dir).step_detail("recover.fetch")
    assert fetched["key"] == key and fetched["sha256"] == made["sha256"]
    restarted = Ledger(setup["rb"].state_dir).steps()["recover.start-apps"].started_at
    assert _rows(stack, name, f"WHERE at < to_timestamp({restarted})") == at_backup
    assert setup["app"].database() == name
