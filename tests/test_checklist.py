"""The pre-cutover checklist against real servers: the stack's PostgreSQL (target.direct, and as the pooled
endpoint), a SeaweedFS target S3 server, a real redis-server with a password, a small health endpoint that
turns unhealthy, an authoritative DNS server with chosen TTLs, and a real ledger with gates recorded fresh,
old and failed."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time

import pytest

from liftoff.ledger import Ledger
from liftoff_sandbox.cdn import CdnStandIn
from liftoff_sandbox.dns import DnsServer
from liftoff_sandbox.health_endpoint import HEALTHY, HealthEndpoint
from liftoff_sandbox.redis import RedisServer
from liftoff_sandbox.s3 import S3Server
from liftoff.runbooks.model import Runbook, forget_resolved_secrets
from liftoff.systems import dns, http_health as health, s3
from liftoff.checks import FAILED, NOT_CHECKED, PASSED, CheckLine
from liftoff.tasks.cutover.checklist import ChecklistReport, run_checklist

RECORD = "app.crm.test"
FILES = "files.crm.test"
UNHEALTHY = {"status": "unhealthy", "timestamp": "2026-11-27T10:00:05Z",
             "checks": {"database": {"status": "up"},
                        "redis": {"status": "down", "error": "connect ECONNREFUSED 127.0.0.1:6379"},
                        "storage": {"status": "up"}}}


@pytest.fixture(scope="module")
def target_s3():
    """The target's S3 server with the runbook's buckets as the storage phase leaves them (runbooks/local.yaml:
    tour-images public, waivers private)."""
    with S3Server() as server:
        client = server.client()
        s3.ensure_bucket(client, "tour-images", True)
        s3.ensure_bucket(client, "waivers", False)
        client.put_object(Bucket="tour-images", Key="tours/porto.jpg", Body=b"\xff\xd8 an image",
                          ContentType="image/jpeg")
        yield server


@pytest.fixture(scope="module")
def cdn(target_s3, record):
    """The CDN in front of the files host: a caching stand-in whose origin is the target S3 server."""
    record.set(FILES, "A", 300, ["127.0.0.1"])
    with CdnStandIn(target_s3.endpoint_url) as server:
        yield server


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def app():
    with HealthEndpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def record():
    with DnsServer({RECORD: ("A", 60, ["203.0.113.10"])}) as server:
        yield server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runbook(stack, tmp_path, monkeypatch, *, full: bool, target_s3=None, redis_server=None, app=None, record=None,
            cdn=None, **cutover) -> Runbook:
    """The stack's runbook with a state dir of the test's own; ``full`` adds PgBouncer (the target itself
    here), Redis, the target S3 server, the app and the DNS record."""
    data = stack.runbook_data()
    data["state_dir"] = str(tmp_path / "state")
    if full:
        data["target"]["pooled"] = dict(data["target"]["direct"])
        monkeypatch.setenv("CHECKLIST_REDIS_PASSWORD", redis_server.password)
        data["target"]["redis"] = {"host": redis_server.host, "port": redis_server.port,
                                   "password": {"env": "CHECKLIST_REDIS_PASSWORD"}}
        monkeypatch.setenv("CHECKLIST_S3_KEY", target_s3.access_key)
        monkeypatch.setenv("CHECKLIST_S3_SECRET", target_s3.secret_key)
        data["storage"]["target"] = {"endpoint_url": target_s3.endpoint_url,
                                     "access_key_id": {"env": "CHECKLIST_S3_KEY"},
                                     "secret_access_key": {"env": "CHECKLIST_S3_SECRET"},
                                     "public_url": f"http://{FILES}:{cdn.port}"}
        data["cdn"] = {"addresses": ["127.0.0.0/8"], "resolver": record.resolver}
        data["cutover"] = {"apps": [{"name": "crm", "health_url": app.health_url}],
                           "checklist": {"dns": {"name": RECORD, "resolver": record.resolver}}}
    for key, value in cutover.items():
        data.setdefault("cutover", {})[key] = value
    return Runbook.model_validate(data)


def gates(rb: Runbook, *phases: str, passed: bool = True) -> Ledger:
    ledger = Ledger(rb.state_dir)
    for phase in phases:
        ledger.record_gate(phase, passed, f"{phase}: all checks matched" if passed else f"{phase}: 2 objects missing",
                           "run-1")
    return ledger


def age_gates(ledger: Ledger, phase: str, hours: float) -> None:
    """Moves a phase's recorded gates back in time, as if they had run ``hours`` ago."""
    with sqlite3.connect(ledger.path) as db:
        db.execute("UPDATE gates SET at = ? WHERE phase = ?", (time.time() - hours * 3600, phase))


