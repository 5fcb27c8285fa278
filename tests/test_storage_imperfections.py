"""The storage phase on a real project's imperfections (issue 16), through both of Supabase Storage's APIs:
rows whose bytes are gone (found by the plan, decided by ``storage.missing_source_bytes``, named by the gate,
left alone by the URL rewrite, counted by the cutover's report), a file with no row, HTML/SVG content types
that Storage's REST download does not serve as stored, a bucket name the source lacks, a URL of a bucket the
runbook does not move, a key with ``@``.

The source is the stack's Supabase-shaped database with buckets of this module's own (removed at the end,
so other modules' counts are untouched), their bytes on a SeaweedFS server standing for Supabase's S3
endpoint, served over REST by the sandbox's Storage fake (which answers a row without bytes with the file
backend's 500, as the real server does); the target is another SeaweedFS server."""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from helpers import run_cli, seeded_storage
from helpers import kill_storage_run_mid_copy
from liftoff.flows.options import RunOptions
from liftoff.flows.storage import migrate_storage
from liftoff.flows.storage_verify import verify_storage
from liftoff.errors import GateFailed, PreflightFailed
from liftoff.reports import last_markdown
from liftoff_sandbox.supabase_source import SUPABASE_PROJECT_URL
from liftoff.runbooks.model import load_runbook

GALLERY, AVATARS = "gallery-16", "avatars-16"
TYPED = {"pages/index.html": "text/html", "icons/logo.svg": "image/svg+xml",
         "blobs/data.bin": "application/octet-stream", "icons/logo@2x.png": "image/png", "empty.txt": "text/plain"}
PHOTOS = [f"photos/p{i:03}.jpg" for i in range(60)]
GONE = {"gone/a.jpg": 1000, "gone/b.jpg": 2000}  # rows whose bytes are not on the source
STRAY = "stray.bin"  # bytes with no row
_n = itertools.count()


def _body(key: str) -> bytes:
    return b"" if key == "empty.txt" else (f"<{key}>".encode() * 40)


def _row(conn, bucket: str, key: str, body_size: int, md5: str | None, mimetype: str) -> None:
    metadata = {"size": body_size, "mimetype": mimetype, "cacheControl": "max-age=600"}
    if md5:
        metadata["eTag"] = f'"{md5}"'
    conn.execute("INSERT INTO storage.objects (bucket_id, name, metadata, version) VALUES (%s, %s, %s, 'v1')",
                 [bucket, key, json.dumps(metadata)])


@pytest.fixture(scope="module")
def world(stack, module_env):
    import psycopg

    from liftoff_sandbox.storage_api import StorageApiFake

    with seeded_storage(stack, "IMPERFECT", module_env) as (supabase_s3, target, _):
        client = supabase_s3.client()
        with psycopg.connect(stack.source.conninfo(), autocommit=True) as conn:
            for bucket in (GALLERY, AVATARS):
                conn.execute("INSERT INTO storage.buckets (id, name, public) VALUES (%s, %s, true)", [bucket, bucket])
                client.create_bucket(Bucket=bucket)
            for key in [*TYPED, *PHOTOS]:
                body = _body(key)
                mimetype = TYPED.get(key, "image/jpeg")
                client.put_object(Bucket=GALLERY, Key=key, Body=body, ContentType=mimetype)
                _row(conn, GALLERY, key, len(body), hashlib.md5(body).hexdigest(), mimetype)
            for key, size in GONE.items():
                _row(conn, GALLERY, key, size, None, "image/jpeg")
            client.put_object(Bucket=GALLERY, Key=STRAY, Body=b"no row for me")
            client.put_object(Bucket=AVATARS, Key="u1.png", Body=b"avatar")
            _row(conn, AVATARS, "u1.png", 6, hashlib.md5(b"avatar").hexdigest(), "image/png")
        api = StorageApiFake(stack.source.conninfo(), client).start()
        module_env.setenv("IMPERFECT_SERVICE_KEY", api.service_role_key)
        try:
            yield {"supabase_s3": supabase_s3, "target": target, "api": api}
        finally:
            api.stop()
            with psycopg.connect(stack.source.conninfo(), autocommit=True) as conn:
                conn.execute("DELETE FROM storage.objects WHERE bucket_id = ANY(%s)", [[GALLERY, AVATARS]])
                conn.execute("DELETE FROM storage.buckets WHERE id = ANY(%s)", [[GALLERY, AVATARS]])


