"""The Supabase stand-in: platform objects, the CRM schema and deterministic data, on real servers."""

import contextlib
import hashlib
import json
from collections.abc import Iterator

import psycopg
import pytest

from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir, pg16_bin_dir
from liftoff_sandbox.supabase_source import generate_crm, prepare_supabase_source, storage_object_bytes

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


# The patterns real Supabase apps add (prepare_supabase_source(apps=True)) ------------------------------
APP_TABLES = ["public.role_permissions", "public.user_roles", "public.profiles", "public.notes", "public.api_keys"]


def _apps_server(bin_dir, *, contrib: bool):
    server = PostgresServer(bin_dir, superuser="supabase_admin", password=ADMIN_PASSWORD).start()
    try:
        prepare_supabase_source(server, postgres_password=POSTGRES_PASSWORD, contrib=contrib, apps=True)
        counts = generate_crm(server.conninfo(), bookings=BOOKINGS)
    except BaseException:
        server.stop()
        raise
    return server, counts


@pytest.fixture(scope="module")
def apps_source():
    server, counts = _apps_server(pg15_bin_dir(), contrib=True)
    yield server, counts
    server.stop()


@pytest.fixture(scope="module")
def apps_twin():
    server, counts = _apps_server(pg15_bin_dir(), contrib=True)
    yield server, counts
    server.stop()


@pytest.fixture(scope="module")
def pg16_apps_source():
    server, counts = _apps_server(pg16_bin_dir(), contrib=False)
    yield server, counts
    server.stop()


def _app_checksums(server) -> dict[str, str]:
    return {t: _one(server, f"select md5(string_agg(x::text, '' order by x::text)) from {t} x")
            for t in APP_TABLES if _one(server, f"select to_regclass('{t}') is not null")}


@contextlib.contextmanager
def _as_api_role(server, role: str, claims: dict | None = None) -> Iterator[psycopg.Connection]:
    """A connection acting as PostgREST does for a request: ``postgres`` switched to ``role`` with the JWT's
    claims in ``request.jwt.claims``. Everything it does is rolled back at the end, so tests share a source."""
    with psycopg.connect(server.conninfo(user="postgres", password=POSTGRES_PASSWORD)) as conn:
        try:
            conn.execute(f"set local role {role}")
            if claims is not None:
                conn.execute("select set_config('request.jwt.claims', %s, true)", [json.dumps(claims)])
            yield conn
        finally:
            conn.rollback()


def test_apps_counts_match_tables_and_every_auth_user_has_a_profile(apps_source):
    server, counts = apps_source
    assert set(counts) >= set(APP_TABLES)
    for table, n in counts.items():
        assert _one(server, f"select count(*) from {table}") == n, table
    assert counts["public.profiles"] == counts["auth.users"]
    assert _one(server, "select count(*) from auth.users u join public.profiles p on p.id = u.id "
                        "and p.full_name = u.raw_user_meta_data ->> 'full_name'") == counts["auth.users"]
    assert _one(server, "select count(*) from public.user_roles r join public.guides g on g.auth_user_id = r.user_id") \
        == counts["public.guides"]
    # The app's identity sequences continue after the generated ids (other tests' inserts may move them on).
    for table in APP_TABLES:
        if table == "public.profiles":  # keyed by the auth user's id
            continue
        sequence = _one(server, f"select pg_get_serial_sequence('{table}', 'id')")
        last_value, is_called = server.execute(f"select last_value, is_called from {sequence}")[0]
        assert is_called and last_value >= _one(server, f"select max(id) from {table}") == counts[table], table


def test_signing_up_in_auth_users_creates_a_profile_from_the_user_metadata(apps_source):
    server, _ = apps_source
    assert _one(server, "select tgfoid::regprocedure::text from pg_trigger "
                        "where tgrelid = 'auth.users'::regclass and tgname = 'on_auth_user_created'") \
        == "handle_new_user()"
    assert _one(server, "select prosecdef and proconfig = array['search_path=\"\"'] from pg_proc "
                        "where oid = 'public.handle_new_user()'::regprocedure")
    with psycopg.connect(server.conninfo()) as conn:
        metadata = {"full_name": "Åsa Nyström", "avatar_url": "https://a.example/1.png"}
        user_id = conn.execute("insert into auth.users (id, email, raw_user_meta_data) values "
                               "(gen_random_uuid(), 'new@example.com', %s) returning id",
                               [json.dumps(metadata)]).fetchone()[0]
        assert conn.execute("select full_name, avatar_url from public.profiles where id = %s", [user_id]).fetchone() \
            == ("Åsa Nyström", "https://a.example/1.png")
        conn.execute("delete from auth.users where id = %s", [user_id])
        assert conn.execute("select count(*) from public.profiles where id = %s", [user_id]).fetchone()[0] == 0
        conn.rollback()