def statuses(report: ChecklistReport) -> dict[str, str]:
    return {line.name: line.status for line in report.lines}


# ---------------------------------------------------------------------------------------------------------
# The whole checklist


@pytest.fixture
def everything(stack, tmp_path, monkeypatch, target_s3, redis_server, app, record, cdn):
    rb = runbook(stack, tmp_path, monkeypatch, full=True, target_s3=target_s3, redis_server=redis_server, app=app,
                 record=record, cdn=cdn)
    gates(rb, "database", "storage", "backup", "pooler", "cache", "tuning", "health", "security")
    return rb


def test_every_line_passes_when_the_target_answers_the_gates_are_fresh_the_app_is_green_and_the_ttl_short(
        everything, app):
    report = run_checklist(everything)

    assert statuses(report) == {
        "target PostgreSQL answers": PASSED, "PgBouncer answers": PASSED, "Redis answers": PASSED,
        "target S3 server answers": PASSED, "database gate passed": PASSED, "storage gate passed": PASSED,
        "latest backup restore-tested": PASSED, "pooler gate passed": PASSED, "cache gate passed": PASSED,
        "tuning gate passed": PASSED, "health gate passed": PASSED, "security gate passed": PASSED,
        "test upload to tour-images": PASSED,
        "test upload to waivers": PASSED, "CDN in front of the files": PASSED, "app crm healthy": PASSED,
        "DNS TTL": PASSED,
    }, report.rows()
    assert report.ok and report.failures() == [] and report.not_checked() == []
    assert report.summary() == "checklist passed: 17 of 17 lines passed"
    assert "read back anonymously" in report.line("test upload to tour-images").detail
    assert "refused anonymously" in report.line("test upload to waivers").detail
    assert "PONG" in report.line("Redis answers").detail
    assert "list_buckets answered" in report.line("target S3 server answers").detail
    assert "TTL 60 s <= 300 s (authoritative answer" in report.line("DNS TTL").detail
    assert "203.0.113.10" in report.line("DNS TTL").detail
    assert "checks up: database, redis, storage" in report.line("app crm healthy").detail
    assert app.hits == 1
    md = report.markdown()
    assert md.count("✅ passed") == 17 and "❌" not in md and "🔴" not in md
    assert [row["check"] for row in report.rows()] == [line.name for line in report.lines]


def test_lines_not_configured_are_not_checked_shown_red_and_do_not_fail_the_checklist(stack, tmp_path, monkeypatch):
    rb = runbook(stack, tmp_path, monkeypatch, full=False)
    gates(rb, "database", "storage")  # local.yaml lists buckets: the storage gate counts

    report = run_checklist(rb)

    assert statuses(report) == {
        "target PostgreSQL answers": PASSED, "PgBouncer answers": NOT_CHECKED, "Redis answers": NOT_CHECKED,
        "target S3 server answers": NOT_CHECKED, "database gate passed": PASSED, "storage gate passed": PASSED,
        "latest backup restore-tested": NOT_CHECKED, "pooler gate passed": NOT_CHECKED,
        "cache gate passed": NOT_CHECKED, "tuning gate passed": NOT_CHECKED, "health gate passed": NOT_CHECKED,
        "security gate passed": NOT_CHECKED,
        "CDN in front of the files": NOT_CHECKED, "apps healthy": NOT_CHECKED, "DNS TTL": NOT_CHECKED,
    }, report.rows()
    assert report.ok, report.failures()
    assert report.not_checked() == ["PgBouncer answers", "Redis answers", "target S3 server answers",
                                    "latest backup restore-tested", "pooler gate passed", "cache gate passed",
                                    "tuning gate passed", "health gate passed", "security gate passed",
                                    "CDN in front of the files", "apps healthy", "DNS TTL"]
    assert report.summary().startswith("checklist passed: 3 of 15 lines passed; not checked: PgBouncer answers")
    assert "liftoff run pooler" in report.line("pooler gate passed").fix
    assert "liftoff run tune " in report.line("tuning gate passed").fix
    assert "target.pooled" in report.line("PgBouncer answers").detail
    assert "target.redis" in report.line("Redis answers").detail
    assert "cutover.checklist.dns" in report.line("DNS TTL").detail
    assert "backup phase has not run" in report.line("latest backup restore-tested").detail
    md = report.markdown()
    assert md.count("🔴 not checked") == 12 and md.count("✅ passed") == 3
    assert "not checked** by a machine" in md