def _runbook(stack, world, protocol: str, *, buckets=(GALLERY,), database: str = "postgres", **storage) -> Path:
    name = f"imperfect{next(_n)}"
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=database)
    source = ({"project_url": SUPABASE_PROJECT_URL, "protocol": "rest", "rest_url": world["api"].url,
               "service_key": {"env": "IMPERFECT_SERVICE_KEY"}} if protocol == "rest" else
              {"project_url": SUPABASE_PROJECT_URL,
               "s3": {"endpoint_url": world["supabase_s3"].endpoint_url,
                      "access_key_id": {"env": "IMPERFECT_SUPABASE_S3_KEY"},
                      "secret_access_key": {"env": "IMPERFECT_SUPABASE_S3_SECRET"}}})
    data["storage"] = {
        "buckets": [{"name": b, "public": True} for b in buckets], "bucket_prefix": f"{name}-", "source": source,
        "target": {"endpoint_url": world["target"].endpoint_url, "access_key_id": {"env": "IMPERFECT_TARGET_S3_KEY"},
                   "secret_access_key": {"env": "IMPERFECT_TARGET_S3_SECRET"},
                   "public_url": "https://files.example.com"},
        "rewrite": [], **storage}
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _target_keys(world, runbook: Path, bucket: str = GALLERY) -> set[str]:
    name = load_runbook(runbook).storage.bucket_prefix + bucket
    client = world["target"].client()
    if name not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        return set()
    return {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=name)
            for o in page.get("Contents", [])}


def _prefixed_buckets(world, runbook: Path) -> list[str]:
    prefix = load_runbook(runbook).storage.bucket_prefix
    return [b["Name"] for b in world["target"].client().list_buckets()["Buckets"] if b["Name"].startswith(prefix)]


# ---------------------------------------------------------------------------------------------------------
# missing_source_bytes: fail (the default)


@pytest.mark.parametrize("protocol", ["s3", "rest"])
def test_rows_without_bytes_stop_the_plan_and_nothing_is_written(stack, world, protocol):
    runbook = _runbook(stack, world, protocol)
    with pytest.raises(PreflightFailed) as stopped:
        migrate_storage(RunOptions(runbook=str(runbook)))
    message = str(stopped.value)
    assert "\n" not in message and "2 storage.objects rows have no bytes on the source" in message
    assert f"{GALLERY}/gone/a.jpg (1000 bytes;" in message and f"{GALLERY}/gone/b.jpg (2000 bytes;" in message
    assert "storage.missing_source_bytes: skip" in message and "Nothing was written" in message
    plan = last_markdown("storage-plan")
    assert "Rows whose bytes are gone on the source (2)" in plan and "| gone/b.jpg | 2000 |" in plan
    if protocol == "s3":  # a listing that reads the bytes sees the file with no row; Storage's REST one cannot
        assert f"{GALLERY}/{STRAY} (13 bytes)" in plan
    assert _prefixed_buckets(world, runbook) == []  # no bucket, no object on the target
    ledger = load_runbook(runbook).state_dir / "ledger.sqlite"
    assert not ledger.exists() or not sqlite3.connect(ledger).execute(
        "SELECT count(*) FROM items WHERE phase = 'storage'").fetchone()[0]


