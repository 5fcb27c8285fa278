"""The rehearsal against real servers: the session stack's Supabase-shaped source and PostgreSQL target, and
a SeaweedFS pair (Supabase Storage's S3 endpoint seeded with the objects' bytes, and the target S3 server).
Each runbook has its own scratch database and state_dir; the real target database is never written."""

from __future__ import annotations

import itertools

import pytest
import yaml

from helpers import seeded_storage
from liftoff.flows.options import RunOptions
from liftoff.flows.rehearsal import rehearse
from liftoff.errors import PreflightFailed, RunbookInvalid, StepFailed
from liftoff.ledger import Event, Ledger
from liftoff.reports import last_markdown
from liftoff_sandbox.supabase_source import SUPABASE_PROJECT_URL
from liftoff.runbooks.model import load_runbook
from liftoff.tasks.rehearsal import estimate as arithmetic
from liftoff.tasks.rehearsal import scratch

_n = itertools.count()


@pytest.fixture(scope="module")
def servers(stack, module_env):
    with seeded_storage(stack, "LIFTOFF_REHEARSAL", module_env) as (supabase_s3, target, _):
        yield supabase_s3, target


def rehearsal_runbook(stack, servers=None, **database):
    """A runbook whose real target database exists (empty, never written by these tests) and whose rehearsal
    uses a scratch database of its own; with ``servers``, its storage phase is configured too."""
    name = f"rehearsed{next(_n)}"
    stack.new_target_database(name)
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=name, **database)
    data["rehearsal"] = {"scratch_database": f"{name}_scratch", "bucket_prefix": "rehearsal-"}
    if servers:
        supabase_s3, target = servers
        data["storage"].update(
            bucket_prefix=f"{name}-",
            source={"project_url": SUPABASE_PROJECT_URL,
                    "s3": {"endpoint_url": supabase_s3.endpoint_url,
                           "access_key_id": {"env": "LIFTOFF_REHEARSAL_SUPABASE_S3_KEY"},
                           "secret_access_key": {"env": "LIFTOFF_REHEARSAL_SUPABASE_S3_SECRET"}}},
            target={"endpoint_url": target.endpoint_url, "access_key_id": {"env": "LIFTOFF_REHEARSAL_TARGET_S3_KEY"},
                    "secret_access_key": {"env": "LIFTOFF_REHEARSAL_TARGET_S3_SECRET"},
                    "public_url": "https://files.example.com"})
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _databases(stack) -> set[str]:
    return {r[0] for r in stack.target.execute("SELECT datname FROM pg_database")}


def _buckets(servers, prefix: str) -> list[str]:
    return [b["Name"] for b in servers[1].client().list_buckets().get("Buckets", []) if b["Name"].startswith(prefix)]


def _tables(stack, database: str) -> list:
    return stack.target.execute("SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE n.nspname = 'public' AND c.relkind = 'r'", dbname=database)


def _real_ledger_with_history(rb) -> Ledger:
    """The real ledger as a real migration leaves it: steps, items, and a completed cutover's durations."""
    ledger = Ledger(rb.state_dir)
    ledger.start_step("export")
    ledger.finish_step("export", {"summary": "the real export"})
    ledger.set_items("export", "table", [("public.tours", "exported", 12, None)])
    ledger.record_event("cutover", "cutover.completed",
                        after={"downtime_s": 70.0, "steps": {"freeze": 1.5, "final sync": 60.0, "switch": 7.5,
                                                             "smoke test": 1.0}})
    return ledger


def _snapshot(ledger: Ledger) -> tuple:
    return ({k: (s.status, s.started_at, s.finished_at, s.detail) for k, s in ledger.steps().items()},
            list(ledger.items("export", "table")))


@pytest.fixture(scope="module")
def first_rehearsal(stack, servers):
    """One rehearsal with both phases, started over what a crashed one left: its scratch database (with a
    table in it) and one of its scratch buckets (with an object)."""
    path = rehearsal_runbook(stack, servers)
    rb = load_runbook(path)
    before = _snapshot(_real_ledger_with_history(rb))
    stack.target.execute(f"CREATE DATABASE {rb.rehearsal.scratch_database}")
    stack.target.execute("CREATE TABLE public.tours (id int PRIMARY KEY)", dbname=rb.rehearsal.scratch_database)
    leftover = scratch.scratch_buckets(rb)[0]
    servers[1].client().create_bucket(Bucket=leftover)
    servers[1].client().put_object(Bucket=leftover, Key="stale/object.txt", Body=b"from a crashed rehearsal")
    result = rehearse(RunOptions(runbook=str(path)))
    return {"path": path, "rb": rb, "result": result, "before": before, "report": last_markdown("rehearsal-report")}


