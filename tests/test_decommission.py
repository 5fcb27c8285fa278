"""The decommission against real servers: a Supabase-shaped PostgreSQL 15 source whose ``postgres`` role is no
superuser and may not read ``supabase_migrations`` or ``realtime``, Supabase Storage's S3 endpoint (SeaweedFS)
holding the objects its ``storage.objects`` rows describe, a PostgreSQL 15 target whose server takes the
scratch restore, and a second SeaweedFS server as the backup bucket (B2's stand-in). What Liftoff leaves on
the source (this runbook's publication and slots, another runbook's slot) is made by Liftoff's own functions.
The approval is given through the suite's Prefect server, as an operator would."""

from __future__ import annotations

import hashlib
import json
import os

import psycopg
import pytest
import yaml
from helpers import run_cli

from liftoff.errors import GateFailed, NotApproved, PreflightFailed
from liftoff.flows.decommission import DecommissionOptions, decommission
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff.runbooks.model import load_runbook
from liftoff.systems import pg_replication as repl
from liftoff.tasks.decommission.steps import (
    archive_database,
    archive_files,
    start_decommission,
    verify_archive,
)
from liftoff_sandbox.operator import answer_when_paused
from liftoff_sandbox.stack import LocalStack

PREFIX = "LIFTOFF_DC"


@pytest.fixture(scope="module")
def stack():
    s = LocalStack(bookings=60, files=True, env_prefix=PREFIX)
    try:
        yield s.start()
    finally:
        s.stop()
        for key in [k for k in os.environ if k.startswith(PREFIX + "_")]:
            del os.environ[key]


def write_runbook(stack, tmp_path) -> str:
    data = stack.runbook_data(state_dir=str(tmp_path / "state"))
    name = f"dc-{tmp_path.name[-12:].strip('_').replace('_', '-').lower()}"
    data["name"] = name
    bucket = f"archive-{hashlib.md5(name.encode()).hexdigest()[:8]}"
    stack.target_s3.client().create_bucket(Bucket=bucket)
    data["backups"] = {"destination": {"endpoint_url": stack.target_s3.endpoint_url, "bucket": bucket,
                                       "access_key_id": {"env": f"{PREFIX}_TARGET_S3_KEY"},
                                       "secret_access_key": {"env": f"{PREFIX}_TARGET_S3_SECRET"}},
                       "files": []}
    data["decommission"] = {"restore_test_database": f"archive_test_{hashlib.md5(name.encode()).hexdigest()[:6]}"}
    data["cutover"] = {"approval_timeout_s": 120}  # a loaded machine resumes a paused run slowly
    path = tmp_path / "runbook.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def source(stack, user: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(stack.source.conninfo(user="postgres", password=stack.passwords["source"]), autocommit=True)


def supabase_state(stack) -> dict:
    """Everything the decommission must leave as it is: every table's rows (as Supabase's superuser sees them,
    Supabase's own schemas included), the buckets, and every object with its ETag."""
    with psycopg.connect(stack.source.conninfo(), autocommit=True) as admin:
        tables = admin.execute("""SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
                                   JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r'
                                    AND n.nspname NOT IN ('pg_catalog', 'information_schema')""").fetchall()
        counts = {t: admin.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for (t,) in tables}
        buckets = admin.execute("SELECT id, public FROM storage.buckets ORDER BY 1").fetchall()
    client = stack.supabase_s3.client()
    objects = {(b, o["Key"], o["ETag"], o["Size"]) for b, _ in buckets
               for page in client.get_paginator("list_objects_v2").paginate(Bucket=b) for o in page.get("Contents", [])}
    return {"counts": counts, "buckets": buckets, "objects": objects}


def leave_replication_behind(stack, runbook: str) -> repl.Names:
    """What the replicated cutover leaves on the source when nothing cleaned up: this runbook's publication, its
    slot and its tracker slot; and a slot of another runbook (a rehearsal's)."""
    names = repl.Names.for_runbook(load_runbook(runbook).name)
    with source(stack) as conn:
        repl.create_publication(conn, names.publication, ["public.bookings"])
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (names.slot,))
        repl.create_tracker(conn, names.tracker)
        conn.execute("SELECT pg_create_logical_replication_slot('liftoff_other_rehearsal', 'pgoutput')")
    return names


