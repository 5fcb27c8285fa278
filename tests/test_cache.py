"""The cache phase against a real redis-server (Debian's, on a free loopback port, from a config file, with a
password): the plan's settings checked, set when the runbook allows it, kept through a restart; a Redis
without appendonly fails with the command that fixes it; a stopped Redis fails; the CLI run and its gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from liftoff.flows.cache import setup_cache
from liftoff.flows.options import RunOptions
from liftoff.errors import ConnectionRefused, GateFailed
from liftoff.ledger import Ledger
from liftoff_sandbox.redis import RedisServer
from liftoff.runbooks.model import Cache, Runbook, redis_memory_bytes
from liftoff.checks import FAILED, NOT_CHECKED, PASSED
from liftoff.systems.redis_cache import ROUND_TRIP_PREFIX, check_cache, read_cache_settings

PASSWORD_ENV = "LIFTOFF_TEST_CACHE_REDIS_PASSWORD"
PLAN = {"appendonly": "yes", "maxmemory": str(512 * 1024 * 1024), "maxmemory-policy": "allkeys-lru"}


@pytest.fixture
def redis_server(monkeypatch):
    """A Redis as Debian ships it: no AOF, no memory limit, noeviction."""
    with RedisServer() as server:
        monkeypatch.setenv(PASSWORD_ENV, server.password)
        yield server


def write_runbook(tmp_path, server: RedisServer, cache: dict | None = None) -> str:
    """A runbook whose PostgreSQL endpoints are never contacted by the cache phase."""
    pg = {"host": "127.0.0.1", "port": 1, "user": "postgres", "password": {"env": "UNUSED_PG_PASSWORD"}}
    data = {"name": "cache-test", "state_dir": str(tmp_path / "state"), "source": pg,
            "target": {"direct": pg, "redis": {"host": server.host, "port": server.port,
                                               "password": {"env": PASSWORD_ENV}}}}
    if cache is not None:
        data["cache"] = cache
    path = tmp_path / "runbook.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def runtime_settings(server: RedisServer) -> dict[str, str]:
    with server.client(decode_responses=True) as client:
        return {name: client.config_get(name)[name] for name in PLAN}


def test_redis_memory_units_follow_redis_conf():
    assert redis_memory_bytes("512mb") == 536870912 and redis_memory_bytes("512m") == 512_000_000
    assert redis_memory_bytes("1GB") == 1024 ** 3 and redis_memory_bytes("0") == 0
    with pytest.raises(ValueError):
        redis_memory_bytes("512 megabytes")
    assert Cache().wanted() == {"appendonly": "yes", "maxmemory": "512mb", "maxmemory-policy": "allkeys-lru"}


def test_apply_sets_the_plan_and_a_restart_keeps_settings_and_data(tmp_path, redis_server):
    runbook = write_runbook(tmp_path, redis_server, {"apply": True})
    assert runtime_settings(redis_server)["appendonly"] == "no"

    result = setup_cache(RunOptions(runbook=runbook))

    assert set(result["changed"]) == {"appendonly", "maxmemory", "maxmemory-policy"}
    assert runtime_settings(redis_server) == PLAN
    conf = (redis_server.root / "redis.conf").read_text().splitlines()
    assert {"appendonly yes", "maxmemory 512mb", "maxmemory-policy allkeys-lru"} <= set(conf), conf
    gate = Ledger(tmp_path / "state").latest_gate("cache")
    assert gate.passed and gate.summary.startswith("cache gate passed"), gate
    assert Ledger(tmp_path / "state").step_status("cache.config") == "done"
    with redis_server.client(decode_responses=True) as client:
        assert client.keys(f"{ROUND_TRIP_PREFIX}*") == []  # the round trip's key was deleted
        client.set("booking:42", "confirmed")

    redis_server.restart()

    with redis_server.client(decode_responses=True) as client:
        assert client.get("booking:42") == "confirmed"  # the AOF kept it
    assert runtime_settings(redis_server) == PLAN  # redis.conf kept them
    # A second run finds everything as wanted and changes nothing.
    assert setup_cache(RunOptions(runbook=runbook))["changed"] == {}


def test_redis_without_appendonly_fails_with_the_command_that_fixes_it(tmp_path, redis_server):
    runbook = write_runbook(tmp_path, redis_server)  # no cache section: the plan's defaults, check only

    with pytest.raises(GateFailed, match="appendonly yes: CONFIG GET appendonly: no"):
        setup_cache(RunOptions(runbook=runbook))

    rb = Runbook.model_validate(yaml.safe_load(Path(runbook).read_text()))
    report = check_cache(rb)
    assert {line.name: line.status for line in report.lines} == {
        "Redis answers": PASSED, "appendonly yes": FAILED, "maxmemory 512mb": FAILED,
        "maxmemory-policy allkeys-lru": FAILED, "write/read round trip": PASSED}
    cli = f"redis-cli -h 127.0.0.1 -p {redis_server.port}"
    fix = report.line("appendonly yes").fix
    assert f"`{cli} CONFIG SET appendonly yes && {cli} CONFIG REWRITE`" in fix, fix
    assert f"`appendonly yes` in {redis_server.root / 'redis.conf'}" in fix and "REDISCLI_AUTH" in fix
    assert "CONFIG SET maxmemory-policy allkeys-lru" in report.line("maxmemory-policy allkeys-lru").fix
    assert "0 (no limit)" in report.line("maxmemory 512mb").detail
    assert redis_server.password not in str(report.rows())
    # Nothing was changed (cache.apply is false), and the gate's failure is on record.
    assert runtime_settings(redis_server)["appendonly"] == "no"
    gate = Ledger(tmp_path / "state").latest_gate("cache")
    assert not gate.passed and "appendonly yes" in gate.summary
    assert Ledger(tmp_path / "state").step_status("verify-cache") == "failed"


def test_dry_run_reports_what_it_would_set_and_writes_nothing(tmp_path, redis_server):
    runbook = write_runbook(tmp_path, redis_server, {"apply": True, "maxmemory": "256mb"})

    result = setup_cache(RunOptions(runbook=runbook, dry_run=True))

    assert result == {"dry_run": True, "differ": ["appendonly", "maxmemory", "maxmemory-policy"], "apply": True}
    assert runtime_settings(redis_server)["appendonly"] == "no"
    assert runtime_settings(redis_server)["maxmemory"] == "0"
    assert not (tmp_path / "state").exists()  # not even a ledger


def test_a_stopped_redis_fails_the_gate_naming_target_redis(tmp_path, redis_server):
    runbook = write_runbook(tmp_path, redis_server)
    rb = Runbook.model_validate(yaml.safe_load(Path(runbook).read_text()))
    redis_server.stop(remove=False)

    report = check_cache(rb)

    assert not report.ok
    assert report.line("Redis answers").status == FAILED
    assert f"target.redis ({redis_server.host}:{redis_server.port})" in report.line("Redis answers").detail
    assert report.line("write/read round trip").status == NOT_CHECKED
    with pytest.raises(ConnectionRefused, match="target.redis"):
        read_cache_settings(rb)


def test_cli_run_cache_applies_and_records_the_gate(tmp_path, redis_server):
    from helpers import run_cli

    runbook = write_runbook(tmp_path, redis_server, {"apply": True, "maxmemory": "64mb"})

    done = run_cli("run", "cache", "--runbook", runbook, env={PASSWORD_ENV: redis_server.password}, timeout=120)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Cache gate PASSED" in done.stdout and "cache: done" in done.stdout
    assert runtime_settings(redis_server)["maxmemory"] == str(64 * 1024 * 1024)
    gate = Ledger(tmp_path / "state").latest_gate("cache")
    assert gate.passed and gate.flow_run_id
    assert redis_server.password not in done.stdout + done.stderr