def test_authorize_follows_the_user_role_claim_and_the_rbac_policies_with_it(apps_source):
    server, counts = apps_source
    assert _one(server, "select prosecdef and proconfig = array['search_path=\"\"'] from pg_proc "
                        "where oid = 'public.authorize(public.app_permission)'::regprocedure")
    # A pending booking has no payment; one without a waiver can be deleted (its events cascade).
    booking = _one(server, "select b.id from public.bookings b where b.status = 'pending' and not exists "
                           "(select 1 from public.waivers w where w.booking_id = b.id) order by b.id limit 1")
    stranger = "00000000-0000-4000-8000-000000000001"
    expected = {None: (False, False, 0, 0), "guide": (True, False, counts["public.bookings"], 0),
                "admin": (True, True, counts["public.bookings"], 1)}
    for user_role, (can_read, can_delete, visible, deleted) in expected.items():
        claims = {"sub": stranger, "role": "authenticated"} | ({"user_role": user_role} if user_role else {})
        with _as_api_role(server, "authenticated", claims) as conn:
            assert conn.execute("select public.authorize('bookings.read'), public.authorize('bookings.delete')"
                                ).fetchone() == (can_read, can_delete), user_role
            assert conn.execute("select count(*) from public.bookings").fetchone()[0] == visible, user_role
            assert conn.execute("delete from public.bookings where id = %s", [booking]).rowcount == deleted, user_role
            conn.rollback()


def test_custom_access_token_hook_is_for_supabase_auth_admin_only(apps_source):
    server, _ = apps_source
    policy = server.execute("select polpermissive, polcmd, polroles::regrole[]::text[], pg_get_expr(polqual, polrelid) "
                            "from pg_policy where polrelid = 'public.user_roles'::regclass "
                            "and polname = 'Allow auth admin to read user roles'")
    assert policy == [(True, "r", ["supabase_auth_admin"], "true")]
    privileges = server.execute(
        "select r, has_function_privilege(r, 'public.custom_access_token_hook(jsonb)', 'execute'), "
        "has_table_privilege(r, 'public.user_roles', 'select'), has_schema_privilege(r, 'public', 'usage') "
        "from unnest(array['supabase_auth_admin', 'authenticated', 'anon']) r")
    assert privileges == [("supabase_auth_admin", True, True, True), ("authenticated", False, False, True),
                          ("anon", False, False, True)]
    admin_user = _one(server, "select user_id from public.user_roles where role = 'admin'")
    event = json.dumps({"user_id": str(admin_user), "claims": {"sub": str(admin_user), "role": "authenticated"}})
    with psycopg.connect(server.conninfo()) as conn:
        conn.execute("set local role supabase_auth_admin")  # as Supabase Auth calls the hook: no BYPASSRLS
        claims = conn.execute("select public.custom_access_token_hook(%s::jsonb) -> 'claims'", [event]).fetchone()[0]
        assert claims == {"sub": str(admin_user), "role": "authenticated", "user_role": "admin"}
        conn.rollback()
    with _as_api_role(server, "authenticated") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select public.custom_access_token_hook(%s::jsonb)", [event])


def test_notes_owner_defaults_to_the_jwt_subject_and_policies_reach_auth_only_through_is_owner(apps_source):
    server, _ = apps_source
    assert _one(server, "select pg_get_expr(adbin, adrelid) from pg_attrdef where adrelid = 'public.notes'::regclass "
                        "and adnum = (select attnum from pg_attribute where attrelid = 'public.notes'::regclass "
                        "and attname = 'owner_id')") == "auth.uid()"
    expressions = [r[0] for r in server.execute(
        "select coalesce(pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)) from pg_policy "
        "where polrelid = 'public.notes'::regclass")]
    assert len(expressions) == 3 and all(e == "is_owner(owner_id)" for e in expressions)
    assert "auth.uid()" in _one(server, "select prosrc from pg_proc where oid = 'public.is_owner(uuid)'::regprocedure")

    writer, reader = "00000000-0000-4000-8000-0000000000aa", "00000000-0000-4000-8000-0000000000bb"
    with _as_api_role(server, "authenticated", {"sub": writer, "role": "authenticated"}) as conn:
        owner = conn.execute("insert into public.notes (body) values ('bring sunscreen ☀️') returning owner_id"
                             ).fetchone()[0]
        assert str(owner) == writer
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # new row violates row-level security
            conn.execute("insert into public.notes (owner_id, body) values (%s, 'not mine')", [reader])
        conn.rollback()
    with _as_api_role(server, "authenticated", {"sub": reader, "role": "authenticated"}) as conn:
        assert conn.execute("select count(*) from public.notes").fetchone()[0] == 0
    owner, own = server.execute("select owner_id, count(*) from public.notes group by 1 order by 2 desc, 1 limit 1")[0]
    with _as_api_role(server, "authenticated", {"sub": str(owner), "role": "authenticated"}) as conn:
        assert conn.execute("select count(*) from public.notes").fetchone()[0] == own


