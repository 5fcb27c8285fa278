"""The cutover's write freeze on the source, done as Supabase's non-superuser ``postgres``: each method stops
the writes it is meant to stop, ends or outlasts what was already open, and its lift puts back exactly the
settings and grants there were. Real servers only.

The tests run in their own databases on the stack's source (one owned by ``supabase_admin`` as on hosted
Supabase, one owned by ``postgres``) with their own login roles; role settings are per database and grants
per table, so the source database other tests use is never frozen.
"""

from __future__ import annotations

import json
import secrets
import threading
import time

import psycopg
import pytest

from liftoff.errors import StepFailed
from liftoff.runbooks.model import Freeze
from liftoff.systems.pg_freeze import (
    freeze_holes,
    freeze_problems,
    freeze_writes,
    lift_freeze,
)

DB = "liftoff_freeze"  # owned by supabase_admin, as a hosted project's database
OWNED_DB = "liftoff_freeze_owned"  # owned by postgres, for the database method
APP = "liftoff_freeze_app"  # a LOGIN role an app writes as, with its own grants
PGRST = "liftoff_freeze_pgrst"  # shaped like PostgREST's authenticator: logs in, SET ROLEs to the API roles
API_ROLES = ["anon", "authenticated", "service_role"]
ODD = 'public."Tour Notes ü"'  # a name that needs quoting, with column-level grants

SCHEMA = f"""
CREATE TABLE public.bookings (id serial PRIMARY KEY, note text);
CREATE TABLE {ODD} (id int, body text, mood text);
CREATE VIEW public.bookings_view AS SELECT id, note FROM public.bookings;
GRANT ALL ON ALL TABLES IN SCHEMA public TO anon, authenticated, service_role;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO anon, authenticated, service_role, {APP};
REVOKE ALL ON {ODD} FROM anon, authenticated;
GRANT SELECT, INSERT (body) ON {ODD} TO anon;
GRANT UPDATE (mood) ON {ODD} TO authenticated WITH GRANT OPTION;
REVOKE TRUNCATE ON public.bookings FROM anon;
GRANT SELECT, INSERT, DELETE ON public.bookings TO {APP};
GRANT UPDATE ON public.bookings TO {APP} WITH GRANT OPTION;
"""


class Source:
    """The stack's source, reached as supabase_admin, as postgres (the runbook's source user) and as the
    test's app roles."""

    def __init__(self, stack):
        self.server = stack.source
        self.postgres_password = stack.passwords["source"]
        self.passwords = {APP: secrets.token_urlsafe(12), PGRST: secrets.token_urlsafe(12)}

    def admin(self, sql: str, db: str = "postgres"):
        return self.server.execute(sql, dbname=db)

    def as_postgres(self, db: str = DB) -> psycopg.Connection:
        return psycopg.connect(self.server.conninfo(db, "postgres", self.postgres_password), autocommit=True)

    def as_role(self, role: str, db: str = DB) -> psycopg.Connection:
        return psycopg.connect(self.server.conninfo(db, role, self.passwords[role]), autocommit=True)

    def settings(self) -> list:
        """Every role and database setting of the cluster."""
        return self.admin("SELECT setdatabase, setrole, setconfig FROM pg_db_role_setting ORDER BY 1, 2")

    def acls(self, db: str = DB) -> list:
        """Every table and column ACL in ``public``, as text."""
        return self.admin("""
            SELECT c.oid::regclass::text, c.relacl::text,
                   array(SELECT a.attname || '=' || a.attacl::text FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attacl IS NOT NULL ORDER BY a.attnum)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' ORDER BY 1""", db=db)

    def app_insert(self, db: str = DB) -> str | None:
        """An INSERT by the app's login role in a new session, as an ordinary driver sends it: None if it
        worked, else the SQLSTATE."""
        with self.as_role(APP, db) as conn:
            return _sqlstate(conn, "INSERT INTO public.bookings (note) VALUES ('app')")

    def api_insert(self, role: str, table: str = "public.bookings", column: str = "note",
                   conn: psycopg.Connection | None = None) -> str | None:
        """An INSERT through the API role ``role`` as PostgREST sends it: logged in as the authenticator,
        ``BEGIN ... READ WRITE``, the role set for the transaction. None if it worked, else the SQLSTATE."""
        own = conn is None
        conn = conn or self.as_role(PGRST)
        try:
            conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE")
            conn.execute("SELECT set_config('role', %s, true)", (role,))
            state = _sqlstate(conn, f"INSERT INTO {table} ({column}) VALUES ('api')")
            conn.execute("COMMIT" if state is None else "ROLLBACK")
            return state
        finally:
            if own:
                conn.close()


