"""The ``replicate`` final sync against real servers: a Supabase-shaped PostgreSQL 15 source with
``wal_level=logical``, a PostgreSQL 16 target subscribed to it, a real sshd standing in for the VPS with an app
that follows its env file, and the Prefect server through which the tests approve or reject. A writer keeps
inserting, updating and deleting on tables with bigint, uuid, identity and composite keys and on a table
without a key while replication starts, while it streams and through the cutover; every write the source
acknowledged is looked for on the target afterwards."""

from __future__ import annotations

import itertools
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import run_cli

from liftoff.errors import GateFailed, NotApproved, StepFailed
from liftoff.flows.cutover import cutover
from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.flows.replication import cleanup_replication, replicate
from liftoff.flows.rollback import rollback
from liftoff.flows.verify import verify_database
from liftoff.runbooks.model import load_runbook
from liftoff.systems import pg_replication
from liftoff.tasks.cutover.replication import gate_changed_tables, names
from liftoff_sandbox.crm_app import CrmApp
from liftoff_sandbox.operator import answer_when_paused

WRITER = "repl_writer"
DB = "repl"  # the target database (the app's health says which database it runs on)
TABLES = ("w_big", "w_uuid", "w_ident", "w_comp", "w_nokey")
SCHEMA_SQL = """
CREATE TABLE public.w_big (id bigint PRIMARY KEY, v int NOT NULL);
CREATE TABLE public.w_uuid (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), v int NOT NULL);
CREATE TABLE public.w_ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int NOT NULL);
CREATE TABLE public.w_comp (a int, b int, v int NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE public.w_nokey (k int NOT NULL, v int NOT NULL);
INSERT INTO public.w_big SELECT g, g FROM generate_series(1, 300) g;
INSERT INTO public.w_uuid (v) SELECT g FROM generate_series(1, 300) g;
INSERT INTO public.w_ident (v) SELECT g FROM generate_series(1, 300) g;
INSERT INTO public.w_comp SELECT g % 17, g, g FROM generate_series(1, 300) g;
INSERT INTO public.w_nokey SELECT g, g FROM generate_series(1, 100) g;
"""
APPROVE = {"approver": "Ada (ops)", "approve": True, "reason": "", "confirm_1": True}
REJECT = {"approver": "Ada (ops)", "approve": False, "reason": "not tonight", "confirm_1": True}
_n = itertools.count()


