"""The storage phase's source side (liftoff/systems/supabase_storage.py) against real servers: a Supabase-shaped
PostgreSQL 15 source (its storage.buckets / storage.objects rows and policies), a SeaweedFS S3 server seeded
with those rows' bytes (Supabase Storage's S3 endpoint stand-in), and the Storage REST fake in front of both."""

from __future__ import annotations

import hashlib
import json
import time

import psycopg
import pytest

from liftoff.errors import ConnectionRefused, StepFailed
from liftoff_sandbox.faults import FaultProxy
from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir
from liftoff_sandbox.s3 import S3Server
from liftoff_sandbox.storage_api import StorageApiFake, mint_service_role_key, seed_objects
from liftoff_sandbox.supabase_source import (PRIVATE_BUCKET, PUBLIC_BUCKET, generate_crm, prepare_supabase_source,
                                             storage_object_bytes)
from liftoff.systems import s3
from liftoff.systems.supabase_storage import (ListedFile, ObjectMissing, RestSource, S3Source, SourceStream, check_bytes,
                                    inventory, read_buckets, reconcile, storage_policies)

OWNER_PASSWORD = "source-owner-pw-4471"
EDGE = "documents"  # keys with spaces, +, case, deep paths, an empty object, a folder wider than a page
EDGE_KEYS = ["docs/a b.pdf", "docs/a+b.pdf", "docs/it's (1) & co.pdf", "docs/Zeta.pdf", "docs/alpha.pdf",
             "docs/x/y/z/deep.pdf", "docs-x.pdf", "docs.pdf", "empty.txt", "top (1).pdf"]
# Keys storage-api (src/storage/limits.ts) refuses, non-ASCII and %, that the database and an S3 bucket
# can still hold (an older Storage, a restore): only the S3 way reads them.
INTL = "intl"
INTL_KEYS = ["reçus/été 2024.pdf", "日本/写真.jpg", "docs/100% done.pdf", "docs/100%25.pdf", "plain.pdf"]
FAST = s3.RetryPolicy(attempts=3, max_seconds=10, initial_wait=0.01, max_wait=0.05)


def _metadata(body: bytes, mimetype: str) -> dict:
    return {"eTag": f'"{hashlib.md5(body).hexdigest()}"', "size": len(body), "mimetype": mimetype,
            "cacheControl": "max-age=3600", "lastModified": "2024-02-03T04:05:06.000Z",
            "contentLength": len(body), "httpStatusCode": 200}


def _add_row(conn, bucket: str, key: str, metadata: dict | None) -> None:
    conn.execute("insert into storage.objects (bucket_id, name, metadata, version) values (%s, %s, %s, 'v1')",
                 [bucket, key, json.dumps(metadata) if metadata is not None else None])


def _add_bucket(conn, bucket: str, public: bool = False) -> None:
    conn.execute("insert into storage.buckets (id, name, public) values (%s, %s, %s)", [bucket, bucket, public])


def _body(bucket: str, key: str) -> bytes:
    return b"" if key == "empty.txt" else storage_object_bytes(bucket, key)


@pytest.fixture(scope="module")
def source():
    server = PostgresServer(pg15_bin_dir(), superuser="supabase_admin", password="source-admin-pw-4471").start()
    try:
        prepare_supabase_source(server, postgres_password=OWNER_PASSWORD, apps=True)
        generate_crm(server.conninfo(), bookings=60)
        with psycopg.connect(server.conninfo(), autocommit=True) as conn:
            for bucket, keys in ((EDGE, EDGE_KEYS), (INTL, INTL_KEYS)):
                _add_bucket(conn, bucket)
                for key in keys:
                    _add_row(conn, bucket, key, _metadata(_body(bucket, key), "application/pdf"))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_server(source):
    with S3Server() as server:
        client = server.client()
        seed_objects(client, source.conninfo())
        client.put_object(Bucket=EDGE, Key="empty.txt", Body=b"", ContentType="application/pdf")
        yield server