def test_an_unreachable_pgbouncer_fails_its_line_naming_host_and_port_and_every_other_line_still_runs(
        everything, monkeypatch):
    port = _free_port()
    pooled = everything.target.pooled.model_copy(update={"port": port})
    rb = everything.model_copy(update={"target": everything.target.model_copy(update={"pooled": pooled})})

    report = run_checklist(rb)

    line = report.line("PgBouncer answers")
    assert line.status == FAILED
    assert f"target.pooled (127.0.0.1:{port})" in line.detail and "cannot reach" in line.detail
    assert "target.pooled" in line.fix
    assert not report.ok and report.failures() == [f"PgBouncer answers: {line.detail}"]
    assert line.blocked and report.differences_found() == [] and len(report.blockers()) == 1  # exit 2, not 3
    assert [name for name, s in statuses(report).items() if s != PASSED] == ["PgBouncer answers"]
    assert report.summary().startswith("checklist failed: 1 of 17 lines failed (PgBouncer answers)")
    assert "❌ failed | PgBouncer answers" in report.markdown()


def test_a_stopped_redis_and_a_wrong_redis_password_fail_its_line_without_the_secret(everything, monkeypatch,
                                                                                     redis_server):
    monkeypatch.setenv("CHECKLIST_REDIS_PASSWORD", "wrong-" + redis_server.password)
    refused = run_checklist(everything).line("Redis answers")
    assert refused.status == FAILED
    assert f"target.redis ({redis_server.host}:{redis_server.port})" in refused.detail
    assert "refused the login" in refused.detail and "env:CHECKLIST_REDIS_PASSWORD" in refused.detail
    assert redis_server.password not in refused.detail + refused.fix

    forget_resolved_secrets()
    monkeypatch.setenv("CHECKLIST_REDIS_PASSWORD", redis_server.password)
    port = _free_port()
    elsewhere = everything.target.redis.model_copy(update={"port": port})
    rb = everything.model_copy(update={"target": everything.target.model_copy(update={"redis": elsewhere})})
    down = run_checklist(rb)
    line = down.line("Redis answers")
    assert line.status == FAILED and f"127.0.0.1:{port}" in line.detail and "cannot reach Redis" in line.detail
    assert redis_server.password not in down.markdown()


def test_a_wrong_s3_secret_fails_the_s3_line_naming_the_endpoint_and_the_key_id(everything, monkeypatch, target_s3):
    monkeypatch.setenv("CHECKLIST_S3_SECRET", "wrong" + target_s3.secret_key)
    report = run_checklist(everything)
    line = report.line("target S3 server answers")
    assert line.status == FAILED, line
    assert target_s3.endpoint_url in line.detail and target_s3.access_key in line.detail
    assert "SignatureDoesNotMatch" in line.detail
    assert target_s3.secret_key not in report.markdown()


# ---------------------------------------------------------------------------------------------------------
# The gates in the ledger


def test_a_gate_that_never_ran_fails_with_the_command_that_runs_it(everything):
    with sqlite3.connect(Ledger(everything.state_dir).path) as db:
        db.execute("DELETE FROM gates WHERE phase IN ('database', 'storage')")

    report = run_checklist(everything)

    database, storage = report.line("database gate passed"), report.line("storage gate passed")
    assert database.status == storage.status == FAILED
    assert database.detail == f"no database gate has run for runbook {everything.name}"
    assert database.fix == "run liftoff run database --runbook FILE"
    assert storage.fix == "run liftoff run storage --runbook FILE"


def test_a_gate_older_than_the_runbook_allows_fails_naming_its_age_and_the_limit(everything):
    age_gates(Ledger(everything.state_dir), "database", hours=30)

    report = run_checklist(everything)

    line = report.line("database gate passed")
    assert line.status == FAILED
    assert "passed 30.0 h ago (flow run run-1), older than cutover.checklist.max_gate_age_hours (24 h)" in line.detail
    assert line.fix == "run liftoff run verify --runbook FILE for a fresh gate"
    assert report.line("storage gate passed").status == PASSED

    looser = everything.model_copy(update={"cutover": everything.cutover.model_copy(update={
        "checklist": everything.cutover.checklist.model_copy(update={"max_gate_age_hours": 48})})})
    assert run_checklist(looser).line("database gate passed").status == PASSED