class Writer(threading.Thread):
    """Random inserts, updates and deletes on the source as an app login role, about ``rate`` per second,
    reconnecting after errors (the freeze ends its sessions and makes it read-only). ``acked``: for each
    (table, key) the value the source acknowledged last (None: deleted); a write whose COMMIT raised is
    uncertain, its key dropped from the check."""

    def __init__(self, conninfo: str, rate: float = 50):
        super().__init__(daemon=True)
        self.conninfo, self.rate = conninfo, rate
        self.acked: dict[tuple, int | None] = {}
        self.uncertain: set[tuple] = set()
        self.ok = self.refused = 0
        self.first_refused: float | None = None
        self.stop_event = threading.Event()
        self.rng = random.Random(18)

    def run(self):
        conn = None
        while not self.stop_event.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.conninfo, autocommit=True)
                self.write_one(conn)
            except psycopg.Error:
                self.refused += 1
                self.first_refused = self.first_refused or time.time()
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
            time.sleep(1 / self.rate)
        if conn is not None:
            conn.close()

    def write_one(self, conn):
        table = self.rng.choice(TABLES[:4])
        op = self.rng.choice(["insert", "insert", "update", "delete"])
        v = self.rng.randint(1, 10**6)
        if table == "w_big":
            key = (table, self.rng.randint(1, 2000))
            sql = {"insert": "INSERT INTO public.w_big VALUES (%(k)s, %(v)s) ON CONFLICT (id) DO UPDATE SET v = %(v)s",
                   "update": "UPDATE public.w_big SET v = %(v)s WHERE id = %(k)s",
                   "delete": "DELETE FROM public.w_big WHERE id = %(k)s"}[op]
            args = {"k": key[1], "v": v}
        elif table == "w_comp":
            key = (table, (self.rng.randint(0, 16), self.rng.randint(1, 600)))
            sql = {"insert": "INSERT INTO public.w_comp VALUES (%(a)s, %(b)s, %(v)s) ON CONFLICT (a, b) DO UPDATE SET v = %(v)s",
                   "update": "UPDATE public.w_comp SET v = %(v)s WHERE a = %(a)s AND b = %(b)s",
                   "delete": "DELETE FROM public.w_comp WHERE a = %(a)s AND b = %(b)s"}[op]
            args = {"a": key[1][0], "b": key[1][1], "v": v}
        elif table == "w_uuid":
            known = [k for (t, k), val in self.acked.items() if t == table and val is not None]
            if op == "insert" or not known:
                key = (table, uuid.uuid4())
                sql, op = "INSERT INTO public.w_uuid VALUES (%(k)s, %(v)s)", "insert"
            else:
                key = (table, self.rng.choice(known))
                sql = {"update": "UPDATE public.w_uuid SET v = %(v)s WHERE id = %(k)s",
                       "delete": "DELETE FROM public.w_uuid WHERE id = %(k)s"}[op]
            args = {"k": key[1], "v": v}
        else:  # identity: the source hands out the id
            if op == "insert":
                try:
                    new_id = conn.execute("INSERT INTO public.w_ident (v) VALUES (%s) RETURNING id", (v,)).fetchone()[0]
                except psycopg.OperationalError:
                    raise
                self.acked[(table, new_id)] = v
                self.ok += 1
                return
            key = (table, self.rng.randint(1, 400))
            sql = {"update": "UPDATE public.w_ident SET v = %(v)s WHERE id = %(k)s",
                   "delete": "DELETE FROM public.w_ident WHERE id = %(k)s"}[op]
            args = {"k": key[1], "v": v}
        try:
            cur = conn.execute(sql, args)
        except psycopg.OperationalError:
            self.uncertain.add(key)  # the connection died: the COMMIT may or may not have happened
            raise
        if op == "delete":
            if cur.rowcount:
                self.acked[key] = None
        elif op == "insert" or cur.rowcount:
            self.acked[key] = v
        self.ok += 1

    def stop(self):
        self.stop_event.set()
        self.join(10)


@pytest.fixture(scope="module")
def vps():
    from liftoff_sandbox.ssh import SshServer

    server = SshServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def repl_stack(prefect_api):
    """Its own source and PostgreSQL 16 target (the tables it adds must not reach the shared stack's gates)."""
    from liftoff_sandbox.stack import LocalStack

    stack = LocalStack(bookings=200, target_major=16, contrib=False, env_prefix="LIFTOFF_REPL").start()
    password = secrets.token_urlsafe(12)
    stack.source.execute(SCHEMA_SQL, user="postgres", password=stack.passwords["source"])
    stack.source.execute(f"CREATE ROLE {WRITER} LOGIN PASSWORD '{password}'")
    stack.source.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join('public.' + t for t in TABLES)} "
                         f"TO {WRITER}", user="postgres", password=stack.passwords["source"])
    stack.writer_conninfo = stack.source.conninfo("postgres", WRITER, password)
    stack.writer_password = password
    stack.new_target_database(DB)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def setup(repl_stack, vps):
    """A runbook with ``final_sync: replicate`` whose ledger migrated the target, the app on the source."""
    stack = repl_stack
    data = stack.runbook_data(state_dir="state-repl", target_database=DB)
    data["storage"] = {}
    data["database"]["roles"] = {WRITER: "drop_references"}
    source_url = f"postgresql://{WRITER}:{stack.writer_password}@{stack.source.host}:{stack.source.port}/postgres"
    app = CrmApp(stack.workdir, source_url).start()
    data.update(stack.cutover_sections(vps, app, DB, WRITER, env_prefix="LIFTOFF_REPL",
                                       manual=["Team notified of the maintenance window"]))
    data["cutover"]["final_sync"] = "replicate"
    data["cutover"]["replication"] = {"max_lag_s": 5, "apply_timeout_s": 30}
    path = stack.workdir / "repl.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    migrate_database(RunOptions(runbook=str(path)))
    yield path, app
    app.stop()


