"""Rewriting the app's Supabase Storage URLs in PostgreSQL (liftoff/systems/storage_urls.py), against a real
PostgreSQL 15 (scratch databases on the stack's target server) and, for the URLs it writes, a real
SeaweedFS server answering anonymous GETs."""

from __future__ import annotations

import hashlib
import itertools
import re
import urllib.request
from urllib.parse import quote

import psycopg
import pytest

from liftoff.errors import StepFailed
from liftoff.ledger import Ledger
from liftoff_sandbox.s3 import S3Server
from liftoff_sandbox.supabase_source import PUBLIC_BUCKET, SUPABASE_PROJECT_URL
from liftoff.systems import s3 as s3tasks
from liftoff.systems.storage_urls import (
    ColumnSpec, inverse, new_url, parse_key, parse_supabase_url, parse_target_url, preview_rewrite, rewrite,
)

PROJECT = SUPABASE_PROJECT_URL  # https://abcdefgh.supabase.co
STORAGE = f"{PROJECT}/storage/v1"
BASE = "https://files.example.com"
AWKWARD_KEYS = [
    "tours/1/a.jpg",
    "with space/tour photo 1.jpg",
    "ünïcødé/日本語/émoji-🚀.png",
    "plus+sign/a+b=c.txt",
    "percent/100%.txt",
    "percent/already%20encoded.txt",
    "odd/(1)!'*~;,:@&$.txt",
    "a/b/c/d/e/f/g/h/i/j/deep.txt",
]


def encode_uri(text: str) -> str:
    """JavaScript's encodeURI, which storage-js's getPublicUrl applies to the whole URL."""
    return quote(text, safe="!#$&'()*+,-./:;=?@_~")


def public(bucket: str, key: str) -> str:
    return encode_uri(f"{STORAGE}/object/public/{bucket}/{key}")


# ---------------------------------------------------------------------------------------------------
# The URL forms, no database


def test_each_supabase_url_form_is_recognised_and_only_public_ones_map():
    p = parse_supabase_url(public("tour-images", "tours/1/a b.jpg"), PROJECT)
    assert (p.form, p.bucket, p.key, p.query) == ("public", "tour-images", "tours/1/a b.jpg", "")
    assert new_url(p, BASE) == f"{BASE}/tour-images/tours/1/a%20b.jpg"
    assert new_url(p, BASE + "/", bucket_prefix="rehearsal-") == f"{BASE}/rehearsal-tour-images/tours/1/a%20b.jpg"

    signed = parse_supabase_url(f"{STORAGE}/object/sign/waivers/w/1.pdf?token=eyJhbGciOi.x.y", PROJECT)
    assert (signed.form, signed.bucket, signed.key, signed.query) == ("sign", "waivers", "w/1.pdf",
                                                                      "token=eyJhbGciOi.x.y")
    render = parse_supabase_url(f"{STORAGE}/render/image/public/tour-images/t/1.jpg?width=300&quality=75", PROJECT)
    assert (render.form, render.bucket, render.key, render.query) == ("render", "tour-images", "t/1.jpg",
                                                                      "width=300&quality=75")
    authenticated = parse_supabase_url(f"{STORAGE}/object/authenticated/waivers/w/1.pdf", PROJECT)
    short = parse_supabase_url(f"{STORAGE}/object/waivers/w/1.pdf", PROJECT)
    download = parse_supabase_url(public("tour-images", "t/1.jpg") + "?download=photo.jpg", PROJECT)
    assert authenticated.form == short.form == "authenticated" and download.form == "public"
    for parsed in (signed, render, authenticated, short, download):
        assert new_url(parsed, BASE) is None

    assert parse_supabase_url(public("tour-images", "t/1.jpg").replace("abcdefgh", "otherproj"), PROJECT) is None
    assert parse_supabase_url(f"{PROJECT}/rest/v1/tours", PROJECT) is None
    assert parse_supabase_url("tours/1/a.jpg", PROJECT) is None
    direct = "https://abcdefgh.storage.supabase.co/storage/v1/object/public/b/k.jpg"  # the direct hostname
    assert parse_supabase_url(direct, PROJECT).key == "k.jpg"
    # A fragment is the browser's business (a PDF's page): kept.
    assert new_url(parse_supabase_url(public("documents", "guide.pdf") + "#page=2", PROJECT), BASE) == \
        f"{BASE}/documents/guide.pdf#page=2"


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_key_round_trips_through_the_new_url(key):
    forms = [parse_supabase_url(public("b", key), PROJECT), parse_key(key, "b")]
    if not re.search("%[0-9A-Fa-f]{2}", key):  # built by hand, unencoded (ambiguous for a key holding %XX)
        forms.append(parse_supabase_url(f"{STORAGE}/object/public/b/{key}", PROJECT))
    for parsed in forms:
        assert parsed.key == key, parsed
        url = new_url(parsed, BASE)
        assert url.isascii() and " " not in url and "+" not in url
        back = parse_target_url(url, BASE)
        assert (back.bucket, back.key) == ("b", key)


