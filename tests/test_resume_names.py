"""A resume cannot get stuck: archive entries are named from the source catalog, not by splitting TOC text.

Sources with names that hold spaces, quotes, unicode and upper case; runs cut off inside post-data or
right after pre-data committed; and a new export after a full restore, against real servers.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.errors import StepFailed
from liftoff.ledger import Ledger
from liftoff.runbooks.model import load_runbook

ORDER_ITEMS_SCHEMA = r'''
CREATE TABLE public."Order Items" (id int NOT NULL, sku text NOT NULL, qty int NOT NULL CHECK (qty > 0), note text);
ALTER TABLE public."Order Items" ADD CONSTRAINT "Zoë's ""pk""" PRIMARY KEY (id);
ALTER TABLE public."Order Items" ADD CONSTRAINT "Uniq SKU ü" UNIQUE (sku);
CREATE INDEX "Qty ""idx"" é" ON public."Order Items" (qty);
CREATE TABLE public."Shipments" (id int PRIMARY KEY, "item id" int NOT NULL);
ALTER TABLE public."Shipments" ADD CONSTRAINT "Ships ""item"" → fk" FOREIGN KEY ("item id")
    REFERENCES public."Order Items" (id);
CREATE TABLE public.item_audit (id bigserial PRIMARY KEY, item int NOT NULL);
CREATE FUNCTION public.audit_item() RETURNS trigger LANGUAGE plpgsql AS
    $$BEGIN INSERT INTO public.item_audit (item) VALUES (NEW.id); RETURN NEW; END$$;
CREATE TRIGGER "Audit ""items"" ü" AFTER INSERT ON public."Order Items"
    FOR EACH ROW EXECUTE FUNCTION public.audit_item();
