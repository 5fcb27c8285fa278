"""Preflight compares the source's and the target's encoding, collation, ctype and locale provider: a target
that would order text differently is a WARN line (or, per runbook, a failed check) naming both sides and
the CREATE DATABASE that matches the source."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from helpers import fresh_runbook
from liftoff.flows.options import RunOptions
from liftoff.flows.preflight import preflight
from liftoff.errors import PreflightFailed
from liftoff.reports import last_markdown
from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir, pg16_bin_dir
from liftoff.systems import postgres
from liftoff.tasks.database.preflight import _create_database_like


def _target_with_locale_c(stack, encoding: str = "UTF8", **database):
    """A target database created with LOCALE 'C', against the source's C.UTF-8."""
    name = "locc" + uuid.uuid4().hex[:8]
    stack.target.execute(f"CREATE DATABASE {name} LOCALE 'C' ENCODING '{encoding}' TEMPLATE template0")
    return stack.write_runbook(f"{name}.yaml", state_dir=f"state-{name}", target_database=name, **database)


def test_target_with_another_collation_gives_a_warn_line_naming_both(stack):
    runbook = _target_with_locale_c(stack)
    result = preflight(RunOptions(runbook=str(runbook)))
    mismatch = [w for w in result["warnings"] if w.startswith("source ")]
    assert len(mismatch) == 1, result["warnings"]
    line = mismatch[0]
    assert "has encoding UTF8, collation C.UTF-8, ctype C.UTF-8, provider libc;" in line
    assert "has encoding UTF8, collation C, ctype C, provider libc:" in line
    assert "ORDER BY on text" in line and "text indexes" in line
    assert "TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C.UTF-8'" in line
    summary = last_markdown("preflight-summary")
    assert summary.startswith("# Preflight passed with 1 warning") and "| encoding and collation | WARN |" in summary


def test_collation_mismatch_fail_stops_preflight_naming_both_collations(stack):
    runbook = _target_with_locale_c(stack, collation_mismatch="fail")
    with pytest.raises(PreflightFailed) as failed:
        preflight(RunOptions(runbook=str(runbook)))
    lines = [l for l in str(failed.value).splitlines() if "collation" in l]
    assert len(lines) == 1, str(failed.value)
    assert "collation C.UTF-8" in lines[0] and "collation C," in lines[0]
    assert "(database.collation_mismatch: fail)" in lines[0]


def test_target_with_another_encoding_warns_that_characters_may_be_refused(stack):
    runbook = _target_with_locale_c(stack, encoding="LATIN1")
    result = preflight(RunOptions(runbook=str(runbook)))
    line = next(w for w in result["warnings"] if w.startswith("source "))
    assert "has encoding LATIN1, collation C" in line
    assert "encoding LATIN1 may refuse characters the source holds" in line
    assert "ENCODING 'UTF8' LOCALE 'C.UTF-8'" in line


def test_matching_locales_give_no_collation_warning(stack):
    runbook = fresh_runbook(stack, "locsame" + uuid.uuid4().hex[:8])
    result = preflight(RunOptions(runbook=str(runbook)))
    assert not [w for w in result["warnings"] if "collation" in w], result["warnings"]
    assert "| encoding and collation | ok | source and target: encoding UTF8, collation C.UTF-8" in \
        last_markdown("preflight-summary")


def test_database_locale_reads_libc_and_icu_databases_on_pg15():
    with PostgresServer(pg15_bin_dir(), superuser="postgres", password="locale-test-pw-1") as server:
        server.execute("CREATE DATABASE icu_db LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C' TEMPLATE template0")
        with psycopg.connect(server.conninfo()) as conn:
            libc = postgres.database_locale(conn)
        with psycopg.connect(server.conninfo("icu_db")) as conn:
            icu = postgres.database_locale(conn)
    assert (libc.encoding, libc.collate, libc.ctype, libc.provider, libc.locale) == \
        ("UTF8", "C.UTF-8", "C.UTF-8", "libc", None)
    assert (icu.provider, icu.locale, icu.collate) == ("icu", "und", "C")
    assert libc.comparable != icu.comparable
    assert "LOCALE_PROVIDER icu ICU_LOCALE 'und'" in _create_database_like(icu)


def test_database_locale_reads_the_pg16_catalog():
    # The PyPI PostgreSQL 16 build has no ICU: libc databases only.
    with PostgresServer(pg16_bin_dir(), superuser="postgres", password="locale-test-pw-1") as server:
        server.execute("CREATE DATABASE latin LOCALE 'C' ENCODING 'LATIN1' TEMPLATE template0")
        with psycopg.connect(server.conninfo()) as conn:
            default = postgres.database_locale(conn)
        with psycopg.connect(server.conninfo("latin")) as conn:
            latin = postgres.database_locale(conn)
    assert (default.encoding, default.collate, default.provider) == ("UTF8", "C.UTF-8", "libc")
    assert (latin.encoding, latin.collate, latin.ctype, latin.provider) == ("LATIN1", "C", "C", "libc")
