"""The database gate compares definitions and access, not just names.

Flow-level tests change one definition on a copy of a good migration (same names, same rows) and watch the
gate name the object and what differs. Privilege tests use two databases on one server and a role map.
"""

from __future__ import annotations

import itertools

import psycopg
import pytest

from helpers import fresh_runbook
from liftoff.flows.options import RunOptions
from liftoff.flows.verify import verify_database
from liftoff.errors import GateFailed
from liftoff.systems.pg_definitions import read_definitions
from liftoff.systems.pg_compare import compare_databases, compare_definitions

_names = itertools.count()


@pytest.fixture
def copy_of_migrated(stack, migrated):
    """A copy of the good migration's target database, with a runbook pointing at it."""
    name = f"defs{next(_names)}"
    runbook = fresh_runbook(stack, name, template="migrated")
    return name, runbook


def _gate(runbook) -> list[str]:
    with pytest.raises(GateFailed) as failed:
        verify_database(RunOptions(runbook=str(runbook)))
    return str(failed.value).splitlines()[1:]


def _only_failure(stack, copy_of_migrated, change: str) -> str:
    """Applies ``change`` to the target copy; the gate must fail with exactly one line, returned."""
    db, runbook = copy_of_migrated
    stack.target.execute(change, dbname=db)
    lines = _gate(runbook)
    assert len(lines) == 1, lines
    return lines[0]


def test_gate_passes_on_an_untouched_copy_with_definitions_compared(stack, copy_of_migrated):
    _, runbook = copy_of_migrated
    public_tables = [t for t in stack.counts if t.startswith("public.")]
    # every migrated table, and the shim's auth.users
    assert verify_database(RunOptions(runbook=str(runbook)))["tables"] == len(public_tables) + 1


def test_disabled_trigger_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, "ALTER TABLE public.bookings DISABLE TRIGGER bookings_audit")
    assert line == "trigger public.bookings.bookings_audit: enabled differs (source O, target D)"


def test_changed_function_body_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, """
        CREATE OR REPLACE FUNCTION public.log_booking_event() RETURNS trigger LANGUAGE plpgsql
        SET search_path = '' AS $$ begin return new; end; $$""")
    assert line == "function public.log_booking_event(): body differs"


def test_function_made_security_definer_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, "ALTER FUNCTION public.log_booking_event() SECURITY DEFINER")
    assert line == "function public.log_booking_event(): security definer differs (source false, target true)"


def test_dropped_column_default_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated,
                         "ALTER TABLE public.customers ALTER COLUMN marketing_opt_in DROP DEFAULT")
    assert line == "column public.customers.marketing_opt_in: default differs (source false, target (none))"


def test_check_redefined_under_the_same_name_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, """
        ALTER TABLE public.tours DROP CONSTRAINT tours_base_price_check,
          ADD CONSTRAINT tours_base_price_check CHECK (base_price >= '-100'::numeric)""")
    assert line.startswith("constraint public.tours.tours_base_price_check: definition differs (source CHECK")
    assert "-100" in line


def test_index_redefined_under_the_same_name_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, """
        DROP INDEX public.bookings_customer_id_idx;
        CREATE INDEX bookings_customer_id_idx ON public.bookings (customer_id, seats)""")
    assert line.startswith("index public.bookings_customer_id_idx: definition differs")
    assert "(customer_id, seats)" in line


def test_dropped_not_null_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, "ALTER TABLE public.guides ALTER COLUMN full_name DROP NOT NULL")
    assert line == "column public.guides.full_name: not null differs (source true, target false)"


def test_text_column_changed_to_varchar_20_is_caught(stack, copy_of_migrated):
    # The rows' text is the same, so only the definition tells.
    line = _only_failure(stack, copy_of_migrated, "ALTER TABLE public.payments ALTER COLUMN provider TYPE varchar(20)")
    assert line == "column public.payments.provider: type differs (source text, target character varying(20))"


def test_policy_weakened_to_using_true_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, 'ALTER POLICY "active tours are public" ON public.tours USING (true)')
    assert line == 'policy public.tours."active tours are public": qual differs (source active, target true)'


def test_extra_permissive_policy_on_the_target_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated,
                         "CREATE POLICY everyone ON public.payments FOR SELECT TO public USING (true)")
    assert line == "policy public.payments.everyone: on the target only, not on the source"


def test_row_level_security_disabled_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, "ALTER TABLE public.customers DISABLE ROW LEVEL SECURITY")
    assert line == "table public.customers: row level security differs (source true, target false)"


def test_force_row_level_security_changed_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, "ALTER TABLE public.bookings FORCE ROW LEVEL SECURITY")
    assert line == "table public.bookings: force row level security differs (source false, target true)"


