"""The shape every phase shares: steps and gate results in the ledger, one registry, one lock per run, status."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import fresh_runbook, run_cli
from liftoff.flows.options import RunOptions
from liftoff.flows.verify import verify_database
from liftoff.errors import GateFailed
from liftoff.ledger import Ledger, exclusive
from liftoff.phases import PHASES, all_flows
from liftoff.runbooks.model import load_runbook


def test_every_step_of_a_run_is_recorded_with_its_flow_run_and_time(migrated):
    ledger = Ledger(load_runbook(migrated["runbook"]).state_dir)
    steps = ledger.steps()
    for name in ("export", "restore.prepare", "restore.pre-data", "restore.data", "restore.post-data",
                 "restore.grants", "verify"):
        record = steps[name]
        assert record.status == "done", (name, record)
        assert record.flow_run_id and record.seconds is not None and record.seconds >= 0, (name, record)
    gate = ledger.latest_gate("database")
    assert gate.passed and gate.summary.startswith("passed:") and gate.flow_run_id == steps["verify"].flow_run_id


def test_a_failed_gate_is_recorded_as_failed_not_done(stack, migrated):
    runbook = fresh_runbook(stack, "failedgate", template="migrated")
    verify_database(RunOptions(runbook=str(runbook)))  # passes first: a passed gate is on record
    stack.target.execute("DELETE FROM public.payments WHERE id = (SELECT min(id) FROM public.payments)",
                         dbname="failedgate")
    with pytest.raises(GateFailed):
        verify_database(RunOptions(runbook=str(runbook)))
    ledger = Ledger(load_runbook(runbook).state_dir)
    assert ledger.steps()["verify"].status == "failed"
    gate = ledger.latest_gate("database")
    assert not gate.passed and "table public.payments: row count differs" in gate.summary


def test_status_prints_each_step_and_the_latest_gate_with_its_age(migrated):
    shown = run_cli("status", "--runbook", str(migrated["runbook"]))
    assert shown.returncode == 0, shown.stderr
    for name in ("export", "restore.data", "restore.grants", "verify"):
        assert name in shown.stdout
    assert "latest database gate: passed" in shown.stdout and " ago (flow run " in shown.stdout


def test_status_of_a_runbook_that_never_ran_says_so(stack):
    runbook = stack.write_runbook("never.yaml", state_dir="state-never-ran")
    shown = run_cli("status", "--runbook", str(runbook))
    assert shown.returncode == 0 and "nothing has run yet" in shown.stdout


def test_the_registry_feeds_the_cli_and_the_deployments():
    import liftoff.deployments.serve as serve

    names = set(all_flows())
    assert {"preflight", "export", "restore", "verify", "database"} <= names
    assert {("migrate-database" if n == "database" else n) for n in names} == set(serve.FLOWS)
    help_text = run_cli("run", "--help").stdout
    assert all(n in help_text for n in names)
    flow_names = [all_flows()[n].load().name for n in names]
    assert len(flow_names) == len(set(flow_names)), "flow names must be unique across phases"
    # every phase has its steps and its gate, except the runs that span phases (migrate, rehearsal)
    assert all(set(p.steps) and p.gate for p in PHASES if p.name not in ("migration", "prepare"))
    assert next(p for p in PHASES if p.name == "prepare").gate is None  # a missing access is no gate's difference
    assert set(serve.DEPLOYMENTS) == set(serve.FLOWS)  # every deployment comes from the registry


def test_the_lock_names_its_holder_and_is_reentrant_within_a_run(tmp_path):
    with exclusive(tmp_path, flow_run_id="run-123"):
        with exclusive(tmp_path):  # a step inside a composed run takes it again
            pass
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from liftoff.ledger import exclusive\n"
             f"with exclusive({str(tmp_path)!r}): pass"],
            capture_output=True, text=True, env=os.environ.copy())
        assert other.returncode != 0
        assert f"held by pid {os.getpid()}, flow run run-123 since" in other.stderr
    with exclusive(tmp_path):  # released
        pass


def test_items_are_written_in_batches_and_events_append(tmp_path):
    ledger = Ledger(tmp_path)
    written = ledger.set_items("storage", "object", ((f"tour-images/{i:05}.jpg", "copied", i, f"md5-{i}")
                                                      for i in range(2000)))
    assert written == 2000
    assert next(ledger.items("storage", "object")) == ("tour-images/00000.jpg", "copied", 0, "md5-0")
    assert sum(1 for _ in ledger.items("storage", "object", status="copied")) == 2000
    ledger.record_event("storage", "rewrite public.tour_images.public_url", before={"id": 1, "url": "a"},
                        after={"id": 1, "url": "b"}, flow_run_id="r1")
    ledger.record_event("cutover", "freeze writes", before={"read_only": False}, after={"read_only": True})
    events = ledger.events()
    assert [e.what for e in events] == ["rewrite public.tour_images.public_url", "freeze writes"]
    assert events[0].before == {"id": 1, "url": "a"} and ledger.events("cutover")[0].after == {"read_only": True}


def test_an_old_ledger_gains_the_new_shape_and_keeps_its_table_progress(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    db.executescript("""
        CREATE TABLE steps (step TEXT PRIMARY KEY, status TEXT NOT NULL, started_at REAL, finished_at REAL,
                            detail TEXT);
        CREATE TABLE tables (phase TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, rows INTEGER,
                             updated_at REAL, PRIMARY KEY (phase, name));
        INSERT INTO steps VALUES ('export', 'done', 1, 2, '{}');
        INSERT INTO tables VALUES ('restore', 'public.bookings', 'loaded', 42, 3);
    """)
    db.commit()
    db.close()
    ledger = Ledger(tmp_path)
    assert ledger.tables("restore") == {"public.bookings": ("loaded", 42)}
    assert ledger.is_done("export") and ledger.steps()["export"].seconds is None


def test_the_sandbox_prefect_ui_calls_its_own_api(prefect_api):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{prefect_api.ui_url}/ui-settings", timeout=10) as answer:
        settings = json.load(answer)
    assert settings["api_url"] == prefect_api.api_url
