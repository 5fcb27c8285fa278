"""The storage phase against real servers: the Supabase-shaped source's storage.objects as the inventory,
a SeaweedFS server as Supabase Storage's S3 endpoint (seeded with the generated objects' bytes), another as
the target (MinIO's stand-in). Each test copies into its own bucket prefix and state_dir."""

from __future__ import annotations

import hashlib
import itertools
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import seeded_storage
from helpers import kill_storage_run_mid_copy
from liftoff.flows.options import RunOptions
from liftoff.flows.storage import migrate_storage
from liftoff.flows.storage_verify import verify_storage
from liftoff.errors import GateFailed, PreflightFailed
from liftoff_sandbox.supabase_source import SUPABASE_PROJECT_URL
from liftoff.runbooks.model import load_runbook

_n = itertools.count()


@pytest.fixture(scope="module")
def servers(stack, module_env):
    with seeded_storage(stack, "LIFTOFF", module_env) as servers:
        yield servers


def storage_runbook(stack, servers, *, target_url: str | None = None, target_database: str = "postgres",
                    **storage) -> Path:
    supabase_s3, target, _ = servers
    name = f"files{next(_n)}"
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=target_database)
    data["storage"] = {
        "buckets": [{"name": "tour-images", "public": True}, {"name": "waivers"}],
        "bucket_prefix": f"{name}-",
        "source": {"project_url": SUPABASE_PROJECT_URL,
                   "s3": {"endpoint_url": supabase_s3.endpoint_url, "access_key_id": {"env": "LIFTOFF_SUPABASE_S3_KEY"},
                          "secret_access_key": {"env": "LIFTOFF_SUPABASE_S3_SECRET"}}},
        "target": {"endpoint_url": target_url or target.endpoint_url, "access_key_id": {"env": "LIFTOFF_TARGET_S3_KEY"},
                   "secret_access_key": {"env": "LIFTOFF_TARGET_S3_SECRET"},
                   "public_url": "https://files.example.com"},
        **storage,
    }
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _objects(stack) -> dict[str, int]:
    return dict(stack.source.execute("SELECT bucket_id, count(*) FROM storage.objects GROUP BY 1"))


def _anonymous_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def migrated_files(stack, servers):
    runbook = storage_runbook(stack, servers)
    result = migrate_storage(RunOptions(runbook=str(runbook)))
    return runbook, result


def test_every_object_is_copied_once_and_the_gate_passes(stack, servers, migrated_files):
    _, target, seeded = servers
    runbook, result = migrated_files
    counts = _objects(stack)
    assert result["copy"]["copied"] == sum(counts.values()) == sum(seeded.values())
    assert result["verify"]["objects"] == sum(counts.values())
    prefix = load_runbook(runbook).storage.bucket_prefix
    client = target.client()
    key = stack.source.execute("SELECT name FROM storage.objects WHERE bucket_id = 'tour-images' LIMIT 1")[0][0]
    head = client.head_object(Bucket=f"{prefix}tour-images", Key=key)
    assert head["ContentType"] == "image/jpeg" and head["CacheControl"] == "max-age=3600"
    # public bucket readable without credentials, private one refused
    assert _anonymous_status(f"{target.endpoint_url}/{prefix}tour-images/{urllib.request.quote(key)}") == 200
    waiver = stack.source.execute("SELECT name FROM storage.objects WHERE bucket_id = 'waivers' LIMIT 1")[0][0]
    assert _anonymous_status(f"{target.endpoint_url}/{prefix}waivers/{urllib.request.quote(waiver)}") in (401, 403)


def test_a_rerun_copies_nothing(migrated_files):
    runbook, _ = migrated_files
    again = migrate_storage(RunOptions(runbook=str(runbook)))
    assert again["copy"]["copied"] == 0 and again["verify"]["objects"] > 0


def test_dry_run_counts_what_it_would_copy_and_writes_nothing(stack, servers):
    _, target, _ = servers
    runbook = storage_runbook(stack, servers)
    result = migrate_storage(RunOptions(runbook=str(runbook), dry_run=True))
    assert result["objects"] == sum(_objects(stack).values()) and result["bytes"] > 0
    assert not load_runbook(runbook).state_dir.exists()
    prefix = load_runbook(runbook).storage.bucket_prefix
    assert not [b for b in target.client().list_buckets()["Buckets"] if b["Name"].startswith(prefix)]


