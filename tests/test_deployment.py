"""The deployments on a real Prefect server: registered by a serving process, read back through the API as the
UI reads them, and triggered through the client like a click on "Run"; and `liftoff serve` as an operator
starts and stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import fresh_runbook, serving_deployments, stop_process_group

SERVE_TIMEOUT_S = 90
_KEY = {"env": "LIFTOFF_DEPLOY_UNUSED_KEY"}  # never resolved: no flow of these sections runs against it
# Sections that configure every phase, so `serve --runbook` deploys each (nothing here is reached)
EVERY_PHASE = {
    "ssh": {"host": "127.0.0.1", "port": 22, "user": "root", "private_key": _KEY,
            "known_hosts": "/nonexistent/known_hosts"},
    "pooler": {"config_dir": "/nonexistent/pgbouncer"},
    "cache": {},
    "tuning": {},
    "backups": {"destination": {"endpoint_url": "http://127.0.0.1:9", "bucket": "backups", "access_key_id": _KEY,
                                "secret_access_key": _KEY}, "schedules": [],
                "pitr": {"stanza": "crm", "pg_path": "/var/lib/postgresql/16/main", "restart_command": "true",
                         "stop_command": "true", "start_command": "true"}},
    "cutover": {"switch": {"driver": "ssh", "ssh": {"env_file": "/nonexistent/.env", "restart": "true"},
                           "env": {"APP_MODE": "live"}}},
}
STORAGE = {"source": {"project_url": "https://example.supabase.co",
                      "s3": {"endpoint_url": "http://127.0.0.1:9", "access_key_id": _KEY, "secret_access_key": _KEY}},
           "target": {"endpoint_url": "http://127.0.0.1:9", "access_key_id": _KEY, "secret_access_key": _KEY,
                      "public_url": "http://files.localhost"}}


def _runbook(stack, name: str, **top) -> Path:
    path = fresh_runbook(stack, name)
    data = yaml.safe_load(path.read_text())
    data.update(name=name.replace("_", "-"), **top)  # artifact keys start with the runbook's name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


_stop = stop_process_group


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory):
    """`python -m liftoff.deployments.serve --runbook R` serving every deployment until the module's tests are done."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from liftoff.deployments.serve import deployments

    runbook = _runbook(stack, "deployed", rehearsal={"schedule": "30 4 * * 1", "timezone": "Europe/Berlin"},
                       **EVERY_PHASE)
    data = yaml.safe_load(runbook.read_text())
    data["storage"].update(STORAGE)
    runbook.write_text(yaml.safe_dump(data, sort_keys=False))
    expected = {f"{d.flow_name}/{d.name}" for d in deployments(str(runbook))}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving_deployments():  # one serving process at a time on the suite's server (conftest)
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "liftoff.deployments.serve", "--runbook", str(runbook)], cwd="/",
                                    env=os.environ.copy(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + SERVE_TIMEOUT_S
                while True:
                    found = {}
                    for full in expected:
                        try:
                            found[full] = client.read_deployment_by_name(full)
                        except ObjectNotFound:
                            break
                    if len(found) == len(expected):
                        break
                    assert proc.poll() is None, f"liftoff.deployments.serve exited: {log.read_text()[-2000:]}"
                    assert time.monotonic() < deadline, f"deployments never all appeared: {sorted(expected - set(found))}"
                    time.sleep(1)
            yield {"runbook": runbook, "deployments": found, "log": log}
        finally:
            _stop(proc)


def _by_name(served, name: str):
    return next(d for full, d in served["deployments"].items() if full.endswith(f"/{name}"))


def test_every_phase_flow_migrate_rehearsal_and_rollback_is_a_deployment(served):
    from liftoff.phases import all_flows

    names = {full.split("/")[1] for full in served["deployments"]}
    phase_flows = {"migrate-database" if n == "database" else n for n in all_flows()}
    assert names >= phase_flows | {"migrate", "rehearsal", "rollback"}


def test_served_with_a_runbook_only_the_phases_it_configures_are_deployments(stack):
    from liftoff.deployments.serve import deployments

    plain = {d.name for d in deployments(str(_runbook(stack, "deployed_plain")))}
    assert {"prepare", "migrate-database", "verify", "health", "migrate", "rehearsal"} <= plain
    assert not plain & {"backup", "restore-test", "pooler", "cache", "security", "cutover", "rollback", "storage"}
    no_pitr = {k: v for k, v in EVERY_PHASE["backups"].items() if k != "pitr"}
    with_backups = _runbook(stack, "deployed_backups", backups=no_pitr)
    assert {d.name for d in deployments(str(with_backups))} - plain == {"backup", "restore-test", "recover"}
    with_pitr = _runbook(stack, "deployed_pitr", backups=EVERY_PHASE["backups"])
    assert {d.name for d in deployments(str(with_pitr))} - plain == {"backup", "restore-test", "recover", "pitr"}
    # the decommission archives into backups.destination after a kept cutover: it needs both
    assert "decommission" not in {d.name for d in deployments(str(with_backups))}
    both = _runbook(stack, "deployed_decommission", backups=no_pitr, cutover=EVERY_PHASE["cutover"])
    assert {"decommission", "watch", "rollback"} <= {d.name for d in deployments(str(both))}


def test_each_deployment_form_is_runoptions_with_descriptions_prefilled_with_the_runbook(served):
    for full, deployment in served["deployments"].items():
        schema = deployment.parameter_openapi_schema
        # RunOptions, or (backup: the tier; recover: the backup; decommission: the force's reason) a form that adds
        # one field to it
        form = schema["properties"]["options"]["$ref"].removeprefix("#/definitions/")
        assert form in ("RunOptions", "BackupOptions", "RecoverOptions", "PitrOptions", "DecommissionOptions"), full
        fields = schema["definitions"][form]["properties"]
        assert {"runbook", "dry_run"} <= set(fields) and len(fields) <= 4, full
        assert fields["runbook"]["description"].startswith("Path of the runbook file"), full
        assert fields["dry_run"]["default"] is False and "write nothing" in fields["dry_run"]["description"], full
        assert deployment.parameters["options"] == {"runbook": str(served["runbook"])}, full
        assert "liftoff" in deployment.tags and deployment.description.strip(), full
        text = json.dumps(schema).lower()
        assert not any(word in text for word in ("password", "secret", "token")), f"{full}: a secret in the form"


def test_rehearsal_is_scheduled_on_the_runbooks_cron_in_its_time_zone(served):
    rehearsal = _by_name(served, "rehearsal")
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in rehearsal.schedules] == \
        [("30 4 * * 1", "Europe/Berlin", True)]
    assert "rehearsal" in rehearsal.tags
    # pitr runs its full and differential backups on backups.pitr's crons; nothing else has a schedule here
    assert sorted(s.schedule.cron for s in _by_name(served, "pitr").schedules) == ["0 1 * * 0", "0 1 * * 1-6"]
    assert all(not d.schedules for full, d in served["deployments"].items()
               if not full.endswith(("/rehearsal", "/pitr")))