def test_the_cli_exits_2_with_one_line_naming_the_rows_and_the_decision(stack, world):
    runbook = _runbook(stack, world, "rest")
    done = run_cli("run", "storage", "--runbook", str(runbook))
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "gone/a.jpg" in errors[0] and "storage.missing_source_bytes" in errors[0]


# ---------------------------------------------------------------------------------------------------------
# missing_source_bytes: skip


@pytest.fixture(scope="module")
def url_database(stack):
    """A target database whose app table holds URLs of the moved bucket (one of a file without bytes, one with
    an ``@`` in its key) and of a bucket the runbook does not move."""
    name = stack.new_target_database(f"imperfect_urls{next(_n)}")
    base = f"{SUPABASE_PROJECT_URL}/storage/v1/object/public"
    urls = {1: f"{base}/{GALLERY}/photos/p001.jpg", 2: f"{base}/{GALLERY}/icons/logo@2x.png",
            3: f"{base}/{GALLERY}/gone/a.jpg", 4: f"{base}/{AVATARS}/u1.png", 5: f"{base}/{GALLERY}/pages/index.html"}
    stack.target.execute("CREATE TABLE public.photos (id int PRIMARY KEY, url text)", dbname=name)
    for id_, url in urls.items():
        stack.target.execute(f"INSERT INTO public.photos VALUES ({id_}, '{url}')", dbname=name)
    return name, urls


def _urls(stack, database: str) -> dict[int, str]:
    return dict(stack.target.execute("SELECT id, url FROM public.photos", dbname=database))


@pytest.mark.parametrize("protocol", ["s3", "rest"])
def test_skip_moves_the_rest_keeps_stored_types_and_names_what_was_not_migrated(stack, world, url_database, protocol):
    database, original = url_database
    stack.target.execute("UPDATE public.photos SET url = CASE id " + " ".join(
        f"WHEN {i} THEN '{u}'" for i, u in original.items()) + " END", dbname=database)  # each run from the source's
    runbook = _runbook(stack, world, protocol, database=database, missing_source_bytes="skip",
                       rewrite=[{"table": "public.photos", "column": "url"}])
    prefix = load_runbook(runbook).storage.bucket_prefix

    result = migrate_storage(RunOptions(runbook=str(runbook)))
    moved = len(TYPED) + len(PHOTOS)
    assert result["copy"]["copied"] == moved and result["copy"]["not_migrated"] == 2
    # a bucket this small is HEADed whole (storage.sampled_heads), the two rows without bytes included
    assert result["verify"] == {"buckets": 1, "objects": moved, "bytes": result["verify"]["bytes"], "not_migrated": 2,
                                "proven_by_listing": 0, "proven_by_head": moved + 2}
    assert _target_keys(world, runbook) == set(TYPED) | set(PHOTOS)  # neither the rows without bytes nor the stray

    # each object's stored Content-Type and Cache-Control, whatever the REST download's headers said
    client = world["target"].client()
    for key, mimetype in TYPED.items():
        head = client.head_object(Bucket=f"{prefix}{GALLERY}", Key=key)
        assert (key, head["ContentType"], head["CacheControl"]) == (key, mimetype, "max-age=600")

    gate = last_markdown("verify-storage-summary")
    assert "Storage gate PASSED" in gate and "no bytes on the source, not migrated" in gate
    assert "gone/a.jpg (1000 bytes;" in gate and "gone/b.jpg (2000 bytes;" in gate

    # the rewrite: the moved bucket's URLs point at the target, except the file that is not there; the
    # other bucket's URL is left and counted
    urls = _urls(stack, database)
    assert urls[1] == f"https://files.example.com/{prefix}{GALLERY}/photos/p001.jpg"
    assert urls[2] == f"https://files.example.com/{prefix}{GALLERY}/icons/logo@2x.png"
    assert urls[3] == original[3] and urls[4] == original[4]
    column = result["urls"]["columns"]["public.photos.url"]
    assert (column["rows_changed"], column["bucket_not_moved"], column["no_bytes_on_source"]) == (3, 1, 1)
    assert column["no_bytes_values"] == [original[3]]
    preview = last_markdown("storage-urls-preview")
    assert "1 URLs of buckets the runbook does not move" in preview and original[4] in preview
    assert "1 URLs of files whose bytes are gone on the source" in preview and original[3] in preview
    assert f"{GALLERY}/icons/logo@2x.png" in preview and "***" not in preview  # an @ in a key is no password

    again = migrate_storage(RunOptions(runbook=str(runbook)))
    assert again["copy"]["copied"] == 0 and again["verify"]["not_migrated"] == 2
    assert again["urls"]["rows_changed"] == 0