def test_changed_view_query_is_caught(stack, copy_of_migrated):
    db, _ = copy_of_migrated
    query = stack.target.execute("SELECT pg_get_viewdef('public.upcoming_departures'::regclass)", dbname=db)[0][0]
    assert "now()" in query
    changed = query.replace("now()", "(now() - '1 day'::interval)")
    line = _only_failure(stack, copy_of_migrated, "CREATE OR REPLACE VIEW public.upcoming_departures "
                                                  f"WITH (security_invoker = true) AS {changed}")
    assert line.startswith("view public.upcoming_departures: query differs (source ")
    assert "1 day" in line.split("target", 1)[1]


def test_view_no_longer_security_invoker_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, "ALTER VIEW public.upcoming_departures RESET (security_invoker)")
    assert line == "view public.upcoming_departures: options differs (source security_invoker=true, target (none))"


def test_sequence_increment_changed_is_caught(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated, "ALTER SEQUENCE public.tours_id_seq INCREMENT BY 5")
    assert line == "sequence public.tours_id_seq: increment differs (source 1, target 5)"


# Kinds that change several ways are changed on different objects of one copy, one gate run for all: each
# line must still name its object and both values, and nothing else may differ.

def _failures(stack, copy_of_migrated, change: str) -> list[str]:
    db, runbook = copy_of_migrated
    stack.target.execute(change, dbname=db)
    return sorted(_gate(runbook))


def test_changed_replica_identities_are_caught(stack, copy_of_migrated):
    assert _failures(stack, copy_of_migrated, """
        ALTER TABLE public.payments REPLICA IDENTITY FULL;
        ALTER TABLE public.guides REPLICA IDENTITY NOTHING;
        ALTER TABLE public.tours REPLICA IDENTITY USING INDEX tours_slug_key""") == [
        "table public.guides: replica identity differs (source default, target nothing)",
        "table public.payments: replica identity differs (source default, target full)",
        "table public.tours: replica identity differs (source default, target index tours_slug_key)",
    ]


def test_extra_unique_index_on_the_target_is_caught_with_its_definition(stack, copy_of_migrated):
    # Two tours may share a title on the source; the target would refuse the second.
    line = _only_failure(stack, copy_of_migrated, "CREATE UNIQUE INDEX tours_title_key ON public.tours (title)")
    assert line == ("index public.tours_title_key: on the target only, not on the source "
                    "(CREATE UNIQUE INDEX tours_title_key ON public.tours USING btree (title))")


def test_extra_unique_constraint_is_one_line_not_two(stack, copy_of_migrated):
    line = _only_failure(stack, copy_of_migrated,
                         "ALTER TABLE public.tours ADD CONSTRAINT tours_title_key UNIQUE (title)")
    assert line == "constraint public.tours.tours_title_key: on the target only, not on the source"


def test_index_on_a_table_only_the_target_has_is_not_a_difference(stack, copy_of_migrated):
    db, runbook = copy_of_migrated
    stack.target.execute("CREATE TABLE public.scratch (id int); CREATE INDEX scratch_id_idx ON public.scratch (id)",
                         dbname=db)
    verify_database(RunOptions(runbook=str(runbook)))


def test_enum_values_added_on_the_target_are_caught(stack, copy_of_migrated):
    statuses = "'pending', 'confirmed', 'cancelled', 'completed'"
    assert _failures(stack, copy_of_migrated, """
        ALTER TYPE public.booking_status ADD VALUE 'refunded';
        ALTER TYPE public.app_role ADD VALUE 'owner' BEFORE 'admin'""") == [
        "type public.app_role: values differs (source 'admin', 'guide', target 'owner', 'admin', 'guide')",
        f"type public.booking_status: values differs (source {statuses}, target {statuses}, 'refunded')",
    ]


_CURRENCY_CHECK = "CHECK ((VALUE ~ '^[A-Z]{3}$'::text))"


def test_domain_check_re_added_not_valid_and_its_default_and_not_null_are_caught(stack, copy_of_migrated):
    assert _failures(stack, copy_of_migrated, """
        ALTER DOMAIN public.currency_code DROP CONSTRAINT currency_code_check;
        ALTER DOMAIN public.currency_code ADD CONSTRAINT currency_code_check CHECK (VALUE ~ '^[A-Z]{3}$') NOT VALID;
        ALTER DOMAIN public.currency_code SET DEFAULT 'EUR';
        ALTER DOMAIN public.currency_code SET NOT NULL""") == [
        f"type public.currency_code: constraint currency_code_check differs (source {_CURRENCY_CHECK}, target "
        f"{_CURRENCY_CHECK} NOT VALID)",
        "type public.currency_code: default differs (source (none), target 'EUR'::bpchar)",
        "type public.currency_code: not null differs (source false, target true)",
    ]