def test_new_url_keeps_the_spelling_of_an_encoded_url():
    url = f"{STORAGE}/object/public/tour-images/a%20b/%C3%BC%2Fx.jpg"
    assert new_url(parse_supabase_url(url, PROJECT), BASE) == f"{BASE}/tour-images/a%20b/%C3%BC%2Fx.jpg"


def test_new_urls_serve_the_objects_from_a_real_s3_server():
    """What the rewrite writes is fetched anonymously from a public bucket of a real S3 server, for keys
    with spaces, unicode, "+" and "%": the encoding is right for the server, not only for our parser."""
    with S3Server() as server:
        client = server.client()
        s3tasks.ensure_bucket(client, "tour-images", public=True)
        for i, key in enumerate(AWKWARD_KEYS):
            client.put_object(Bucket="tour-images", Key=key, Body=f"object {i}".encode())
        for i, key in enumerate(AWKWARD_KEYS):
            for parsed in (parse_supabase_url(public("tour-images", key), PROJECT), parse_key(key, "tour-images")):
                url = new_url(parsed, server.endpoint_url)
                with urllib.request.urlopen(url, timeout=10) as answer:
                    assert answer.read() == f"object {i}".encode(), url


# ---------------------------------------------------------------------------------------------------
# The columns, in a real database

_names = itertools.count(1)

MEDIA = [  # (id, url, path): url is kind url, path kind key of bucket "documents"
    (1, public("tour-images", "tours/1/a.jpg"), "waivers/1/w.pdf"),
    (2, public("tour-images", "with space/tour photo 1.jpg"), "a b/ü+%.pdf"),
    (3, public("tour-images", "ünïcødé/日本語/émoji-🚀.png"), "/leading/slash.pdf"),
    (4, public("tour-images", "plus+sign/a+b=c.txt"), None),
    (5, public("tour-images", "percent/100%.txt"), ""),
    (6, f"{STORAGE}/object/sign/documents/w/1.pdf?token=eyJhbGciOiJIUzI1NiJ9.e30.sig", f"{BASE}/documents/done.pdf"),
    (7, f"{STORAGE}/render/image/public/tour-images/tours/1/a.jpg?width=300&height=200", "invoices/2024/0001.pdf"),
    (8, f"{STORAGE}/object/authenticated/documents/w/2.pdf", "invoices/2024/0002.pdf"),
    (9, None, "invoices/2024/0003.pdf"),
    (10, "https://otherproj.supabase.co/storage/v1/object/public/tour-images/x.jpg", "r/1.pdf"),
    (11, f"{BASE}/tour-images/already/there.jpg", "r/2.pdf"),
    (12, public("tour-images", "t/1.jpg") + "?download=photo.jpg", "r/3.pdf"),
    (13, "", "r/4.pdf"),
    (14, f"{STORAGE}/object/public/tour-images/hand built/é.jpg", "r/5.pdf"),
]
URL_MAPPED = {1, 2, 3, 4, 5, 14}
URL_UNMAPPABLE = {6, 7, 8, 12}
KEY_MAPPED = {1, 2, 3, 7, 8, 9, 10, 11, 12, 13, 14}

