"""The storage phase's S3 building blocks (liftoff/systems/s3.py) against two real SeaweedFS servers, a source and a
target, with the fault proxy in between where a test needs throttling, dropped connections or a PUT count."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import itertools
import json
import random
import re
import time
import tracemalloc
import types

import psycopg
import pytest
from boto3.s3.transfer import TransferConfig

from liftoff.errors import ConnectionRefused, StepFailed
from liftoff_sandbox.faults import FaultProxy
from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir
from liftoff_sandbox.s3 import S3Server
from liftoff_sandbox.storage_api import StorageApiFake
from liftoff_sandbox.supabase_source import prepare_supabase_source
from liftoff.systems import s3 as s3tasks
from liftoff.systems.s3 import (
    RetryPolicy, S3Endpoint, compare_object, copy_batch, copy_batch_from, copy_object, deep_md5, ensure_bucket,
    head, list_objects, prove_bucket_access,
)
from liftoff.systems.supabase_storage import RestSource

MiB = 1024 * 1024
FAST = RetryPolicy(attempts=10, max_seconds=60, initial_wait=0.01, max_wait=0.2)
AWKWARD_KEYS = [
    "with space/tour photo 1.jpg",
    "ünïcødé/日本語/émoji-🚀.png",
    "plus+sign/a+b=c.txt",
    "percent/100%.txt",
    "percent/already%20encoded.txt",
    "a/b/c/d/e/f/g/h/i/j/deep.txt",
]


def endpoint(server: S3Server, url: str | None = None, **override) -> S3Endpoint:
    fields = {"endpoint_url": url or server.endpoint_url, "region": server.region,
              "access_key_id": server.access_key, "secret_access_key": server.secret_key, **override}
    return S3Endpoint(**fields)


@pytest.fixture(scope="module")
def source_server():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def target_server():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def src(source_server):
    return s3tasks.client(endpoint(source_server), max_pool_connections=16)


@pytest.fixture(scope="module")
def dst(target_server):
    return s3tasks.client(endpoint(target_server), max_pool_connections=16)


_bucket_numbers = itertools.count()


@pytest.fixture
def buckets(src, dst, request):
    """One fresh bucket of the same name on each side."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name[len("test_"):].lower())[:45].strip("-")
    name = f"t{next(_bucket_numbers)}-{slug}"
    src.create_bucket(Bucket=name)
    dst.create_bucket(Bucket=name)
    return name


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def body(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def count(client, bucket: str) -> int:
    return sum(1 for _ in list_objects(client, bucket))


# -- copy ---------------------------------------------------------------------------------------------------


def test_copy_keeps_awkward_keys_empty_objects_headers_and_metadata(src, dst, buckets):
    rng = random.Random(1)
    objects = {key: rng.randbytes(rng.randint(1, 50_000)) for key in AWKWARD_KEYS}
    objects["empty/.keep"] = b""
    for key, data in objects.items():
        src.put_object(Bucket=buckets, Key=key, Body=data)
    src.put_object(Bucket=buckets, Key="waivers/2024/anna.pdf", Body=b"%PDF-1.7 signed",
                   ContentType="application/pdf", CacheControl="max-age=3600",
                   ContentDisposition='attachment; filename="anna.pdf"',
                   Metadata={"uploaded-by": "crm", "tour": "lagoon"})
    objects["waivers/2024/anna.pdf"] = b"%PDF-1.7 signed"

    for key, data in objects.items():
        copied = copy_object(src, buckets, key, dst, buckets, retry=FAST)
        assert (copied.key, copied.size, copied.md5) == (key, len(data), md5(data))
        assert body(dst, buckets, key) == data
        target = head(dst, buckets, key)
        assert target.md5 == md5(data)
        assert base64.b64decode(target.metadata["md5chksum"]).hex() == md5(data)  # rclone's form
        assert compare_object(head(src, buckets, key), target) == []

    waiver = head(dst, buckets, "waivers/2024/anna.pdf")
    assert waiver.content_type == "application/pdf" and waiver.cache_control == "max-age=3600"
    assert waiver.content_disposition == 'attachment; filename="anna.pdf"'
    assert waiver.metadata["uploaded-by"] == "crm" and waiver.metadata["tour"] == "lagoon"
    assert head(dst, buckets, "empty/.keep").size == 0
    assert sorted(o.key for o in list_objects(dst, buckets)) == sorted(objects)


def test_multipart_copy_streams_parts_and_stores_the_real_md5_with_bounded_memory(src, dst, buckets):
    data = random.Random(2).randbytes(20 * MiB)
    src.put_object(Bucket=buckets, Key="tours/lagoon.mov", Body=data)  # single PUT: a plain-MD5 ETag
    expected = md5(data)
    del data

    tracemalloc.start()
    try:
        copied = copy_object(src, buckets, "tours/lagoon.mov", dst, buckets, part_size=5 * MiB, retry=FAST)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 3 * MiB, f"peak Python memory {peak / MiB:.1f} MiB while copying a 20 MiB object"
    target = head(dst, buckets, "tours/lagoon.mov")
    assert target.etag.endswith("-4") and copied.etag == target.etag
    assert target.md5 == copied.md5 == expected
    assert deep_md5(dst, buckets, "tours/lagoon.mov") == expected
    assert dst.list_multipart_uploads(Bucket=buckets).get("Uploads") is None


def test_source_without_a_plain_md5_is_hashed_first_and_a_false_claim_is_not_trusted(src, dst, buckets):
    # A source object uploaded in parts: its ETag is no MD5 and it carries no md5 metadata.
    parted = random.Random(3).randbytes(11 * MiB)
    src.upload_fileobj(io.BytesIO(parted), buckets, "parted.bin", Config=TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, use_threads=False))
    source = head(src, buckets, "parted.bin")
    assert source.md5 is None and source.etag.endswith("-3")
    # A source whose md5 metadata lies, below and above the part size.
    lying = {"small-liar": b"small but lying", "big-liar": random.Random(4).randbytes(6 * MiB)}
    false_claim = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    for key, data in lying.items():
        src.put_object(Bucket=buckets, Key=key, Body=data, Metadata={"md5chksum": false_claim})

    for key, data in [("parted.bin", parted), *lying.items()]:
        copied = copy_object(src, buckets, key, dst, buckets, part_size=5 * MiB, retry=FAST)
        assert copied.md5 == md5(data)
        assert head(dst, buckets, key).md5 == md5(data)
        assert deep_md5(dst, buckets, key) == md5(data)
    assert compare_object(source, head(dst, buckets, "parted.bin")) == [
        f"md5 unknown on source (ETag {source.etag} is not an MD5 and no md5chksum metadata): "
        f"compare with a deep check"]