def _gate(runbook, deep: bool = False) -> str:
    with pytest.raises(GateFailed) as failed:
        verify_storage(RunOptions(runbook=str(runbook)), deep=deep)
    return str(failed.value)


def _one_key(stack, bucket: str) -> str:
    return stack.source.execute(f"SELECT name FROM storage.objects WHERE bucket_id = '{bucket}' ORDER BY name LIMIT 1")[0][0]


def test_gate_catches_a_missing_object(stack, servers, migrated_files):
    runbook, _ = migrated_files
    key = _one_key(stack, "waivers")
    servers[1].client().delete_object(Bucket=f"{load_runbook(runbook).storage.bucket_prefix}waivers", Key=key)
    message = _gate(runbook)
    assert f"bucket waivers: {key}: missing on target" in message


def test_gate_catches_a_truncated_object(stack, servers, migrated_files):
    runbook, _ = migrated_files
    key, bucket = _one_key(stack, "tour-images"), f"{load_runbook(runbook).storage.bucket_prefix}tour-images"
    client = servers[1].client()
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=body[:-10], ContentType="image/jpeg", CacheControl="max-age=3600")
    message = _gate(runbook)
    assert f"{key}: size differs (source {len(body)}, target {len(body) - 10})" in message


def test_only_the_deep_gate_catches_a_flipped_byte_behind_unchanged_metadata(stack, servers, migrated_files):
    runbook, _ = migrated_files
    key, bucket = _one_key(stack, "waivers"), f"{load_runbook(runbook).storage.bucket_prefix}waivers"
    client = servers[1].client()
    original = client.get_object(Bucket=bucket, Key=key)
    body = bytearray(original["Body"].read())
    before = hashlib.md5(body).hexdigest()
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body), ContentType=original["ContentType"],
                      CacheControl=original.get("CacheControl", ""), Metadata=original["Metadata"])
    assert verify_storage(RunOptions(runbook=str(runbook)))["objects"] > 0  # the metadata still claims the MD5
    message = _gate(runbook, deep=True)
    assert f"{key}: MD5 differs (source {before}, target {hashlib.md5(bytes(body)).hexdigest()})" in message


def test_gate_catches_a_wrong_content_type(stack, servers, migrated_files):
    runbook, _ = migrated_files
    key, bucket = _one_key(stack, "tour-images"), f"{load_runbook(runbook).storage.bucket_prefix}tour-images"
    client = servers[1].client()
    client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key}, ContentType="text/plain",
                       MetadataDirective="REPLACE",
                       Metadata=client.head_object(Bucket=bucket, Key=key)["Metadata"])
    assert f"{key}: Content-Type differs (source image/jpeg, target text/plain)" in _gate(runbook)


def test_the_gate_proves_unchanged_objects_by_listing_and_heads_each_one_changed_since_the_copy(stack, servers):
    """No sampled HEADs: a clean copy passes with no HEAD at all (the target's listing shows every object with
    the ETag our write was answered and no later LastModified). A HEAD sample of one per bucket is exactly two
    HEADs. Then, a second after the copy, a Content-Type changed alone (same bytes, same ETag), a truncated
    object, a deleted one and one only on the target: each is named."""
    runbook = storage_runbook(stack, servers, sampled_heads=0, sampled_fraction=0)
    total = sum(_objects(stack).values())
    verified = migrate_storage(RunOptions(runbook=str(runbook)))["verify"]
    assert (verified["proven_by_listing"], verified["proven_by_head"]) == (total, 0)

    data = yaml.safe_load(runbook.read_text())
    data["storage"]["sampled_heads"] = 1
    runbook.write_text(yaml.safe_dump(data, sort_keys=False))
    verified = verify_storage(RunOptions(runbook=str(runbook)))
    assert (verified["proven_by_listing"], verified["proven_by_head"]) == (total - 2, 2)

    time.sleep(1.1)  # LastModified counts seconds: a change within our write's own second is the blind spot
    prefix = load_runbook(runbook).storage.bucket_prefix
    images, waivers = f"{prefix}tour-images", f"{prefix}waivers"
    client = servers[1].client()
    retyped, truncated = stack.source.execute(
        "SELECT name FROM storage.objects WHERE bucket_id = 'tour-images' ORDER BY name LIMIT 2")
    retyped, truncated = retyped[0], truncated[0]
    client.copy_object(Bucket=images, Key=retyped, CopySource={"Bucket": images, "Key": retyped},
                       ContentType="text/plain", MetadataDirective="REPLACE",
                       Metadata=client.head_object(Bucket=images, Key=retyped)["Metadata"])
    body = client.get_object(Bucket=images, Key=truncated)["Body"].read()
    client.put_object(Bucket=images, Key=truncated, Body=body[:-10], ContentType="image/jpeg")
    deleted = _one_key(stack, "waivers")
    client.delete_object(Bucket=waivers, Key=deleted)
    client.put_object(Bucket=waivers, Key="zz-only-on-target.pdf", Body=b"%PDF-1.4", ContentType="application/pdf")
    message = _gate(runbook)
    assert f"{retyped}: Content-Type differs (source image/jpeg, target text/plain)" in message
    assert f"{truncated}: size differs (source {len(body)}, target {len(body) - 10})" in message
    assert f"{deleted}: missing on target" in message
    assert "zz-only-on-target.pdf: on the target only" in message