@pytest.fixture(scope="module")
def fake(source, s3_server):
    with StorageApiFake(source.conninfo(), s3_server.client()) as api:
        yield api


@pytest.fixture()
def conn(source):
    """The source as the runbook reaches it: Supabase's postgres role (not a superuser), autocommit."""
    with psycopg.connect(source.conninfo(user="postgres", password=OWNER_PASSWORD), autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def s3_source(s3_server):
    endpoint = s3.S3Endpoint(s3_server.endpoint_url, s3_server.region, s3_server.access_key, s3_server.secret_key)
    # SeaweedFS lists folder by folder ("docs/..." before "docs-x.pdf"): read it level by level.
    return S3Source(s3.client(endpoint), retry=FAST, listing="levels")


@pytest.fixture(scope="module")
def rest_source(fake):
    with RestSource(fake.url, fake.service_role_key, page_size=3, retry=FAST) as source:
        yield source


@pytest.fixture(scope="module")
def older_fake(source, s3_server):
    """A storage-api without the list-v2 route."""
    with StorageApiFake(source.conninfo(), s3_server.client(), list_v2=False) as api:
        yield api


@pytest.fixture(scope="module")
def rest_fallback(older_fake):
    with RestSource(older_fake.url, older_fake.service_role_key, page_size=3, retry=FAST) as source:
        yield source


def _rows(source, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(source.conninfo()) as c:
        return c.execute(sql, params).fetchall()


def _names(source, bucket: str) -> list[str]:
    return [r[0] for r in _rows(source, 'select name from storage.objects where bucket_id = %s '
                                        'order by name collate "C"', [bucket])]


# -- the inventory ------------------------------------------------------------------------------------------


def test_inventory_equals_storage_objects_rows_count_and_bytes_per_bucket(source, conn):
    expected = {b: (n, total) for b, n, total in _rows(
        source, "select bucket_id, count(*), sum((metadata ->> 'size')::bigint) from storage.objects group by 1")}
    got = {}
    for bucket in expected:
        objects = list(inventory(conn, bucket, batch=7))
        assert [o.key for o in objects] == _names(source, bucket)
        got[bucket] = (len(objects), sum(o.size for o in objects))
    assert got == expected
    assert got[PUBLIC_BUCKET][0] > 0 and got[PRIVATE_BUCKET][0] > 0

    first = next(o for o in inventory(conn, PRIVATE_BUCKET))
    body = storage_object_bytes(PRIVATE_BUCKET, first.key)
    assert (first.size, first.md5, first.etag, first.mimetype, first.cache_control) == \
        (len(body), hashlib.md5(body).hexdigest(), hashlib.md5(body).hexdigest(), "application/pdf", "max-age=3600")
    assert first.updated_at is not None
    assert [o.key for o in inventory(conn, EDGE, "docs/x/")] == ["docs/x/y/z/deep.pdf"]


def test_inventory_streams_from_a_server_side_cursor_and_two_can_interleave(conn):
    images, waivers = inventory(conn, PUBLIC_BUCKET, batch=5), inventory(conn, PRIVATE_BUCKET, batch=5)
    next(images), next(waivers)
    cursors = dict(conn.execute("select name, is_holdable from pg_cursors where name like 'liftoff_storage%'"))
    assert len(cursors) == 2 and all(cursors.values())
    assert all(o.bucket == PUBLIC_BUCKET for o in images) and all(o.bucket == PRIVATE_BUCKET for o in waivers)
    assert conn.execute("select count(*) from pg_cursors where name like 'liftoff_storage%'").fetchone()[0] == 0


def test_inventory_marks_a_row_without_size_and_a_multipart_etag_as_no_md5(conn, source):
    with psycopg.connect(source.conninfo(), autocommit=True) as admin:
        _add_bucket(admin, "odd-rows")
        _add_row(admin, "odd-rows", "no-metadata.bin", None)
        _add_row(admin, "odd-rows", "multipart.bin", {"eTag": '"0123456789abcdef0123456789abcdef-3"',
                                                      "size": "31457280", "mimetype": "video/mp4"})
    odd = {o.key: o for o in inventory(conn, "odd-rows")}
    assert (odd["no-metadata.bin"].size, odd["no-metadata.bin"].md5) == (None, None)
    assert (odd["multipart.bin"].size, odd["multipart.bin"].md5) == (31457280, None)
    assert odd["multipart.bin"].etag == "0123456789abcdef0123456789abcdef-3"


def test_buckets_are_read_with_public_flag_size_limit_and_mime_types(conn):
    buckets = {b.name: b for b in read_buckets(conn)}
    assert (buckets[PUBLIC_BUCKET].public, buckets[PUBLIC_BUCKET].file_size_limit,
            buckets[PUBLIC_BUCKET].allowed_mime_types) == (True, 5_242_880, ["image/jpeg", "image/png", "image/webp"])
    assert (buckets[PRIVATE_BUCKET].public, buckets[PRIVATE_BUCKET].file_size_limit,
            buckets[PRIVATE_BUCKET].allowed_mime_types) == (False, 10_485_760, ["application/pdf"])
    assert (buckets[EDGE].public, buckets[EDGE].file_size_limit, buckets[EDGE].allowed_mime_types) == \
        (False, None, None)


def test_storage_policies_list_the_waivers_rule_and_what_replaces_each(conn):
    policies = {p.name: p for p in storage_policies(conn)}
    waivers = policies["customers read own waivers"]
    assert (waivers.bucket, waivers.command, waivers.roles) == (PRIVATE_BUCKET, "SELECT", ["authenticated"])
    assert "bucket_id = 'waivers'" in waivers.expression and "auth.uid()" in waivers.expression
    assert "private" in waivers.replacement and "presigned" in waivers.replacement
    images = policies["tour images are public"]
    assert (images.bucket, sorted(images.roles)) == (PUBLIC_BUCKET, ["anon", "authenticated"])
    assert "public on the target" in images.replacement
    upload = policies["staff upload tour images"]
    assert upload.command == "INSERT" and upload.expression.startswith("WITH CHECK")
    assert "authorize" in upload.expression and "uploads go through the app" in upload.replacement


# -- the two sources ----------------------------------------------------------------------------------------


def _stream_md5(source, bucket: str, key: str, piece: int | None = None) -> tuple[str, int]:
    digest, size = hashlib.md5(), 0
    with source.open(bucket, key) as stream:
        chunks = iter(lambda: stream.read(piece), b"") if piece else stream.iter_chunks()
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@pytest.mark.parametrize("bucket", [PUBLIC_BUCKET, PRIVATE_BUCKET, EDGE])
def test_rest_source_lists_exactly_the_inventory_and_streams_bytes_matching_the_etag(rest_source, fake, conn,
                                                                                      bucket):
    before = fake.requests["object.list-v2"], fake.requests["object.list"]
    listed = list(rest_source.list(bucket))
    rows = list(inventory(conn, bucket))
    assert [f.key for f in listed] == [o.key for o in rows]  # list-v2, paged 3 at a time, in byte order
    assert [(f.size, f.etag) for f in listed] == [(o.size, o.etag) for o in rows]
    assert (fake.requests["object.list-v2"] - before[0], fake.requests["object.list"] - before[1]) == \
        (-(-len(rows) // 3), 0)
    assert rest_source.offers_list_v2 is True
    for obj in rows:
        assert _stream_md5(rest_source, bucket, obj.key) == (obj.md5, obj.size), obj.key
    first = rows[0]
    assert _stream_md5(rest_source, bucket, first.key, piece=100) == (first.md5, first.size)
    head = rest_source.head(bucket, first.key)
    assert (head.size, head.md5) == (first.size, first.md5)


@pytest.mark.parametrize("bucket", [PUBLIC_BUCKET, PRIVATE_BUCKET, EDGE])
def test_rest_source_without_list_v2_lists_the_same_keys_folder_by_folder(rest_fallback, older_fake, conn, bucket):
    before = older_fake.requests["object.list"]
    listed = list(rest_fallback.list(bucket))
    rows = list(inventory(conn, bucket))
    assert [(f.key, f.size, f.etag) for f in listed] == [(o.key, o.size, o.etag) for o in rows]
    assert rest_fallback.offers_list_v2 is False and older_fake.requests["object.list-v2"] == 0
    assert older_fake.requests["object.list"] - before > len({k.rsplit("/", 1)[0] for k in (f.key for f in listed)})


@pytest.mark.parametrize("mode", ["list-v2", "limit/offset"])
def test_rest_source_lists_a_folder_as_the_inventory_lists_its_prefix(rest_source, rest_fallback, conn, mode):
    rest = rest_source if mode == "list-v2" else rest_fallback
    expected = [o.key for o in inventory(conn, EDGE, "docs/")]
    assert "docs/Zeta.pdf" in expected and "docs/x/y/z/deep.pdf" in expected
    assert [f.key for f in rest.list(EDGE, "docs")] == [f.key for f in rest.list(EDGE, "docs/")] == expected


@pytest.mark.parametrize("bucket", [PUBLIC_BUCKET, PRIVATE_BUCKET, EDGE, INTL])
def test_s3_source_lists_exactly_the_inventory_and_streams_bytes_matching_the_etag(s3_source, conn, bucket):
    listed = list(s3_source.list(bucket))
    rows = list(inventory(conn, bucket))
    assert [(f.key, f.size, f.etag) for f in listed] == [(o.key, o.size, o.etag) for o in rows]
    for obj in rows:
        assert _stream_md5(s3_source, bucket, obj.key) == (obj.md5, obj.size), obj.key
    assert _stream_md5(s3_source, bucket, rows[0].key, piece=100) == (rows[0].md5, rows[0].size)
    assert s3_source.head(bucket, rows[0].key).md5 == rows[0].md5


def test_s3_flat_listing_stops_with_one_line_when_a_server_does_not_list_in_byte_order(s3_source, conn):
    flat = S3Source(s3_source.client, retry=FAST, listing="flat")
    assert [f.key for f in flat.list(PUBLIC_BUCKET)] == [o.key for o in inventory(conn, PUBLIC_BUCKET)]
    with pytest.raises(StepFailed) as unordered:
        list(flat.list(EDGE))
    message = str(unordered.value)
    assert "not in byte order" in message and "listing='levels'" in message and "\n" not in message
    assert s3_source.client.meta.endpoint_url in message


def test_a_download_cut_short_raises_naming_the_key_and_the_bytes_received():
    closed = []
    stream = SourceStream("S3 http://source", "waivers", "a/b.pdf", 10, None, None, None,
                          iter([b"abc", b"defg"]), lambda: closed.append(True))
    with stream:
        assert (stream.read(5), stream.read(1)) == (b"abcde", b"f")
        with pytest.raises(StepFailed, match=r"bucket 'waivers' key 'a/b.pdf': the download ended after 7 of 10"):
            stream.read()
    assert closed == [True]


def test_rest_source_names_a_key_storage_refuses_and_a_key_without_a_row(rest_source):
    for key in ("reçus/été 2024.pdf", "docs/100% done.pdf"):
        with pytest.raises(StepFailed) as refused:
            rest_source.open(INTL, key)
        assert "InvalidKey" in str(refused.value) and repr(key) in str(refused.value)
    with pytest.raises(ObjectMissing) as missing:
        rest_source.open(EDGE, "docs/never-uploaded.pdf")
    assert "docs/never-uploaded.pdf" in str(missing.value) and "\n" not in str(missing.value)
    assert rest_source.head(EDGE, "docs/never-uploaded.pdf") is None


def test_rest_source_retries_throttling_and_dropped_connections(fake, conn):
    with FaultProxy(fake.url, slowdown=0.3, drop={"POST": 0.3, "*": 0.0}, seed=11) as proxy, \
            RestSource(proxy.url, fake.service_role_key, page_size=1,
                       retry=s3.RetryPolicy(attempts=12, initial_wait=0.01, max_wait=0.05)) as rest:
        checked = list(check_bytes(rest, rest.list(EDGE), concurrency=4))
        assert proxy.slowdowns["POST"] > 0 and proxy.slowdowns["GET"] > 0 and proxy.drops["POST"] > 0
    assert [(f.key, f.size, f.error) for f in checked] == [(o.key, o.size, None) for o in inventory(conn, EDGE)]


# -- reconciliation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket", [PUBLIC_BUCKET, PRIVATE_BUCKET, EDGE])
def test_a_clean_source_reconciles_clean_through_both_apis(conn, s3_source, rest_source, bucket):
    over_s3 = reconcile(inventory(conn, bucket), s3_source.list(bucket))
    over_rest = reconcile(inventory(conn, bucket), check_bytes(rest_source, rest_source.list(bucket)))
    for rec in (over_s3, over_rest):
        assert rec.ok and rec.lines() == []
        tally = rec.buckets[bucket]
        assert tally.rows == tally.listed == tally.matched > 0 and tally.row_bytes == tally.listed_bytes
    if bucket != EDGE:  # liftoff/systems/s3.py's own listing (no bucket on its entries) merges too
        assert reconcile(inventory(conn, bucket), s3.list_objects(s3_source.client, bucket)).ok


@pytest.fixture(scope="module")
def broken(source, s3_server):
    """A bucket with one row whose bytes were never stored, bytes with no row, a truncated object, a row
    without metadata, and one good object."""
    bucket, client = "broken", s3_server.client()
    good, short = storage_object_bytes(bucket, "good.pdf"), storage_object_bytes(bucket, "short.pdf")
    with psycopg.connect(source.conninfo(), autocommit=True) as admin:
        _add_bucket(admin, bucket)
        _add_row(admin, bucket, "good.pdf", _metadata(good, "application/pdf"))
        _add_row(admin, bucket, "lost.pdf", _metadata(b"x" * 1000, "application/pdf"))
        _add_row(admin, bucket, "short.pdf", _metadata(short, "application/pdf"))
        _add_row(admin, bucket, "unsized.pdf", None)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="good.pdf", Body=good)
    client.put_object(Bucket=bucket, Key="short.pdf", Body=short[:100])
    client.put_object(Bucket=bucket, Key="stray.pdf", Body=b"no row for me")
    client.put_object(Bucket=bucket, Key="unsized.pdf", Body=b"12345")
    return {"bucket": bucket, "short": len(short)}


def test_reconcile_reports_a_row_without_bytes_bytes_without_a_row_and_a_size_that_differs(conn, s3_source,
                                                                                          broken):
    bucket = broken["bucket"]
    rec = reconcile(inventory(conn, bucket), s3_source.list(bucket))
    assert not rec.ok
    assert (rec.rows_without_bytes.count, rec.rows_without_bytes.bytes) == (1, 1000)
    assert rec.rows_without_bytes.examples == [f"{bucket}/lost.pdf (not listed)"]
    assert (rec.bytes_without_row.count, rec.bytes_without_row.examples) == (1, [f"{bucket}/stray.pdf (13 bytes)"])
    assert rec.size_differs.examples == [f"{bucket}/short.pdf (row {broken['short']}, bytes 100)"]
    assert rec.rows_without_size.examples == [f"{bucket}/unsized.pdf (listed with 5 bytes)"]
    tally = rec.buckets[bucket]
    assert (tally.rows, tally.listed, tally.matched, tally.problems) == (4, 4, 1, 4)
    lines = rec.lines()
    assert len(lines) == 4 and any("lost.pdf" in line for line in lines) and any("stray.pdf" in line for line in lines)
    assert "1 rows without bytes" in rec.summary()


def test_reconcile_through_rest_finds_missing_and_truncated_bytes_by_download(conn, rest_source, broken):
    bucket = broken["bucket"]
    listed = list(rest_source.list(bucket))
    assert [f.key for f in listed] == ["good.pdf", "lost.pdf", "short.pdf", "unsized.pdf"]  # the rows' listing
    listing_only = reconcile(inventory(conn, bucket), listed)  # the rows' listing proves nothing about bytes
    assert listing_only.rows_without_size.examples == [f"{bucket}/unsized.pdf (no size listed either)"]
    assert listing_only.rows_without_bytes.count == listing_only.size_differs.count == 0
    rec = reconcile(inventory(conn, bucket), check_bytes(rest_source, listed))
    assert rec.rows_without_bytes.count == 1
    assert rec.rows_without_bytes.examples[0].startswith(f"{bucket}/lost.pdf (")
    assert "500" in rec.rows_without_bytes.examples[0]  # the file backend's answer, after bounded retries
    assert rec.size_differs.examples == [f"{bucket}/short.pdf (row {broken['short']}, bytes 100)"]
    assert rec.bytes_without_row.count == 0  # REST lists rows: stray bytes show only through S3


def test_reconcile_keeps_only_a_few_examples_but_counts_everything(conn):
    rows = list(inventory(conn, PRIVATE_BUCKET))
    rec = reconcile(rows, [], examples=3)
    assert rec.rows_without_bytes.count == len(rows) > 3 and len(rec.rows_without_bytes.examples) == 3
    assert rec.rows_without_bytes.bytes == sum(o.size for o in rows)
    assert f"and {len(rows) - 3} more" in rec.lines()[0]


def test_reconcile_refuses_a_listing_out_of_key_order(conn):
    rows = list(inventory(conn, EDGE))
    listed = [ListedFile(EDGE, o.key, o.size, o.etag) for o in reversed(rows)]
    with pytest.raises(ValueError, match="not in key order"):
        reconcile(rows, listed)


# -- refused keys -------------------------------------------------------------------------------------------


def test_a_wrong_service_key_fails_at_once_with_one_line_naming_the_url_not_the_key(fake):
    wrong = mint_service_role_key("another-projects-jwt-secret")
    with RestSource(fake.url, wrong, retry=s3.RetryPolicy()) as rest:
        for call in (rest.check, lambda: list(rest.list(PUBLIC_BUCKET)), lambda: rest.open(PRIVATE_BUCKET, "x.pdf")):
            started = time.monotonic()
            with pytest.raises(ConnectionRefused) as refused:
                call()
            message = str(refused.value)
            assert time.monotonic() - started < 3
            assert fake.storage_url in message and "service_role key" in message
            assert "\n" not in message and wrong not in message and wrong.split(".")[2] not in message


def test_a_wrong_s3_secret_fails_at_once_with_one_line_naming_the_endpoint_not_the_secret(s3_server):
    wrong = "not-the-secret-" + "q" * 24
    endpoint = s3.S3Endpoint(s3_server.endpoint_url, s3_server.region, s3_server.access_key, wrong)
    source = S3Source(s3.client(endpoint), retry=s3.RetryPolicy())
    for call in (lambda: source.check(PUBLIC_BUCKET), lambda: list(source.list(PUBLIC_BUCKET)),
                 lambda: source.open(PUBLIC_BUCKET, "x.jpg")):
        started = time.monotonic()
        with pytest.raises(ConnectionRefused) as refused:
            call()
        message = str(refused.value)
        assert time.monotonic() - started < 3
        assert s3_server.endpoint_url in message and s3_server.access_key in message
        assert "\n" not in message and wrong not in message


def test_rest_source_uploads_replaces_and_deletes_through_storages_own_routes(rest_source, fake, source):
    """What the rollback does with a file the app stored on the target: Storage's upload route writes the bytes
    and the row (x-upsert replaces), its delete route removes both; a second upload without x-upsert is
    Storage's KeyAlreadyExists, a second delete its not-found."""
    import io

    import httpx

    key = "rollback/carried back.pdf"
    first, second = b"%PDF first version", b"%PDF second, longer version"
    for body in (first, second):
        rest_source.put(EDGE, key, lambda body=body: io.BytesIO(body), len(body), "application/pdf", "max-age=60")
        (size, etag, mimetype, cache), = _rows(source, "select (metadata->>'size')::int, metadata->>'eTag', "
                                                       "metadata->>'mimetype', metadata->>'cacheControl' "
                                                       "from storage.objects where bucket_id = %s and name = %s",
                                               [EDGE, key])
        assert (size, etag.strip('"'), mimetype, cache) == (len(body), hashlib.md5(body).hexdigest(),
                                                            "application/pdf", "max-age=60")
        with rest_source.open(EDGE, key) as stream:
            assert stream.read() == body
    refused = httpx.post(f"{fake.storage_url}/object/{EDGE}/rollback/x.pdf", content=b"x",
                         headers={"Authorization": f"Bearer {fake.service_role_key}"})
    again = httpx.post(f"{fake.storage_url}/object/{EDGE}/rollback/x.pdf", content=b"x",
                       headers={"Authorization": f"Bearer {fake.service_role_key}"})
    assert refused.status_code == 200 and refused.json()["Key"] == f"{EDGE}/rollback/x.pdf"
    assert again.status_code == 400 and again.json()["statusCode"] == "409" and again.json()["error"] == "Duplicate"
    rest_source.remove(EDGE, "rollback/x.pdf")
    rest_source.remove(EDGE, key)
    assert _rows(source, "select count(*) from storage.objects where bucket_id = %s and name like 'rollback/%%'",
                 [EDGE]) == [(0,)]
    assert rest_source.head(EDGE, key) is None
    with pytest.raises(ObjectMissing):
        rest_source.remove(EDGE, key)


# -- reading a row's first byte: rows whose bytes are gone ---------------------------------------------------


def test_probing_tells_a_row_without_bytes_after_three_500s_not_a_whole_retry_budget(fake, broken):
    """Storage's file backend answers 500 for a row whose bytes are gone: three in a row classify it, where
    the source's retry policy would have tried eight times."""
    bucket = broken["bucket"]
    patient = s3.RetryPolicy(attempts=8, max_seconds=60, initial_wait=0.01, max_wait=0.05)
    with RestSource(fake.url, fake.service_role_key, retry=patient) as rest:
        before = fake.requests["object.get"]
        lost = rest.probe(bucket, "lost.pdf", 1000)
        assert fake.requests["object.get"] - before == s3.GONE_AFTER_500S == 3
        assert lost.error.startswith("HTTP 500 on 3 reads in a row") and lost.size is None
        good = rest.probe(bucket, "good.pdf")
        short = rest.probe(bucket, "short.pdf")
    assert good.error is None and good.size == len(storage_object_bytes(bucket, "good.pdf"))
    assert short.error is None and short.size == 100  # the bytes' own size (Content-Range), not the row's


def test_probing_through_a_hosted_shaped_storage_reads_no_such_key_once(source, s3_server, broken):
    bucket = broken["bucket"]
    with StorageApiFake(source.conninfo(), s3_server.client(), missing_bytes="s3") as hosted, \
            RestSource(hosted.url, hosted.service_role_key, retry=FAST) as rest:
        lost = rest.probe(bucket, "lost.pdf", 1000)
        assert hosted.requests["object.get"] == 1
    assert lost.error.startswith("not found") and "Not found" in lost.error


def test_probing_over_s3_finds_missing_empty_and_whole_objects(s3_source, broken):
    bucket = broken["bucket"]
    assert s3_source.probe(bucket, "lost.pdf", 1000).error == "not found (NoSuchKey)"
    assert s3_source.probe(bucket, "good.pdf").size == len(storage_object_bytes(bucket, "good.pdf"))
    empty = s3_source.probe(EDGE, "empty.txt", 0)  # a range cannot address an empty object: read whole
    assert (empty.size, empty.error) == (0, None)


def test_a_read_that_fails_otherwise_is_an_error_never_a_missing_file(fake, broken):
    with FaultProxy(fake.url, slowdown=1.0) as throttled, \
            RestSource(throttled.url, fake.service_role_key, retry=FAST) as rest:
        with pytest.raises(StepFailed, match="503"):
            rest.probe(broken["bucket"], "good.pdf")
