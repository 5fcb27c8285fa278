"""The stream strategy's table copy (psql reads the source in the export's snapshot, the target loads in one
transaction), on real servers: a copy cut short commits nothing, and a missing psql is named."""

from __future__ import annotations

import itertools

import pytest

from liftoff.errors import StepFailed, ToolMissing
from liftoff.runbooks.model import Endpoint
from liftoff.systems import pg_tools, postgres

_n = itertools.count()


@pytest.fixture
def endpoints(stack, monkeypatch):
    """A source and a target database on the session's servers, each with public.items."""
    name = f"streamcopy{next(_n)}"
    for server in (stack.source, stack.target):
        server.execute(f"CREATE DATABASE {name}")
        server.execute("CREATE TABLE public.items (id int PRIMARY KEY, label text)", dbname=name)
    stack.source.execute("INSERT INTO public.items SELECT g, 'item ' || g FROM generate_series(1, 5000) g", dbname=name)
    stack.target.execute("INSERT INTO public.items VALUES (1, 'loaded before')", dbname=name)
    monkeypatch.setenv("STREAM_COPY_SOURCE_PW", stack.source.password)
    monkeypatch.setenv("STREAM_COPY_TARGET_PW", stack.target.password)
    return [Endpoint(host=server.host, port=server.port, database=name, user=server.superuser,
                     password={"env": f"STREAM_COPY_{side}_PW"})
            for server, side in ((stack.source, "SOURCE"), (stack.target, "TARGET"))]


def _copy(source: Endpoint, target: Endpoint, tools: pg_tools.PgTools, query_for=lambda q: q) -> int:
    with postgres.exported_snapshot(source, "source") as (_, snapshot_id), \
            postgres.session(target, "target.direct", autocommit=False) as tgt:
        def rows_from(query: str) -> pg_tools.CopyOut:
            return pg_tools.CopyOut(tools, postgres.libpq_env(source, "source"), query_for(query), snapshot_id,
                                    postgres.TEXT_SETTINGS, "copy public.items from source")
        return postgres.stream_table(tgt, "public", "items", rows_from)


def test_a_copy_that_fails_midway_commits_nothing_and_says_where(stack, endpoints):
    source, target = endpoints
    tools = pg_tools.find_pg_tools(15)
    # The source's query fails after about 2,500 rows have been sent: the target must not keep them.
    with pytest.raises(StepFailed) as failed:
        _copy(source, target, tools, lambda q: q.replace(
            '"label"', 'CASE WHEN "id" < 2500 THEN "label" ELSE (1 / (2500 - "id"))::text END', 1))
    assert "copy public.items from source failed (psql exit" in str(failed.value)
    assert "division by zero" in str(failed.value)
    assert stack.target.execute("SELECT id, label FROM public.items", dbname=target.database) == \
        [(1, "loaded before")]

    assert _copy(source, target, tools) == 5000  # the same copy, uncut, replaces the table's rows
    assert stack.target.execute("SELECT count(*), max(label) FROM public.items", dbname=target.database) == \
        [(5000, "item 999")]


def test_a_missing_psql_is_named_with_the_package_to_install(stack, endpoints, tmp_path):
    source, target = endpoints
    real = pg_tools.find_pg_tools(15)
    without_psql = pg_tools.PgTools(tmp_path, real.major, real.version)
    with pytest.raises(ToolMissing) as missing:
        _copy(source, target, without_psql)
    assert f"cannot run {tmp_path / 'psql'}" in str(missing.value)
    assert f"install the PostgreSQL client (psql) of version {real.major}" in str(missing.value)
    assert stack.target.execute("SELECT id, label FROM public.items", dbname=target.database) == \
        [(1, "loaded before")]
