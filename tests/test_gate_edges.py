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