def test_domain_check_dropped_or_added_on_the_target_is_caught(stack, copy_of_migrated):
    assert _failures(stack, copy_of_migrated, """
        ALTER DOMAIN public.currency_code DROP CONSTRAINT currency_code_check;
        ALTER DOMAIN public.currency_code ADD CONSTRAINT currency_code_not_test CHECK (VALUE <> 'XTS')""") == [
        "type public.currency_code: constraint currency_code_check differs (source "
        f"{_CURRENCY_CHECK}, target (none))",
        "type public.currency_code: constraint currency_code_not_test differs (source (none), target "
        "CHECK ((VALUE <> 'XTS'::bpchar)))",
    ]


def test_changed_default_privileges_are_caught(stack, copy_of_migrated):
    assert _failures(stack, copy_of_migrated, """
        -- the issue's case: tables the app role creates later would be writable by anon
        ALTER DEFAULT PRIVILEGES FOR ROLE crm_app IN SCHEMA public GRANT INSERT, UPDATE, DELETE ON TABLES TO anon;
        ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT INSERT ON TABLES TO PUBLIC;
        ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public REVOKE DELETE ON TABLES FROM anon;
        -- a global entry replaces the built-in EXECUTE to PUBLIC on functions
        ALTER DEFAULT PRIVILEGES FOR ROLE postgres REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC""") == [
        "default privileges for role crm_app in schema public on tables to anon: target grants DELETE, INSERT, "
        "UPDATE, the source does not (access widened)",
        "default privileges for role postgres in every schema on functions to PUBLIC: the source grants EXECUTE, "
        "the target does not (access narrowed)",
        "default privileges for role postgres in every schema on tables to PUBLIC: target grants INSERT, the source "
        "does not (access widened)",
        "default privileges for role postgres in schema public on tables to anon: the source grants DELETE, the "
        "target does not (access narrowed)",
    ]


# ---------------------------------------------------------------------------------------------------
# Access, through a role map: two databases on one server (roles are the server's, grants the database's)

_n = itertools.count()


@pytest.fixture
def two_databases(stack):
    """Two databases on one server, each with a table public.payments; and a maker of fresh roles."""
    names = [f"acl{next(_n)}a", f"acl{next(_n)}b"]
    roles: list[str] = []
    for name in names:
        stack.target.execute(f"CREATE DATABASE {name}")
        stack.target.execute("CREATE TABLE public.payments (id int PRIMARY KEY, amount int, card text)", dbname=name)

    def new_role() -> str:
        role = f"gate_role_{next(_n)}"
        stack.target.execute(f"CREATE ROLE {role} NOLOGIN")
        roles.append(role)
        return role

    conns = [psycopg.connect(stack.target.conninfo(name), autocommit=True) for name in names]
    yield conns, new_role
    for conn in conns:
        for role in roles:
            conn.execute(f"DROP OWNED BY {role}")
        conn.close()
    for role in roles:
        stack.target.execute(f"DROP ROLE {role}")


def _compare(stack, conns, roles):
    source, target = (c.info.dbname for c in conns)
    report = compare_databases(
        lambda: psycopg.connect(stack.target.conninfo(source), autocommit=True),
        lambda: psycopg.connect(stack.target.conninfo(target), autocommit=True),
        [], ["public"], roles=roles,
    )
    return report.failures()


def test_a_grant_the_source_revoked_fails_as_access_widened(stack, two_databases):
    (source, target), new_role = two_databases
    role = new_role()
    target.execute(f"GRANT SELECT ON public.payments TO {role}")
    source.execute(f"GRANT SELECT ON public.payments TO {role}; REVOKE SELECT ON public.payments FROM {role}")
    assert _compare(stack, (source, target), {role: role}) == [
        f"privilege {role} on table public.payments: target grants SELECT, the source does not (access widened)"]


def test_a_grant_missing_on_the_target_fails_as_access_narrowed(stack, two_databases):
    (source, target), new_role = two_databases
    role = new_role()
    source.execute(f"GRANT SELECT, INSERT ON public.payments TO {role}")
    target.execute(f"GRANT SELECT ON public.payments TO {role}")
    assert _compare(stack, (source, target), {role: role}) == [
        f"privilege {role} on table public.payments: the source grants INSERT, the target does not (access narrowed)"]


def test_a_column_grant_wider_on_the_target_fails_as_access_widened(stack, two_databases):
    (source, target), new_role = two_databases
    role = new_role()
    source.execute(f"GRANT SELECT (id, amount) ON public.payments TO {role}")
    target.execute(f"GRANT SELECT (id, amount, card) ON public.payments TO {role}")
    assert _compare(stack, (source, target), {role: role}) == [
        f"privilege {role} on column public.payments.card: target grants SELECT, the source does not "
        f"(access widened)"]


