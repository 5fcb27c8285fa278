"""The REST listing at a real project's size: a folder of 20,000 files listed through the Storage fake by
liftoff/systems/supabase_storage.py's RestSource, with list-v2 and with the limit/offset fallback, against a real
PostgreSQL 15 source. The rows are the inventory only: a listing reads no bytes, so none are stored."""

from __future__ import annotations

from collections import Counter

import psycopg
import pytest

from liftoff.errors import StepFailed
from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir
from liftoff_sandbox.storage_api import StorageApiFake
from liftoff_sandbox.supabase_source import prepare_supabase_source
from liftoff.systems import s3
from liftoff.systems.supabase_storage import RestSource, inventory, reconcile

WIDE = "uploads"
FOLDER_SIZE = 20_000
SMALL = "small"
FAST = s3.RetryPolicy(attempts=2, max_seconds=10, initial_wait=0.01, max_wait=0.05)
CASED = "cased"
# Next to the wide folder: a file named like it, a deeper folder, and files named alike but for their case
# (byte order puts capitals first, Storage's limit/offset list orders by the lowercased name).
AROUND = ["receipts-2024.pdf", "receipts.pdf", "receipts/Same.pdf", "receipts/same.pdf", "receipts/sub/x.pdf",
          "receipts/sub-y.pdf", "Invoices/capital.pdf"]


@pytest.fixture(scope="module")
def source():
    server = PostgresServer(pg15_bin_dir(), superuser="supabase_admin", password="listing-admin-pw").start()
    try:
        prepare_supabase_source(server, postgres_password="listing-owner-pw", contrib=False)
        with psycopg.connect(server.conninfo(), autocommit=True) as conn:
            for bucket in (WIDE, SMALL, CASED):
                conn.execute("insert into storage.buckets (id, name) values (%s, %s)", [bucket, bucket])
            # One statement: 20,000 rows in one folder, names in mixed case so that byte order and the
            # lowercased order differ all along.
            conn.execute("""
                insert into storage.objects (bucket_id, name, metadata, version)
                select %s, 'receipts/' || (array['A', 'b', 'C', 'd'])[i %% 4 + 1] || lpad(i::text, 5, '0')
                           || '-' || left(md5(i::text), 6) || '.pdf',
                       jsonb_build_object('size', i, 'eTag', '"' || md5(i::text) || '"', 'mimetype',
                                          'application/pdf'), 'v1'
                  from generate_series(1, %s) as i""", [WIDE, FOLDER_SIZE])
            conn.execute("insert into storage.objects (bucket_id, name, metadata, version) "
                         "select %s, name, jsonb_build_object('size', 7), 'v1' from unnest(%s::text[]) as name",
                         [WIDE, AROUND])
            conn.execute("insert into storage.objects (bucket_id, name, metadata, version) "
                         "select %s, 'f/' || lpad(i::text, 4, '0') || '.pdf', jsonb_build_object('size', i), 'v1' "
                         "from generate_series(1, 600) as i", [SMALL])
            conn.execute("insert into storage.objects (bucket_id, name, metadata, version) "
                         "select %s, name, jsonb_build_object('size', 1), 'v1' from unnest(%s::text[]) as name",
                         [CASED, ["Docs/a.pdf", "docs/b.pdf", "docs/c.pdf"]])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keys(source):
    with psycopg.connect(source.conninfo()) as conn:
        return {bucket: [o.key for o in inventory(conn, bucket)] for bucket in (WIDE, SMALL, CASED)}


@pytest.fixture(scope="module")
def fakes(source):
    """The same source behind a storage-api with list-v2 and one without (no S3 server: nothing downloads)."""
    with StorageApiFake(source.conninfo(), None) as current, \
            StorageApiFake(source.conninfo(), None, list_v2=False) as older:
        yield {"list-v2": current, "limit/offset": older}


@pytest.mark.parametrize("mode", ["list-v2", "limit/offset"])
def test_a_folder_of_20000_files_lists_each_key_once_in_byte_order_at_a_page_cost_that_does_not_grow(
        fakes, keys, mode):
    fake = fakes[mode]
    reads_before = len(fake.rows_read)
    with RestSource(fake.url, fake.service_role_key, retry=FAST) as rest:
        listed = [f.key for f in rest.list(WIDE)]
        assert rest.offers_list_v2 is (mode == "list-v2")
    assert len(listed) == len(set(listed)) == len(keys[WIDE]) == FOLDER_SIZE + len(AROUND)
    assert listed == keys[WIDE] == sorted(listed, key=str.encode)
    assert listed.index("Invoices/capital.pdf") < listed.index("receipts-2024.pdf") < \
        listed.index("receipts.pdf") < listed.index("receipts/A00004-a87ff6.pdf")
    assert listed.index("receipts/sub-y.pdf") < listed.index("receipts/sub/x.pdf")
    # What each page read from PostgreSQL: the same at the first page as at the last.
    pages = [rows for operation, limit, rows in list(fake.rows_read)[reads_before:] if limit == 1000]
    assert len(pages) > FOLDER_SIZE // 1000
    bound = 1001 if mode == "list-v2" else 2 * 1000 + 10  # limit/offset: a peek, a batch read again, a batch
    assert max(pages) <= bound, pages


def test_folders_named_alike_but_for_case_list_apart_through_list_v2_and_fail_reconciliation_without_it(
        source, fakes, keys):
    """Storage's limit/offset list folds ``Docs/`` and ``docs/`` into one folder and lists both under the
    name it met first: no client can tell them apart there. The merge with the inventory says so."""
    with RestSource(fakes["list-v2"].url, fakes["list-v2"].service_role_key, retry=FAST) as rest:
        assert [f.key for f in rest.list(CASED)] == keys[CASED] == ["Docs/a.pdf", "docs/b.pdf", "docs/c.pdf"]
    with RestSource(fakes["limit/offset"].url, fakes["limit/offset"].service_role_key, retry=FAST) as rest, \
            psycopg.connect(source.conninfo()) as conn:
        listed = list(rest.list(CASED))
        assert [f.key for f in listed] == ["Docs/a.pdf", "Docs/b.pdf", "Docs/c.pdf"]
        rec = reconcile(inventory(conn, CASED), listed, bucket=CASED)
    assert (rec.rows_without_bytes.count, rec.bytes_without_row.count) == (2, 2) and not rec.ok


def test_a_listing_page_that_times_out_is_asked_again_smaller(fakes, keys):
    with StorageApiFake(fakes["list-v2"].conninfo, None, slow_pages=(100, 3.0)) as slow, \
            RestSource(slow.url, slow.service_role_key, retry=FAST) as rest:
        rest.list_timeout = 0.5
        listed = [f.key for f in rest.list(SMALL)]
        asked = Counter(limit for _, limit in slow.pages_asked)
    assert listed == keys[SMALL]
    assert asked == {1000: 1, 250: 1, 62: -(-600 // 62)}  # a quarter, a quarter again, then kept


def test_a_listing_that_keeps_timing_out_fails_with_one_line_naming_the_route_and_bucket(fakes):
    with StorageApiFake(fakes["limit/offset"].conninfo, None, list_v2=False, slow_pages=(0, 2.0)) as slow, \
            RestSource(slow.url, slow.service_role_key, retry=FAST) as rest:
        rest.list_timeout = 0.3
        with pytest.raises(StepFailed) as failed:
            list(rest.list(SMALL))
        url = slow.storage_url
    message = str(failed.value)
    assert url in message and f"bucket '{SMALL}'" in message and "POST /object/list" in message
    assert "failed after 2 attempts" in message and "Timeout" in message and "\n" not in message