def test_a_failed_multipart_copy_is_aborted_on_the_target(source_server, dst, src, buckets):
    src.put_object(Bucket=buckets, Key="big photo.jpg", Body=random.Random(5).randbytes(12 * MiB))
    # Every GET from the source is cut midway; HEAD passes, so the upload starts and then cannot finish.
    with FaultProxy(source_server.endpoint_url, drop={"GET": 1.0}) as proxy:
        cut_source = s3tasks.client(endpoint(source_server, proxy.url))
        with pytest.raises(StepFailed) as failed:
            copy_object(cut_source, buckets, "big photo.jpg", dst, buckets, part_size=5 * MiB,
                        retry=RetryPolicy(attempts=2, initial_wait=0.01, max_wait=0.05))
        assert proxy.drops["GET"] == 1 + 2  # the opening GET (its headers are all it needs), 2 tries of part 1
    message = str(failed.value)
    assert "\n" not in message and "'big photo.jpg'" in message and "part 1 failed after 2 attempts" in message
    assert dst.list_multipart_uploads(Bucket=buckets).get("Uploads") is None
    assert head(dst, buckets, "big photo.jpg") is None


def test_copy_batch_through_slowdowns_and_drops_completes_and_every_object_verifies(
        source_server, target_server, src, dst, buckets):
    rng = random.Random(6)
    objects = {f"batch/{i:02d} é+%.bin": rng.randbytes(rng.choice([0, 1, 700, 20_000, 150_000, 400_000]))
               for i in range(58)}
    objects["batch/big-1.bin"] = rng.randbytes(6 * MiB)
    objects["batch/big-2.bin"] = rng.randbytes(7 * MiB)
    for key, data in objects.items():
        src.put_object(Bucket=buckets, Key=key, Body=data)

    finished = []
    with FaultProxy(source_server.endpoint_url, slowdown=0.1, drop=0.1, seed=3) as source_proxy, \
            FaultProxy(target_server.endpoint_url, slowdown=0.2, drop=0.1, seed=4) as target_proxy:
        flaky_src = s3tasks.client(endpoint(source_server, source_proxy.url), max_pool_connections=8)
        flaky_dst = s3tasks.client(endpoint(target_server, target_proxy.url), max_pool_connections=8)
        result = copy_batch(iter(objects), flaky_src, buckets, flaky_dst, buckets, part_size=5 * MiB,
                            concurrency=8, retry=FAST, on_done=finished.append)
        assert target_proxy.slowdowns["PUT"] > 0 and target_proxy.drops["PUT"] > 0
        assert source_proxy.slowdowns["GET"] + source_proxy.slowdowns["HEAD"] > 0
        assert source_proxy.drops["GET"] + source_proxy.drops["HEAD"] > 0

    assert result.failed == []
    assert sorted(c.key for c in result.copied) == sorted(objects) == sorted(o.key for o in finished)
    assert result.bytes == sum(map(len, objects.values()))
    for key, data in objects.items():  # seen without the proxies
        assert compare_object(head(src, buckets, key), head(dst, buckets, key)) == []
        assert deep_md5(dst, buckets, key) == md5(data)
    assert dst.list_multipart_uploads(Bucket=buckets).get("Uploads") is None