def test_anon_cannot_read_role_permissions_though_default_privileges_gave_it_the_rest(apps_source):
    server, _ = apps_source
    granted = dict(server.execute("select p, has_table_privilege('anon', 'public.role_permissions', p) "
                                  "from unnest(array['select', 'insert', 'update', 'delete']) p"))
    assert granted == {"select": False, "insert": True, "update": True, "delete": True}
    assert _one(server, "select has_table_privilege('authenticated', 'public.role_permissions', 'select')")
    with _as_api_role(server, "anon") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select * from public.role_permissions")


def test_profiles_update_is_granted_on_two_columns_and_only_to_the_owner(apps_source):
    server, _ = apps_source
    assert _one(server, "select has_table_privilege('authenticated', 'public.profiles', 'update')") is False
    columns = dict(server.execute(
        "select c, has_column_privilege('authenticated', 'public.profiles', c, 'update') "
        "from unnest(array['full_name', 'avatar_url', 'updated_at', 'id']) c"))
    assert columns == {"full_name": True, "avatar_url": True, "updated_at": False, "id": False}
    mine, other = [r[0] for r in server.execute("select id from public.profiles order by id limit 2")]
    with _as_api_role(server, "authenticated", {"sub": str(mine), "role": "authenticated"}) as conn:
        assert conn.execute("select count(*) from public.profiles").fetchone()[0] > 1  # anyone can read
        assert conn.execute("update public.profiles set full_name = 'Me' where id = %s", [mine]).rowcount == 1
        assert conn.execute("update public.profiles set full_name = 'You' where id = %s", [other]).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("update public.profiles set updated_at = now() where id = %s", [mine])


def test_storage_policies_show_customers_their_own_waivers_and_everyone_the_tour_images(apps_source):
    server, _ = apps_source
    images = _one(server, "select count(*) from storage.objects where bucket_id = 'tour-images'")
    user_id, waivers = server.execute("select owner, count(*) from storage.objects where bucket_id = 'waivers' "
                                      "and owner is not null group by 1 order by 2 desc, 1 limit 1")[0]
    assert waivers < _one(server, "select count(*) from storage.objects where bucket_id = 'waivers'")
    visible = ("select count(*) filter (where bucket_id = 'waivers'), "
               "count(*) filter (where bucket_id = 'tour-images') from storage.objects")
    with _as_api_role(server, "authenticated", {"sub": str(user_id), "role": "authenticated"}) as conn:
        assert conn.execute(visible).fetchone() == (waivers, images)
    with _as_api_role(server, "anon", {"role": "anon"}) as conn:
        assert conn.execute(visible).fetchone() == (0, images)
    # Uploading tour images takes the permission, through the app's authorize().
    upload = "insert into storage.objects (bucket_id, name) values ('tour-images', 'tours/new.jpg')"
    with _as_api_role(server, "authenticated", {"sub": str(user_id), "user_role": "guide"}) as conn:
        assert conn.execute(upload).rowcount == 1
    with _as_api_role(server, "authenticated", {"sub": str(user_id)}) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(upload)