def test_the_latest_gate_counts_so_a_failed_gate_after_a_passed_one_fails_the_line(everything):
    gates(everything, "storage", passed=False)

    line = run_checklist(everything).line("storage gate passed")

    assert line.status == FAILED
    assert "the latest storage gate failed 0 min ago (flow run run-1): storage: 2 objects missing" in line.detail
    assert line.fix.startswith("fix what the gate reports, then run liftoff run verify-storage --runbook FILE; "
                               "after a failed cutover, liftoff run resync")


def test_a_backup_whose_restore_test_failed_or_is_old_fails_and_one_never_tested_is_not_checked(everything):
    assert run_checklist(everything).line("latest backup restore-tested").status == PASSED

    age_gates(Ledger(everything.state_dir), "backup", hours=25)
    assert run_checklist(everything).line("latest backup restore-tested").status == FAILED

    gates(everything, "backup", passed=False)
    line = run_checklist(everything).line("latest backup restore-tested")
    assert line.status == FAILED and "backup: 2 objects missing" in line.detail

    with sqlite3.connect(Ledger(everything.state_dir).path) as db:
        db.execute("DELETE FROM gates WHERE phase = 'backup'")
    line = run_checklist(everything).line("latest backup restore-tested")
    assert line.status == NOT_CHECKED and "restore the latest backup" in line.fix


# ---------------------------------------------------------------------------------------------------------
# The app's health and the record's TTL


def test_a_failed_pooler_gate_and_a_stale_security_gate_fail_their_lines_with_the_command_to_rerun(everything):
    ledger = gates(everything, "pooler", passed=False)
    age_gates(ledger, "security", 100)

    report = run_checklist(everything)

    assert statuses(report)["pooler gate passed"] == FAILED
    assert statuses(report)["security gate passed"] == FAILED
    assert statuses(report)["cache gate passed"] == PASSED
    assert "pooler: 2 objects missing" in report.line("pooler gate passed").detail
    assert "liftoff run pooler" in report.line("pooler gate passed").fix
    assert "older than cutover.checklist.max_gate_age_hours" in report.line("security gate passed").detail
    assert not report.ok


def test_an_app_that_turns_unhealthy_fails_its_line_naming_the_checks_that_are_down(everything, app):
    assert run_checklist(everything).line("app crm healthy").status == PASSED

    app.answer = (503, UNHEALTHY)
    report = run_checklist(everything)

    line = report.line("app crm healthy")
    assert line.status == FAILED
    assert line.detail == (f"{app.health_url}: HTTP 503; status 'unhealthy'; checks not up: "
                           "redis (down: connect ECONNREFUSED 127.0.0.1:6379)")
    assert report.failures() == [f"app crm healthy: {line.detail}"]


def test_a_ttl_above_the_maximum_fails_and_says_how_long_to_wait_after_lowering_it(everything, record):
    record.set(RECORD, "A", 3600, ["203.0.113.10"])
    try:
        line = run_checklist(everything).line("DNS TTL")
    finally:
        record.set(RECORD, "A", 60, ["203.0.113.10"])

    assert line.status == FAILED
    assert f"{RECORD}: TTL 3600 s is above cutover.checklist.dns.max_ttl 300 s" in line.detail
    assert "wait 3600 s" in line.fix


def test_a_dns_name_that_does_not_exist_fails_its_line_naming_the_resolver(everything, record):
    dns_check = everything.cutover.checklist.dns.model_copy(update={"name": "missing.crm.test"})
    rb = everything.model_copy(update={"cutover": everything.cutover.model_copy(update={
        "checklist": everything.cutover.checklist.model_copy(update={"dns": dns_check})})})

    line = run_checklist(rb).line("DNS TTL")

    assert line.status == FAILED
    assert line.detail == (f"DNS missing.crm.test: no such name (NXDOMAIN) at resolver {record.resolver}; "
                           "check the record's name")


# ---------------------------------------------------------------------------------------------------------
# The building blocks: health and DNS


def test_health_is_green_only_for_200_status_healthy_and_every_check_up(app):
    assert health.check_health(app.health_url).healthy

    for answer, why in [
        ((200, {**HEALTHY, "status": "degraded"}), "status 'degraded'"),
        ((200, {**HEALTHY, "checks": {**HEALTHY["checks"], "storage": {"status": "down"}}}),
         "checks not up: storage (down)"),
        ((500, HEALTHY), "HTTP 500"),
        ((200, b"<html>ok</html>"), "the body is not JSON"),
        ((200, [1, 2]), "not a JSON object"),
    ]:
        app.answer = answer
        result = health.check_health(app.health_url)
        assert not result.healthy and why in result.detail, (answer, result)
        assert result.status_code == answer[0]