def test_copy_batch_reports_a_missing_source_object_and_copies_the_others(src, dst, buckets):
    src.put_object(Bucket=buckets, Key="here-1", Body=b"one")
    src.put_object(Bucket=buckets, Key="here-2", Body=b"two")
    result = copy_batch(["here-1", "gone", "here-2"], src, buckets, dst, buckets, retry=FAST)
    assert sorted(c.key for c in result.copied) == ["here-1", "here-2"]
    assert [f.key for f in result.failed] == ["gone"]
    assert "no such object on the source" in result.failed[0].error and "'gone'" in result.failed[0].error
    assert body(dst, buckets, "here-2") == b"two"


# -- copy from a stream (the REST source) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage_api(source_server):
    """Supabase Storage's REST API (the sandbox's fake) over a Supabase-shaped PostgreSQL inventory and the
    source S3 server's bytes; yields (fake, conninfo of the inventory)."""
    pg = PostgresServer(pg15_bin_dir(), superuser="supabase_admin", password="s3-tasks-admin-pw-5120").start()
    try:
        prepare_supabase_source(pg, postgres_password="s3-tasks-owner-pw-5120", contrib=False)
        with StorageApiFake(pg.conninfo(), source_server.client()) as fake:
            yield fake, pg.conninfo()
    finally:
        pg.stop()


def stored(storage_api, src, bucket: str, objects: dict[str, tuple[bytes, str]], *, multipart: set[str] = frozenset()):
    """Puts each object on the source S3 server (``multipart``: uploaded in parts, so its ETag is no MD5, as a
    hosted Storage gives) and its storage.objects row, with the ETag the server answered."""
    _, conninfo = storage_api
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("insert into storage.buckets (id, name, public) values (%s, %s, false)", [bucket, bucket])
        for key, (data, mimetype) in objects.items():
            if key in multipart:
                src.upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs={"ContentType": mimetype},
                                   Config=TransferConfig(multipart_threshold=1, multipart_chunksize=5 * MiB,
                                                         use_threads=False))
            else:
                src.put_object(Bucket=bucket, Key=key, Body=data, ContentType=mimetype, CacheControl="max-age=3600")
            etag = head(src, bucket, key).etag
            conn.execute("insert into storage.objects (bucket_id, name, metadata, version) values (%s, %s, %s, 'v1')",
                         [bucket, key, json.dumps({"eTag": f'"{etag}"', "size": len(data), "mimetype": mimetype})])