def test_guide_directory_view_reads_auth_users_and_waiver_file_size_reads_storage_objects(apps_source):
    server, _ = apps_source
    assert _one(server, "select count(*) from pg_depend d join pg_rewrite r on r.oid = d.objid "
                        "where r.ev_class = 'public.guide_directory'::regclass "
                        "and d.refobjid = 'auth.users'::regclass") > 0
    assert _one(server, "select count(*) from public.guide_directory") \
        == _one(server, "select count(*) from public.guides where active and auth_user_id is not null")
    with _as_api_role(server, "anon") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select * from public.guide_directory")
    assert "storage.objects" in _one(server, "select prosrc from pg_proc "
                                             "where oid = 'public.waiver_file_size(uuid)'::regprocedure")
    booking, size = server.execute("select w.booking_id, (o.metadata ->> 'size')::bigint from public.waivers w "
                                   "join storage.objects o on o.bucket_id = 'waivers' and o.name = w.document_path "
                                   "order by 1 limit 1")[0]
    assert _one(server, f"select public.waiver_file_size('{booking}')") == size
    # Nothing else in the app uses either (the view's own rule aside).
    for obj in ("'public.guide_directory'::regclass", "'public.waiver_file_size(uuid)'::regprocedure"):
        assert _one(server, f"select count(*) from pg_depend where refobjid = {obj} and deptype = 'n' and objid not in "
                            f"(select oid from pg_rewrite where ev_class = {obj}::oid)") == 0


def test_api_keys_default_hashes_with_pgcrypto_while_uuid_ossp_stays_unused(apps_source):
    server, _ = apps_source
    used = {r[0] for r in server.execute(
        "select distinct e.extname from pg_depend d join pg_attrdef ad on ad.oid = d.objid and d.classid = "
        "'pg_attrdef'::regclass join pg_proc p on p.oid = d.refobjid and d.refclassid = 'pg_proc'::regclass "
        "join pg_depend x on x.objid = p.oid and x.classid = 'pg_proc'::regclass and x.deptype = 'e' "
        "join pg_extension e on e.oid = x.refobjid "
        "where ad.adrelid in (select oid from pg_class where relnamespace = 'public'::regnamespace)")}
    assert used == {"pgcrypto"}
    assert {r[0] for r in server.execute("select extname from pg_extension")} >= {"pgcrypto", "uuid-ossp"}
    with psycopg.connect(server.conninfo()) as conn:
        key_hash = conn.execute("insert into public.api_keys (guide_id, label) values (1, 'new') returning key_hash"
                                ).fetchone()[0]
        assert len(key_hash) == 64 and int(key_hash, 16) >= 0
        conn.rollback()
    with _as_api_role(server, "authenticated", {"sub": "00000000-0000-4000-8000-000000000001"}) as conn:
        assert conn.execute("select count(*) from public.api_keys").fetchone()[0] == 0  # RLS, no policy


def test_notes_are_published_to_supabase_realtime_with_the_crm_tables(apps_source):
    server, _ = apps_source
    published = {r[0] for r in server.execute(
        "select schemaname || '.' || tablename from pg_publication_tables where pubname = 'supabase_realtime'")}
    assert published == {"public.bookings", "public.tour_schedules", "public.notes"}


def test_auth_email_reads_the_jwt_email_claim_and_is_null_without_one(apps_source):
    server, _ = apps_source
    with _as_api_role(server, "authenticated", {"sub": "00000000-0000-4000-8000-000000000001",
                                                "email": "zoë@example.com"}) as conn:
        assert conn.execute("select auth.email()").fetchone()[0] == "zoë@example.com"
    with _as_api_role(server, "anon") as conn:
        assert conn.execute("select auth.email(), auth.jwt()").fetchone() == (None, None)


def test_same_seed_gives_identical_app_tables_and_unchanged_crm_tables(apps_source, apps_twin, source):
    assert apps_source[1] == apps_twin[1]
    assert _app_checksums(apps_source[0]) == _app_checksums(apps_twin[0])
    assert set(_app_checksums(apps_source[0])) == set(APP_TABLES)
    # The apps layer adds rows; it does not change what the CRM tables hold.
    assert _table_checksums(apps_source[0]) == _table_checksums(source[0])
    assert {t: n for t, n in apps_source[1].items() if t not in APP_TABLES} == source[1]


def test_pg16_without_contrib_builds_with_apps_and_skips_only_api_keys(pg16_apps_source, apps_source):
    server, counts = pg16_apps_source
    assert server.major == 16
    assert {r[0] for r in server.execute("select extname from pg_extension")} == {"plpgsql"}
    assert _one(server, "select to_regclass('public.api_keys')") is None
    assert _one(server, "select count(*) from pg_trigger where tgname = 'on_auth_user_created'") == 1
    assert counts == {t: n for t, n in apps_source[1].items() if t != "public.api_keys"}
    expected = _app_checksums(apps_source[0])
    del expected["public.api_keys"]
    assert _app_checksums(server) == expected
    assert _table_checksums(server) == _table_checksums(apps_source[0])