def _sqlstate(conn: psycopg.Connection, statement: str) -> str | None:
    try:
        conn.execute(statement)
        return None
    except psycopg.Error as exc:
        return exc.sqlstate


@pytest.fixture(scope="module")
def source(stack):
    """Two databases and two login roles of the test's own on the stack's source; ``postgres`` a member of
    ``pg_signal_backend`` as on Supabase. Everything is dropped (and the membership put back) afterwards."""
    s = Source(stack)
    granted_signal = not s.admin("SELECT pg_has_role('postgres', 'pg_signal_backend', 'MEMBER')")[0][0]
    s.admin(f"CREATE ROLE {APP} LOGIN PASSWORD '{s.passwords[APP]}'")
    s.admin(f"CREATE ROLE {PGRST} LOGIN NOINHERIT PASSWORD '{s.passwords[PGRST]}'")
    s.admin(f"GRANT anon, authenticated, service_role TO {PGRST}")
    if granted_signal:
        s.admin("GRANT pg_signal_backend TO postgres")
    try:
        s.admin(f"CREATE DATABASE {DB}")
        s.admin(f"CREATE DATABASE {OWNED_DB} OWNER postgres")
        for db in (DB, OWNED_DB):
            s.admin("GRANT ALL ON SCHEMA public TO postgres", db=db)
            with s.as_postgres(db) as conn:
                conn.execute(SCHEMA)
        yield s
    finally:
        for db in (DB, OWNED_DB):
            s.admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        s.admin(f"DROP ROLE IF EXISTS {APP}")
        s.admin(f"DROP ROLE IF EXISTS {PGRST}")
        if granted_signal:
            s.admin("REVOKE pg_signal_backend FROM postgres")


@pytest.fixture
def lifted(source):
    """Records to lift after the test, whatever happened in it (the first one last, as the rollback does)."""
    records: list[tuple[str, dict]] = []
    yield records
    for db, record in reversed(records):
        with source.as_postgres(db) as conn:
            lift_freeze(conn, record)


def _freeze(source, lifted, freeze: Freeze, db: str = DB, **kw) -> dict:
    with source.as_postgres(db) as conn:
        record = freeze_writes(conn, freeze, ["public"], **kw)
    lifted.append((db, record))
    json.dumps(record)  # plain JSON, for the ledger's event log
    return record


def _lift(source, lifted, record: dict, db: str = DB) -> None:
    with source.as_postgres(db) as conn:
        lift_freeze(conn, record)
    lifted.remove((db, record))


def test_role_freeze_ends_the_app_roles_open_sessions_and_refuses_new_writes_until_lifted(source, lifted):
    source.admin(f"ALTER ROLE {PGRST} IN DATABASE {DB} SET default_transaction_read_only = 'off'")
    source.admin(f"ALTER ROLE {APP} IN DATABASE {DB} SET statement_timeout = '5s'")
    try:
        before = source.settings()
        assert source.app_insert() is None
        open_here, open_elsewhere = source.as_role(APP), source.as_role(APP, db="postgres")

        record = _freeze(source, lifted, Freeze(method="role", roles=[APP, PGRST]))

        assert record["settings"] == {APP: None, PGRST: "off"}
        assert open_here.info.backend_pid in record["ended_sessions"]
        assert open_elsewhere.info.backend_pid not in record["ended_sessions"]
        with pytest.raises(psycopg.OperationalError):
            open_here.execute("SELECT 1")
        assert open_elsewhere.execute("SELECT 1").fetchone() == (1,)  # another database is not frozen
        assert source.app_insert() == "25006"  # cannot execute INSERT in a read-only transaction
        with source.as_postgres() as conn:
            assert freeze_holes(conn, record) == []

        _lift(source, lifted, record)
        assert source.settings() == before  # "not set", 'off' and the unrelated statement_timeout as they were
        assert source.app_insert() is None
        open_elsewhere.close()
    finally:
        source.admin(f"ALTER ROLE {PGRST} IN DATABASE {DB} RESET ALL")
        source.admin(f"ALTER ROLE {APP} IN DATABASE {DB} RESET ALL")


def test_role_freeze_does_not_stop_a_transaction_begun_read_write_as_postgrest_begins_its_writes(source, lifted):
    record = _freeze(source, lifted, Freeze(method="role", roles=[PGRST]))
    with source.as_role(PGRST) as conn:
        conn.execute("SELECT set_config('role', 'authenticated', false)")
        assert _sqlstate(conn, "INSERT INTO public.bookings (note) VALUES ('default mode')") == "25006"
        assert source.api_insert("authenticated", conn=conn) is None  # why the API roles need method revoke
    _lift(source, lifted, record)