def test_rollback_and_recover_alone_are_marked_as_the_emergency_deployments(served):
    rollback, recover = _by_name(served, "rollback"), _by_name(served, "recover")
    assert rollback.description.startswith("EMERGENCY: press this one when the cutover went wrong")
    assert recover.description.startswith("EMERGENCY: press this one when the database must come back")
    assert "emergency" in rollback.tags and "emergency" in recover.tags
    assert _by_name(served, "decommission").description.startswith("AFTER THE WATCH: archives Supabase")
    assert sorted(full for full, d in served["deployments"].items() if "emergency" in d.tags) == \
        ["recover/recover", "rollback/rollback"]
    # the recovery's form has the backup to restore as a typed field, next to the runbook
    assert set(recover.parameter_openapi_schema["definitions"]["RecoverOptions"]["properties"]) == \
        {"runbook", "dry_run", "backup", "target_time"}


def test_a_bad_rehearsal_schedule_is_one_line_naming_the_field(stack):
    from liftoff.deployments.serve import rehearsal_schedules
    from liftoff.errors import RunbookInvalid

    runbook = stack.write_runbook("bad-cron.yaml", state_dir="state-bad-cron")
    data = yaml.safe_load(runbook.read_text())
    for rehearsal, field in (({"schedule": "every sunday"}, "rehearsal.schedule"),
                             ({"timezone": "Mars/Olympus"}, "rehearsal.timezone")):
        runbook.write_text(yaml.safe_dump({**data, "rehearsal": rehearsal}))
        with pytest.raises(RunbookInvalid) as caught:
            rehearsal_schedules(str(runbook))
        assert f"{runbook}: {field}: expected" in str(caught.value) and "\n" not in str(caught.value)