ATTACHMENTS = [  # composite primary key (booking_id, label)
    (1, "front", public("documents", "bookings/1/front.pdf")),
    (1, "back", public("documents", "bookings/1/back side.pdf")),
    (2, "front", f"{STORAGE}/object/sign/documents/bookings/2/front.pdf?token=abc"),
]

SPECS = [
    ColumnSpec("public.media", "url"),
    ColumnSpec("public.media", "path", kind="key", bucket="documents"),
    ColumnSpec("app data.attachments", "file url"),
]


@pytest.fixture
def db(stack):
    """A fresh database on the stack's target server holding the tables above; yields its conninfo."""
    name = f"storage_urls_{next(_names)}"
    stack.target.execute(f"CREATE DATABASE {name}")
    conninfo = stack.target.conninfo(name)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.media (id bigint PRIMARY KEY, url text, path varchar(200), note text)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO public.media (id, url, path, note) VALUES (%s, %s, %s, 'keep me')", MEDIA)
        conn.execute('CREATE SCHEMA "app data"')
        conn.execute('CREATE TABLE "app data".attachments (booking_id int, label text, "file url" text, '
                     "PRIMARY KEY (booking_id, label))")
        with conn.cursor() as cur:
            cur.executemany('INSERT INTO "app data".attachments VALUES (%s, %s, %s)', ATTACHMENTS)
    yield conninfo
    stack.target.execute(f"DROP DATABASE {name} WITH (FORCE)")


def digest(conninfo: str) -> str:
    """md5 of every row of both tables, in key order: equal only if every byte of every value is."""
    with psycopg.connect(conninfo) as conn:
        return conn.execute(
            "SELECT md5((SELECT string_agg(m::text, E'\\n' ORDER BY id) FROM public.media m) || '|' || "
            "(SELECT string_agg(a::text, E'\\n' ORDER BY booking_id, label) FROM \"app data\".attachments a))"
        ).fetchone()[0]


def column(conninfo: str, sql: str) -> dict:
    with psycopg.connect(conninfo) as conn:
        return dict(conn.execute(sql).fetchall())


def test_preview_counts_each_kind_of_value_and_writes_nothing(db):
    before = digest(db)
    with psycopg.connect(db, autocommit=True) as conn:
        url, path, attachments = preview_rewrite(conn, SPECS, PROJECT, BASE)
    assert digest(db) == before

    assert (url.table, url.column, url.rows_total, url.rows_mapped, url.rows_unmappable,
            url.rows_already_rewritten, url.rows_other, url.rows_null) == \
        ("public.media", "url", 14, len(URL_MAPPED), len(URL_UNMAPPABLE), 1, 2, 1)
    assert url.examples == [(MEDIA[0][1], f"{BASE}/tour-images/tours/1/a.jpg"),
                            (MEDIA[1][1], f"{BASE}/tour-images/with%20space/tour%20photo%201.jpg"),
                            (MEDIA[2][1], new_url(parse_supabase_url(MEDIA[2][1], PROJECT), BASE))]
    assert [v for v, _ in url.unmappable_examples] == [MEDIA[5][1], MEDIA[6][1], MEDIA[7][1]]
    assert "signed URL" in url.unmappable_examples[0][1] and "renderer" in url.unmappable_examples[1][1]
    assert url.other_examples == [MEDIA[9][1], ""]

    assert (path.rows_total, path.rows_mapped, path.rows_unmappable, path.rows_already_rewritten, path.rows_null) == \
        (14, len(KEY_MAPPED), 1, 1, 1)
    assert path.examples[1] == ("a b/ü+%.pdf", f"{BASE}/documents/a%20b/%C3%BC%2B%25.pdf")
    assert path.examples[2] == ("/leading/slash.pdf", f"{BASE}/documents/leading/slash.pdf")
    assert path.unmappable_examples == [("", "no object key")]
    assert (attachments.rows_mapped, attachments.rows_unmappable) == (2, 1)

    with psycopg.connect(db, autocommit=True) as conn:
        assert preview_rewrite(conn, SPECS[:1], PROJECT, BASE, examples=1)[0].examples == url.examples[:1]


