"""The tuning phase against a dedicated PostgreSQL 16 cluster (ALTER SYSTEM changes a server for good: the shared
ones are left alone), started as a packaged server is (its settings in postgresql.conf, where ALTER SYSTEM can
override them): the plan's settings checked in their units, set with a reload, the restart-needed ones named
until a restart, then the gate passes; a role that may not ALTER SYSTEM gets one line saying what to grant."""

from __future__ import annotations

import pytest
import yaml

from helpers import ROOT

from liftoff.checks import FAILED, PASSED
from liftoff.errors import GateFailed, StepFailed
from liftoff.flows.options import RunOptions
from liftoff.flows.tune import tune_postgres
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff.runbooks.model import Tuning, load_runbook, pg_memory_bytes
from liftoff.systems.pg_tuning import RESTART_LINE, check_tuning, readable, unit_bytes
from liftoff_sandbox.postgres import PostgresServer, pg16_bin_dir

PASSWORD_ENV = "LIFTOFF_TEST_TUNING_PG_PASSWORD"
PLAN = Tuning().wanted()
RESTART_NEEDED = ["max_connections", "shared_buffers", "wal_buffers"]  # postmaster context


@pytest.fixture(scope="module")
def cluster(module_env):
    """A PostgreSQL 16 as a VPS has it before tuning: shared_buffers 128MB, max_connections 60, defaults else."""
    with PostgresServer(pg16_bin_dir(), settings_in_conf=True) as server:
        module_env.setenv(PASSWORD_ENV, server.password)
        yield server


def write_runbook(tmp_path, server: PostgresServer, tuning: dict | None = None, user: str = "postgres",
                  password_env: str = PASSWORD_ENV) -> str:
    direct = {"host": server.host, "port": server.port, "user": user, "password": {"env": password_env},
              "sslmode": "disable"}
    data = {"name": "tuning-test", "state_dir": str(tmp_path / "state"), "source": direct,
            "target": {"direct": direct}}
    if tuning is not None:
        data["tuning"] = tuning
    path = tmp_path / "runbook.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def running(server: PostgresServer) -> dict[str, str]:
    return dict(server.execute("SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(ARRAY["
                               + ", ".join(f"'{n}'" for n in PLAN) + "])"))


def test_units_follow_postgresql():
    assert pg_memory_bytes("1GB") == 1024 ** 3 and pg_memory_bytes("32MB") == 32 * 1024 ** 2
    assert unit_bytes("8kB") == 8192 and unit_bytes("kB") == 1024 and unit_bytes(None) is None
    assert readable(131072 * 1024) == "128MB" and readable(3 * 1024 ** 3) == "3GB" and readable(1000) == "1000B"
    with pytest.raises(ValueError):
        pg_memory_bytes("1gb")  # PostgreSQL reads unit names case-sensitively: 1gb is refused by the server too
    assert PLAN == {"shared_buffers": "1GB", "effective_cache_size": "3GB", "work_mem": "32MB",
                    "maintenance_work_mem": "256MB", "max_connections": "100", "wal_buffers": "32MB"}
    assert load_runbook(ROOT / "runbooks" / "tour-crm.yaml").tuning.wanted() == PLAN


def test_a_dry_run_reports_what_it_would_set_and_writes_nothing(tmp_path, cluster):
    before = running(cluster)
    result = tune_postgres(RunOptions(runbook=write_runbook(tmp_path, cluster, {"apply": True}), dry_run=True))
    assert result == {"dry_run": True, "differ": list(PLAN), "apply": True}
    plan = last_markdown("tuning-summary")
    assert "6 of 6 settings differ from the plan" in plan and "| shared_buffers | 128MB | 1GB |" in plan
    assert running(cluster) == before and not (tmp_path / "state").exists()