def _artifact_rows(client, run_id, key: str) -> list[dict]:
    """The table artifact ``key`` published by ``run_id`` or one of its sub-runs, at any depth."""
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, FlowRunFilter, FlowRunFilterParentFlowRunId,
    )

    runs, parents = [run_id], [run_id]
    while parents:
        parents = [r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents)))]
        runs += parents
    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=runs)))
    assert found, f"no artifact {key} from run {run_id} or its sub-runs"
    data = found[0].data
    return json.loads(data) if isinstance(data, str) else data


@pytest.fixture(scope="module")
def runs(served, stack):
    """Two runs started through the API as the UI's Run button does, side by side: `migrate-database` for real and
    `migrate` as a dry run of another runbook; the served process picks both up."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    dry = _runbook(stack, "deployed_dry")
    started = {
        "database": run_deployment("migrate-database/migrate-database", timeout=0,
                                   parameters={"options": {"runbook": str(served["runbook"])}}),
        "migrate": run_deployment("migrate/migrate", timeout=0,
                                  parameters={"options": {"runbook": str(dry), "dry_run": True}}),
    }
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 300
        while True:
            finished = {name: client.read_flow_run(run.id) for name, run in started.items()}
            if all(run.state.is_final() for run in finished.values()):
                return finished
            assert time.monotonic() < deadline, {name: run.state.name for name, run in finished.items()}
            time.sleep(1)


def test_database_deployment_run_from_the_api_migrates_and_publishes_the_gate_table(runs, stack):
    from prefect.client.orchestration import get_client

    from liftoff.reports import artifact_key

    run = runs["database"]
    assert run.state.is_completed(), run.state
    bookings_now = stack.source.execute("SELECT count(*) FROM public.bookings")[0][0]  # no writer runs meanwhile
    assert stack.target.execute("SELECT count(*) FROM public.bookings", dbname="deployed")[0][0] == bookings_now
    with get_client(sync_client=True) as client:
        rows = _artifact_rows(client, run.id, artifact_key("deployed", "verify-tables"))
    bookings = next(r for r in rows if r["table"] == "public.bookings")
    assert bookings["source rows"] == bookings["target rows"] == bookings_now
    assert {r["status"] for r in rows} == {"match"}


def test_migrate_deployment_dry_run_plans_each_phase_and_names_what_the_runbook_leaves_out(runs, stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from liftoff.reports import artifact_key

    run = runs["migrate"]
    assert run.state.is_completed(), run.state
    with get_client(sync_client=True) as client:
        plan = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key("deployed-dry", "migrate-plan")]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        assert plan, "migrate published no plan"
        assert "| storage |" in plan[0].data and "skipped: no storage.source" in plan[0].data
        assert "skipped: no cutover.switch" in plan[0].data
        assert _artifact_rows(client, run.id, artifact_key("deployed-dry", "preflight-checks"))
    assert stack.target.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                                dbname="deployed_dry")[0][0] == 0  # a dry run writes nothing


def test_platform_deployments_run_from_the_api_against_real_pgbouncer_and_redis(served, stack):
    """`pooler`, `cache` and `health` started through the API as the Run button does (parameters: another
    runbook), picked up by the serving process, each against the real server, each gate in the ledger."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from liftoff.ledger import Ledger
    from liftoff_sandbox.pgbouncer import PgBouncerServer
    from liftoff_sandbox.redis import RedisServer
    from liftoff.runbooks.model import load_runbook

    path = fresh_runbook(stack, "platform")
    # No Redis password: the serving process's environment (where {env: ...} secrets resolve) was fixed when
    # it started. PgBouncer logs the stack's postgres in with its SCRAM secret; the same env secret as direct.
    with RedisServer(password=None) as redis_server, \
            PgBouncerServer.in_front_of(stack.target, database="platform") as bouncer:
        data = yaml.safe_load(path.read_text())
        data["target"]["pooled"] = {**data["target"]["direct"], "port": bouncer.port}
        data["target"]["redis"] = {"host": redis_server.host, "port": redis_server.port}
        data["pooler"] = {"config_dir": str(bouncer.root), "listen_addr": bouncer.host,
                          "settings": {"unix_socket_dir": ""}, "gate": {"clients": 20}}
        data["cache"] = {"apply": True}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        options = {"options": {"runbook": str(path)}}
        finished = {}
        with get_client(sync_client=True) as client:
            for name in ("setup-pooler/pooler", "cache/cache", "health/health"):  # health reads the other two
                run = run_deployment(name, parameters=options, timeout=0)
                deadline = time.monotonic() + 120
                while not (state := client.read_flow_run(run.id).state).is_final():
                    assert time.monotonic() < deadline, f"{name} still {state.name}"
                    time.sleep(1)
                finished[name] = state
        with redis_server.client(decode_responses=True) as r:
            assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"  # set by the cache run
    assert {name: state.type.value for name, state in finished.items()} == dict.fromkeys(finished, "COMPLETED")
    ledger = Ledger(load_runbook(path).state_dir)
    for phase in ("pooler", "cache", "health"):
        gate = ledger.latest_gate(phase)
        assert gate is not None and gate.passed, (phase, gate)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_liftoff_serve_starts_a_local_prefect_server_and_stops_everything_on_sigterm(tmp_path):
    import httpx

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "liftoff"), "serve", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        ui = None
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while ui is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "liftoff serve exited before printing the UI address"
            if line.startswith("Prefect UI: "):
                ui = line.split()[2]
            assert time.monotonic() < deadline, "no UI address printed"
        assert ui == f"http://127.0.0.1:{port}/deployments"
        api = f"http://127.0.0.1:{port}/api"
        # The UI served there calls this port's API, not Prefect's default 4200.
        assert httpx.get(f"http://127.0.0.1:{port}/ui-settings").json()["api_url"] == api
        while True:
            names = {d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}).json()}
            if {"migrate-database", "migrate", "rollback"} <= names:
                break
            assert proc.poll() is None and time.monotonic() < deadline, f"deployments not registered: {names}"
            time.sleep(1)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{api}/health")
        assert _processes_mentioning(f"--port {port}") == []
        assert (tmp_path / ".liftoff" / "prefect").is_dir()  # the run history stays for the next start
    finally:
        _stop(proc)
        for leftover in _processes_mentioning(f"--port {port}"):
            os.kill(int(leftover.split(":")[0]), signal.SIGKILL)


def test_each_deployment_that_writes_runs_once_at_a_time_and_cancels_a_second_start(served):
    limits = {full.split("/")[1]: d.global_concurrency_limit for full, d in served["deployments"].items()}
    from liftoff.deployments.serve import READ_ONLY

    for name, limit in limits.items():
        if name in READ_ONLY:
            assert limit is None, name
        else:
            assert limit is not None and limit.limit == 1, name
    strategies = {d.concurrency_options.collision_strategy for full, d in served["deployments"].items()
                  if full.split("/")[1] not in READ_ONLY}
    assert {str(s).rsplit(".", 1)[-1] for s in strategies} == {"CANCEL_NEW"}
