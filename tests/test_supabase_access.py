"""The migrated app behaves for Supabase's API roles exactly as on the source: the same rows through RLS, the
same grants (a revoked one stays revoked), and roles as the runbook decides. Real servers only."""

from __future__ import annotations

import json

import psycopg
import pytest

from helpers import fresh_runbook, run_cli
from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.flows.preflight import preflight
from liftoff.errors import PreflightFailed
from liftoff.ledger import Ledger
from liftoff.runbooks.model import load_runbook


def _as(server, dbname: str, role: str, claims: dict | None, query: str, params=()):
    """Runs ``query`` as ``role`` (SET ROLE, as PostgREST does) with request.jwt.claims set; returns rows or
    the error's SQLSTATE."""
    with psycopg.connect(server.conninfo(dbname)) as conn:
        conn.execute("SELECT set_config('role', %s, true)", (role,))
        if claims is not None:
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        try:
            return conn.execute(query, params).fetchall()
        except psycopg.Error as exc:
            return exc.sqlstate
        finally:
            conn.rollback()


def _both(stack, role, claims, query, params=()):
    return (_as(stack.source, "postgres", role, claims, query, params),
            _as(stack.target, "migrated", role, claims, query, params))


def test_authenticated_users_see_the_same_rows_through_rls_as_on_the_source(stack, migrated):
    users = [r[0] for r in stack.source.execute(
        "SELECT customer_user_id::text FROM public.bookings WHERE customer_user_id IS NOT NULL "
        "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 3")]
    assert users
    for sub in users:
        claims = {"sub": sub, "role": "authenticated"}
        for query in ("SELECT id::text FROM public.bookings ORDER BY 1", "SELECT id::text FROM public.customers",
                      "SELECT count(*) FROM public.tours", "SELECT auth.uid()::text, auth.role()"):
            on_source, on_target = _both(stack, "authenticated", claims, query)
            assert on_source == on_target, (sub, query)
        assert _as(stack.target, "migrated", "authenticated", claims,
                   "SELECT count(*) FROM public.bookings")[0][0] > 0


def test_an_insert_rls_refuses_on_the_source_is_refused_on_the_target(stack, migrated):
    sub = stack.source.execute("SELECT user_id::text FROM public.customers WHERE user_id IS NOT NULL LIMIT 1")[0][0]
    someone_else = stack.source.execute(
        "SELECT user_id::text FROM public.customers WHERE user_id IS NOT NULL AND user_id::text <> %s LIMIT 1"
        .replace("%s", f"'{sub}'"))[0][0]
    schedule, customer = stack.source.execute("SELECT schedule_id, customer_id::text FROM public.bookings LIMIT 1")[0]
    insert = ("INSERT INTO public.bookings (schedule_id, customer_id, customer_user_id, created_by, seats, "
              "total_amount) VALUES (%s, %s, %s, %s, 1, 10) RETURNING 1")
    claims = {"sub": sub, "role": "authenticated"}
    denied = _both(stack, "authenticated", claims, insert, (schedule, customer, someone_else, sub))
    assert denied == ("42501", "42501")  # new row violates row-level security policy, on both
    allowed = _both(stack, "authenticated", claims, insert, (schedule, customer, sub, sub))
    assert allowed == ([(1,)], [(1,)])


def test_anon_sees_what_it_saw_and_nothing_more(stack, migrated):
    for query in ("SELECT count(*) FROM public.tours", "SELECT count(*) FROM public.upcoming_departures"):
        on_source, on_target = _both(stack, "anon", None, query)
        assert on_source == on_target and isinstance(on_source, list), query
    # revoked from anon on the source: refused on both (not widened by a blanket grant)
    assert _both(stack, "anon", None, "SELECT count(*) FROM public.payments") == ("42501", "42501")
    assert _both(stack, "anon", None, "SELECT count(*) FROM public.bookings") == ([(0,)], [(0,)])