def test_role_freeze_refuses_begin_read_write_and_its_lift_ends_the_sessions_that_logged_in_during_it(source,
                                                                                                      lifted):
    acls = source.acls()
    record = _freeze(source, lifted, Freeze(method="role", roles=[APP]))
    revoked = {(g["table"], g["column"], g["grantee"], g["privilege"], g["grantable"]) for g in record["revoked"]}
    assert {("bookings", None, APP, "INSERT", False), ("bookings", None, APP, "UPDATE", True)} <= revoked

    during = source.as_role(APP)  # an app's pool reconnecting while the freeze stands
    elsewhere = source.as_role(APP, db="postgres")  # the same role in a database not frozen
    assert _sqlstate(during, "INSERT INTO public.bookings (note) VALUES ('default mode')") == "25006"
    during.execute("BEGIN READ WRITE")  # what the read-only default cannot stop: the revoke does
    assert _sqlstate(during, "INSERT INTO public.bookings (note) VALUES ('read write')") == "42501"
    during.execute("ROLLBACK")
    with source.as_postgres() as conn:
        assert freeze_holes(conn, record) == []

    _lift(source, lifted, record)
    with pytest.raises(psycopg.OperationalError):  # read-only for as long as it lived: ended by the lift
        during.execute("SELECT 1")
    assert elsewhere.execute("SELECT 1").fetchone() == (1,)
    assert source.app_insert() is None  # a new connection writes
    assert source.acls() == acls  # the grants back, grant option included
    elsewhere.close()


def test_revoke_freeze_stops_the_api_roles_as_postgrest_uses_them_and_lift_restores_the_exact_acls(source, lifted):
    before = source.acls()
    assert source.api_insert("anon") is None
    assert source.api_insert("anon", ODD, "body") is None
    already_open = source.as_role(PGRST)

    record = _freeze(source, lifted, Freeze(method="revoke", roles=API_ROLES))

    for role in API_ROLES:
        assert source.api_insert(role) == "42501", role  # permission denied, even in a READ WRITE transaction
        assert source.api_insert(role, "public.bookings_view") == "42501", role
    assert source.api_insert("anon", ODD, "body") == "42501"  # the column grant went too
    assert source.api_insert("anon", conn=already_open) == "42501"  # a session opened before is stopped too
    assert source.app_insert() is None  # a login role with its own grants is not what this method stops
    revoked = {(g["table"], g["column"], g["grantee"], g["privilege"], g["grantable"]) for g in record["revoked"]}
    assert ("Tour Notes ü", "body", "anon", "INSERT", False) in revoked
    assert ("Tour Notes ü", "mood", "authenticated", "UPDATE", True) in revoked
    assert ("bookings", None, "anon", "TRUNCATE", False) not in revoked  # it was not there to revoke
    assert all(g["grantee"] in API_ROLES for g in record["revoked"])
    with source.as_postgres() as conn:
        assert freeze_holes(conn, record) == []

    _lift(source, lifted, record)
    assert source.acls() == before
    assert source.api_insert("anon", conn=already_open) is None
    assert source.api_insert("authenticated", "public.bookings_view") is None
    already_open.close()


@pytest.mark.parametrize("method,roles", [("role", [APP, PGRST]), ("revoke", API_ROLES)])
def test_freezing_twice_then_lifting_the_first_record_restores_the_original(source, lifted, method, roles):
    settings, acls = source.settings(), source.acls()
    first = _freeze(source, lifted, Freeze(method=method, roles=roles))
    second = _freeze(source, lifted, Freeze(method=method, roles=roles))
    assert second.get("revoked", []) == []  # nothing more to revoke
    assert set(second.get("settings", {}).values()) <= {"on"}

    _lift(source, lifted, first)
    assert (source.settings(), source.acls()) == (settings, acls)
    _lift(source, lifted, second)  # the second record's lift puts back its "previous": still frozen for role
    with source.as_postgres() as conn:
        lift_freeze(conn, first)  # idempotent
        lift_freeze(conn, first)
    assert (source.settings(), source.acls()) == (settings, acls)
    assert source.app_insert() is None


def test_database_freeze_as_a_non_owner_is_refused_in_one_line_and_changes_nothing(source, lifted):
    settings = source.settings()
    with source.as_postgres() as conn:
        with pytest.raises(StepFailed) as failed:
            freeze_writes(conn, Freeze(method="database", roles=[APP]), ["public"])
        assert freeze_problems(conn, Freeze(method="database", roles=[APP]), ["public"]) == [(
            f"cutover.freeze.method database: ALTER DATABASE {DB} needs its owner (supabase_admin) and source user "
            "postgres is not (as on hosted Supabase); use cutover.freeze.method role or revoke")]
    message = str(failed.value)
    assert "\n" not in message and "needs its owner (supabase_admin)" in message and "method role or revoke" in message
    assert source.settings() == settings
    assert source.app_insert() is None