def test_copy_from_a_rest_stream_keeps_bytes_md5_and_headers_of_empty_small_large_and_awkward_objects(
        storage_api, src, dst, buckets):
    rng = random.Random(11)
    objects = {
        "empty/.keep": (b"", "text/plain"),
        "photos/small lagoon.jpg": (rng.randbytes(70_000), "image/jpeg"),
        "with space/a+b=c (1) & co's.pdf": (rng.randbytes(3_000), "application/pdf"),
        "video/tour.mp4": (rng.randbytes(11 * MiB + 17), "video/mp4"),  # above the part size, plain-MD5 ETag
        "video/parted.mov": (rng.randbytes(12 * MiB), "video/quicktime"),  # above, and no MD5 on the source
        "scans/parted-small.pdf": (rng.randbytes(90_000), "application/pdf"),  # one part: ETag "...-1"
    }
    refused = ["ünïcødé/été.jpg", "percent/100%.txt"]  # Storage refuses these keys (InvalidKey)
    stored(storage_api, src, buckets, objects, multipart={"video/parted.mov", "scans/parted-small.pdf"})
    fake = storage_api[0]
    finished = []
    with RestSource(fake.url, fake.service_role_key, retry=FAST) as rest:
        assert rest.open(buckets, "video/parted.mov").md5 is None
        result = copy_batch_from([*objects, *refused], lambda key: rest.open(buckets, key), dst, buckets,
                                 part_size=5 * MiB, concurrency=4, retry=FAST, on_done=finished.append)

    assert sorted(c.key for c in result.copied) == sorted(objects)
    assert sorted(f.key for f in result.failed) == sorted(refused)
    assert sorted(o.key for o in finished) == sorted([*objects, *refused])
    for failure in result.failed:
        assert "InvalidKey" in failure.error and repr(failure.key) in failure.error and "\n" not in failure.error
    for copied in result.copied:
        data, mimetype = objects[copied.key]
        assert (copied.size, copied.md5, copied.content_type) == (len(data), md5(data), mimetype)
        assert body(dst, buckets, copied.key) == data
        target = head(dst, buckets, copied.key)
        assert base64.b64decode(target.metadata["md5chksum"]).hex() == md5(data) == target.md5
        assert target.content_type == mimetype
    assert head(dst, buckets, "video/tour.mp4").etag.endswith("-3")  # multipart: 5 + 5 + 1 MiB
    assert head(dst, buckets, "photos/small lagoon.jpg").cache_control == "max-age=3600"
    assert dst.list_multipart_uploads(Bucket=buckets).get("Uploads") is None


@pytest.mark.parametrize("key, size", [("cut/small.jpg", 300_000), ("cut/large.mov", 7 * MiB)])
def test_a_source_stream_cut_short_fails_that_object_naming_it_and_leaves_nothing_on_the_target(
        storage_api, src, dst, buckets, key, size):
    data = random.Random(12).randbytes(size)
    stored(storage_api, src, buckets, {key: (data, "image/jpeg"), "whole.txt": (b"fine", "text/plain")})
    fake = storage_api[0]
    tries = RetryPolicy(attempts=3, initial_wait=0.01, max_wait=0.05)
    # Every download of the object is cut after its headers and half its body.
    with FaultProxy(fake.url, drop={"GET": 1.0}) as proxy, \
            RestSource(proxy.url, fake.service_role_key, retry=tries) as rest:
        result = copy_batch_from([key], lambda k: rest.open(buckets, k), dst, buckets, part_size=5 * MiB,
                                 retry=tries)
        assert proxy.drops["GET"] == 3  # each attempt opened the stream again
    with RestSource(fake.url, fake.service_role_key, retry=tries) as rest:
        fine = copy_batch_from(["whole.txt"], lambda k: rest.open(buckets, k), dst, buckets, retry=tries)

    assert result.copied == [] and [f.key for f in result.failed] == [key]
    message = result.failed[0].error
    assert "\n" not in message and repr(key) in message and f"bucket '{buckets}'" in message
    assert "after 3 attempts" in message and "source" in message
    assert fake.service_role_key not in message
    assert head(dst, buckets, key) is None
    assert dst.list_multipart_uploads(Bucket=buckets).get("Uploads") is None
    assert [c.key for c in fine.copied] == ["whole.txt"] and body(dst, buckets, "whole.txt") == b"fine"


def test_with_a_proxy_set_for_the_endpoint_the_object_requests_go_through_it(
        target_server, src, buckets, monkeypatch):
    src.put_object(Bucket=buckets, Key="via proxy/1+1.jpg", Body=b"jpeg bytes", ContentType="image/jpeg")
    with FaultProxy(target_server.endpoint_url) as proxy:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)  # read when the client is made, as botocore does
        proxied_dst = s3tasks.client(endpoint(target_server))
        copied = copy_object(src, buckets, "via proxy/1+1.jpg", proxied_dst, buckets, retry=FAST)
        target = head(proxied_dst, buckets, "via proxy/1+1.jpg")
        assert proxy.requests["PUT"] == 1 and proxy.requests["HEAD"] == 1
    assert copied.md5 == target.md5 == md5(b"jpeg bytes") and target.content_type == "image/jpeg"


