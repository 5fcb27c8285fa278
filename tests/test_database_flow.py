"""migrate-database end to end against real PostgreSQL servers: a Supabase-shaped source into empty targets."""

from __future__ import annotations

import pytest

from helpers import fresh_runbook, source_counts
from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.flows.preflight import preflight
from liftoff.flows.verify import verify_database
from liftoff.errors import PreflightFailed
from liftoff.runbooks.model import load_runbook


def _tables(server, dbname):
    return {r[0] for r in server.execute(
        "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname = 'public'", dbname=dbname)}


def test_migrate_database_copies_every_table_and_the_gate_passes(stack, migrated):
    result = migrated["result"]
    exported = result["export"]["tables"]
    assert set(exported) == _tables(stack.source, "postgres")
    for table, rows in migrated["counts"].items():
        if table.startswith("public."):
            assert exported[table] == rows, table
    target_counts = {t: stack.target.execute(f"SELECT count(*) FROM {t}", dbname="migrated")[0][0] for t in exported}
    assert target_counts == exported
    # the gate also compares the shim's copy of auth.users with the source's
    assert result["verify"]["rows"] == sum(exported.values()) + migrated["counts"]["auth.users"]


def test_restore_leaves_supabase_platform_objects_behind_and_shims_auth(stack, migrated):
    names = {r[0] for r in stack.target.execute("SELECT nspname FROM pg_namespace", dbname="migrated")}
    assert {"storage", "supabase_migrations", "realtime"}.isdisjoint(names)
    assert stack.target.execute("SELECT count(*) FROM pg_publication", dbname="migrated")[0][0] == 0
    assert stack.target.execute("SELECT count(*) FROM pg_event_trigger", dbname="migrated")[0][0] == 0
    # shim policy: auth.uid() works and the policies that call it are kept
    assert stack.target.execute("SELECT auth.uid() IS NULL", dbname="migrated")[0][0] is True
    policies = stack.target.execute("SELECT count(*) FROM pg_policies WHERE qual ~ 'auth\\.uid'", dbname="migrated")
    assert policies[0][0] >= 2
    # app role grants were re-applied after --no-acl
    assert stack.target.execute("SELECT has_table_privilege('crm_app', 'public.bookings', 'INSERT')",
                                dbname="migrated")[0][0] is True


def test_rerun_after_success_reuses_the_archive_and_loads_nothing_again(stack, migrated):
    again = migrate_database(RunOptions(runbook=str(migrated["runbook"])))
    assert again["export"].get("skipped") is True
    assert again["restore"]["loaded"]["loaded"] == [] and again["restore"]["loaded"]["skipped"]
    assert again["verify"]["rows"] == migrated["result"]["verify"]["rows"]


def test_dry_run_writes_nothing(stack):
    runbook = fresh_runbook(stack, "dryrun")
    result = migrate_database(RunOptions(runbook=str(runbook), dry_run=True))
    assert result["export"]["dry_run"] is True
    assert "public.bookings" in result["export"]["tables"]
    assert not load_runbook(runbook).state_dir.exists()
    assert _tables(stack.target, "dryrun") == set()


def test_drop_policy_stops_in_preflight_on_a_default_that_calls_auth(stack):
    """public.notes.owner_id defaults to auth.uid(): without the shim the table cannot be created as it is."""
    runbook = fresh_runbook(stack, "dropstops", supabase_leftovers="drop")
    with pytest.raises(PreflightFailed) as failed:
        preflight(RunOptions(runbook=str(runbook)))
    assert "default public.notes.owner_id: uses auth.uid() (not on the target: supabase_leftovers is drop); " \
           "use supabase_leftovers: shim" in str(failed.value)


def test_verify_alone_fails_on_a_target_never_restored(stack):
    from liftoff.errors import GateFailed

    runbook = fresh_runbook(stack, "neverrestored")
    with pytest.raises(GateFailed) as failed:
        verify_database(RunOptions(runbook=str(runbook)))
    assert "table public.bookings" in str(failed.value)


@pytest.fixture(scope="module")
def stack16(prefect_api):
    """A PostgreSQL 15 source without contrib extensions, and a PostgreSQL 16 target (production's version)."""
    from liftoff_sandbox.stack import LocalStack

    s = LocalStack(bookings=200, target_major=16, contrib=False, env_prefix="LIFTOFF_PG16").start()
    yield s
    s.stop()


def test_pg15_source_migrates_into_pg16_target(stack16):
    assert stack16.target.major == 16 and stack16.source.major == 15
    result = migrate_database(RunOptions(runbook=str(stack16.runbook_path)))
    assert result["preflight"]["source_major"] == 15 and result["preflight"]["target_major"] == 16
    assert result["verify"]["rows"] == sum(n for t, n in stack16.counts.items() if t.startswith("public.")) \
        + stack16.counts["auth.users"]


def _runbook_onto_pg16(stack, stack16, name: str):
    import yaml

    stack16.new_target_database(name)
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=name)
    data["target"]["direct"].update(port=stack16.target.port,
                                    password={"env": "LIFTOFF_PG16_TARGET_PASSWORD"})
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_preflight_needs_only_the_extensions_migrated_objects_use(stack, stack16):
    """The source has uuid-ossp and pgcrypto installed; only pgcrypto is used (a column default calls
    extensions.digest), so a PostgreSQL 16 target without contrib is refused for pgcrypto alone."""
    with pytest.raises(PreflightFailed) as failed:
        preflight(RunOptions(runbook=str(_runbook_onto_pg16(stack, stack16, "ext16"))))
    message = str(failed.value)
    assert "lacks extensions the migrated objects use: pgcrypto;" in message
    assert "uuid-ossp" not in message


def test_stream_strategy_copies_server_to_server_and_keeps_a_schema_archive(stack):
    from liftoff.systems.pg_tools import PgTools, read_toc

    runbook = fresh_runbook(stack, "streamed", strategy="stream")
    users = source_counts(stack)["auth.users"]
    result = migrate_database(RunOptions(runbook=str(runbook)))
    assert sorted(result["restore"]["loaded"]["loaded"]) == sorted(result["export"]["tables"])
    assert result["verify"]["rows"] == sum(result["export"]["tables"].values()) + users
    toc = read_toc(PgTools(stack.source.bin_dir, 15), load_runbook(runbook).state_dir / "dump")
    assert {e.desc for e in toc} >= {"TABLE", "INDEX", "FK CONSTRAINT"}
    assert not [e for e in toc if e.desc == "TABLE DATA"]


def test_gate_publishes_its_table_and_a_finished_progress_bar(stack, migrated):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, ArtifactFilterType,
    )

    from liftoff.reports import artifact_key

    name = load_runbook(migrated["runbook"]).name  # artifact keys carry the runbook's name
    # This run's own artifacts, by its flow run id: under pytest-xdist another worker's runbook has the same
    # name on the same Prefect server, so "the latest artifact with that key" may be the other one's.
    state = verify_database(RunOptions(runbook=str(migrated["runbook"])), return_state=True)
    assert state.is_completed(), state
    run_id = state.state_details.flow_run_id
    mine = ArtifactFilterFlowRunId(any_=[run_id])
    with get_client(sync_client=True) as client:
        [table] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key(name, "verify-tables")]), flow_run_id=mine))
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"]), flow_run_id=mine))

    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["table"] for r in rows} == set(migrated["result"]["export"]["tables"]) | {"auth.users"}
    assert all(r["status"] == "match" and r["source rows"] == r["target rows"] for r in rows)
    assert progress and all(float(p.data) == 100.0 for p in progress), [p.data for p in progress]