def test_a_grant_the_source_revoked_stays_revoked_and_app_roles_are_an_extra(stack, migrated):
    check = "SELECT has_table_privilege(%s, 'public.payments', 'SELECT')"
    assert stack.source.execute(check.replace("%s", "'authenticated'"))[0][0] is False
    assert stack.target.execute(check.replace("%s", "'authenticated'"), dbname="migrated")[0][0] is False
    assert stack.target.execute(check.replace("%s", "'crm_app'"), dbname="migrated")[0][0] is True
    grants = migrated["result"]["restore"]["grants"]
    assert any(g.startswith("extra: crm_app gets read_write") for g in grants)


def test_service_role_bypasses_rls_on_the_target_as_on_the_source(stack, migrated):
    on_source, on_target = _both(stack, "service_role", {"role": "service_role"}, "SELECT count(*) FROM public.bookings")
    assert on_source == on_target == [(migrated["counts"]["public.bookings"],)]
    assert stack.target.execute("SELECT rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = 'service_role'",
                                dbname="migrated")[0] == (True, False)


def test_the_shim_copies_every_column_of_auth_users_and_supabase_auth_functions(stack, migrated):
    columns = "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute " \
              "WHERE attrelid = 'auth.users'::regclass AND attnum > 0 AND NOT attisdropped"
    assert stack.source.execute(columns)[0][0] == stack.target.execute(columns, dbname="migrated")[0][0]
    digest = "SELECT md5(string_agg(u::text, '' ORDER BY id)) FROM auth.users u"
    assert stack.source.execute(digest)[0][0] == stack.target.execute(digest, dbname="migrated")[0][0]
    claims = {"sub": "00000000-0000-0000-0000-000000000001", "email": "a@example.com", "role": "authenticated"}
    on_target = _as(stack.target, "migrated", "authenticated", claims, "SELECT auth.email(), auth.jwt() ->> 'email'")
    assert on_target == [("a@example.com", "a@example.com")]
    # Supabase's auth.jwt() is NULL without claims, not '{}'
    assert _as(stack.target, "migrated", "anon", None, "SELECT auth.jwt() IS NULL")[0][0] is True


# ---------------------------------------------------------------------------------------------------
# A source of its own, without the example apps: these tests change it


@pytest.fixture(scope="module")
def own_stack(prefect_api):
    from liftoff_sandbox.stack import LocalStack

    s = LocalStack(bookings=120, env_prefix="LIFTOFF_ACCESS", apps=False).start()
    yield s
    s.stop()


def test_a_role_without_a_decision_stops_preflight_naming_it_and_the_fix(own_stack):
    own_stack.source.execute("CREATE ROLE crm_reader NOLOGIN; GRANT SELECT ON public.tours TO crm_reader")
    try:
        runbook = fresh_runbook(own_stack, "unmapped")
        with pytest.raises(PreflightFailed) as failed:
            preflight(RunOptions(runbook=str(runbook)))
        message = str(failed.value)
        assert "role crm_reader is named by the migrated objects (grant on public.tours)" in message
        assert "database.roles" in message

        mapped = fresh_runbook(own_stack, "mapped", roles={"crm_reader": {"map_to": "crm_app"}})
        migrate_database(RunOptions(runbook=str(mapped)))
        privilege = "SELECT has_table_privilege('crm_app', 'public.{}', 'SELECT')"
        assert own_stack.target.execute(privilege.format("tours"), dbname="mapped")[0][0] is True
    finally:
        own_stack.source.execute("REVOKE ALL ON public.tours FROM crm_reader; DROP ROLE crm_reader")