# -- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrong, code", [("secret", "SignatureDoesNotMatch"), ("key id", "InvalidAccessKeyId")])
def test_a_refused_key_fails_at_once_naming_endpoint_bucket_and_key_id(target_server, src, buckets, wrong, code):
    src.put_object(Bucket=buckets, Key="photo.jpg", Body=b"jpeg")
    bad_secret = "wrong-" + target_server.secret_key
    override = ({"secret_access_key": bad_secret} if wrong == "secret"
                else {"access_key_id": "LIFTOFFNOSUCHKEY0000", "secret_access_key": bad_secret})
    with FaultProxy(target_server.endpoint_url) as proxy:
        proxy_url = proxy.url
        refused_dst = s3tasks.client(endpoint(target_server, proxy_url, **override))
        key_id = override.get("access_key_id", target_server.access_key)
        started = time.monotonic()
        with pytest.raises(ConnectionRefused) as refused:
            copy_object(src, buckets, "photo.jpg", refused_dst, buckets)  # default retry policy
        assert time.monotonic() - started < 2
        assert proxy.requests["PUT"] == 1  # never retried
        with pytest.raises(ConnectionRefused) as refused_batch:
            copy_batch(["photo.jpg"] * 5, src, buckets, refused_dst, buckets, concurrency=2)
    for message in (str(refused.value), str(refused_batch.value)):
        assert "\n" not in message
        assert proxy_url in message and f"bucket '{buckets}'" in message and f"'{key_id}'" in message
        assert code in message
        assert target_server.secret_key not in message and bad_secret not in message
    assert bad_secret not in repr(endpoint(target_server, secret_access_key=bad_secret))


# -- dry run ------------------------------------------------------------------------------------------------


def test_dry_run_writes_nothing(source_server, target_server, src, dst, buckets):
    sizes = {"a.jpg": 10, "b/c.pdf": 2000, "big.bin": 6 * MiB}
    for key, size in sizes.items():
        src.put_object(Bucket=buckets, Key=key, Body=b"x" * size)
    dst.put_object(Bucket=buckets, Key="already-there", Body=b"old")

    with FaultProxy(target_server.endpoint_url) as proxy:
        watched_dst = s3tasks.client(endpoint(target_server, proxy.url))
        result = copy_batch(list(sizes), src, buckets, watched_dst, buckets, part_size=5 * MiB, dry_run=True)
        planned = ensure_bucket(watched_dst, "not-yet-made", public=True, dry_run=True)
        assert proxy.puts_forwarded == 0 and proxy.requests["POST"] == 0 and proxy.requests["DELETE"] == 0

    assert {c.key: c.size for c in result.copied} == sizes and all(c.dry_run for c in result.copied)
    assert result.bytes == sum(sizes.values())
    assert planned == "would create; would set anonymous download"
    assert count(dst, buckets) == 1
    assert "not-yet-made" not in [b["Name"] for b in dst.list_buckets()["Buckets"]]


# -- buckets ------------------------------------------------------------------------------------------------


def test_ensure_bucket_is_idempotent_and_proves_public_and_private_access(target_server, dst):
    url = target_server.endpoint_url
    assert ensure_bucket(dst, "tour-images", public=True) == "create; set anonymous download"
    assert ensure_bucket(dst, "documents", public=False) == "create; private"
    assert ensure_bucket(dst, "tour-images", public=True) == "exists; anonymous download already set"
    assert ensure_bucket(dst, "documents", public=False) == "exists; private"
    key = "tours/lagoon 1+ü.jpg"
    dst.put_object(Bucket="tour-images", Key=key, Body=b"jpeg bytes")
    dst.put_object(Bucket="documents", Key=key, Body=b"signed waiver")

    public = prove_bucket_access(url, "tour-images", key, public=True)
    private = prove_bucket_access(url, "documents", key, public=False)
    assert public.ok and (public.anonymous_get_status, public.anonymous_list_status) == (200, 403)
    assert private.ok and (private.anonymous_get_status, private.anonymous_list_status) == (403, 403)

    # Someone opens the private bucket by hand: the proof says so, and ensure_bucket closes it again.
    dst.put_bucket_policy(Bucket="documents", Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"],
        "Resource": ["arn:aws:s3:::documents/*"]}]}))
    opened = prove_bucket_access(url, "documents", key, public=False)
    assert not opened.ok
    assert opened.problems == [f"bucket 'documents' is private but an anonymous GET of {key!r} answered 200, "
                               f"not 403"]
    assert ensure_bucket(dst, "documents", public=False) == "exists; remove anonymous access"
    assert prove_bucket_access(url, "documents", key, public=False).ok

    # And the other way: the public bucket's policy removed by hand.
    dst.delete_bucket_policy(Bucket="tour-images")
    closed = prove_bucket_access(url, "tour-images", key, public=True)
    assert not closed.ok and "answered 403, not 200" in closed.problems[0]
    assert ensure_bucket(dst, "tour-images", public=True) == "exists; set anonymous download"
    assert prove_bucket_access(url, "tour-images", key, public=True).ok


