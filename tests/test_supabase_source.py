"""The Supabase stand-in: platform objects, the CRM schema and deterministic data, on real servers."""

import hashlib
import json

import psycopg
import pytest

from liftoff.sandbox.postgres import PostgresServer, pg15_bin_dir, pg16_bin_dir
from liftoff.sandbox.supabase_source import generate_crm, prepare_supabase_source, storage_object_bytes

ADMIN_PASSWORD = "s3cret-admin"
POSTGRES_PASSWORD = "pg-owner-pw"
BOOKINGS = 300
PUBLIC_TABLES = ["guides", "tours", "tour_schedules", "customers", "bookings", "payments", "waivers",
                 "tour_images", "booking_events"]


def _supabase_server(bin_dir, *, contrib: bool, seed: int = 7):
    server = PostgresServer(bin_dir, superuser="supabase_admin", password=ADMIN_PASSWORD).start()
    try:
        prepare_supabase_source(server, postgres_password=POSTGRES_PASSWORD, contrib=contrib)
        counts = generate_crm(server.conninfo(), bookings=BOOKINGS, seed=seed)
    except BaseException:
        server.stop()
        raise
    return server, counts


@pytest.fixture(scope="module")
def source():
    server, counts = _supabase_server(pg15_bin_dir(), contrib=True)
    yield server, counts
    server.stop()


@pytest.fixture(scope="module")
def twin():
    server, counts = _supabase_server(pg15_bin_dir(), contrib=True)
    yield server, counts
    server.stop()


@pytest.fixture(scope="module")
def pg16_source():
    server, counts = _supabase_server(pg16_bin_dir(), contrib=False)
    yield server, counts
    server.stop()


def _one(server, query):
    return server.execute(query)[0][0]


def _table_checksums(server) -> dict[str, str]:
    tables = [f"public.{t}" for t in PUBLIC_TABLES] + ["auth.users", "storage.buckets", "storage.objects"]
    return {t: _one(server, f"select md5(string_agg(x::text, '' order by x::text)) from {t} x") for t in tables}


def test_postgres_is_a_login_non_superuser_and_supabase_admin_is_superuser(source):
    server, _ = source
    rows = dict(((r[0], r[1:]) for r in server.execute(
        "select rolname, rolsuper, rolcanlogin, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
        "from pg_roles where rolname in ('postgres', 'supabase_admin')")))
    assert rows["postgres"] == (False, True, True, True, True, True)
    assert rows["supabase_admin"][0] is True
    with psycopg.connect(server.conninfo(user="postgres", password=POSTGRES_PASSWORD)) as conn:
        assert conn.execute("select current_user").fetchone()[0] == "postgres"


def test_platform_roles_schemas_extensions_publication_and_event_trigger_exist(source):
    server, _ = source
    roles = {r[0] for r in server.execute("select rolname from pg_roles")}
    assert {"anon", "authenticated", "service_role", "authenticator", "supabase_auth_admin",
            "supabase_storage_admin"} <= roles
    assert _one(server, "select rolinherit from pg_roles where rolname = 'authenticator'") is False
    assert _one(server, "select count(*) from pg_auth_members m join pg_roles r on r.oid = m.member "
                        "where r.rolname = 'authenticator'") == 3
    owners = dict(server.execute("select nspname, nspowner::regrole::text from pg_namespace"))
    assert owners["auth"] == "supabase_auth_admin"
    assert owners["storage"] == "supabase_storage_admin"
    assert {"extensions", "supabase_migrations", "realtime", "graphql_public", "pgbouncer"} <= owners.keys()
    extensions = dict(server.execute("select extname, extnamespace::regnamespace::text from pg_extension"))
    assert extensions["uuid-ossp"] == "extensions" and extensions["pgcrypto"] == "extensions"
    published = {r[0] for r in server.execute(
        "select schemaname || '.' || tablename from pg_publication_tables where pubname = 'supabase_realtime'")}
    assert published == {"public.bookings", "public.tour_schedules"}
    assert _one(server, "select evtevent from pg_event_trigger where evtname = 'issue_pg_graphql_access'") \
        == "ddl_command_end"
    assert _one(server, "select prosecdef from pg_proc where oid = 'pgbouncer.get_auth(text)'::regprocedure")


def test_bookings_rls_policies_call_auth_uid_and_filter_by_jwt_subject(source):
    server, _ = source
    assert _one(server, "select relrowsecurity from pg_class where oid = 'public.bookings'::regclass")
    policies = server.execute("select polname, pg_get_expr(coalesce(polqual, polwithcheck), polrelid) "
                              "from pg_policy where polrelid = 'public.bookings'::regclass")
    assert len(policies) == 2 and all("auth.uid()" in expr for _, expr in policies)

    user_id, own = server.execute("select customer_user_id, count(*) from public.bookings "
                                  "where customer_user_id is not null group by 1 order by 2 desc, 1 limit 1")[0]
    with psycopg.connect(server.conninfo(user="postgres", password=POSTGRES_PASSWORD)) as conn:
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)", [json.dumps({"sub": str(user_id)})])
        assert conn.execute("select count(*) from public.bookings").fetchone()[0] == own
        conn.rollback()