def test_gate_catches_a_storage_row_whose_object_is_not_on_the_target(stack, servers, migrated_files):
    runbook, _ = migrated_files
    stack.source.execute(
        "INSERT INTO storage.objects (bucket_id, name, metadata) VALUES ('waivers', 'zz-late/waiver.pdf', "
        "'{\"size\": 10, \"mimetype\": \"application/pdf\", \"eTag\": \"\\\"0123456789abcdef0123456789abcdef\\\"\"}')")
    try:
        message = _gate(runbook)
        assert "bucket waivers: zz-late/waiver.pdf: missing on target" in message
    finally:
        stack.source.execute("DELETE FROM storage.objects WHERE name = 'zz-late/waiver.pdf'")


def test_sigkill_mid_copy_then_rerun_copies_only_the_remainder(stack, servers):
    from liftoff_sandbox.faults import FaultProxy

    _, target, seeded = servers
    total = sum(seeded.values())
    with FaultProxy(target.endpoint_url, slowdown={"PUT": 0.5}, seed=3) as slow:
        # slowed down (half of the PUTs answered SlowDown, retried with backoff) so the kill lands mid-copy
        runbook = storage_runbook(stack, servers, target_url=slow.url, batch_size=20, concurrency=2)
        ledger = load_runbook(runbook).state_dir / "ledger.sqlite"
        before = kill_storage_run_mid_copy(runbook, ledger, after=40)
        assert 0 < before < total
        slow.set_faults(slowdown=0.0)
        slow.reset_counters()
        result = migrate_storage(RunOptions(runbook=str(runbook)))
        remainder = total - before
        # at most the objects copied after the ledger's last write before the kill are copied again
        assert remainder <= slow.puts_forwarded <= remainder + 50 + 2
        assert result["copy"]["copied"] == slow.puts_forwarded
        assert result["verify"]["objects"] == total


def test_the_plan_lists_storage_policies_and_rows_without_bytes(stack, servers):
    from liftoff.reports import last_markdown

    stack.source.execute(
        "INSERT INTO storage.objects (bucket_id, name, metadata) VALUES ('waivers', 'zz-nobytes/w.pdf', "
        "'{\"size\": 10, \"mimetype\": \"application/pdf\"}')")
    try:
        runbook = storage_runbook(stack, servers)
        with pytest.raises(PreflightFailed, match="zz-nobytes/w.pdf"):  # the dry run stops where the run would
            migrate_storage(RunOptions(runbook=str(runbook), dry_run=True))
        plan = last_markdown("storage-plan")
        assert "zz-nobytes/w.pdf" in plan  # reconciled with the source's listing, never skipped
        policies = [r[0] for r in stack.source.execute(
            "SELECT policyname FROM pg_policies WHERE schemaname = 'storage' AND tablename = 'objects'")]
        assert policies and all(p in plan for p in policies)
        assert "presigned" in plan
    finally:
        stack.source.execute("DELETE FROM storage.objects WHERE name = 'zz-nobytes/w.pdf'")


def test_a_wrong_target_secret_is_one_line_naming_endpoint_and_key_id(stack, servers):
    from helpers import run_cli

    runbook = storage_runbook(stack, servers)
    data = yaml.safe_load(runbook.read_text())
    data["storage"]["target"]["secret_access_key"] = {"env": "LIFTOFF_WRONG_S3_SECRET"}
    runbook.write_text(yaml.safe_dump(data))
    wrong = "not-the-secret-" + servers[1].secret_key[:6]
    done = run_cli("run", "storage", "--runbook", str(runbook), env={"LIFTOFF_WRONG_S3_SECRET": wrong})
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and servers[1].endpoint_url in errors[0] and servers[1].access_key in errors[0]
    assert wrong not in done.stderr + done.stdout


