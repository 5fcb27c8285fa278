"""The Supabase Storage REST fake answers the real `supabase` client as storage-api v1.70.6 does, from a real
PostgreSQL inventory (storage.buckets / storage.objects) and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import psycopg
import pytest
from storage3.exceptions import StorageApiError
from supabase import create_client

from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir
from liftoff_sandbox.s3 import S3Server
from liftoff_sandbox.storage_api import StorageApiFake, mint_service_role_key, seed_objects
from liftoff_sandbox.supabase_source import (PRIVATE_BUCKET, PUBLIC_BUCKET, generate_crm, prepare_supabase_source,
                                             storage_object_bytes)

EDGE_BUCKET = "edge-cases"
NO_BYTES = "receipts/2024/lost.pdf"
NON_ASCII = "receipts/2024/reçu-été.pdf"


@pytest.fixture(scope="module")
def source():
    server = PostgresServer(pg15_bin_dir(), superuser="supabase_admin", password="fake-admin-pw").start()
    try:
        prepare_supabase_source(server, postgres_password="fake-owner-pw", contrib=False)
        generate_crm(server.conninfo(), bookings=120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def seeded(source, s3):
    return seed_objects(s3.client(), source.conninfo())


@pytest.fixture(scope="module")
def fake(source, s3, seeded):
    with StorageApiFake(source.conninfo(), s3.client()) as api:
        yield api


@pytest.fixture(scope="module")
def storage(fake):
    return create_client(fake.url, fake.service_role_key).storage


@pytest.fixture(scope="module")
def edge_rows(source, s3, fake):
    """A private bucket added after the fake started: a row whose bytes were never stored, and a row (with
    bytes) whose key Storage itself would have refused."""
    with psycopg.connect(source.conninfo(), autocommit=True) as conn:
        conn.execute("insert into storage.buckets (id, name, public) values (%s, %s, false)",
                     [EDGE_BUCKET, EDGE_BUCKET])
        for name in (NO_BYTES, NON_ASCII):
            body = storage_object_bytes(EDGE_BUCKET, name)
            metadata = {"eTag": f'"{hashlib.md5(body).hexdigest()}"', "size": len(body),
                        "mimetype": "application/pdf", "cacheControl": "max-age=3600",
                        "lastModified": "2024-02-03T04:05:06.000Z", "contentLength": len(body),
                        "httpStatusCode": 200}
            conn.execute("insert into storage.objects (bucket_id, name, metadata, version) values (%s, %s, %s, %s)",
                         [EDGE_BUCKET, name, json.dumps(metadata), "v1"])
    client = s3.client()
    client.create_bucket(Bucket=EDGE_BUCKET)
    client.put_object(Bucket=EDGE_BUCKET, Key=NON_ASCII, Body=storage_object_bytes(EDGE_BUCKET, NON_ASCII))
    return {NO_BYTES, NON_ASCII}


def _rows(source, bucket: str) -> dict[str, dict]:
    with psycopg.connect(source.conninfo()) as conn:
        return dict(conn.execute("select name, metadata from storage.objects where bucket_id = %s", [bucket]))


def _walk(storage, bucket: str, limit: int, path: str = "") -> list[dict]:
    """Every object under ``path``, as an operator's client must collect them: one folder level per call,
    page by page; a folder is an item with ``id: None``."""
    found, offset = [], 0
    while True:
        page = storage.from_(bucket).list(path, {"limit": limit, "offset": offset})
        for item in page:
            full = f"{path}/{item['name']}" if path else item["name"]
            if item["id"] is None:
                found += _walk(storage, bucket, limit, full)
            else:
                found.append({**item, "name": full})
        if len(page) < limit:
            return found
        offset += limit


def _raw(fake, method: str, path: str, key: str | None = None, headers: dict | None = None,
         **kw) -> httpx.Response:
    """A request as the client sends it (``apikey`` + bearer ``key``), or with no key at all."""
    sent = {"Authorization": f"Bearer {key}", "apikey": key} if key else {}
    return httpx.request(method, fake.storage_url + path, headers={**sent, **(headers or {})}, timeout=10, **kw)


def test_seed_puts_every_storage_objects_row_into_its_bucket(source, s3, seeded):
    assert seeded == {bucket: len(_rows(source, bucket)) for bucket in (PUBLIC_BUCKET, PRIVATE_BUCKET)}
    assert all(count > 0 for count in seeded.values())
    assert seed_objects(s3.client(), source.conninfo()) == seeded  # again: same objects, nothing new


def test_bucket_list_and_get_return_the_storage_buckets_rows(storage, source):
    with psycopg.connect(source.conninfo()) as conn:
        expected = {r[0]: r[1:] for r in conn.execute(
            "select id, public, file_size_limit, allowed_mime_types from storage.buckets")}
    buckets = storage.list_buckets()
    assert {b.id: (b.public, b.file_size_limit, b.allowed_mime_types) for b in buckets} == expected
    assert {b.type for b in buckets} == {"STANDARD"}
    public = storage.get_bucket(PUBLIC_BUCKET)
    assert (public.id, public.public, public.owner) == (PUBLIC_BUCKET, True, "")
    with pytest.raises(StorageApiError) as err:
        storage.get_bucket("no-such-bucket")
    assert (err.value.status, err.value.code, err.value.message) == ("404", "Bucket not found", "Bucket not found")


@pytest.mark.parametrize("bucket", [PUBLIC_BUCKET, PRIVATE_BUCKET])
def test_recursive_paged_listing_yields_exactly_the_storage_objects_rows(storage, source, bucket):
    listed = _walk(storage, bucket, limit=7)
    rows = _rows(source, bucket)
    assert len(listed) == len(rows)  # no object twice, none skipped at a page boundary
    assert {item["name"]: item["metadata"] for item in listed} == rows


def test_listing_is_one_folder_level_sorted_by_lowercased_name(storage, source):
    level = storage.from_(PUBLIC_BUCKET).list("tours", {"limit": 1000})
    names = [item["name"] for item in level]
    assert names == sorted(names, key=lambda n: n.lower().encode())  # lower(name) COLLATE "C"
    assert all(item["id"] is None and item["metadata"] is None and item["updated_at"] is None for item in level)
    tours = {name.split("/")[1] for name in _rows(source, PUBLIC_BUCKET)}
    assert set(names) == tours
    files = storage.from_(PUBLIC_BUCKET).list(f"tours/{names[0]}")
    assert len(files) == 3 and all(item["id"] and "/" not in item["name"] for item in files)
    assert files[0]["created_at"].endswith("Z")
    descending = storage.from_(PUBLIC_BUCKET).list("tours", {"limit": 1000, "sortBy": {"column": "name",
                                                                                      "order": "desc"}})
    assert [item["name"] for item in descending] == names[::-1]
    assert [i["name"] for i in storage.from_(PUBLIC_BUCKET).list("tours", {"search": names[0]})][0] == names[0]


def test_downloads_are_the_generated_bytes_and_their_md5_is_the_row_etag(storage, source):
    for bucket in (PUBLIC_BUCKET, PRIVATE_BUCKET):
        rows = _rows(source, bucket)
        for name, metadata in rows.items():
            body = storage.from_(bucket).download(name)
            assert body == storage_object_bytes(bucket, name), f"{bucket}/{name}"
            assert f'"{hashlib.md5(body).hexdigest()}"' == metadata["eTag"], f"{bucket}/{name}"


def test_download_streams_with_the_s3_objects_headers(fake, source):
    name, metadata = sorted(_rows(source, PUBLIC_BUCKET).items())[0]
    response = _raw(fake, "GET", f"/object/authenticated/{PUBLIC_BUCKET}/{name}", fake.service_role_key)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["etag"] == metadata["eTag"]
    assert response.headers["cache-control"] == "max-age=3600"
    assert int(response.headers["content-length"]) == metadata["size"]
    ranged = _raw(fake, "GET", f"/object/{PUBLIC_BUCKET}/{name}", fake.service_role_key,
                  headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == storage_object_bytes(PUBLIC_BUCKET, name)[:10]


def test_info_and_head_answer_from_the_row(storage, fake, source):
    name, metadata = sorted(_rows(source, PRIVATE_BUCKET).items())[0]
    info = storage.from_(PRIVATE_BUCKET).info(name)
    assert (info["name"], info["bucket_id"], info["size"], info["etag"], info["content_type"]) == \
        (name, PRIVATE_BUCKET, metadata["size"], metadata["eTag"], "application/pdf")
    head = _raw(fake, "HEAD", f"/object/authenticated/{PRIVATE_BUCKET}/{name}", fake.service_role_key)
    assert head.status_code == 200 and head.headers["etag"] == metadata["eTag"]
    assert int(head.headers["content-length"]) == metadata["contentLength"]


def test_a_wrong_key_is_refused_as_storage_refuses_it(fake, source):
    another_secret = mint_service_role_key()
    for key, message in (("not-a-jwt", "Invalid Compact JWS"), (another_secret, "signature verification failed")):
        wrong = create_client(fake.url, key).storage
        with pytest.raises(StorageApiError) as err:
            wrong.list_buckets()
        assert (err.value.status, err.value.code, err.value.message) == ("403", "Unauthorized", message)
        response = _raw(fake, "POST", f"/object/list/{PUBLIC_BUCKET}", key, json={"prefix": ""})
        assert response.status_code == 400
        assert response.json() == {"statusCode": "403", "error": "Unauthorized", "message": message,
                                   "code": "AccessDenied"}
        # /object/{bucket}/{key} lets an invalid token through as anon: public served, private hidden.
        public_name = sorted(_rows(source, PUBLIC_BUCKET))[0]
        assert wrong.from_(PUBLIC_BUCKET).download(public_name) == storage_object_bytes(PUBLIC_BUCKET, public_name)
        with pytest.raises(StorageApiError) as err:
            wrong.from_(PRIVATE_BUCKET).download(sorted(_rows(source, PRIVATE_BUCKET))[0])
        assert (err.value.status, err.value.code) == ("404", "Bucket not found")
    missing = _raw(fake, "GET", "/bucket")
    assert missing.status_code == 400
    assert missing.json() == {"statusCode": "400", "error": "Error", "code": "InvalidRequest",
                              "message": "headers must have required property 'authorization'"}


def test_public_urls_serve_public_buckets_only(storage, fake, source):
    public_name = sorted(_rows(source, PUBLIC_BUCKET))[0]
    url = storage.from_(PUBLIC_BUCKET).get_public_url(public_name)
    anonymous = httpx.get(url, timeout=10)
    assert anonymous.status_code == 200 and anonymous.content == storage_object_bytes(PUBLIC_BUCKET, public_name)
    private_name = sorted(_rows(source, PRIVATE_BUCKET))[0]
    refused = httpx.get(storage.from_(PRIVATE_BUCKET).get_public_url(private_name), timeout=10)
    assert refused.status_code == 400
    assert refused.json() == {"statusCode": "404", "error": "Bucket not found", "message": "Bucket not found",
                              "code": "NoSuchBucket"}
    # Even with the service key: the public route never looks at the token.
    with_key = _raw(fake, "GET", f"/object/public/{PRIVATE_BUCKET}/{private_name}", fake.service_role_key)
    assert with_key.status_code == 400 and with_key.json()["error"] == "Bucket not found"
    unknown = _raw(fake, "GET", "/object/sign/x", fake.service_role_key)
    assert unknown.status_code == 400  # /object/{bucket}/{key} with bucket "sign": no such bucket
    assert _raw(fake, "POST", "/object/move", fake.service_role_key, json={}).status_code == 404


def test_a_row_added_later_lists_even_without_bytes_but_its_download_answers_500(storage, fake, edge_rows):
    listed = {item["name"] for item in _walk(storage, EDGE_BUCKET, limit=1)}
    assert listed == edge_rows
    before = fake.requests["object.get"]
    with pytest.raises(StorageApiError) as err:
        storage.from_(EDGE_BUCKET).download(NO_BYTES)
    assert (err.value.status, err.value.code) == ("500", "Internal")
    assert fake.requests["object.get"] == before + 1
    assert storage.from_(EDGE_BUCKET).info(NO_BYTES)["size"] == len(storage_object_bytes(EDGE_BUCKET, NO_BYTES))


def test_a_row_without_bytes_downloads_as_no_such_key_with_the_s3_backend(source, s3, edge_rows):
    with StorageApiFake(source.conninfo(), s3.client(), missing_bytes="s3") as hosted:
        response = _raw(hosted, "GET", f"/object/{EDGE_BUCKET}/{NO_BYTES}", hosted.service_role_key)
    assert response.status_code == 400
    assert response.json() == {"statusCode": "404", "error": "Not found", "message": "The resource was not found",
                               "code": "NoSuchKey"}


def test_a_non_ascii_key_is_refused_with_invalid_key(storage, fake, edge_rows):
    with pytest.raises(StorageApiError) as err:
        storage.from_(EDGE_BUCKET).download(NON_ASCII)
    assert (err.value.status, err.value.code, err.value.message) == ("400", "InvalidKey", f"Invalid key: {NON_ASCII}")
    response = _raw(fake, "GET", f"/object/info/{EDGE_BUCKET}/{NON_ASCII}", fake.service_role_key)
    assert response.status_code == 400 and response.json()["code"] == "InvalidKey"


def test_paging_where_folders_and_files_interleave_neither_repeats_nor_skips(storage, source):
    names = ["a.txt", "a/1.txt", "a/2/x.txt", "a-b.txt", "a.b/c.txt", "ab.txt", "b/1.txt", "b.txt", "c.txt",
             "c/d/e.txt", "d.txt", "Z.txt"]
    with psycopg.connect(source.conninfo(), autocommit=True) as conn:
        conn.execute("insert into storage.buckets (id, name) values ('mixed', 'mixed')")
        for name in names:
            conn.execute("insert into storage.objects (bucket_id, name, metadata) values ('mixed', %s, '{}')", [name])
    whole = [item["name"] for item in storage.from_("mixed").list("", {"limit": 1000})]
    # One level, in lower(name) COLLATE "C" order ("-" < "." < "/"), folders among the files.
    assert whole == ["a-b.txt", "a.b", "a.txt", "a", "ab.txt", "b.txt", "b", "c.txt", "c", "d.txt", "Z.txt"]
    for limit in (1, 2, 3, 4):
        paged, offset = [], 0
        while page := storage.from_("mixed").list("", {"limit": limit, "offset": offset}):
            paged += [item["name"] for item in page]
            offset += limit
        assert paged == whole, f"limit {limit}"
        assert sorted(item["name"] for item in _walk(storage, "mixed", limit)) == sorted(names)


MIXED = ["a.txt", "a/1.txt", "a/2/x.txt", "a-b.txt", "a.b/c.txt", "ab.txt", "b/1.txt", "b.txt", "c.txt",
         "c/d/e.txt", "d.txt", "Z.txt", "z.txt"]


@pytest.fixture(scope="module")
def mixed_v2(source):
    with psycopg.connect(source.conninfo(), autocommit=True) as conn:
        conn.execute("insert into storage.buckets (id, name) values ('mixed-v2', 'mixed-v2')")
        conn.execute("insert into storage.objects (bucket_id, name, metadata) "
                     "select 'mixed-v2', name, '{}' from unnest(%s::text[]) as name", [MIXED])
    return "mixed-v2"


def _pages_v2(storage, bucket: str, options: dict) -> tuple[list[str], list[str], int]:
    """(folders, objects, calls) of a list-v2 listing followed cursor by cursor through storage3."""
    folders, objects, cursor, calls = [], [], None, 0
    while True:
        result = storage.from_(bucket).list_v2({**options, **({"cursor": cursor} if cursor else {})})
        calls += 1
        folders += [f.name for f in result.folders]
        objects += [o.name for o in result.objects]
        if not result.hasNext:
            assert result.nextCursor is None
            return folders, objects, calls
        cursor = result.nextCursor


def test_list_v2_pages_every_key_under_a_prefix_in_byte_order_by_cursor(storage, fake, mixed_v2):
    in_bytes = sorted(MIXED, key=str.encode)
    for limit in (1, 2, 5, 1000):
        folders, objects, calls = _pages_v2(storage, mixed_v2, {"limit": limit})
        assert (folders, objects, calls) == ([], in_bytes, -(-len(MIXED) // limit)), f"limit {limit}"
    assert _pages_v2(storage, mixed_v2, {"prefix": "a", "limit": 2})[1] == [n for n in in_bytes if n.startswith("a")]
    raw = _raw(fake, "POST", f"/object/list-v2/{mixed_v2}", fake.service_role_key, json={"limit": 2}).json()
    assert list(raw) == ["hasNext", "nextCursor", "nextCursorKey", "folders", "objects"]
    assert list(raw["objects"][0]) == ["id", "name", "metadata", "updated_at", "created_at", "last_accessed_at"]
    assert raw["nextCursorKey"] == "a-b.txt" and raw["objects"][1]["created_at"].endswith("Z")
    assert base64.b64decode(raw["nextCursor"]).decode() == "l:a-b.txt"


def test_list_v2_with_delimiter_gives_one_level_its_folders_apart(storage, fake, mixed_v2):
    expected_folders, expected_objects = ["a.b/", "a/", "b/", "c/"], \
        ["Z.txt", "a-b.txt", "a.txt", "ab.txt", "b.txt", "c.txt", "d.txt", "z.txt"]
    for limit in (1, 3, 1000):
        folders, objects, _ = _pages_v2(storage, mixed_v2, {"limit": limit, "with_delimiter": True})
        assert (folders, objects) == (expected_folders, expected_objects), f"limit {limit}"
    deeper = _raw(fake, "POST", f"/object/list-v2/{mixed_v2}", fake.service_role_key,
                  json={"prefix": "a/", "with_delimiter": True}).json()
    assert [(f["key"], f["name"], f["id"]) for f in deeper["folders"]] == [("2", "a/2/", None)]
    assert [(o["key"], o["name"]) for o in deeper["objects"]] == [("1.txt", "a/1.txt")]
    descending = _pages_v2(storage, mixed_v2, {"limit": 2, "with_delimiter": True,
                                               "sortBy": {"column": "name", "order": "desc"}})
    # Descending, a folder of one object met inside a batch is passed over, as by the real function.
    assert descending[1] == expected_objects[::-1] and set(descending[0]) <= set(expected_folders)


def test_list_v2_refusals_and_an_older_storage_without_it(fake, source, s3, mixed_v2):
    url = f"/object/list-v2/{mixed_v2}"
    bad_cursor = _raw(fake, "POST", url, fake.service_role_key, json={"cursor": base64.b64encode(b"x").decode()})
    assert (bad_cursor.status_code, bad_cursor.json()["error"], bad_cursor.json()["message"]) == \
        (400, "InvalidParameter", "Invalid Parameter continuation token")
    no_token = _raw(fake, "POST", url, json={})
    assert (no_token.status_code, no_token.json()["statusCode"], no_token.json()["message"]) == \
        (400, "403", "Invalid Compact JWS")
    assert _raw(fake, "POST", url, fake.service_role_key, json={"limit": 0}).json()["message"] == \
        "body/limit must be >= 1"
    with StorageApiFake(source.conninfo(), s3.client(), list_v2=False) as older:
        answer = _raw(older, "POST", url, older.service_role_key, json={})
    assert (answer.status_code, answer.json()["message"]) == (404, f"Route POST:{url} not found")