def test_the_access_proof_tries_a_throttled_anonymous_request_again(target_server, dst):
    ensure_bucket(dst, "throttled-public", public=True)
    dst.put_object(Bucket="throttled-public", Key="photo 1.jpg", Body=b"jpeg bytes")
    with FaultProxy(target_server.endpoint_url, slowdown={"GET": 0.5}, seed=3) as proxy:
        proof = prove_bucket_access(proxy.url, "throttled-public", "photo 1.jpg", public=True, retry=FAST)
        assert proxy.slowdowns["GET"] > 0
    assert proof.ok and (proof.anonymous_get_status, proof.anonymous_list_status) == (200, 403)


# -- verification -------------------------------------------------------------------------------------------


def test_compare_object_catches_a_truncated_object_a_flipped_byte_and_a_wrong_content_type(src, dst, buckets):
    data = random.Random(7).randbytes(100_000)
    for key in ("truncated.jpg", "flipped.jpg", "retyped.jpg", "deleted.jpg"):
        src.put_object(Bucket=buckets, Key=key, Body=data, ContentType="image/jpeg", CacheControl="max-age=60")
        copy_object(src, buckets, key, dst, buckets, retry=FAST)
    original = head(dst, buckets, "flipped.jpg")
    source = head(src, buckets, "flipped.jpg")

    # Damage on the target that keeps our md5 metadata, as a disk or a hand edit would.
    def overwrite(key, new_body, content_type="image/jpeg"):
        dst.put_object(Bucket=buckets, Key=key, Body=new_body, ContentType=content_type,
                       CacheControl="max-age=60", Metadata=original.metadata)

    overwrite("truncated.jpg", data[:-1000])
    flipped = bytearray(data)
    flipped[50_000] ^= 0x01
    overwrite("flipped.jpg", bytes(flipped))
    overwrite("retyped.jpg", data, content_type="text/plain")
    dst.delete_object(Bucket=buckets, Key="deleted.jpg")

    assert compare_object(source, head(dst, buckets, "truncated.jpg")) == ["size 100000 on source, 99000 on target"]
    shallow = head(dst, buckets, "flipped.jpg")
    assert compare_object(source, shallow) == []  # metadata alone cannot see it
    deep = dataclasses.replace(shallow, md5=deep_md5(dst, buckets, "flipped.jpg"))
    assert compare_object(source, deep) == [f"md5 {md5(data)} on source, {md5(bytes(flipped))} on target"]
    assert compare_object(source, head(dst, buckets, "retyped.jpg")) == [
        "content type 'image/jpeg' on source, 'text/plain' on target"]
    assert head(dst, buckets, "deleted.jpg") is None
    assert compare_object(source, None) == ["missing on target"]


def test_list_objects_is_a_generator_that_pages_through_a_prefix(src, buckets):
    for i in range(25):
        src.put_object(Bucket=buckets, Key=f"photos/{i:02d}.jpg", Body=b"x" * i)
    src.put_object(Bucket=buckets, Key="other/x", Body=b"y")
    listing = list_objects(src, buckets, prefix="photos/", page_size=10)
    assert isinstance(listing, types.GeneratorType)
    listed = list(listing)
    assert [o.key for o in listed] == [f"photos/{i:02d}.jpg" for i in range(25)]
    assert [o.size for o in listed] == list(range(25))
    assert listed[3].etag == md5(b"xxx")
    assert count(src, buckets) == 26


def test_a_retry_warning_names_the_server_that_failed_not_the_one_written_to(source_server, src, dst, buckets):
    """A copy's retries run around the whole object (the target's call); a source that answers SlowDown is the
    source's fault, and its warning says so."""
    from structlog.testing import capture_logs

    src.put_object(Bucket=buckets, Key="warned.bin", Body=b"w" * 1000)
    with FaultProxy(source_server.endpoint_url, slowdown={"GET": 0.6}, seed=2) as source_proxy:
        flaky_src = s3tasks.client(endpoint(source_server, source_proxy.url))
        with capture_logs() as logs:
            copy_batch(["warned.bin"], flaky_src, buckets, dst, buckets, retry=FAST)
        assert source_proxy.slowdowns["GET"] > 0
        failed_at = source_proxy.url
    retries = [e for e in logs if e["event"] == "s3 retry"]
    assert retries and {e["endpoint"] for e in retries} == {failed_at}