def test_keys_beside_a_folder_of_the_same_stem_are_merged_in_byte_order(stack, servers):
    """S3 servers differ in listing order (SeaweedFS lists docs/a.pdf before docs-x.pdf): the plan's
    reconciliation and the gate's count of the target must not mistake that for a difference."""
    supabase_s3 = servers[0]
    keys = ["zz/a.pdf", "zz-b.pdf", "zz/c/d.pdf"]
    client = supabase_s3.client()
    for key in keys:
        body = key.encode() * 10
        client.put_object(Bucket="waivers", Key=key, Body=body, ContentType="application/pdf")
        stack.source.execute(
            "INSERT INTO storage.objects (bucket_id, name, metadata) VALUES ('waivers', %s, %s)"
            .replace("%s", "'{}'").format(key, '{"size": %d, "mimetype": "application/pdf", "eTag": "\\"%s\\""}'
                                          % (len(body), hashlib.md5(body).hexdigest())))
    try:
        runbook = storage_runbook(stack, servers)
        result = migrate_storage(RunOptions(runbook=str(runbook)))
        assert result["verify"]["objects"] == sum(_objects(stack).values())
    finally:
        for key in keys:
            client.delete_object(Bucket="waivers", Key=key)
            stack.source.execute(f"DELETE FROM storage.objects WHERE bucket_id = 'waivers' AND name = '{key}'")


def test_copy_through_throttling_and_dropped_connections_completes_and_verifies(stack, servers):
    from liftoff_sandbox.faults import FaultProxy

    _, target, seeded = servers
    with FaultProxy(target.endpoint_url, slowdown=0.2, drop=0.1, seed=11) as flaky:
        runbook = storage_runbook(stack, servers, target_url=flaky.url, concurrency=4)
        result = migrate_storage(RunOptions(runbook=str(runbook)))
        assert flaky.slowdowns["PUT"] > 0 and flaky.drops["PUT"] + flaky.drops["HEAD"] > 0  # faults were met
    assert result["copy"]["copied"] == sum(seeded.values()) and result["verify"]["objects"] == sum(seeded.values())


# ---------------------------------------------------------------------------------------------------------
# The REST API as the source (the sandbox's fake of Supabase Storage's endpoints)


@pytest.fixture(scope="module")
def rest_api(stack, servers, module_env):
    from liftoff_sandbox.storage_api import StorageApiFake

    api = StorageApiFake(stack.source.conninfo(), servers[0].client()).start()
    module_env.setenv("LIFTOFF_SUPABASE_SERVICE_KEY", api.service_role_key)
    yield api
    api.stop()


def _rest_source(api, key_env: str = "LIFTOFF_SUPABASE_SERVICE_KEY") -> dict:
    return {"project_url": SUPABASE_PROJECT_URL, "protocol": "rest", "rest_url": api.url,
            "service_key": {"env": key_env}}


def test_rest_source_copies_every_object_once_and_the_gate_passes(stack, servers, rest_api):
    runbook = storage_runbook(stack, servers, source=_rest_source(rest_api))
    downloads_before = rest_api.requests["object.get"]
    result = migrate_storage(RunOptions(runbook=str(runbook)))
    total = sum(_objects(stack).values())
    assert result["copy"]["copied"] == total and result["verify"]["objects"] == total
    # the plan proves each row's bytes by a download's headers, the copy downloads each object once more
    assert rest_api.requests["object.get"] - downloads_before == 2 * total
    _, target, _ = servers
    prefix = load_runbook(runbook).storage.bucket_prefix
    key = _one_key(stack, "waivers")
    head = target.client().head_object(Bucket=f"{prefix}waivers", Key=key)
    assert head["ContentType"] == "application/pdf" and head["CacheControl"] == "max-age=3600"
    again = migrate_storage(RunOptions(runbook=str(runbook)))
    assert again["copy"]["copied"] == 0


def test_rest_source_with_a_wrong_service_key_is_one_line_naming_the_field(stack, servers, rest_api, monkeypatch):
    from liftoff.errors import LiftoffError
    from liftoff_sandbox.storage_api import mint_service_role_key

    wrong = mint_service_role_key("another-projects-secret")
    monkeypatch.setenv("LIFTOFF_WRONG_SERVICE_KEY", wrong)
    runbook = storage_runbook(stack, servers, source=_rest_source(rest_api, "LIFTOFF_WRONG_SERVICE_KEY"))
    with pytest.raises(LiftoffError) as refused:
        migrate_storage(RunOptions(runbook=str(runbook)))
    message = str(refused.value)
    assert "\n" not in message and rest_api.url in message and "storage.source.service_key" in message
    assert wrong not in message