def test_a_rehearsal_migrates_onto_scratch_resources_and_leaves_none_behind(stack, servers, first_rehearsal):
    rb, result = first_rehearsal["rb"], first_rehearsal["result"]
    assert result["passed"] and result["failed"] is None
    assert result["phases"]["database"]["gate"]["passed"] and result["phases"]["storage"]["gate"]["passed"]
    assert result["phases"]["database"]["steps"]["restore.data"] >= 0
    assert result["sizes"]["database"]["rows"] > 0 and result["sizes"]["database"]["source_bytes"] > 0
    assert result["sizes"]["storage"]["objects"] > 0 and result["sizes"]["storage"]["bytes"] > 0
    # the stale table of the crashed rehearsal did not stop preflight: that database was dropped first
    assert result["teardown"]["database_dropped"] and rb.rehearsal.scratch_database not in _databases(stack)
    prepared = Ledger(result["state_dir"]).step_detail("rehearsal.prepare")
    assert prepared["dropped_leftover"] and prepared["leftover_buckets"] == [scratch.scratch_buckets(rb)[0]]
    assert "## Against the previous rehearsal" not in first_rehearsal["report"]
    assert _buckets(servers, scratch.bucket_prefix(rb)) == []
    assert set(result["teardown"]["buckets"]) == set(scratch.scratch_buckets(rb))
    # the real target database was never written
    assert _tables(stack, rb.target.direct.database) == []


def test_a_rehearsal_keeps_its_own_ledger_and_summary_but_not_the_archive(stack, first_rehearsal):
    rb, result = first_rehearsal["rb"], first_rehearsal["result"]
    state = result["state_dir"]
    scratch_rb = load_runbook(f"{state}/{scratch.SCRATCH_RUNBOOK}")
    assert str(scratch_rb.state_dir).startswith(str(rb.state_dir / "rehearsals"))
    assert scratch_rb.target.direct.database == rb.rehearsal.scratch_database and scratch_rb.target.pooled is None
    assert scratch_rb.storage.bucket_prefix == "rehearsal-" + rb.storage.bucket_prefix
    assert scratch_rb.storage.rewrite == rb.storage.rewrite
    text = (scratch_rb.state_dir / scratch.SCRATCH_RUNBOOK).read_text()
    assert "LIFTOFF_LOCAL_TARGET_PASSWORD" in text and stack.passwords["target"] not in text
    assert Ledger(scratch_rb.state_dir).is_done("verify") and Ledger(scratch_rb.state_dir).is_done("storage.copy")
    assert not (scratch_rb.state_dir / "dump").exists() and not (scratch_rb.state_dir / "auth_users.copy").exists()
    assert (scratch_rb.state_dir / scratch.SUMMARY).exists()


def test_a_rehearsal_is_recorded_in_the_real_event_log_only(first_rehearsal):
    rb = first_rehearsal["rb"]
    ledger = Ledger(rb.state_dir)
    assert _snapshot(ledger) == first_rehearsal["before"]  # the real ledger's steps and items are untouched
    event = ledger.events("rehearsal")[0]
    assert event.what == "rehearsal.done" and event.after["passed"] is True
    assert event.after["phases"]["storage"]["seconds"] > 0
    estimate = event.after["estimate"]
    # the switch and smoke durations come from the last real cutover, not an assumption
    assert estimate["parts"]["cutover switch"] == 7.5 and estimate["parts"]["cutover smoke test"] == 1.0
    assert "cutover final sync" not in estimate["parts"] and estimate["assumption"] is None
    assert estimate["downtime_s"] >= estimate["parts"]["verify"] + 7.5
    # the real storage phase never ran: the whole copy counts
    assert estimate["parts"]["storage.copy (what changed)"] == event.after["phases"]["storage"]["steps"]["storage.copy"]


def test_a_failed_phase_still_tears_down_and_the_report_compares_it_with_the_rehearsal_before(
        stack, servers, first_rehearsal, monkeypatch):
    # The same runbook (same state_dir, scratch database and buckets), now mapping a role to a target role
    # that does not exist: preflight on the freshly created scratch database stops the database phase.
    rb = first_rehearsal["rb"]
    data = yaml.safe_load(first_rehearsal["path"].read_text())
    data["database"]["roles"] = {"anon": {"map_to": "no_such_role"}}
    data["notifications"] = {"webhook": {"env": "LIFTOFF_TEST_REHEARSAL_WEBHOOK"}}
    failing = first_rehearsal["path"].with_name(f"{rb.target.direct.database}-failing.yaml")
    failing.write_text(yaml.safe_dump(data, sort_keys=False))
    from liftoff_sandbox.webhook import WebhookReceiver

    with WebhookReceiver() as receiver:
        monkeypatch.setenv("LIFTOFF_TEST_REHEARSAL_WEBHOOK", receiver.url)
        with pytest.raises(PreflightFailed, match="no_such_role"):
            rehearse(RunOptions(runbook=str(failing)))
    # the operator hears of it: one message naming the rehearsal and why
    [posted] = receiver.delivered
    assert f"Rehearsal of {rb.name} FAILED" in posted["text"] and "no_such_role" in posted["text"]
    assert rb.rehearsal.scratch_database not in _databases(stack)
    assert _buckets(servers, scratch.bucket_prefix(rb)) == []
    ledger = Ledger(rb.state_dir)
    assert _snapshot(ledger) == first_rehearsal["before"]
    first, second = ledger.events("rehearsal")
    assert (first.what, second.what) == ("rehearsal.done", "rehearsal.failed")
    assert "no_such_role" in second.after["failed"] and second.after["phases"]["database"]["ok"] is False
    scratch_ledger = Ledger(second.after["state_dir"])
    # the scratch database had been created (preflight ran against it), then torn down
    assert scratch_ledger.is_done("rehearsal.prepare") and scratch_ledger.is_done("rehearsal.teardown")
    report = last_markdown("rehearsal-report")
    assert report.startswith("# Rehearsal FAILED") and "no_such_role" in report
    table = report.split("## Rehearsals, oldest first")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[1] for r in rows] == ["yes", "NO"]
    comparison = report.split("## Against the previous rehearsal")[1].split("##")[0]
    assert "| database phase, s |" in comparison and "| estimated downtime, s |" in comparison