def test_check_only_names_each_difference_with_its_statement_and_changes_nothing(tmp_path, cluster):
    before = running(cluster)
    runbook = write_runbook(tmp_path, cluster)

    with pytest.raises(GateFailed) as failed:
        tune_postgres(RunOptions(runbook=runbook))

    report = failed.value.report
    assert {line.name: line.status for line in report.lines} == {**{n: FAILED for n in PLAN}, RESTART_LINE: PASSED}
    shared = report.line("shared_buffers")
    assert shared.detail.startswith("runs with 128MB, the plan wants 1GB (from configuration file, needs a restart")
    assert "ALTER SYSTEM SET shared_buffers = '1GB'; then restart PostgreSQL" in shared.fix
    assert report.line("work_mem").detail.startswith("runs with 4MB, the plan wants 32MB")
    assert "SELECT pg_reload_conf();" in report.line("work_mem").fix
    assert running(cluster) == before
    assert cluster.execute("SELECT count(*) FROM pg_file_settings WHERE sourcefile LIKE '%auto.conf'") == [(0,)]
    ledger = Ledger(tmp_path / "state")
    assert not ledger.latest_gate("tuning").passed and ledger.step_status("verify-tuning") == "failed"
    assert ledger.step_detail("tuning.apply")["differ"]["max_connections"] == {"current": "60", "wanted": "100"}


def test_apply_sets_with_a_reload_names_the_restart_and_passes_after_the_restart(tmp_path, cluster):
    runbook = write_runbook(tmp_path, cluster, {"apply": True})

    with pytest.raises(GateFailed) as failed:
        tune_postgres(RunOptions(runbook=runbook))

    report = failed.value.report
    now = running(cluster)
    # a reload was enough for these: the server runs with them already
    assert (now["work_mem"], now["maintenance_work_mem"], now["effective_cache_size"]) == ("32MB", "256MB", "3GB")
    assert {n: report.line(n).status for n in PLAN} == {
        **{n: PASSED for n in ("work_mem", "maintenance_work_mem", "effective_cache_size")},
        **{n: FAILED for n in RESTART_NEEDED}}
    assert report.line(RESTART_LINE).status == FAILED
    assert report.line(RESTART_LINE).detail.startswith("max_connections, shared_buffers, wal_buffers: changed in "
                                                       "the configuration, PostgreSQL needs a restart")
    assert "waits for a restart" in report.line("shared_buffers").detail
    ledger = Ledger(tmp_path / "state")
    assert sorted(ledger.step_detail("tuning.apply")["needs_restart"]) == RESTART_NEEDED
    assert set(ledger.step_detail("tuning.apply")["changed"]) == set(PLAN)

    # a second run before the restart sets nothing again, and still fails on the restart
    with pytest.raises(GateFailed, match="restart pending"):
        tune_postgres(RunOptions(runbook=runbook))
    assert ledger.step_detail("tuning.apply")["changed"] == {}

    cluster.restart()
    result = tune_postgres(RunOptions(runbook=runbook))

    assert result["changed"] == {} and result["needs_restart"] == []
    assert running(cluster) == {**PLAN, "max_connections": "100"}
    assert ledger.latest_gate("tuning").passed
    assert ledger.latest_gate("tuning").summary == "tuning gate passed: 7 of 7 lines passed"
    assert check_tuning(load_runbook(runbook)).ok


def test_a_role_that_may_not_alter_system_gets_one_line_naming_the_grant(tmp_path, cluster, monkeypatch):
    cluster.execute("DROP ROLE IF EXISTS tuner; CREATE ROLE tuner LOGIN PASSWORD 'tuner-pw'")
    monkeypatch.setenv("LIFTOFF_TEST_TUNER_PASSWORD", "tuner-pw")
    runbook = write_runbook(tmp_path, cluster, {"apply": True, "work_mem": "48MB"}, user="tuner",
                            password_env="LIFTOFF_TEST_TUNER_PASSWORD")

    with pytest.raises(StepFailed) as failed:
        tune_postgres(RunOptions(runbook=runbook))

    message = str(failed.value)
    assert "\n" not in message and "tuner-pw" not in message
    assert message.startswith(f"target.direct (127.0.0.1:{cluster.port}): user 'tuner' may not ALTER SYSTEM SET work_mem")
    assert "GRANT ALTER SYSTEM ON PARAMETER" in message
    assert running(cluster)["work_mem"] != "48MB"