def test_a_policy_for_a_dropped_role_is_left_out_and_listed_and_a_renamed_one_follows_its_role(own_stack):
    own_stack.source.execute(
        "CREATE POLICY \"auth admin reads tours\" ON public.tours FOR SELECT TO supabase_auth_admin USING (true);"
        "CREATE POLICY \"staff and anon\" ON public.tours FOR SELECT TO anon, supabase_auth_admin USING (active)")
    try:
        runbook = fresh_runbook(own_stack, "hookpolicy")
        result = migrate_database(RunOptions(runbook=str(runbook)))
        assert result["verify"]["tables"] >= 9
        policies = dict(own_stack.target.execute(
            "SELECT policyname, array_to_string(roles, ',') FROM pg_policies WHERE tablename = 'tours'",
            dbname="hookpolicy"))
        assert "auth admin reads tours" not in policies
        assert policies["staff and anon"] == "anon"
        decisions = {d["object"]: d for d in Ledger(load_runbook(runbook).state_dir).step_detail("export")["decisions"]}
        assert decisions["policy public.tours.auth admin reads tours"]["decision"] == "left out"
        assert decisions["policy public.tours.staff and anon"]["decision"] == "created with mapped roles"
    finally:
        own_stack.source.execute('DROP POLICY "auth admin reads tours" ON public.tours;'
                                 'DROP POLICY "staff and anon" ON public.tours')