def test_a_dry_run_says_what_it_would_do_and_touches_nothing(stack, servers):
    path = rehearsal_runbook(stack, servers)
    rb = load_runbook(path)
    result = rehearse(RunOptions(runbook=str(path), dry_run=True))
    assert result["dry_run"] and result["scratch_database"] == rb.rehearsal.scratch_database
    assert result["phases"] == ["database", "storage"]
    assert result["buckets"] == [f"rehearsal-{rb.storage.bucket_prefix}{b.name}" for b in rb.storage.buckets]
    assert not rb.state_dir.exists() and rb.rehearsal.scratch_database not in _databases(stack)
    assert _buckets(servers, scratch.bucket_prefix(rb)) == []
    assert "dry run" in last_markdown("rehearsal-plan")


def test_scratch_resources_refuse_names_that_are_not_the_rehearsals(stack, servers):
    rb = load_runbook(rehearsal_runbook(stack, servers))
    refused = rf"{stack.target.port}\): refusing to drop database '{rb.target.direct.database}'"
    with pytest.raises(StepFailed, match=refused):
        scratch.drop_scratch_database(rb, rb.target.direct.database)
    with pytest.raises(StepFailed, match="refusing to delete bucket 'tour-images'"):
        scratch.delete_scratch_buckets(rb, ["tour-images"])
    assert rb.target.direct.database in _databases(stack)
    same = rb.model_copy(update={"rehearsal": rb.rehearsal.model_copy(
        update={"scratch_database": rb.target.direct.database})})
    with pytest.raises(RunbookInvalid, match="is the real target database"):
        scratch.scratch_runbook(same, rb.state_dir / "rehearsals" / "x")
    with pytest.raises(RunbookInvalid, match="rehearsal.scratch_database"):
        rehearse(RunOptions(runbook=str(_with_scratch(stack, rb, "postgres"))))


def _with_scratch(stack, rb, name: str):
    path = stack.workdir / f"{rb.name}-{name}.yaml"
    data = yaml.safe_load((stack.workdir / f"{rb.target.direct.database}.yaml").read_text())
    data["rehearsal"]["scratch_database"] = name
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_downtime_estimate_states_its_assumption_without_a_real_cutover():
    estimate = arithmetic.estimate_downtime({"export": 2.0, "restore.data": 3.0}, copy_seconds=10.0,
                                         changed_fraction=0.25, switch=None)
    assert estimate["parts"]["storage.copy (what changed)"] == 2.5
    assert estimate["downtime_s"] == 2.0 + 3.0 + 2.5 + arithmetic.ASSUMED_SWITCH_S
    assert "no real cutover is recorded" in estimate["assumption"]


def test_the_comparison_shows_a_slower_rehearsal_as_a_regression():
    def event(i, what, db_s, downtime):
        return Event(i, 1_790_000_000.0 + i * 86400, "rehearsal", what, None,
                     {"phases": {"database": {"seconds": db_s, "steps": {"export": db_s / 2}}},
                      "sizes": {"database": {"rows": 1000}}, "estimate": {"downtime_s": downtime}}, None)

    older, newer = event(1, "rehearsal.done", 10.0, 40.0), event(2, "rehearsal.failed", 15.0, 50.0)
    rows = arithmetic.comparison_rows([older, newer])
    assert [r["passed"] for r in rows] == ["yes", "NO"]
    assert rows[1]["change"] == "+10 (+25%)" and rows[0]["change"] == "–"
    figures = {r["figure"]: r for r in arithmetic.changes(older.after, newer.after)}
    assert figures["database phase, s"]["change"] == "+5 (+50%)"
    assert figures["step export, s"]["previous"] == "5" and figures["step export, s"]["this one"] == "7.50"