def test_a_role_mapped_to_another_name_is_compared_through_the_map(stack, two_databases):
    (source, target), new_role = two_databases
    on_source, on_target = new_role(), new_role()
    source.execute(f"GRANT USAGE ON SCHEMA public TO {on_source}; GRANT SELECT ON public.payments TO {on_source}")
    target.execute(f"GRANT USAGE ON SCHEMA public TO {on_target}; GRANT SELECT ON public.payments TO {on_target}")
    assert _compare(stack, (source, target), {on_source: on_target}) == []
    assert f"privilege {on_source} on table public.payments: the source grants SELECT, the target does not " \
           f"(access narrowed)" in _compare(stack, (source, target), {on_source: on_source})
    target.execute(f"GRANT UPDATE ON public.payments TO {on_target}")
    assert _compare(stack, (source, target), {on_source: on_target}) == [
        f"privilege {on_source} (target {on_target}) on table public.payments: target grants UPDATE, the source "
        f"does not (access widened)"]


def test_a_role_mapped_to_none_is_not_compared(stack, two_databases):
    (source, target), new_role = two_databases
    role = new_role()
    source.execute(f"GRANT ALL ON public.payments TO {role}")
    assert _compare(stack, (source, target), {role: None}) == []
    assert len(_compare(stack, (source, target), {role: role})) == 1


def test_a_policy_to_a_mapped_role_compares_through_the_map(stack, two_databases):
    (source, target), new_role = two_databases
    on_source, on_target, other = new_role(), new_role(), new_role()
    source.execute(f"CREATE POLICY p1 ON public.payments TO {on_source}, {other} USING (amount > 0)")
    target.execute(f"CREATE POLICY p1 ON public.payments TO {on_target} USING (amount > 0)")
    src, tgt = read_definitions(source, ["public"]), read_definitions(target, ["public"])
    assert compare_definitions(src, tgt, roles={on_source: on_target, other: None}) == []
    [diff] = compare_definitions(src, tgt, roles={on_source: on_target})
    expected = ", ".join(sorted([other, on_target]))
    assert diff.summary() == f"policy public.payments.p1: roles differs (source {expected}, target {on_target})"


def test_a_policy_whose_only_role_is_dropped_is_expected_absent(stack, two_databases):
    (source, target), new_role = two_databases
    role = new_role()
    source.execute(f"CREATE POLICY p1 ON public.payments TO {role} USING (amount > 0)")
    assert _compare(stack, (source, target), {role: None}) == []
    assert _compare(stack, (source, target), {}) == ["policy missing on target: public.payments.p1"]


def test_generated_expression_identity_collation_and_volatility_are_compared(two_databases):
    (source, target), _ = two_databases
    source.execute("""
        CREATE TABLE public.items (id int GENERATED ALWAYS AS IDENTITY, price int, gross int GENERATED ALWAYS AS
          (price * 2) STORED, label text COLLATE "C");
        CREATE FUNCTION public.net(p int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT p'""")
    target.execute("""
        CREATE TABLE public.items (id int GENERATED BY DEFAULT AS IDENTITY, price int, gross int GENERATED ALWAYS AS
          (price * 3) STORED, label text COLLATE "POSIX");
        CREATE FUNCTION public.net(p int) RETURNS int VOLATILE LANGUAGE sql AS 'SELECT p'""")
    diffs = compare_definitions(read_definitions(source, ["public"]), read_definitions(target, ["public"]))
    assert [d.summary() for d in diffs] == [
        'column public.items.gross: generated differs (source (price * 2) STORED, target (price * 3) STORED)',
        'column public.items.id: identity differs (source always, target by default)',
        'column public.items.label: collation differs (source C, target POSIX)',
        'function public.net(p integer): volatility differs (source immutable, target volatile)',
    ]


def test_enum_values_missing_or_reordered_on_the_target_are_caught(two_databases):
    (source, target), _ = two_databases
    source.execute("CREATE TYPE public.tier AS ENUM ('bronze', 'silver', 'gold');"
                   "CREATE TYPE public.size AS ENUM ('s', 'm', 'l')")
    target.execute("CREATE TYPE public.tier AS ENUM ('bronze', 'gold');"
                   "CREATE TYPE public.size AS ENUM ('s', 'l', 'm')")
    diffs = compare_definitions(read_definitions(source, ["public"]), read_definitions(target, ["public"]))
    assert [d.summary() for d in diffs] == [
        "type public.size: values differs (source 's', 'm', 'l', target 's', 'l', 'm')",
        "type public.tier: values differs (source 'bronze', 'silver', 'gold', target 'bronze', 'gold')",
    ]