ALTER TABLE public."Order Items" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Everyone's ""view""" ON public."Order Items" FOR SELECT USING (qty > 0);
INSERT INTO public."Order Items" SELECT g, 'sku-' || g, 1 + g % 5, 'note ' || g FROM generate_series(1, 3000) g;
INSERT INTO public."Shipments" SELECT g, 1 + g % 3000 FROM generate_series(1, 800) g;
'''

FUNCTIONS_AND_VIEWS_SCHEMA = r'''
CREATE TYPE public.mood AS ENUM ('calm', 'busy');
CREATE FUNCTION public."Double It"(n int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT n * 2';
CREATE FUNCTION public.today_mood() RETURNS public.mood LANGUAGE sql STABLE AS $$SELECT 'calm'::public.mood$$;
CREATE VIEW public."Numbers View" AS SELECT g AS n, public."Double It"(g) AS doubled FROM generate_series(1, 5) g;
CREATE VIEW public.mood_now AS SELECT public.today_mood() AS mood;
'''


def _source_database(stack, name: str, schema_sql: str) -> str:
    """A database on the stack's source, owned by the runbook's source user (as an app's database is)."""
    owner = stack.source.conninfo(user="postgres", password=stack.passwords["source"])
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    with psycopg.connect(stack.source.conninfo(name, user="postgres", password=stack.passwords["source"]),
                         autocommit=True) as conn:
        conn.execute(schema_sql)
    return name


def _runbook(stack, source_db: str, name: str, **database):
    """A new target database and a runbook from ``source_db`` into it (leftovers: drop, as the source has no
    Supabase auth schema)."""
    stack.new_target_database(name)
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=name, supabase_leftovers="drop", **database)
    data["source"]["database"] = source_db
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def order_items_db(stack):
    return _source_database(stack, "order_items", ORDER_ITEMS_SCHEMA)


@pytest.fixture(scope="module")
def functions_only_db(stack):
    return _source_database(stack, "functions_only", FUNCTIONS_AND_VIEWS_SCHEMA)


def _names(stack, dbname: str, query: str) -> set[str]:
    return {r[0] for r in stack.target.execute(query, dbname=dbname)}


POST_DATA_NAMES = """
    SELECT 'constraint ' || conrelid::regclass || ' ' || conname FROM pg_constraint
     WHERE connamespace = 'public'::regnamespace AND contype IN ('p', 'u', 'f')
    UNION ALL SELECT 'index ' || indexrelid::regclass FROM pg_index WHERE indrelid = 'public."Order Items"'::regclass
    UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL SELECT 'policy ' || polname FROM pg_policy
"""


@pytest.mark.parametrize("strategy", ["dump", "stream"])
def test_rerun_after_a_kill_inside_post_data_finishes_with_quoted_unicode_names(stack, order_items_db, strategy):
    runbook = _runbook(stack, order_items_db, f"items_{strategy}", strategy=strategy)
    migrate_database(RunOptions(runbook=str(runbook)))
    target = f"items_{strategy}"
    complete = _names(stack, target, POST_DATA_NAMES)
    assert 'constraint "Order Items" Zoë\'s "pk"' in complete and 'policy Everyone\'s "view"' in complete

    # As a run killed inside post-data leaves it: the step running, the keys and indexes built during the
    # data step there, a foreign key, a trigger and a policy not yet created.
    stack.target.execute(
        'ALTER TABLE public."Shipments" DROP CONSTRAINT "Ships ""item"" → fk";'
        'DROP TRIGGER "Audit ""items"" ü" ON public."Order Items";'
        'DROP POLICY "Everyone\'s ""view""" ON public."Order Items"', dbname=target)
    Ledger(load_runbook(runbook).state_dir).start_step("restore.post-data")

    result = migrate_database(RunOptions(runbook=str(runbook)))

    assert result["restore"]["loaded"]["skipped"] is True
    assert _names(stack, target, POST_DATA_NAMES) == complete
    assert result["verify"]["rows"] == 3000 + 800 + 3000  # the gate passed with exact counts (audit not refired)


def _step_status(ledger: Path, step: str) -> str | None:
    if not ledger.exists():
        return None
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5) as db:
        try:
            row = db.execute("SELECT status FROM steps WHERE step = ?", (step,)).fetchone()
        except sqlite3.OperationalError:
            return None
    return row[0] if row else None


def test_sigkill_during_post_data_then_rerun_finishes_with_quoted_unicode_names(stack):
    # Enough rows that validating the foreign key keeps post-data running for a moment.
    big = _source_database(stack, "order_items_big",
                           ORDER_ITEMS_SCHEMA.replace("3000", "300000").replace("1, 800)", "1, 300000)"))
    runbook = _runbook(stack, big, "items_killed")
    ledger = load_runbook(runbook).state_dir / "ledger.sqlite"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "liftoff"), "run", "database", "--runbook", str(runbook)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _step_status(ledger, "restore.post-data") == "running":
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before post-data could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pg_restore children, inside post-data
    proc.wait()
    assert _step_status(ledger, "restore.post-data") == "running"

    result = migrate_database(RunOptions(runbook=str(runbook)))

    assert result["restore"]["loaded"]["skipped"] is True
    names = _names(stack, "items_killed", POST_DATA_NAMES)
    assert {'constraint "Order Items" Zoë\'s "pk"', 'constraint "Shipments" Ships "item" → fk',
            'trigger Audit "items" ü', 'policy Everyone\'s "view"'} <= names
    assert result["verify"]["rows"] == 3 * 300000


def test_rerun_after_pre_data_committed_finishes_for_a_schema_of_only_functions_and_views(stack, functions_only_db):
    runbook = _runbook(stack, functions_only_db, "fn_only")
    migrate_database(RunOptions(runbook=str(runbook)))
    # As a run killed right after pre-data committed leaves it: the objects there, the step running.
    ledger = Ledger(load_runbook(runbook).state_dir)
    ledger.forget_steps("restore")
    ledger.start_step("restore.pre-data")

    migrate_database(RunOptions(runbook=str(runbook)))

    assert ledger.step_detail("restore.pre-data") == {"recovered": True}
    assert stack.target.execute('SELECT sum(doubled) FROM public."Numbers View"', dbname="fn_only")[0][0] == 30


def test_pre_data_refuses_a_target_holding_only_some_of_its_objects(stack, functions_only_db):
    runbook = _runbook(stack, functions_only_db, "fn_partial")
    stack.target.execute("CREATE TYPE public.mood AS ENUM ('other')", dbname="fn_partial")

    with pytest.raises(StepFailed) as failed:
        migrate_database(RunOptions(runbook=str(runbook)))

    message = str(failed.value)
    assert "type public.mood is there" in message and "restore into an empty database" in message
    assert _names(stack, "fn_partial", "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace") \
        == set()


@pytest.mark.parametrize("strategy", ["dump", "stream"])
def test_new_export_after_a_full_restore_reloads_every_table_exactly(stack, strategy):
    from helpers import fresh_runbook

    runbook = fresh_runbook(stack, f"reexport_{strategy}", strategy=strategy)
    first = migrate_database(RunOptions(runbook=str(runbook)))
    state_dir = load_runbook(runbook).state_dir
    shutil.rmtree(state_dir / "dump")
    Ledger(state_dir).forget_steps("export")

    again = migrate_database(RunOptions(runbook=str(runbook)))

    assert not again["export"].get("skipped")
    assert sorted(again["restore"]["loaded"]["loaded"]) == sorted(first["export"]["tables"])
    for table, rows in again["export"]["tables"].items():
        on_target = stack.target.execute(f"SELECT count(*) FROM {table}", dbname=f"reexport_{strategy}")[0][0]
        assert on_target == rows, table
    assert again["verify"]["rows"] == first["verify"]["rows"]  # no duplicate booking_events from the audit trigger
    triggers = _names(stack, f"reexport_{strategy}", "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
    assert "bookings_audit" in triggers