def test_under_fail_the_gate_says_the_source_has_no_bytes_rather_than_blaming_the_target(stack, world):
    runbook = _runbook(stack, world, "rest", missing_source_bytes="skip")
    migrate_storage(RunOptions(runbook=str(runbook)))
    data = yaml.safe_load(runbook.read_text())
    data["storage"]["missing_source_bytes"] = "fail"
    runbook.write_text(yaml.safe_dump(data))
    with pytest.raises(GateFailed) as failed:
        verify_storage(RunOptions(runbook=str(runbook)))
    assert "gone/a.jpg: missing on target, and no bytes on the source either (HTTP 500 on 3 reads" in str(failed.value)
    # a file that is on the source and not on the target is still the target's fault
    prefix = load_runbook(runbook).storage.bucket_prefix
    world["target"].client().delete_object(Bucket=f"{prefix}{GALLERY}", Key="photos/p002.jpg")
    data["storage"]["missing_source_bytes"] = "skip"
    runbook.write_text(yaml.safe_dump(data))
    with pytest.raises(GateFailed) as failed:
        verify_storage(RunOptions(runbook=str(runbook)))
    assert "photos/p002.jpg: missing on target" in str(failed.value) and "gone/a.jpg" not in str(failed.value)


def test_a_kill_mid_copy_with_rows_without_bytes_resumes_and_copies_each_object_once(stack, world):
    from liftoff_sandbox.faults import FaultProxy

    moved = len(TYPED) + len(PHOTOS)
    with FaultProxy(world["target"].endpoint_url, slowdown={"PUT": 0.5}, seed=5) as slow:
        runbook = _runbook(stack, world, "s3", missing_source_bytes="skip", batch_size=5, concurrency=2)
        data = yaml.safe_load(runbook.read_text())
        data["storage"]["target"]["endpoint_url"] = slow.url
        runbook.write_text(yaml.safe_dump(data))
        ledger = load_runbook(runbook).state_dir / "ledger.sqlite"
        before = kill_storage_run_mid_copy(runbook, ledger, after=10)
        assert 0 < before < moved
        slow.set_faults(slowdown=0.0)
        slow.reset_counters()
        result = migrate_storage(RunOptions(runbook=str(runbook)))
    remainder = moved - before
    assert remainder <= result["copy"]["copied"] <= remainder + 5  # at most the batch in flight, again
    assert result["copy"]["copied"] == slow.puts_forwarded
    assert result["verify"]["objects"] == moved and result["verify"]["not_migrated"] == 2
    assert not {"gone/a.jpg", "gone/b.jpg"} & _target_keys(world, runbook)


# ---------------------------------------------------------------------------------------------------------
# A bucket the source lacks


@pytest.mark.parametrize("protocol", ["s3", "rest"])
def test_an_unknown_bucket_is_refused_before_anything_is_created(stack, world, protocol):
    runbook = _runbook(stack, world, protocol, buckets=(GALLERY, "galery-16"), missing_source_bytes="skip")
    done = run_cli("run", "storage", "--runbook", str(runbook))
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'galery-16'" in errors[0] and "not among the source's buckets" in errors[0]
    assert GALLERY in errors[0] and AVATARS in errors[0]  # the source's buckets, to pick the right name from
    assert _prefixed_buckets(world, runbook) == []