def test_health_of_an_endpoint_nobody_serves_is_not_healthy_and_says_it_cannot_reach_it():
    url = f"http://127.0.0.1:{_free_port()}/api/health"
    result = health.check_health(url, timeout=2)
    assert not result.healthy and result.status_code is None
    assert result.detail.startswith(f"{url}: cannot reach it (") and "refused" in result.detail.lower()


def test_wait_healthy_returns_once_the_app_turns_healthy_and_gives_up_with_the_last_reason(app):
    app.answer = (503, UNHEALTHY)
    timer = threading.Timer(1.0, lambda: setattr(app, "answer", (200, HEALTHY)))
    timer.start()
    started = time.monotonic()
    result = health.wait_healthy(app.health_url, timeout_s=20, interval_s=0.2)
    assert result.healthy and 0.9 < time.monotonic() - started < 5

    app.answer = (503, UNHEALTHY)
    started = time.monotonic()
    result = health.wait_healthy(app.health_url, timeout_s=1.5, interval_s=0.2)
    assert not result.healthy and "redis (down" in result.detail
    assert 1.4 < time.monotonic() - started < 4 and app.hits > 5


def test_record_ttl_reads_the_authoritative_ttl_and_the_answers(record):
    assert dns.record_ttl(RECORD, record.resolver) == (60, ["203.0.113.10"])
    found = dns.lookup(RECORD, record.resolver)
    assert found.authoritative and found.resolver == f"resolver {record.resolver}"


def test_record_ttl_errors_are_one_line_naming_the_resolver():
    with DnsServer(silent=True) as mute:
        resolver = mute.resolver
        with pytest.raises(Exception) as timed_out:
            dns.record_ttl(RECORD, resolver, timeout=1)
        assert mute.queries >= 1
    assert str(timed_out.value) == (f"DNS resolver {resolver} did not answer for {RECORD} A within 1 s; check the "
                                    "resolver's address and that it is reachable")
    assert type(timed_out.value).__name__ == "ConnectionRefused"

    with pytest.raises(Exception, match=r"DNS resolver 'dns\.example': expected an IP address"):
        dns.record_ttl(RECORD, "dns.example")


def test_a_report_fails_only_on_failed_lines_and_its_markdown_keeps_each_line_in_its_table_row():
    report = ChecklistReport([CheckLine("a", PASSED, "fine"), CheckLine("b", NOT_CHECKED, "not configured", "add b"),
                              CheckLine("c | d", FAILED, "x | y", "fix it")])
    assert not report.ok and report.failures() == ["c | d: x | y"]
    assert "| ❌ failed | c \\| d | x \\| y | fix it |" in report.markdown()
    assert report.rows()[1] == {"check": "b", "status": NOT_CHECKED, "detail": "not configured", "fix": "add b"}


def test_a_test_upload_fails_its_bucket_line_when_the_access_rule_is_wrong_and_leaves_no_probe(everything, target_s3):
    """waivers made public by mistake: its probe object is readable anonymously, which the line says."""
    client = target_s3.client()
    s3.ensure_bucket(client, "waivers", True)
    try:
        line = run_checklist(everything).line("test upload to waivers")
    finally:
        s3.ensure_bucket(client, "waivers", False)
    assert line.status == FAILED and "is private but an anonymous GET" in line.detail
    assert "storage.buckets" in line.fix
    assert client.list_objects_v2(Bucket="waivers").get("KeyCount", 0) == 0  # the probe was deleted, no folder left


def test_test_uploads_leave_nothing_in_the_buckets(everything, target_s3):
    """The storage gate counts every key of a bucket: a probe (or a folder marker some servers keep after a
    key with a slash is deleted) would fail it at the cutover's final sync."""
    client = target_s3.client()

    def listing() -> dict:  # as the gate lists: folder by folder
        return {b: client.list_objects_v2(Bucket=b, Delimiter="/") for b in ("tour-images", "waivers")}

    def keys(found: dict) -> dict:
        return {b: ([o["Key"] for o in r.get("Contents", [])], [p["Prefix"] for p in r.get("CommonPrefixes", [])])
                for b, r in found.items()}

    before = keys(listing())
    run_checklist(everything)
    assert keys(listing()) == before
