"""What restore needs from the export is typed in the ledger (rows with columns), not a JSON blob in the step."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from helpers import run_cli
from liftoff.errors import StepFailed
from liftoff.ledger import ExportFacts, ExportRecord, Ledger
from liftoff.runbooks.model import load_runbook
from liftoff.systems import postgres, pg_privileges as privileges
from liftoff.tasks.database.common import assess_source, exported_catalog, read_shim


def _rows(rb, query: str, *args) -> list[tuple]:
    with closing(sqlite3.connect(rb.state_dir / "ledger.sqlite")) as db:
        return db.execute(query, args).fetchall()


def test_export_keeps_the_sources_grants_as_ledger_rows_and_its_step_detail_holds_no_catalog(migrated):
    rb = load_runbook(migrated["runbook"])
    grants = set(_rows(rb, "SELECT scope, kind, schema, name, detail, grantee, privilege FROM export_grants"))
    # a column grant: users may change their name, not the rest of their profile row
    assert ("schemas", "column", "public", "profiles", "full_name", "authenticated", "UPDATE") in grants
    assert ("schemas", "table", "public", "profiles", None, "authenticated", "UPDATE") not in grants
    # a revoked grant stays absent: anon lost SELECT on role_permissions but kept INSERT; authenticated has both
    assert ("schemas", "table", "public", "role_permissions", None, "anon", "INSERT") in grants
    assert ("schemas", "table", "public", "role_permissions", None, "anon", "SELECT") not in grants
    assert ("schemas", "table", "public", "role_permissions", None, "authenticated", "SELECT") in grants
    # the auth hook: EXECUTE granted to supabase_auth_admin, revoked from anon, authenticated and PUBLIC
    hook = {g[5] for g in grants if g[1] == "function" and g[3] == "custom_access_token_hook"}
    assert "supabase_auth_admin" in hook and not {"anon", "authenticated", "PUBLIC"} & hook
    # the shim's grants: USAGE on auth for the API roles
    assert ("auth_shim", "schema", "auth", "auth", None, "anon", "USAGE") in grants

    (export,) = _rows(rb, "SELECT source_major, strategy, schemas, auth_shim, archive_bytes, flow_run_id FROM export")
    assert export[:4] == (15, "dump", '["public"]', 1) and export[4] > 0 and export[5]
    assert ("public.bookings_pkey", "public.bookings") in _rows(rb, "SELECT * FROM export_index_tables")
    assert ("anon", "create", "anon") in _rows(rb, "SELECT role, decision, target FROM export_roles")
    assert ("on_auth_user_created", "O") in _rows(rb, "SELECT name, enabled FROM export_auth_triggers")
    assert ("left_out", "policy public.user_roles.Allow auth admin to read user roles") in _rows(
        rb, "SELECT category, object FROM export_decisions")

    detail = Ledger(rb.state_dir).step_detail("export")
    assert not {"catalog", "grants", "index_tables", "extensions", "source_major", "tools"} & detail.keys()
    assert detail["archive_bytes"] == export[4] and "tables" in detail["summary"]


def test_what_restore_reads_from_the_ledger_is_what_the_source_catalog_says(stack, migrated):
    rb = load_runbook(migrated["runbook"])
    catalog = exported_catalog(rb)
    with postgres.session(rb.source, "source") as src:
        assessment = assess_source(rb, src)
        grants = privileges.read_grants(src, rb.database.schemas)
        default_grants = privileges.read_default_grants(src, rb.database.schemas)
        shim = read_shim(rb, src)
        index_tables = postgres.index_tables(src, rb.database.schemas)
    assessment.owners = []  # the plan's list only: restore never reads it
    assert catalog.assessment == assessment
    assert sorted(catalog.grants, key=repr) == sorted(grants, key=repr)
    assert sorted(catalog.default_grants, key=repr) == sorted(default_grants, key=repr)
    assert catalog.shim.columns == shim.columns and catalog.shim.functions == shim.functions
    assert sorted(catalog.shim.grants) == sorted(shim.grants)
    assert catalog.index_tables == index_tables
    assert catalog.settings["strategy"] == "dump" and catalog.settings["schemas"] == rb.database.schemas


def _record(path, name: str, grantee: str) -> None:
    Ledger(path).record_export(
        ExportRecord(archive=f"/{name}", archive_bytes=1, source_major=15, tools="/usr/bin", strategy="dump",
                     schemas=["public"], supabase_leftovers="shim", auth_triggers="recreate", auth_shim=False,
                     snapshot_at=1.0, flow_run_id=name),
        ExportFacts(grants=[("schemas", "table", "public", name, None, grantee, "SELECT")],
                    roles=[(grantee, "create", grantee, False, False, True, [f"grant on public.{name}"])]))


def test_a_new_export_replaces_the_previous_exports_facts_never_mixing_them(tmp_path):
    _record(tmp_path, "first", "anon")
    _record(tmp_path, "second", "authenticated")
    export, facts = Ledger(tmp_path).exported()
    assert export.archive == "/second" and export.flow_run_id == "second"
    assert facts.grants == [("schemas", "table", "public", "second", None, "authenticated", "SELECT")]
    assert facts.roles == [("authenticated", "create", "authenticated", 0, 0, 1, ["grant on public.second"])]
    Ledger(tmp_path).forget_export()
    assert Ledger(tmp_path).exported() is None


def test_an_export_recorded_by_an_older_liftoff_asks_to_export_again(stack):
    runbook = stack.write_runbook("olderledger.yaml", state_dir="state-olderledger", target_database="olderledger")
    rb = load_runbook(runbook)
    ledger = Ledger(rb.state_dir)
    ledger.start_step("export")  # what an older Liftoff left: a done export, its facts in the step's detail
    ledger.finish_step("export", {"tables": {}, "archive": str(rb.state_dir / "dump"), "archive_bytes": 1,
                                  "seconds": 1, "source_major": 15, "catalog": {"grants": []}})
    (rb.state_dir / "dump").mkdir()
    (rb.state_dir / "dump" / "toc.dat").write_bytes(b"")
    with pytest.raises(StepFailed, match="older Liftoff.*export again"):
        exported_catalog(rb)
    for flow in ("restore", "export"):  # export does not reuse an archive whose facts it cannot read
        ran = run_cli("run", flow, "--runbook", str(runbook))
        assert ran.returncode == 2, ran.stderr
        errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "older Liftoff" in errors[0] and "export again" in errors[0], ran.stderr