def test_database_freeze_by_the_owner_makes_new_sessions_read_only_and_a_frozen_user_can_still_lift_it(
        source, lifted):
    before = source.settings()
    already_open = source.as_role(APP, OWNED_DB)
    record = _freeze(source, lifted, Freeze(method="database", roles=[APP]), db=OWNED_DB)
    assert record["setting"] is None
    with pytest.raises(psycopg.OperationalError):
        already_open.execute("SELECT 1")
    assert source.app_insert(OWNED_DB) == "25006"
    with source.as_postgres(OWNED_DB) as conn:
        assert _sqlstate(conn, "INSERT INTO public.bookings (note) VALUES ('owner')") == "25006"  # postgres too
        assert freeze_holes(conn, record) == []
    _lift(source, lifted, record, db=OWNED_DB)  # through a new session, read-only by default
    assert source.settings() == before
    assert source.app_insert(OWNED_DB) is None


def test_role_freeze_of_the_api_roles_is_refused_because_they_never_log_in(source, lifted):
    settings = source.settings()
    with source.as_postgres() as conn, pytest.raises(StepFailed) as failed:
        freeze_writes(conn, Freeze(method="role"), ["public"])  # the API roles, which never log in
    assert "anon, authenticated, service_role cannot log in" in str(failed.value)
    assert "method revoke" in str(failed.value)
    assert "\n" not in str(failed.value)
    assert source.settings() == settings


def test_role_freeze_without_pg_signal_backend_is_refused_before_anything_changes(source, lifted):
    settings = source.settings()
    source.admin("REVOKE pg_signal_backend FROM postgres")
    try:
        with source.as_postgres() as conn, pytest.raises(StepFailed) as failed:
            freeze_writes(conn, Freeze(method="role", roles=[APP]), ["public"])
    finally:
        source.admin("GRANT pg_signal_backend TO postgres")
    assert f"may not end role {APP}'s sessions: GRANT pg_signal_backend TO postgres" in str(failed.value)
    assert source.settings() == settings


def test_revoke_freeze_is_refused_when_a_role_could_still_write_through_public(source, lifted):
    with source.as_postgres() as conn:
        conn.execute("CREATE TABLE public.guestbook (line text)")
        conn.execute("GRANT INSERT ON public.guestbook TO PUBLIC")
    try:
        acls = source.acls()
        with source.as_postgres() as conn:
            problems = freeze_problems(conn, Freeze(method="revoke", roles=API_ROLES), ["public"])
            with pytest.raises(StepFailed) as failed:
                freeze_writes(conn, Freeze(method="revoke", roles=API_ROLES), ["public"])
        assert problems and all("can still INSERT on public.guestbook (through PUBLIC" in p for p in problems)
        assert "can still INSERT on public.guestbook" in str(failed.value)
        assert "nothing was changed" in str(failed.value)
        assert source.acls() == acls
        assert source.api_insert("anon") is None
    finally:
        with source.as_postgres() as conn:
            conn.execute("DROP TABLE public.guestbook")


def test_revoke_freeze_waits_for_a_write_begun_before_it_to_commit(source, lifted):
    writer = source.as_role(PGRST)
    writer.execute("BEGIN READ WRITE")
    writer.execute("SELECT set_config('role', 'authenticated', true)")
    writer.execute("INSERT INTO public.bookings (note) VALUES ('in flight')")
    committed_at = []

    def commit_later():
        time.sleep(1.0)
        committed_at.append(time.time())
        writer.execute("COMMIT")

    committer = threading.Thread(target=commit_later)
    committer.start()
    record = _freeze(source, lifted, Freeze(method="revoke", roles=API_ROLES), wait_s=20)
    committer.join()
    writer.close()
    assert record["frozen_at"] >= committed_at[0]


def test_revoke_freeze_lifts_itself_when_a_write_transaction_outlasts_the_wait(source, lifted):
    acls = source.acls()
    writer = source.as_role(PGRST)
    writer.execute("BEGIN READ WRITE")
    writer.execute("SELECT set_config('role', 'anon', true)")
    writer.execute("INSERT INTO public.bookings (note) VALUES ('never committed')")
    try:
        with source.as_postgres() as conn, pytest.raises(StepFailed) as failed:
            freeze_writes(conn, Freeze(method="revoke", roles=API_ROLES), ["public"], wait_s=1)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "still open after 1 s; the freeze was lifted" in str(failed.value)
    assert source.acls() == acls