def test_crm_schema_is_owned_by_postgres_with_enum_view_trigger_and_auth_reference(source):
    server, _ = source
    owners = {r[0] for r in server.execute(
        "select relowner::regrole::text from pg_class where relnamespace = 'public'::regnamespace")}
    assert owners == {"postgres"}
    assert server.execute("select enum_range(null::public.booking_status)::text")[0][0] \
        == "{pending,confirmed,cancelled,completed}"
    assert _one(server, "select relkind from pg_class where oid = 'public.upcoming_departures'::regclass") == "v"
    assert _one(server, "select count(*) from pg_trigger where tgname = 'bookings_audit' and not tgisinternal") == 1
    assert _one(server, "select confrelid::regclass::text from pg_constraint "
                        "where conrelid = 'public.bookings'::regclass and contype = 'f' "
                        "and conkey = array[(select attnum from pg_attribute where attrelid = "
                        "'public.bookings'::regclass and attname = 'created_by')]") == "auth.users"
    # No contrib function leaks into public: column defaults use core gen_random_uuid().
    defaults = [r[0] for r in server.execute(
        "select pg_get_expr(adbin, adrelid) from pg_attrdef where adrelid in "
        "(select oid from pg_class where relnamespace = 'public'::regnamespace)")]
    assert not [d for d in defaults if "uuid_generate" in d or "extensions." in d]


def test_returned_counts_match_table_counts(source):
    server, counts = source
    assert counts["public.bookings"] == BOOKINGS
    assert set(counts) >= {f"public.{t}" for t in PUBLIC_TABLES} | {"auth.users", "storage.objects"}
    for table, n in counts.items():
        assert _one(server, f"select count(*) from {table}") == n, table
    nulls = _one(server, "select count(*) filter (where created_by is null), count(*) filter (where created_by "
                         "is not null) from public.bookings")
    assert nulls > 0


def test_every_foreign_key_resolves(source):
    server, _ = source
    fks = server.execute("""
        select conrelid::regclass::text, a.attname, confrelid::regclass::text, af.attname
          from pg_constraint c
          join pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]
          join pg_attribute af on af.attrelid = c.confrelid and af.attnum = c.confkey[1]
         where c.contype = 'f' and c.connamespace in ('public'::regnamespace, 'storage'::regnamespace)""")
    assert len(fks) >= 12
    for child, col, parent, pcol in fks:
        orphans = _one(server, f'select count(*) from {child} c where c."{col}" is not null and not exists '
                               f'(select 1 from {parent} p where p."{pcol}" = c."{col}")')
        assert orphans == 0, f"{child}.{col} -> {parent}.{pcol}"


def test_app_inserts_continue_sequences_and_fire_the_audit_trigger(source):
    server, _ = source
    with psycopg.connect(server.conninfo(user="postgres", password=POSTGRES_PASSWORD)) as conn:
        max_id = conn.execute("select max(id) from public.booking_events").fetchone()[0]
        schedule, customer = conn.execute("select schedule_id, customer_id from public.bookings limit 1").fetchone()
        booking = conn.execute("insert into public.bookings (schedule_id, customer_id, seats, total_amount) "
                               "values (%s, %s, 1, 10) returning id", [schedule, customer]).fetchone()[0]
        conn.execute("update public.bookings set status = 'confirmed' where id = %s", [booking])
        events = conn.execute("select id, event_type from public.booking_events where booking_id = %s order by id",
                              [booking]).fetchall()
        assert [e for _, e in events] == ["created", "status_changed"]
        assert events[0][0] == max_id + 1
        conn.rollback()


def test_storage_metadata_describes_the_generated_object_bytes(source):
    server, _ = source
    rows = server.execute("select bucket_id, name, metadata from storage.objects order by name limit 20")
    for bucket, name, metadata in rows:
        content = storage_object_bytes(bucket, name)
        assert metadata["size"] == len(content)
        assert metadata["eTag"] == f'"{hashlib.md5(content).hexdigest()}"'
    url = _one(server, "select public_url from public.tour_images order by id limit 1")
    assert url.startswith("https://abcdefgh.supabase.co/storage/v1/object/public/tour-images/tours/1/")


def test_same_seed_gives_identical_tables_on_another_server(source, twin):
    assert source[1] == twin[1]
    assert _table_checksums(source[0]) == _table_checksums(twin[0])


def test_pg16_without_contrib_has_no_extensions_and_the_same_data(pg16_source, twin):
    server, counts = pg16_source
    assert server.major == 16
    assert {r[0] for r in server.execute("select extname from pg_extension")} == {"plpgsql"}
    assert counts == twin[1]
    assert _table_checksums(server) == _table_checksums(twin[0])
