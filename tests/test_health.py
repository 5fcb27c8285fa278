"""The health phase against real servers: the stack's PostgreSQL (also standing in for target.pooled: the
PgBouncer row here proves the pooled path and its failure, the real PgBouncer is the pooler phase's), a real
redis-server, a SeaweedFS S3 server (MinIO's server is not installable here, so the MinIO row reads "answers,
but not MinIO's probe"), a small app whose /api/health the test sets, and a real sshd whose `df` and `ss` are
the machine's own, with a 4 MiB tmpfs filled past the thresholds."""

from __future__ import annotations

import subprocess

import psycopg
import pytest
import yaml

from liftoff.flows.health import check_health
from liftoff.flows.options import RunOptions
from liftoff.errors import ChecksBlocked, GateFailed
from liftoff.ledger import Ledger
from liftoff_sandbox.health_endpoint import HealthEndpoint
from liftoff_sandbox.postgres import free_port
from liftoff_sandbox.redis import RedisServer
from liftoff_sandbox.s3 import S3Server
from liftoff_sandbox.ssh import SshServer
from liftoff.runbooks.model import Runbook
from liftoff.tasks.health.monitoring import CRITICAL, NOT_CONFIGURED, OK, WARN, check_platform_health
from liftoff.systems.vps import parse_df
from liftoff.systems.ss import parse_ss

KEY_ENV = "LIFTOFF_TEST_HEALTH_SSH_KEY"
REDIS_ENV = "LIFTOFF_TEST_HEALTH_REDIS_PASSWORD"
S3_KEY_ENV, S3_SECRET_ENV = "LIFTOFF_TEST_HEALTH_S3_KEY", "LIFTOFF_TEST_HEALTH_S3_SECRET"
UNHEALTHY = {"status": "unhealthy", "timestamp": "2026-11-27T10:00:05Z",
             "checks": {"database": {"status": "up"},
                        "redis": {"status": "down", "error": "connect ECONNREFUSED 127.0.0.1:6379"}}}
DISK_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def vps(module_env):
    with SshServer() as server:
        module_env.setenv(KEY_ENV, server.client_key_text)
        yield server


@pytest.fixture(scope="module")
def redis_server(module_env):
    with RedisServer() as server:
        module_env.setenv(REDIS_ENV, server.password)
        yield server


@pytest.fixture(scope="module")
def s3_server(module_env):
    with S3Server() as server:
        module_env.setenv(S3_KEY_ENV, server.access_key)
        module_env.setenv(S3_SECRET_ENV, server.secret_key)
        yield server