def test_rls_hiding_rows_from_the_source_user_is_an_operator_error_naming_table_and_policy(own_stack):
    own_stack.source.execute(
        "CREATE ROLE migrator LOGIN PASSWORD 'migrator-password-1'; GRANT USAGE ON SCHEMA public TO migrator;"
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO migrator; GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO migrator")
    try:
        data = own_stack.runbook_data(state_dir="state-rlshidden", target_database="rlshidden")
        own_stack.new_target_database("rlshidden")
        data["source"].update(user="migrator", password={"env": "LIFTOFF_MIGRATOR_PW"})
        import yaml

        path = own_stack.workdir / "rlshidden.yaml"
        path.write_text(yaml.safe_dump(data))
        env = {"LIFTOFF_MIGRATOR_PW": "migrator-password-1"}
        checked = run_cli("run", "preflight", "--runbook", str(path), env=env)
        assert checked.returncode == 2, checked.stderr
        assert "source table public.bookings has row-level security (policies: customers create own bookings, " \
               "customers see own bookings)" in checked.stderr
        assert "BYPASSRLS" in checked.stderr
        exported = run_cli("run", "export", "--runbook", str(path), env=env)
        assert exported.returncode == 2 and "unexpected" not in exported.stderr, exported.stderr
        assert "row-level security" in exported.stderr
        assert Ledger(load_runbook(path).state_dir).step_status("export") == "failed"
    finally:
        own_stack.source.execute("DROP OWNED BY migrator; DROP ROLE migrator")


def test_drop_policy_leaves_out_auth_objects_and_reports_them(own_stack):
    runbook = fresh_runbook(own_stack, "dropped", supabase_leftovers="drop")
    migrate_database(RunOptions(runbook=str(runbook)))
    target = own_stack.target
    assert target.execute("SELECT count(*) FROM pg_policies WHERE qual ~ 'auth\\.'", dbname="dropped")[0][0] == 0
    fks_to_auth = target.execute(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND confrelid::regclass::text LIKE 'auth.%'",
        dbname="dropped")
    assert fks_to_auth[0][0] == 0
    assert "auth" not in {r[0] for r in target.execute("SELECT nspname FROM pg_namespace", dbname="dropped")}
    decisions = {d["object"]: d["decision"] for d in
                 Ledger(load_runbook(runbook).state_dir).step_detail("export")["decisions"]}
    assert decisions["policy public.bookings.customers see own bookings"] == "left out"
    assert decisions["foreign key public.bookings.bookings_created_by_fkey"] == "left out"
    # the audit trigger's function calls auth.uid() in its body: kept, and the plan says it may fail
    assert decisions["function public.log_booking_event()"] == "kept, may fail when used"
    assert decisions["trigger public.bookings.bookings_audit"] == "kept, may fail when used"


def test_sign_up_trigger_on_auth_users_is_recreated_and_creates_a_profile_on_the_target(stack, migrated):
    user = "11111111-2222-4333-8444-555555555555"
    stack.target.execute(
        f"INSERT INTO auth.users (id, email, raw_user_meta_data) VALUES ('{user}', 'new@example.com', "
        "'{\"full_name\": \"New Person\"}')", dbname="migrated")
    try:
        assert stack.target.execute(f"SELECT full_name FROM public.profiles WHERE id = '{user}'",
                                    dbname="migrated") == [("New Person",)]
    finally:
        stack.target.execute(f"DELETE FROM auth.users WHERE id = '{user}'", dbname="migrated")


def test_the_gate_catches_a_disabled_sign_up_trigger_on_the_shim(stack, migrated):
    from liftoff.flows.verify import verify_database
    from liftoff.errors import GateFailed

    runbook = fresh_runbook(stack, "authtrigger", template="migrated")
    stack.target.execute("ALTER TABLE auth.users DISABLE TRIGGER on_auth_user_created", dbname="authtrigger")
    with pytest.raises(GateFailed) as failed:
        verify_database(RunOptions(runbook=str(runbook)))
    assert "trigger auth.users.on_auth_user_created: enabled differs (source O, target D)" in str(failed.value)


def test_what_the_supabase_choices_touched_is_listed_in_the_plan(stack, migrated):
    decisions = {d["object"]: d for d in
                 Ledger(load_runbook(migrated["runbook"]).state_dir).step_detail("export")["decisions"]}
    hook_policy = decisions["policy public.user_roles.Allow auth admin to read user roles"]
    assert hook_policy["decision"] == "left out" and "supabase_auth_admin" in hook_policy["why"]
    assert decisions["trigger auth.users.on_auth_user_created"]["decision"] == "recreated on the shim's auth.users"
    assert decisions["function public.waiver_file_size(booking uuid)"]["decision"] == "kept, may fail when used"
    assert "storage.objects" in decisions["function public.waiver_file_size(booking uuid)"]["why"]
    storage = [o for o, d in decisions.items() if o.startswith("policy storage.objects.")]
    assert storage and all(decisions[o]["decision"] == "not migrated" for o in storage)
    # the hook's EXECUTE was revoked from the API roles and PUBLIC on the source: still revoked
    hook = "SELECT has_function_privilege('authenticated', 'public.custom_access_token_hook(jsonb)', 'EXECUTE')"
    assert stack.target.execute(hook, dbname="migrated")[0][0] is False
    # a column-level grant: authenticated may update these columns of profiles and no others
    column = "SELECT has_column_privilege('authenticated', 'public.profiles', '{}', 'UPDATE')"
    assert stack.target.execute(column.format("full_name"), dbname="migrated")[0][0] is True
    assert stack.target.execute(column.format("id"), dbname="migrated")[0][0] is False


def test_stream_strategy_copies_a_user_who_signs_up_between_export_and_restore(own_stack):
    from liftoff.flows.export import export_database
    from liftoff.flows.restore import restore_database
    from liftoff.flows.verify import verify_database

    runbook = fresh_runbook(own_stack, "signup", strategy="stream")
    export_database(RunOptions(runbook=str(runbook)))
    user = "22222222-3333-4444-8555-666666666666"
    own_stack.source.execute(
        f"INSERT INTO auth.users (id, email) VALUES ('{user}', 'late@example.com');"
        f"INSERT INTO public.customers (user_id, full_name, email) VALUES ('{user}', 'Late', 'late@example.com')")
    try:
        restore_database(RunOptions(runbook=str(runbook)))
        verified = verify_database(RunOptions(runbook=str(runbook)))
        assert verified["tables"] >= 10
        assert own_stack.target.execute(f"SELECT count(*) FROM public.customers WHERE user_id = '{user}'",
                                        dbname="signup")[0][0] == 1
    finally:
        own_stack.source.execute(f"DELETE FROM public.customers WHERE user_id = '{user}';"
                                 f"DELETE FROM auth.users WHERE id = '{user}'")