# ---------------------------------------------------------------------------------------------------------
# The URL rewrite in the app's database (on a copy of the migrated target)

URL_COLUMN = {"table": "public.tour_images", "column": "public_url"}


def _urls(stack, database: str) -> dict[str, str]:
    return {str(k): v for k, v in stack.target.execute("SELECT id, public_url FROM public.tour_images",
                                                         dbname=database)}


def _db_gate(runbook) -> str | None:
    from liftoff.flows.verify import verify_database

    try:
        verify_database(RunOptions(runbook=str(runbook)))
    except GateFailed as failed:
        return str(failed)
    return None


def test_rewrite_then_restore_from_the_ledger_gives_back_the_exact_urls(stack, servers, migrated):
    from liftoff.ledger import Ledger
    from liftoff.reports import last_markdown
    from liftoff.tasks.storage.urls import REWRITE_EVENT, restore_storage_urls

    name = f"urls{next(_n)}"
    stack.new_target_database(name, "migrated")
    runbook = storage_runbook(stack, servers, target_database=name, rewrite=[URL_COLUMN])
    prefix = load_runbook(runbook).storage.bucket_prefix
    original = _urls(stack, name)
    supabase_urls = {k for k, v in original.items() if v.startswith(f"{SUPABASE_PROJECT_URL}/storage/v1/object/public/")}
    assert supabase_urls

    migrate_storage(RunOptions(runbook=str(runbook), dry_run=True))
    preview = last_markdown("storage-urls-preview")
    assert "dry run" in preview and f"-> `https://files.example.com/{prefix}tour-images/" in preview
    assert _urls(stack, name) == original  # the dry run wrote nothing

    result = migrate_storage(RunOptions(runbook=str(runbook)))
    assert result["urls"]["rows_changed"] == len(supabase_urls)
    rewritten = _urls(stack, name)
    for key in supabase_urls:
        assert rewritten[key] == original[key].replace(f"{SUPABASE_PROJECT_URL}/storage/v1/object/public/",
                                                       f"https://files.example.com/{prefix}")
    # the rewritten URL serves the file from the target (the public base stands for the target's endpoint)
    _, target, _ = servers
    some = rewritten[sorted(supabase_urls)[0]]
    assert _anonymous_status(some.replace("https://files.example.com", target.endpoint_url)) == 200
    events = [e for e in Ledger(load_runbook(runbook).state_dir).events("storage") if e.what == REWRITE_EVENT]
    assert len(events) == 1 and len(events[0].after["rows"]) == len(supabase_urls)

    # the database gate expects the rewritten URLs now, and still catches a URL changed behind its back
    assert _db_gate(runbook) is None
    victim = sorted(supabase_urls)[0]
    stack.target.execute(f"UPDATE public.tour_images SET public_url = public_url || '?x' WHERE id = '{victim}'",
                         dbname=name)
    failure = _db_gate(runbook)
    assert failure and "public_url" in failure and victim in failure
    stack.target.execute("UPDATE public.tour_images SET public_url = left(public_url, -2) "
                         f"WHERE id = '{victim}'", dbname=name)

    again = migrate_storage(RunOptions(runbook=str(runbook)))  # idempotent: nothing left to rewrite
    assert again["urls"]["rows_changed"] == 0

    restored = restore_storage_urls(load_runbook(runbook))
    assert restored["restored"] == len(supabase_urls) and restored["kept_count"] == 0
    assert _urls(stack, name) == original
    assert _db_gate(runbook) is None  # and the gate expects the source's values again


def test_rewrite_refuses_before_the_storage_gate_passed(stack, servers, migrated):
    from liftoff.flows.storage_urls import rewrite_urls
    from liftoff.errors import StepFailed

    name = f"urls{next(_n)}"
    stack.new_target_database(name, "migrated")
    runbook = storage_runbook(stack, servers, target_database=name, rewrite=[URL_COLUMN])
    original = _urls(stack, name)
    with pytest.raises(StepFailed, match="storage gate has not run"):
        rewrite_urls(RunOptions(runbook=str(runbook)))
    assert _urls(stack, name) == original