@pytest.fixture
def app():
    with HealthEndpoint() as service:
        yield service


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A 4 MiB tmpfs: `df` over SSH reads its real use as the test fills it."""
    path = tmp_path_factory.mktemp("small-disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], check=False,
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def fill(small_disk):
    """fill(fraction): a file taking that share of the small disk; removed after the test."""
    made = []

    def to(fraction: float):
        path = small_disk / f"fill{len(made)}"
        path.write_bytes(b"\0" * int(DISK_BYTES * fraction))
        made.append(path)

    yield to
    for path in made:
        path.unlink()


def runbook_data(stack, tmp_path, *, vps=None, redis_server=None, s3_server=None, app=None, disk=None,
                 redis_env=REDIS_ENV, **health) -> dict:
    data = stack.runbook_data(state_dir=str(tmp_path / "state"))
    data["name"] = "health-test"
    data["target"]["pooled"] = dict(data["target"]["direct"])  # PostgreSQL itself, reached as through PgBouncer
    if redis_server:
        data["target"]["redis"] = {"host": redis_server.host, "port": redis_server.port,
                                   "password": {"env": redis_env}}
    if s3_server:
        data["storage"]["target"] = {"endpoint_url": s3_server.endpoint_url, "access_key_id": {"env": S3_KEY_ENV},
                                     "secret_access_key": {"env": S3_SECRET_ENV},
                                     "public_url": "http://files.localhost"}
    if app:
        data["cutover"] = {"apps": [{"name": "crm", "health_url": f"{app.url}/api/health"}]}
    if vps:
        data["ssh"] = {"host": vps.host, "port": vps.port, "user": vps.user, "private_key": {"env": KEY_ENV},
                       "known_hosts": str(vps.known_hosts_path)}
    data["health"] = {"disk_paths": [str(disk)] if disk else ["/"], **health}
    return data


def write(tmp_path, data: dict) -> str:
    path = tmp_path / "runbook.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture
def everything(stack, tmp_path, vps, redis_server, s3_server, app, small_disk):
    return runbook_data(stack, tmp_path, vps=vps, redis_server=redis_server, s3_server=s3_server, app=app,
                        disk=small_disk)


def statuses(report) -> dict[str, str]:
    return {line.service: line.status for line in report.lines}


# ---------------------------------------------------------------------------------------------------------


def test_every_service_answering_passes_with_a_status_row_each_and_writes_the_uptime_kuma_list(
        everything, tmp_path, small_disk, s3_server, redis_server, app, vps):
    result = check_health(RunOptions(runbook=write(tmp_path, everything)))

    rb = Runbook.model_validate(everything)
    report = check_platform_health(rb)
    assert statuses(report) == {"PostgreSQL": OK, "PgBouncer": OK, "Redis": OK, "MinIO": WARN, "app crm": OK,
                                f"disk {small_disk}": OK, "PostgreSQL connections": OK}, report.rows()
    assert "SELECT 1 answered" in report.line("PostgreSQL").detail
    assert "not MinIO" in report.line("MinIO").detail  # SeaweedFS answers 403 on /minio/health/live
    assert f"{small_disk} (tmpfs on {small_disk}) 0.0% used" in report.line(f"disk {small_disk}").detail
    assert "4.0 MiB" in report.line(f"disk {small_disk}").detail
    assert "established connections to port" in report.line("PostgreSQL connections").detail
    assert result["warnings"] == report.warnings() and result["summary"].startswith("health passed: 6 of 7")
    gate = Ledger(tmp_path / "state").latest_gate("health")
    assert gate.passed and gate.summary.startswith("health passed"), gate

    export = (tmp_path / "state" / "uptime-kuma-monitors.yaml").read_text()
    monitors = {m["name"]: m for m in yaml.safe_load(export)["monitors"]}
    assert set(monitors) == {"health-test PostgreSQL", "health-test PgBouncer", "health-test Redis",
                             "health-test MinIO", "health-test app crm"}
    assert monitors["health-test Redis"] == {
        "name": "health-test Redis", "type": "port", "hostname": redis_server.host, "port": redis_server.port,
        "interval": 60, "retryInterval": 60, "maxretries": 3, "description": "Redis accepts TCP connections"}
    assert monitors["health-test app crm"]["type"] == "http"
    assert monitors["health-test app crm"]["url"] == f"{app.url}/api/health"
    assert monitors["health-test app crm"]["accepted_statuscodes"] == ["200-299"]
    assert monitors["health-test MinIO"]["url"] == f"{s3_server.endpoint_url}/minio/health/live"
    for secret in (redis_server.password, s3_server.secret_key, vps.client_key_text.splitlines()[1]):
        assert secret not in export


def test_a_stopped_redis_and_a_closed_pgbouncer_port_are_critical_and_fail_the_flow_with_exit_2(
        stack, tmp_path, vps, small_disk, monkeypatch):
    stopped = RedisServer().start()
    monkeypatch.setenv(f"{REDIS_ENV}_STOPPED", stopped.password)
    stopped.stop()
    data = runbook_data(stack, tmp_path, vps=vps, redis_server=stopped, disk=small_disk,
                        redis_env=f"{REDIS_ENV}_STOPPED")
    data["target"]["pooled"]["port"] = free_port()

    with pytest.raises(ChecksBlocked) as err:  # a host to start or correct: the operator's, exit 2
        check_health(RunOptions(runbook=write(tmp_path, data)))

    assert err.value.exit_code == 2
    assert "Redis: target.redis" in str(err.value) and "PgBouncer: target.pooled" in str(err.value)
    report = check_platform_health(Runbook.model_validate(data))
    assert statuses(report) == {"PostgreSQL": OK, "PgBouncer": CRITICAL, "Redis": CRITICAL, "MinIO": NOT_CONFIGURED,
                                "apps": NOT_CONFIGURED, f"disk {small_disk}": OK, "PostgreSQL connections": OK}
    assert "TCP connect failed (Connection refused)" in report.line("PgBouncer").detail
    assert "start Redis" in report.line("Redis").fix
    assert report.line("PgBouncer").blocked and report.line("Redis").blocked
    # nothing was found wrong, only not reachable: no failed gate for the cutover's checklist to read
    assert Ledger(tmp_path / "state").latest_gate("health") is None
    assert Ledger(tmp_path / "state").step_status("health") == "failed"


def test_disk_over_the_warn_threshold_warns_and_over_the_critical_one_fails(stack, tmp_path, vps, small_disk, fill):
    data = runbook_data(stack, tmp_path, vps=vps, disk=small_disk)
    runbook = write(tmp_path, data)
    line = f"disk {small_disk}"

    fill(0.75)
    result = check_health(RunOptions(runbook=runbook))  # a warning does not fail the flow
    assert [w for w in result["warnings"] if w.startswith(line)], result
    warn = check_platform_health(Runbook.model_validate(data)).line(line)
    assert warn.status == WARN and "warn at 70%, critical at 85%" in warn.detail

    fill(0.15)  # 90 % used
    with pytest.raises(GateFailed, match=f"{line}: .* 9[0-9]\\.[0-9]% used"):
        check_health(RunOptions(runbook=runbook))
    critical = check_platform_health(Runbook.model_validate(data)).line(line)
    assert critical.status == CRITICAL and "free space on" in critical.fix
    assert not Ledger(tmp_path / "state").latest_gate("health").passed


def test_connections_to_postgresql_over_the_threshold_are_critical(stack, tmp_path, vps, small_disk):
    held = [psycopg.connect(stack.target.conninfo()) for _ in range(6)]
    try:
        data = runbook_data(stack, tmp_path, vps=vps, disk=small_disk, connections_warn=2, connections_critical=6)
        report = check_platform_health(Runbook.model_validate(data))
    finally:
        for conn in held:
            conn.close()
    line = report.line("PostgreSQL connections")
    assert line.status == CRITICAL and not report.ok, line
    counted = int(line.detail.split(": ", 1)[1].split()[0])
    assert counted >= 6 and f"to port {stack.target.port}" in line.detail
    assert "PgBouncer" in line.fix


def test_an_app_answering_unhealthy_is_critical_naming_its_failing_check(stack, tmp_path, app):
    app.answer = (503, UNHEALTHY)
    report = check_platform_health(Runbook.model_validate(runbook_data(stack, tmp_path, app=app)))

    line = report.line("app crm")
    assert line.status == CRITICAL and not report.ok
    assert "HTTP 503" in line.detail and "redis (down: connect ECONNREFUSED" in line.detail
    assert report.failures() == [f"app crm: {line.detail}"]


def test_services_the_runbook_does_not_name_are_not_configured_and_do_not_fail(stack, tmp_path):
    data = runbook_data(stack, tmp_path)
    del data["target"]["pooled"]
    report = check_platform_health(Runbook.model_validate(data))

    assert statuses(report) == {"PostgreSQL": OK, "PgBouncer": NOT_CONFIGURED, "Redis": NOT_CONFIGURED,
                                "MinIO": NOT_CONFIGURED, "apps": NOT_CONFIGURED, "disk /": NOT_CONFIGURED,
                                "PostgreSQL connections": NOT_CONFIGURED}
    assert report.ok and report.summary().startswith("health passed: 1 of 7 checks ok; not configured: PgBouncer")


def test_a_vps_that_does_not_answer_ssh_makes_its_checks_critical(stack, tmp_path, vps):
    data = runbook_data(stack, tmp_path, vps=vps)
    data["ssh"]["port"] = free_port()
    report = check_platform_health(Runbook.model_validate(data))

    for service in ("disk /", "PostgreSQL connections"):
        line = report.line(service)
        assert line.status == CRITICAL and "ssh: cannot connect to 127.0.0.1" in line.detail, line
        assert "sshd runs on the VPS" in line.fix
    assert report.line("PostgreSQL").status == OK and not report.ok


def test_dry_run_checks_nothing_and_writes_nothing(stack, tmp_path):
    data = runbook_data(stack, tmp_path)
    data["target"]["redis"] = {"host": "127.0.0.1", "port": free_port()}  # down: a dry run does not look

    assert check_health(RunOptions(runbook=write(tmp_path, data), dry_run=True)) == {"dry_run": True, "monitors": 3}
    assert not (tmp_path / "state").exists()


def test_df_and_ss_output_is_parsed_with_spaces_and_ipv6():
    df = ("Filesystem 1-blocks Used Available Capacity Mounted on\n"
          "/dev/mapper/vg-data disk 107374182400 96636764160 5368709120 95% /srv/my data\n")
    usage = parse_df(df, "/srv/my data")
    assert (usage.filesystem, usage.mount, usage.used_bytes) == ("/dev/mapper/vg-data disk", "/srv/my data",
                                                                 96636764160)
    assert round(usage.percent, 1) == 94.7
    ss = ("State  Recv-Q Send-Q      Local Address:Port        Peer Address:Port Process\n"
          "LISTEN 0      244             0.0.0.0:5432             0.0.0.0:*\n"
          "ESTAB  0      0            10.0.0.5:5432            10.0.0.9:51234\n"
          "ESTAB  0      0     [::ffff:10.0.0.5]:5432    [::ffff:10.0.0.7]:40000\n"
          "ESTAB  0      0                 [::1]:6432                [::1]:5432\n"
          "TIME-WAIT 0   0            10.0.0.5:5432            10.0.0.9:51230\n"
          "ESTAB  0      36           10.0.0.5:22             203.0.113.4:60000\n")
    counts = parse_ss(ss, 5432)
    assert (counts.established_to_port, counts.established_total) == (2, 4)


def test_cli_run_health_exits_zero_and_records_the_gate_then_three_on_a_critical(everything, tmp_path, app):
    from helpers import run_cli

    runbook = write(tmp_path, everything)

    done = run_cli("run", "health", "--runbook", runbook, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Health PASSED" in done.stdout and "health: done" in done.stdout
    first = Ledger(tmp_path / "state").latest_gate("health")
    assert first.passed and first.flow_run_id

    app.answer = (503, UNHEALTHY)
    failed = run_cli("run", "health", "--runbook", runbook, timeout=120)
    assert failed.returncode == 3, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "Health FAILED" in failed.stdout and "app crm" in failed.stderr
    assert not Ledger(tmp_path / "state").latest_gate("health").passed