def liftoff_on_source(stack) -> tuple[list, list]:
    with source(stack) as conn:
        return repl.liftoff_objects(conn)


def test_it_refuses_before_a_passing_watch(stack, tmp_path):
    runbook = write_runbook(stack, tmp_path)
    with pytest.raises(PreflightFailed, match="no watch on record.*force_reason"):
        decommission(DecommissionOptions(runbook=runbook))
    Ledger(tmp_path / "state").record_gate("watch", False, "watch failed: critical in 2 of 9 rounds (CPU)")
    with pytest.raises(PreflightFailed, match=r"the latest watch failed \(watch failed: critical in 2 of 9"):
        decommission(DecommissionOptions(runbook=runbook))
    rb = load_runbook(runbook)
    listed = stack.target_s3.client().list_objects_v2(Bucket=rb.backups.destination.bucket)
    assert listed.get("KeyCount", 0) == 0  # nothing archived


def test_the_cli_takes_the_reason_to_force_it(stack, tmp_path):
    """`liftoff run decommission --force-reason`: the plan of a dry run says it would go ahead, and why; the
    flag on a flow without that field is one exit-2 line naming the flag."""
    runbook = write_runbook(stack, tmp_path)
    done = run_cli("run", "decommission", "--runbook", runbook, "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "It would refuse: no watch on record" in done.stdout
    done = run_cli("run", "decommission", "--runbook", runbook, "--dry-run", "--force-reason", "watched by hand")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Forced without a passing watch" in done.stdout and "watched by hand" in done.stdout
    done = run_cli("run", "backup", "--runbook", runbook, "--force-reason", "x")
    assert done.returncode == 2 and "--force-reason does not apply to backup; it is for: decommission" in done.stderr


def test_forced_with_a_reason_archives_proves_and_drops_only_liftoffs_objects(stack, tmp_path):
    runbook = write_runbook(stack, tmp_path)
    rb = load_runbook(runbook)
    names = leave_replication_behind(stack, runbook)
    before = supabase_state(stack)

    planned = decommission(DecommissionOptions(runbook=runbook, dry_run=True))
    assert planned["refused"] == "no watch on record (liftoff run watch)"
    assert {"supabase_migrations", "realtime"} <= set(planned["left_out_schemas"])
    assert f"slot {names.tracker}" in planned["liftoff_on_source"]

    resumer = answer_when_paused("decommission", {"approver": "Ada (ops)", "source_host": rb.source.host,
                                                  "approve": True, "reason": "watched by hand"}, under=tmp_path)
    result = decommission(DecommissionOptions(runbook=runbook, force_reason="the watch ran on the old VPS"))
    resumer.join(timeout=30)

    # The force and its reason are on record.
    forced = [e for e in Ledger(tmp_path / "state").events("decommission") if e.what == "decommission.forced"]
    assert forced and forced[0].after == {"reason": "the watch ran on the old VPS"}

    # The manifest in the bucket: every file with its size and SHA-256, which the bytes bear out.
    client, bucket = stack.target_s3.client(), rb.backups.destination.bucket
    prefix = result["archive"].split(f"s3://{bucket}/", 1)[1]
    manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    assert manifest["proven"] and manifest["forced"] and manifest["force_reason"] == "the watch ran on the old VPS"
    files = {f["file"]: f for f in manifest["files"]}
    assert prefix + "database.dump" in files
    for key, entry in files.items():
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"]), key
    archived = {k[len(prefix + "files/"):] for k in files if k.startswith(prefix + "files/")}
    assert archived == {f"{b}/{key}" for b, key, _, _ in before["objects"]}
    assert set(manifest["left_out"]["schemas (no USAGE for the source user)"]) >= {"supabase_migrations", "realtime"}
    assert any("RLS policies" in line for line in manifest["restore_test"]["does_not_prove"])
    md = last_markdown("decommission-manifest")
    assert "## What it does not prove" in md and "database.dump" in md

    # The restore test restored every archived table with the rows the source holds.
    checks = {c["check"]: c for c in manifest["checks"]}
    assert checks["dump: restores"]["status"] == "passed"
    assert checks["dump: rows as counted at the dump"]["status"] == "passed"
    assert checks["dump: RLS policies in the archive"]["status"] == "passed"
    assert checks["files: bucket waivers"]["status"] == "passed"
    with source(stack) as conn:
        public_bookings = conn.execute("SELECT count(*) FROM public.bookings").fetchone()[0]
    assert f"{public_bookings} counted" not in json.dumps(manifest)  # no difference was named
    assert rb.decommission.restore_test_database not in {r[0] for r in stack.target.execute(
        "SELECT datname FROM pg_database")}  # the scratch database is dropped

    # What Liftoff left is gone, the other runbook's slot too; the operator is told what is left to do.
    assert liftoff_on_source(stack) == ([], [])
    assert {f"slot {names.slot}", f"slot {names.tracker}", f"publication {names.publication}",
            "slot liftoff_other_rehearsal"} <= set(result["dropped"])
    assert any("pause the project" in s for s in result["next_steps"])
    assert "Pause project" in last_markdown("decommission-next-steps")

    # Nothing on Supabase was deleted or changed.
    assert supabase_state(stack) == before


def test_after_a_passing_watch_the_gate_catches_a_damaged_archive(stack, tmp_path):
    runbook = write_runbook(stack, tmp_path)
    rb = load_runbook(runbook)
    Ledger(tmp_path / "state").record_gate("watch", True, "safe to decommission: 289 rounds over 24 h")
    start = start_decommission(rb)
    assert start["forced"] is False and start["watch"].startswith("safe to decommission")
    archive_database(rb)
    archive_files(rb)
    client, bucket, prefix = stack.target_s3.client(), rb.backups.destination.bucket, start["prefix"]

    # One archived object with other bytes of the same size, another gone: both named.
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "files/tour-images/")["Contents"])
    changed, gone = keys[0], keys[1]
    size = client.head_object(Bucket=bucket, Key=changed)["ContentLength"]
    client.put_object(Bucket=bucket, Key=changed, Body=b"x" * size)
    client.delete_object(Bucket=bucket, Key=gone)
    with pytest.raises(GateFailed) as failed:
        verify_archive(rb)
    text = str(failed.value)
    assert changed[len(prefix + "files/tour-images/"):] + ": MD5" in text
    assert gone[len(prefix + "files/tour-images/"):] + ": not in the archive" in text

    # A dump cut short: its SHA-256 no longer matches, named before any restore.
    dump = client.get_object(Bucket=bucket, Key=prefix + "database.dump")["Body"].read()
    client.put_object(Bucket=bucket, Key=prefix + "database.dump", Body=dump[: len(dump) // 2])
    with pytest.raises(GateFailed, match="dump: SHA-256 as stored"):
        verify_archive(rb)
    assert Ledger(tmp_path / "state").latest_gate("decommission").passed is False


def test_an_approval_with_the_wrong_host_drops_nothing(stack, tmp_path):
    runbook = write_runbook(stack, tmp_path)
    names = leave_replication_behind(stack, runbook)
    Ledger(tmp_path / "state").record_gate("watch", True, "safe to decommission: 289 rounds over 24 h")
    resumer = answer_when_paused("decommission", {"approver": "Bob", "source_host": "db.other.supabase.co",
                                                  "approve": True}, under=tmp_path)
    try:
        with pytest.raises(NotApproved, match="the host typed \\(db.other.supabase.co\\) is not '127.0.0.1'"):
            decommission(DecommissionOptions(runbook=runbook))
        resumer.join(timeout=30)
        slots, publications = liftoff_on_source(stack)
        assert {names.slot, names.tracker} <= {s.slot for s in slots} and names.publication in publications
        assert Ledger(tmp_path / "state").latest_gate("decommission").passed  # the archive was made and proven
        assert Ledger(tmp_path / "state").step_status("decommission.source-cleanup") is None
    finally:
        with source(stack) as conn:
            repl.drop_liftoff_objects(conn)