def _variant(runbook, **cutover_changes):
    data = yaml.safe_load(runbook.read_text())
    data["cutover"].update(cutover_changes)
    path = runbook.with_name(f"{runbook.stem}-{next(_n)}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _on_source(stack) -> tuple[list, list]:
    with psycopg.connect(stack.source.conninfo()) as conn:
        slots, pubs = pg_replication.liftoff_objects(conn)
    return [s.slot for s in slots], pubs


def _subscriptions(stack) -> list:
    return [r[0] for r in stack.target.execute("SELECT subname FROM pg_subscription")]  # every database's


def _updates_reported(stack, table: str) -> int:
    return stack.target.execute(f"SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = '{table}'", dbname=DB)[0][0]


def _until_reported(stack, table: str, before: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _updates_reported(stack, table) > before:
            return
        time.sleep(0.1)
    raise AssertionError(f"the target never reported the write on {table}")


def _rows(server, table: str, dbname: str = "postgres") -> list:
    return sorted(server.execute(f"SELECT * FROM public.{table}", dbname=dbname), key=repr)


def test_a_table_without_key_is_never_published_and_its_writes_keep_working(repl_stack, setup):
    runbook, _ = setup
    result = replicate(RunOptions(runbook=str(runbook)))
    assert "public.w_nokey" in result["start"]["copied in the freeze"]
    published = {r[0] for r in repl_stack.source.execute(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s" % (
            "'" + names(load_runbook(runbook)).publication + "'"))}
    assert "public.w_big" in published and "public.w_nokey" not in published
    # Had it been published, this UPDATE would fail ("cannot update table because it does not have a replica
    # identity and publishes updates").
    repl_stack.source.execute("UPDATE public.w_nokey SET v = v + 1 WHERE k = 1", user=WRITER,
                              password=repl_stack.writer_password)
    assert result["lag_gate"].startswith("replication lag passed")


def test_a_rejected_cutover_leaves_nothing_on_the_source(repl_stack, setup):
    runbook, app = setup
    replicate(RunOptions(runbook=str(runbook)))
    assert _on_source(repl_stack)[0] and _subscriptions(repl_stack)
    resumer = answer_when_paused("cutover", REJECT, under=repl_stack.workdir)
    with pytest.raises(NotApproved):
        cutover(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert _on_source(repl_stack) == ([], []) and _subscriptions(repl_stack) == []
    assert app.database() == "postgres"


def test_ddl_during_replication_stops_the_cutover_and_nothing_is_switched(repl_stack, setup):
    runbook, app = setup
    replicate(RunOptions(runbook=str(runbook)))
    owner = {"user": "postgres", "password": repl_stack.passwords["source"]}
    repl_stack.source.execute("ALTER TABLE public.w_nokey ADD COLUMN note text", **owner)
    try:
        resumer = answer_when_paused("cutover", APPROVE, under=repl_stack.workdir)
        with pytest.raises(StepFailed, match="DDL on the source since replication started.*w_nokey"):
            cutover(RunOptions(runbook=str(runbook)))
        resumer.join(5)
    finally:
        repl_stack.source.execute("ALTER TABLE public.w_nokey DROP COLUMN note", **owner)
    assert app.database() == "postgres"  # never switched; the rollback lifted the freeze
    assert _on_source(repl_stack) == ([], []) and _subscriptions(repl_stack) == []


def test_a_start_killed_during_the_initial_copy_restarts_cleanly(repl_stack, setup):
    """SIGKILL `liftoff run replicate` once its slot exists and before the subscription does (the initial
    copy); the next run drops what it left and starts again: one slot pair, one subscription, the lag gate
    passes; no orphan."""
    runbook, _ = setup
    n = names(load_runbook(runbook))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "liftoff"), "run", "replicate", "--runbook",
                             str(runbook)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    killed = False
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if n.slot in _on_source(repl_stack)[0] and not _subscriptions(repl_stack):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait()
    assert killed, "the start ended before it could be killed mid-copy"
    assert n.slot in _on_source(repl_stack)[0] and not _subscriptions(repl_stack)  # what the kill left
    result = replicate(RunOptions(runbook=str(runbook)))
    assert result["lag_gate"].startswith("replication lag passed")
    slots, pubs = _on_source(repl_stack)
    assert sorted(slots) == sorted([n.slot, n.tracker]) and pubs == [n.publication]
    assert _subscriptions(repl_stack) == [n.subscription]


def test_the_switch_time_gate_rereads_what_changed_and_a_statistics_reset_means_everything(repl_stack, setup):
    """A table no replicated change touched since the full comparison is not re-read, yet a direct write on the
    target is seen by the target's statistics, and after a statistics reset every table is re-read: a
    corruption hidden behind a reset is still caught."""
    runbook, _ = setup
    rb = load_runbook(runbook)
    replicate(RunOptions(runbook=str(runbook)))
    from liftoff.tasks.cutover.replication import sync_by_replication

    repl_stack.source.execute("UPDATE public.w_big SET v = v + 1 WHERE id = 1", user="postgres",
                              password=repl_stack.passwords["source"])
    before = _updates_reported(repl_stack, "w_comp")
    repl_stack.target.execute("UPDATE public.w_comp SET v = -1 WHERE a = 1 AND b = 1", dbname=DB)  # corrupt, on the target
    # A backend reports its statistics when it ends, a moment after the client closed: the gate cannot see a
    # write on the target before that (the README says so); wait until it is reported, as it is seconds later.
    _until_reported(repl_stack, "w_comp", before)
    synced = sync_by_replication(rb)
    assert "public.w_big" in synced["changed"] and "public.w_comp" in synced["changed"]
    assert "public.bookings" in synced["proven"] and "public.bookings" not in synced["changed"]
    with pytest.raises(GateFailed) as failed:
        gate_changed_tables(rb, synced)
    report = failed.value.report
    reread = {t.table for t in report.tables}
    assert "public.bookings" not in reread and not report.ok
    assert any("public.w_comp" in f for f in report.failures())

    # Again, with the target's statistics reset after the corruption: every table is re-read.
    replicate(RunOptions(runbook=str(runbook)))
    repl_stack.target.execute("UPDATE public.bookings SET seats = seats + 1 WHERE id = (SELECT id FROM public.bookings ORDER BY id LIMIT 1)",
                              dbname=DB)
    repl_stack.target.execute("SELECT pg_stat_reset()", dbname=DB)
    synced = sync_by_replication(rb)
    assert synced["statistics reset"] and synced["proven"] == []
    with pytest.raises(GateFailed) as failed:
        gate_changed_tables(rb, synced)
    report = failed.value.report
    assert "public.bookings" in {t.table for t in report.tables}
    assert any("public.bookings" in f for f in report.failures())
    # leave the target as the source for the next test: replicate reloads every published table
    assert _on_source(repl_stack) == ([], [])


def test_replicated_cutover_with_writers_loses_no_acknowledged_write(repl_stack, setup):
    runbook, app = setup
    # The checklist needs a passed database gate (the test above left a failed one): with the target reloaded
    # and nothing writing, the gate passes; then replication starts again from scratch under the writer.
    replicate(RunOptions(runbook=str(runbook)))
    verify_database(RunOptions(runbook=str(runbook)))
    cleanup_replication(RunOptions(runbook=str(runbook)))
    writer = Writer(repl_stack.writer_conninfo)
    writer.start()
    try:
        started = time.monotonic()
        replicate(RunOptions(runbook=str(runbook)))  # the initial copy and catch-up run under the writer
        replicate_s = time.monotonic() - started
        time.sleep(1)
        resumer = answer_when_paused("cutover", APPROVE, under=repl_stack.workdir)
        result = cutover(RunOptions(runbook=str(runbook)))
        resumer.join(5)
    finally:
        writer.stop()
    assert writer.ok > 50 and writer.refused > 0  # it wrote throughout, and the freeze stopped it
    assert app.database() == DB
    every = repl_stack.source.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")[0][0]
    synced = result["final_sync"]["database"]
    assert synced["proven"] and synced["re-read"] < every  # not every table: only what changed (and w_nokey)
    assert {"public.w_big", "public.w_comp"} <= set(synced["changed"])
    # Exact: every table equal on both sides (the source frozen), and every acknowledged write there.
    for table in TABLES:
        assert _rows(repl_stack.source, table) == _rows(repl_stack.target, table, DB), table
    target = {t: {r[0] if t != "w_comp" else (r[0], r[1]): r[-1] for r in _rows(repl_stack.target, t, DB)}
              for t in TABLES[:4]}
    missing = [(k, v) for k, v in writer.acked.items() if k not in writer.uncertain
               and target[k[0]].get(k[1]) != v]
    assert missing == []
    # Sequences (not carried by logical replication) at or above the source's.
    seq = "SELECT last_value FROM public.w_ident_id_seq"
    assert repl_stack.target.execute(seq, dbname=DB)[0][0] >= repl_stack.source.execute(seq)[0][0]
    assert _on_source(repl_stack) == ([], []) and _subscriptions(repl_stack) == []
    print(f"replicate {replicate_s:.1f} s, downtime {result['downtime_s']} s, writer ok {writer.ok}, "
          f"refused {writer.refused}")
    undone = rollback_now(repl_stack, runbook)
    assert app.database() == "postgres" and undone


def test_a_failed_smoke_test_rolls_back_and_leaves_nothing_on_the_source(repl_stack, setup):
    runbook, app = setup
    broken = _variant(runbook, smoke_queries=["SELECT count(*) FROM public.no_such_table"])
    replicate(RunOptions(runbook=str(broken)))
    resumer = answer_when_paused("cutover", APPROVE, under=repl_stack.workdir)
    with pytest.raises(StepFailed, match="cutover failed at the smoke test.*rolled back automatically"):
        cutover(RunOptions(runbook=str(broken)))
    resumer.join(5)
    assert app.database() == "postgres"
    assert _on_source(repl_stack) == ([], []) and _subscriptions(repl_stack) == []


def rollback_now(stack, runbook):
    resumer = answer_when_paused("rollback", {"approver": "Ada", "approve": True, "carry": "file", "reason": ""},
                                 under=stack.workdir)
    done = rollback(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    return done


def test_cleanup_drops_what_a_killed_start_left(repl_stack, setup):
    runbook, _ = setup
    n = names(load_runbook(runbook))
    owner = {"user": "postgres", "password": repl_stack.passwords["source"]}
    # what a run killed right after creating its slot leaves behind
    repl_stack.source.execute(f"CREATE PUBLICATION {n.publication} FOR TABLE public.w_big", **owner)
    repl_stack.source.execute(f"SELECT pg_create_logical_replication_slot('{n.slot}', 'pgoutput')", **owner)
    assert n.slot in _on_source(repl_stack)[0]
    shown = run_cli("status", "--runbook", str(runbook))
    assert shown.returncode == 0 and f"{n.slot} (inactive, keeps" in shown.stdout, shown.stdout[-500:]
    done = cleanup_replication(RunOptions(runbook=str(runbook)))
    assert f"slot {n.slot}" in done["dropped"] and _on_source(repl_stack) == ([], [])