def test_rewrite_then_inverse_from_the_ledger_gives_back_the_exact_table(db, tmp_path):
    before = digest(db)
    # As the storage flow calls it: a connection that is not in autocommit mode, closed without a commit.
    conn = psycopg.connect(db)
    result = rewrite(conn, SPECS, PROJECT, BASE)
    conn.close()
    urls = column(db, "SELECT id, url FROM public.media")
    paths = column(db, "SELECT id, path FROM public.media")
    for i, old, old_path in MEDIA:
        if i in URL_MAPPED:
            assert urls[i] == new_url(parse_supabase_url(old, PROJECT), BASE) and urls[i].startswith(BASE)
        else:
            assert urls[i] == old
        assert paths[i] == (new_url(parse_key(old_path, "documents"), BASE) if i in KEY_MAPPED else old_path)
    assert column(db, "SELECT id, note FROM public.media") == {i: "keep me" for i, *_ in MEDIA}
    assert result.rows_changed == len(URL_MAPPED) + len(KEY_MAPPED) + 2
    assert [(c["table"], c["column"], c["key_columns"], c["unmappable"], c["already_rewritten"])
            for c in result.changes] == [("public.media", "url", ["id"], 4, 1),
                                         ("public.media", "path", ["id"], 1, 1),
                                         ("app data.attachments", "file url", ["booking_id", "label"], 1, 0)]
    assert result.changes[2]["rows"][0][0] in (["1", "front"], ["1", "back"])

    # The ledger's event log keeps the changes as JSON; the rollback reads them back from there.
    ledger = Ledger(tmp_path)
    for change in result.changes:
        ledger.record_event("storage", f"rewrite storage URLs in {change['table']}.{change['column']}", after=change)
    with psycopg.connect(db) as conn:
        undone = inverse(conn, [e.after for e in ledger.events("storage")])
    assert (undone.restored, undone.already_restored, undone.kept, undone.missing) == (result.rows_changed, 0, [], [])
    assert digest(db) == before

    with psycopg.connect(db, autocommit=True) as conn:  # an inverse run twice changes nothing more
        again = inverse(conn, result)
    assert (again.restored, again.already_restored, again.kept) == (0, result.rows_changed, [])
    assert digest(db) == before


def test_second_rewrite_changes_nothing(db):
    with psycopg.connect(db, autocommit=True) as conn:
        first = rewrite(conn, SPECS, PROJECT, BASE)
        after_first = digest(db)
        second = rewrite(conn, SPECS, PROJECT, BASE)
        preview = preview_rewrite(conn, SPECS, PROJECT, BASE)
    assert digest(db) == after_first
    assert second.rows_changed == 0 and first.rows_changed > 0
    assert [c["already_rewritten"] for c in second.changes] == [len(URL_MAPPED) + 1, len(KEY_MAPPED) + 1, 2]
    assert [p.rows_mapped for p in preview] == [0, 0, 0]


