"""Gate edge cases, on two real databases: each test makes them differ in one way the gate must see."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from tasks.postgres import TEXT_SETTINGS, Table, list_tables
from tasks.verify import compare_objects, compare_table

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
