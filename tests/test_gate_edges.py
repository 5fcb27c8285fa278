"""Gate edge cases, on two real databases: each test makes them differ in one way the gate must see."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from liftoff.systems.postgres import TEXT_SETTINGS, Table, digest_columns, list_tables
from liftoff.systems.pg_compare import compare_objects, compare_table

_n = itertools.count()


@pytest.fixture
def two_databases(stack):
    """Two empty databases on one server, with connections set up as the gate sets them up."""
    names = [f"edge{next(_n)}a", f"edge{next(_n)}b"]
    for name in names:
        stack.target.execute(f"CREATE DATABASE {name}")
    conns = [psycopg.connect(stack.target.conninfo(name), autocommit=True) for name in names]
    for conn in conns:
        for k, v in TEXT_SETTINGS.items():
            conn.execute("SELECT set_config(%s, %s, false)", (k, v))
    yield conns
    for conn in conns:
        conn.close()


def _both(conns, sql: str) -> None:
    for conn in conns:
        conn.execute(sql)


def _table(conn, name: str) -> Table:
    return next(t for t in list_tables(conn, ["public"]) if t.name == name)


def test_a_column_named_like_the_row_alias_does_not_hide_other_columns(two_databases):
    source, target = two_databases
    _both(two_databases, "CREATE TABLE public.notes (id int PRIMARY KEY, t text, body text);"
                         "INSERT INTO public.notes SELECT g, 'same', 'body ' || g FROM generate_series(1, 50) g")
    target.execute("UPDATE public.notes SET body = 'changed' WHERE id = 17")
    check = compare_table(source, target, _table(source, "notes"))
    assert not check.ok and check.changed_keys == ["17"]


def test_table_without_primary_key_is_compared_as_a_whole(two_databases):
    source, target = two_databases
    _both(two_databases, "CREATE TABLE public.log (at int, line text);"
                         "INSERT INTO public.log SELECT g, 'line ' || g FROM generate_series(1, 30) g")
    target.execute("UPDATE public.log SET line = 'x' WHERE at = 3")
    check = compare_table(source, target, _table(source, "log"))
    assert check.source_rows == check.target_rows == 30
    assert not check.ok and check.status == "content differs"


def test_composite_and_text_keys_are_ranged_and_narrowed(two_databases):
    source, target = two_databases
    _both(two_databases, "CREATE TABLE public.seats (tour text, seat int, holder text, PRIMARY KEY (tour, seat));"
                         "INSERT INTO public.seats SELECT 'tour-' || (g % 7), g, 'h' || g "
                         "FROM generate_series(1, 400) g")
    target.execute("DELETE FROM public.seats WHERE tour = 'tour-3' AND seat = 10")
    target.execute("INSERT INTO public.seats VALUES ('Zzz', 1, 'extra'), ('AAA', 1, 'extra')")
    check = compare_table(source, target, _table(source, "seats"), chunk_rows=64)
    assert check.missing_keys == ["tour-3, 10"]
    assert sorted(check.extra_keys) == ["AAA, 1", "Zzz, 1"]  # below the first key and above the last


def test_an_unpopulated_materialized_view_is_reported(two_databases):
    source, target = two_databases
    _both(two_databases, "CREATE TABLE public.t1 (id int PRIMARY KEY);")
    source.execute("CREATE MATERIALIZED VIEW public.mv AS SELECT count(*) FROM public.t1")
    target.execute("CREATE MATERIALIZED VIEW public.mv AS SELECT count(*) FROM public.t1 WITH NO DATA")
    missing = compare_objects(source, target, ["public"], set(), frozenset())
    assert missing == {"populated materialized view": ["public.mv"]}


def test_domain_and_citext_keys_are_ranged_byte_wise_across_servers_that_sort_differently(stack):
    """A source sorting byte-wise and a target sorting as en-US (ICU): keys of a domain over text and of
    extensions.citext are ranged with COLLATE "C" on both sides, so only the real differences are named."""
    source_db, target_db = f"edge{next(_n)}c", f"edge{next(_n)}icu"
    stack.target.execute(f"CREATE DATABASE {source_db} TEMPLATE template0 LOCALE 'C.UTF-8'")
    stack.target.execute(f"CREATE DATABASE {target_db} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
    conns = [psycopg.connect(stack.target.conninfo(name), autocommit=True) for name in (source_db, target_db)]
    try:
        for conn in conns:
            for k, v in TEXT_SETTINGS.items():
                conn.execute("SELECT set_config(%s, %s, false)", (k, v))
        # Keys whose byte order differs from en-US order: '~', '_' and 'é' sort among or before letters there.
        _both(conns, "CREATE SCHEMA extensions; CREATE EXTENSION citext WITH SCHEMA extensions;"
                     "CREATE DOMAIN public.code AS text;"
                     "CREATE TABLE public.by_code (k public.code PRIMARY KEY, v int);"
                     "CREATE TABLE public.by_email (k extensions.citext PRIMARY KEY, v int);"
                     "INSERT INTO public.by_code SELECT (ARRAY['a','B','~','_','é','Z','ö'])[g % 7 + 1] || g, g "
                     "FROM generate_series(1, 300) g;"
                     "INSERT INTO public.by_email SELECT (ARRAY['a','b','~','_','é','z','ö'])[g % 7 + 1] || g, g "
                     "FROM generate_series(1, 300) g")
        source, target = conns
        for table in ("by_code", "by_email"):
            target.execute(f"DELETE FROM public.{table} WHERE v = 150")
            target.execute(f"INSERT INTO public.{table} VALUES ('~~extra', 1), ('Ñ-extra', 2)")
            check = compare_table(source, target, _table(source, table), chunk_rows=32)
            missing = source.execute(f"SELECT k::text FROM public.{table} WHERE v = 150").fetchone()[0]
            assert check.missing_keys == [missing], (table, check.summary())
            assert sorted(check.extra_keys) == sorted(["~~extra", "Ñ-extra"]), (table, check.summary())
            assert check.changed_keys == [], (table, check.summary())
    finally:
        for conn in conns:
            conn.close()


# (column type, the source's value, what the target is changed to): each a change the typed row digest
# must see. The first ones are where a type's own hash is blind (equal values, different text) and the
# digest hashes the text instead; the rest are hashed by their type.
_TYPED_CHANGES = [
    ("numeric", "1.0", "1.00"),
    ("jsonb", """'{"a":1}'""", """'{"a":1.0}'"""),
    ("bpchar", "'ab'", "'ab '"),
    ("float8", "0", "'-0'"),
    ("interval", "'1 day'", "'24 hours'"),
    ("int[]", "'{1,2}'", "'[0:1]={1,2}'"),
    ("json", """'{"a":1}'""", """'{"a": 1}'"""),
    ("extensions.citext", "'Ada'", "'ADA'"),
    ("text COLLATE ci", "'Ada'", "'ADA'"),
    ("text", "'Ada'", "'Ada '"),
    ("varchar(20)", "'Ada'", "'ada'"),
    ("int8", "9007199254740993", "9007199254740992"),
    ("bool", "true", "false"),
    ("uuid", "'00000000-0000-0000-0000-000000000001'", "'00000000-0000-0000-0000-000000000002'"),
    ("timestamptz", "'2026-11-27 10:00:00+00'", "'2026-11-27 10:00:00.000001+00'"),
    ("date", "'2026-11-27'", "'2026-11-28'"),
    ("bytea", "'\\x00'", "'\\x0000'"),
    ("jsonb", """'{"a":1}'""", """'{"a":2}'"""),
]


# citext, and a case-insensitive collation: types whose equality, so whose hash, folds case.
_CASE_FOLDING_TYPES = ("CREATE SCHEMA extensions; CREATE EXTENSION citext WITH SCHEMA extensions;"
                       "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);")


@pytest.mark.parametrize(("column_type", "value", "changed"), _TYPED_CHANGES, ids=[c[0] for c in _TYPED_CHANGES])
def test_the_typed_row_digest_sees_each_change_the_rows_text_shows(two_databases, column_type, value, changed):
    source, target = two_databases
    _both(two_databases, _CASE_FOLDING_TYPES +
          f"CREATE TABLE public.v (id int PRIMARY KEY, x {column_type}, n int);"
          f"INSERT INTO public.v SELECT g, {value}, g FROM generate_series(1, 40) g")
    table = _table(source, "v")
    assert source.info.server_version >= 140000  # the typed digest's hash_record_extended is there
    assert compare_table(source, target, table).ok  # equal rows: equal digests

    target.execute(f"UPDATE public.v SET x = {changed} WHERE id = 23")
    text = "SELECT ROW(x)::text FROM public.v WHERE id = 23"  # x's output, as the row's text has it
    assert target.execute(text).fetchone() != source.execute(text).fetchone()
    check = compare_table(source, target, table)
    assert not check.ok and check.changed_keys == ["23"], check.summary()


def test_the_digest_hashes_by_type_only_what_its_type_hashes_as_strictly_as_its_text(two_databases):
    source, _ = two_databases
    source.execute(_CASE_FOLDING_TYPES + "CREATE DOMAIN public.code AS text;"
                   "CREATE TABLE public.w (id int8 PRIMARY KEY, name text, ci_name text COLLATE ci, "
                   "email extensions.citext, price numeric(10,2), at timestamptz, meta jsonb, doc json, "
                   "tags text[], code public.code, ratio float8, dropped int)")
    source.execute("ALTER TABLE public.w DROP COLUMN dropped")
    columns = {c.name: c.raw for c in digest_columns(source, _table(source, "w"))}
    assert columns == {"id": True, "name": True, "ci_name": False, "email": False, "price": False, "at": True,
                       "meta": False, "doc": False, "tags": False, "code": False, "ratio": False}


def test_a_column_the_target_lacks_is_a_difference_not_an_error(two_databases):
    source, target = two_databases
    _both(two_databases, "CREATE TABLE public.c (id int PRIMARY KEY, a text, b text);"
                         "INSERT INTO public.c SELECT g, 'a' || g, 'b' || g FROM generate_series(1, 30) g")
    target.execute("ALTER TABLE public.c DROP COLUMN b")
    check = compare_table(source, target, _table(source, "c"))
    assert not check.ok and check.status == "content differs" and len(check.changed_keys) == 5, check.summary()