def test_inverse_keeps_and_reports_a_value_the_app_changed_after_the_rewrite(db):
    with psycopg.connect(db, autocommit=True) as conn:
        result = rewrite(conn, SPECS, PROJECT, BASE)
        conn.execute("UPDATE public.media SET url = %s WHERE id = 2", (f"{BASE}/tour-images/replaced.jpg",))
        conn.execute("DELETE FROM public.media WHERE id = 3")
        undone = inverse(conn, result)
    assert undone.kept == [{"table": "public.media", "column": "url", "key": ["2"],
                            "rewritten": f"{BASE}/tour-images/with%20space/tour%20photo%201.jpg",
                            "current": f"{BASE}/tour-images/replaced.jpg"}]
    assert [(m["column"], m["key"]) for m in undone.missing] == [("path", ["3"]), ("url", ["3"])]
    assert undone.restored == result.rows_changed - 3
    urls = column(db, "SELECT id, url FROM public.media")
    assert urls[2] == f"{BASE}/tour-images/replaced.jpg"
    assert {i: urls[i] for i in urls if i != 2} == {i: u for i, u, _ in MEDIA if i not in (2, 3)}


def test_a_failure_in_a_later_column_leaves_the_earlier_ones_unchanged(db):
    before = digest(db)
    with psycopg.connect(db, autocommit=True) as conn:
        # The new value breaks a constraint of the third column, after the first two were updated.
        conn.execute('ALTER TABLE "app data".attachments ADD CONSTRAINT supabase_only '
                     "CHECK (\"file url\" LIKE 'https://abcdefgh.supabase.co/%')")
        with pytest.raises(StepFailed) as failed:
            rewrite(conn, SPECS, PROJECT, BASE)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    message = str(failed.value)
    assert "app data.attachments.file url" in message and "nothing was changed" in message
    assert "supabase_only" in message and "\n" not in message
    assert digest(db) == before


def test_a_column_missing_on_the_target_is_named_and_nothing_changes(db):
    before = digest(db)
    with psycopg.connect(db, autocommit=True) as conn:
        with pytest.raises(StepFailed, match=r"column public\.media\.picture does not exist on the target"):
            rewrite(conn, [SPECS[0], ColumnSpec("public.media", "picture")], PROJECT, BASE)
        with pytest.raises(StepFailed, match=r"table public\.nowhere does not exist"):
            preview_rewrite(conn, [ColumnSpec("public.nowhere", "url")], PROJECT, BASE)
        conn.execute("CREATE TABLE public.no_key (url text)")
        with pytest.raises(StepFailed, match=r"public\.no_key has no primary key"):
            rewrite(conn, [ColumnSpec("public.no_key", "url")], PROJECT, BASE)
    assert digest(db) == before


def test_sandbox_tour_image_urls_point_at_the_public_base(stack, db):
    """The source's real tour_images rows: every public_url maps to <base>/tour-images/<storage_path>, the
    same URL the storage_path column gives as a key column; the inverse gives back every byte."""
    with psycopg.connect(stack.source.conninfo("postgres")) as src:
        images = src.execute("SELECT id, storage_path, public_url FROM public.tour_images").fetchall()
    assert images
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.tour_images (id bigint PRIMARY KEY, storage_path text, public_url text)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO public.tour_images VALUES (%s, %s, %s)", images)
        before = hashlib.md5(repr(sorted(images)).encode()).hexdigest()
        result = rewrite(conn, [ColumnSpec("public.tour_images", "public_url"),
                                ColumnSpec("public.tour_images", "storage_path", kind="key", bucket=PUBLIC_BUCKET)],
                         PROJECT, BASE)
        rows = conn.execute("SELECT id, storage_path, public_url FROM public.tour_images").fetchall()
        expected = {i: f"{BASE}/{PUBLIC_BUCKET}/{path}" for i, path, _ in images}
        assert {i: url for i, _, url in rows} == expected == {i: path for i, path, _ in rows}
        assert result.rows_changed == 2 * len(images)
        inverse(conn, result.changes)
        after = conn.execute("SELECT id, storage_path, public_url FROM public.tour_images").fetchall()
    assert hashlib.md5(repr(sorted(after)).encode()).hexdigest() == before
