"""Benchmark: Liftoff's export + restore (and its verify gate) against the usual ways to copy a database.

One invocation builds a Supabase-shaped source with ``LocalStack`` (about 1 GB at the default 620,000
bookings), starts a Prefect server for Liftoff's flows, then copies the source's ``public`` schema into a
fresh, empty database on the target server once per contender:

  liftoff          ``liftoff run export`` then ``liftoff run restore`` (then, timed apart, ``liftoff run verify``)
  pg_dump|restore  ``pg_dump -Fc | pg_restore``: one stream, the baseline every ratio is relative to
  dir -j N         ``pg_dump -Fd -j N`` to a directory, then ``pg_restore -j N``
  pgcopydb         ``pgcopydb clone --table-jobs N --index-jobs N``
  pgcopydb+compare the same clone, then pgcopydb's ``compare data`` (its query, see ``pgcopydb_compare_data``):
                   the fair contender for a run that proves its copy

After each contender it counts the rows of every ``public`` table on the target and compares them with the
source; a contender that lost rows is marked. Liftoff's peak memory is the resident set of the liftoff Python
process alone (``getrusage(RUSAGE_SELF)`` at its exit), not of the pg_dump/pg_restore it starts.

    .venv/bin/python bench/db_copy.py                      # the full run, about 1 GB
    .venv/bin/python bench/db_copy.py --bookings 20000     # a smoke run, about 1-2 minutes

Everything it starts (two PostgreSQL clusters, a Prefect server, copy tools) is stopped on exit, Ctrl-C
included. Passwords reach the tools through PGPASSWORD or a private pgpass file, never their argv.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import yaml
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from liftoff_sandbox.postgres import pg15_bin_dir  # noqa: E402
from liftoff.prefect_server import PrefectServer  # noqa: E402
from liftoff_sandbox.stack import LocalStack  # noqa: E402
from liftoff.systems import supabase  # noqa: E402

PG_BIN = pg15_bin_dir()
PG_DUMP, PG_RESTORE = str(PG_BIN / "pg_dump"), str(PG_BIN / "pg_restore")
PGCOPYDB = "/usr/bin/pgcopydb"
GNU_TIME = "/usr/bin/time"
MIB = 2**20
SOURCE_DB = "postgres"
SOURCE_APP_USER = "postgres"  # what Liftoff's runbook uses: a non-superuser that owns public

# Runs the liftoff console entry point (liftoff.cli:app) unchanged, and at exit writes this process' own
# peak RSS: RUSAGE_SELF counts the Python process (all its threads) and none of its children, unlike the
# figure /usr/bin/time reports, which also takes the max over pg_dump/pg_restore.
LIFTOFF_WITH_RSS = """
import atexit, os, resource, sys
def _peak_rss():
    with open(os.environ["BENCH_RSS_FILE"], "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
atexit.register(_peak_rss)
sys.argv[0] = "liftoff"
if os.environ.get("BENCH_PROFILE"):  # --profile: where the seconds outside the steps go
    import cProfile
    profile = cProfile.Profile()
    atexit.register(lambda: profile.dump_stats(os.environ["BENCH_PROFILE"]))
    profile.enable()
from liftoff.cli import app
sys.exit(app())
"""


PROFILE_DIR: Path | None = None  # --profile: cProfile of each liftoff process, kept in logs/


class Interrupted(BaseException):
    """SIGTERM, turned into an exception so the finally blocks stop what was started."""


@dataclass
class Timed:
    seconds: float
    returncode: int
    log: Path
    tree_peak_kib: int | None = None  # /usr/bin/time: max RSS over the process and its children
    self_peak_kib: int | None = None  # the process alone


@dataclass
class Result:
    name: str
    seconds: float | None = None
    ok: bool = False
    rows: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)
    rss: dict[str, Timed] = field(default_factory=dict)
    objects_ok: bool | None = None
    overhead: float | None = None  # wall time outside the ledger's steps (Liftoff only)
    steps_seconds: float | None = None  # the union of the ledger's step intervals


def run_timed(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Timed:
    """Runs argv in its own process group with stdout+stderr to ``log``; on any interruption the whole group
    (the tool and whatever it started) is killed before the exception goes on."""
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=cwd, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
        return Timed(round(time.monotonic() - started, 2), rc, log)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole group, then SIGKILL to whatever is left of it after 10 s. The group, not just
    the child: /usr/bin/time dies at once, while the liftoff process under it (Prefect handles SIGTERM)
    and its pg_dump/pg_restore may not."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            continue
        break
    proc.wait()


# ---------------------------------------------------------------------------------------------------------
# The two servers


class Bench:
    def __init__(self, stack: LocalStack, workdir: Path, jobs: int):
        self.stack, self.workdir, self.jobs = stack, workdir, jobs
        self.src, self.tgt = stack.source, stack.target
        self.src_pw = stack.passwords["source"]
        self.tgt_pw = stack.passwords["target"]
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # source ------------------------------------------------------------------------------------------
    def settle_source(self) -> None:
        """Hint bits, visibility map and statistics written once now, so neither the first contender pays
        for them nor autovacuum runs during a timing."""
        with psycopg.connect(self.src.conninfo(SOURCE_DB), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
            conn.execute("CHECKPOINT")

    def source_size(self) -> tuple[int, int]:
        """(pg_database_size of the source database, bytes of its public schema's tables + indexes + toast)."""
        with psycopg.connect(self.src.conninfo(SOURCE_DB)) as conn:
            db = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            public = conn.execute("""SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)
                                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                      WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'm')""").fetchone()[0]
        return db, int(public)

    def other_schemas(self) -> list[str]:
        """The source's schemas other than public, extensions and the system's."""
        with psycopg.connect(self.src.conninfo(SOURCE_DB)) as conn:
            return [r[0] for r in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('public', 'extensions', 'information_schema') "
                "AND nspname NOT LIKE 'pg\\_%' ORDER BY 1")]

    def row_counts(self, conninfo: str) -> dict[str, int]:
        with psycopg.connect(conninfo) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1")]
            return {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", t))).fetchone()[0]
                    for t in tables}

    def objects(self, conninfo: str) -> dict[str, int]:
        """How many of each kind of schema object public holds: what a copy must recreate besides rows."""
        queries = {
            "indexes": "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'",
            "constraints": "SELECT count(*) FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace "
                           "WHERE n.nspname = 'public'",
            "foreign keys": "SELECT count(*) FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace "
                            "WHERE n.nspname = 'public' AND k.contype = 'f'",
            "policies": "SELECT count(*) FROM pg_policies WHERE schemaname = 'public'",
            "rls tables": "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                          "WHERE n.nspname = 'public' AND c.relrowsecurity",
            "triggers": "SELECT count(*) FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND NOT g.tgisinternal",
            "views": "SELECT count(*) FROM pg_views WHERE schemaname = 'public'",
            "functions": "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                         "WHERE n.nspname = 'public'",
        }
        with psycopg.connect(conninfo) as conn:
            return {k: conn.execute(q).fetchone()[0] for k, q in queries.items()}

    # target ------------------------------------------------------------------------------------------
    def fresh_target_db(self, name: str) -> None:
        with psycopg.connect(self.tgt.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            conn.execute("CHECKPOINT")

    def drop_target_db(self, name: str) -> None:
        """After the checks: keeps the disk small and stops autovacuum of this copy from running during the
        next contender's timing."""
        with psycopg.connect(self.tgt.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute("CHECKPOINT")

    def auth_shim(self, db: str) -> float:
        """What Liftoff's restore builds for itself (leftovers policy ``shim``), built for the other
        contenders too, so every copy ends with the same objects: roles anon/authenticated/service_role, an
        ``auth`` schema with the auth functions and ``auth.users`` (every column) holding the source's users. Without
        it the foreign keys to auth.users and the RLS policies fail to restore (pgcopydb then stops).
        Returns the seconds it took; they count in the contender's time."""
        started = time.monotonic()
        with psycopg.connect(self.tgt.conninfo(db), autocommit=True) as tgt, \
                psycopg.connect(self.src.conninfo(SOURCE_DB)) as src:
            shim = supabase.read_auth_shim(src)
            supabase.create_roles(tgt, {r: supabase.RolePlan("create", r, [], bypassrls=(r == "service_role"))
                                        for r in supabase.PUBLISHED_ROLES})
            supabase.create_auth_shim(tgt, shim)
            supabase.stream_auth_users(src, tgt, shim)
        return round(time.monotonic() - started, 2)

    def add_missing_foreign_keys(self, db: str) -> tuple[float, int]:
        """Creates the public foreign keys the source has and the target lacks (pgcopydb leaves out those
        to tables in a schema its filter excludes: here the three to auth.users). Returns (seconds, count)."""
        started = time.monotonic()
        query = """SELECT format('%I.%I', n.nspname, t.relname), k.conname, pg_get_constraintdef(k.oid)
                     FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid
                     JOIN pg_namespace n ON n.oid = t.relnamespace
                    WHERE n.nspname = 'public' AND k.contype = 'f'"""
        with psycopg.connect(self.src.conninfo(SOURCE_DB)) as src:
            wanted = {(table, name): definition for table, name, definition in src.execute(query)}
        with psycopg.connect(self.tgt.conninfo(db), autocommit=True) as tgt:
            have = {(table, name) for table, name, _ in tgt.execute(query)}
            missing = [(key, d) for key, d in wanted.items() if key not in have]
            for (table, name), definition in missing:
                tgt.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    sql.SQL(table), sql.Identifier(name), sql.SQL(definition)))
        return round(time.monotonic() - started, 2), len(missing)

    # libpq arguments: host, port, user on argv; the password only in the environment ----------------------
    def src_args(self) -> list[str]:
        return ["-h", self.src.host, "-p", str(self.src.port), "-U", SOURCE_APP_USER, "-d", SOURCE_DB]

    def tgt_args(self, db: str) -> list[str]:
        return ["-h", self.tgt.host, "-p", str(self.tgt.port), "-U", "postgres", "-d", db]

    def uri(self, server, user: str, db: str) -> str:
        return f"postgres://{user}@{server.host}:{server.port}/{db}?sslmode=disable"

    def pgpass(self) -> Path:
        """pgcopydb takes two URIs and hands them to its own pg_dump/pg_restore: a pgpass file keeps both
        passwords off every command line."""
        path = self.workdir / "pgpass"
        path.write_text(
            f"{self.src.host}:{self.src.port}:*:{SOURCE_APP_USER}:{self.src_pw}\n"
            f"{self.src.host}:{self.src.port}:*:{self.src.superuser}:{self.src.password}\n"
            f"{self.tgt.host}:{self.tgt.port}:*:postgres:{self.tgt_pw}\n")
        path.chmod(0o600)
        return path


def restore_errors(log: Path) -> int:
    """pg_restore without --exit-on-error goes on past failing entries and ends with this count."""
    found = re.findall(r"errors ignored on restore: (\d+)", log.read_text(errors="replace"))
    return sum(int(n) for n in found)


def check_copy(bench: Bench, result: Result, db: str, source_rows: dict[str, int],
               source_objects: dict[str, int]) -> None:
    """Every public table's row count, and the count of each kind of schema object, against the source."""
    result.rows = bench.row_counts(bench.tgt.conninfo(db))
    lost = [f"{t} {result.rows.get(t, 'missing')}/{n}" for t, n in source_rows.items() if result.rows.get(t) != n]
    if lost:
        result.ok = False
        result.notes.append("ROWS DIFFER: " + ", ".join(lost))
    objects = bench.objects(bench.tgt.conninfo(db))
    differ = [f"{k} {objects[k]}/{n}" for k, n in source_objects.items() if objects[k] != n]
    result.objects_ok = not differ
    if differ:
        result.notes.append("objects differ (target/source): " + ", ".join(differ))


# ---------------------------------------------------------------------------------------------------------
# Contenders


def liftoff_runbook(bench: Bench, db: str, strategy: str) -> tuple[Path, dict]:
    data = bench.stack.runbook_data(jobs=bench.jobs, strategy=strategy)
    data["state_dir"] = str(bench.workdir / "liftoff-state")
    data["target"]["direct"]["database"] = db
    runbook = bench.workdir / "liftoff-bench.yaml"
    runbook.write_text(yaml.safe_dump(data, sort_keys=False))
    return runbook, data


def run_liftoff(bench: Bench, flow: str, runbook: Path, env: dict, log: Path) -> Timed:
    """``liftoff run FLOW`` as an operator runs it, timed, with its own peak RSS and its process tree's."""
    rss_file = bench.workdir / f"liftoff-{flow}.rss"
    time_file = bench.workdir / f"liftoff-{flow}.time"
    argv = [GNU_TIME, "-v", "-o", str(time_file), sys.executable, "-c", LIFTOFF_WITH_RSS,
            "run", flow, "--runbook", str(runbook)]
    if PROFILE_DIR is not None:
        env = {**env, "BENCH_PROFILE": str(PROFILE_DIR / f"liftoff-{flow}.prof")}
    t = run_timed(argv, log, {**env, "BENCH_RSS_FILE": str(rss_file)}, cwd=REPO)
    if rss_file.exists():
        t.self_peak_kib = int(rss_file.read_text().strip())
    m = time_file.exists() and re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_file.read_text())
    t.tree_peak_kib = int(m.group(1)) if m else None
    return t


def bench_liftoff_database(bench: Bench, prefect: PrefectServer, db: str, strategy: str = "stream") -> Result:
    """``liftoff run database``: preflight, export, restore and the gate in one process, as an operator runs
    it. Its phases are the ledger's own step timings; "before the gate" is everything up to the verify step
    (Python and Prefect start-up included), the gate's share is the verify step over the whole run."""
    from liftoff.ledger import Ledger

    result = Result(f"liftoff run database ({strategy})")
    runbook, data = liftoff_runbook(bench, db, strategy)
    env = {**bench.stack.env, **prefect.env(), "PYTHONUNBUFFERED": "1"}
    log = bench.logs / f"liftoff-database-{strategy}.log"
    t = run_liftoff(bench, "database", runbook, env, log)
    result.seconds, result.rss["database"] = t.seconds, t
    if t.returncode != 0:
        result.notes.append(f"liftoff run database exited {t.returncode} (see {log})")
    steps = Ledger(Path(data["state_dir"])).steps()
    for name in ("preflight", "export", "restore.prepare", "restore.pre-data", "restore.data", "restore.post-data",
                 "restore.grants", "verify"):
        if name in steps and steps[name].seconds is not None:
            result.parts[name] = steps[name].seconds
    result.steps_seconds = steps_union_seconds(steps.values())
    if t.returncode == 0:
        result.overhead = round(t.seconds - result.steps_seconds, 2)
    result.ok = not result.notes
    shutil.rmtree(data["state_dir"], ignore_errors=True)
    return result


def steps_union_seconds(steps) -> float:
    """Seconds covered by the ledger's step intervals (their union: a step inside another, or two steps run
    side by side, count once). The run's wall time minus this is Liftoff's fixed overhead: interpreter and
    Prefect start-up, flow and task runs, plans and artifacts, whatever happens between two steps."""
    spans = sorted((s.started_at, s.finished_at) for s in steps if s.started_at and s.finished_at)
    total, end = 0.0, None
    for start, finish in spans:
        if end is None or start > end:
            total += finish - start
            end = finish
        elif finish > end:
            total += finish - end
            end = finish
    return round(total, 2)


def bench_liftoff(bench: Bench, prefect: PrefectServer, db: str, strategy: str) -> Result:
    result = Result(f"liftoff {strategy}: export+restore")
    runbook, data = liftoff_runbook(bench, db, strategy)
    env = {**bench.stack.env, **prefect.env(), "PYTHONUNBUFFERED": "1"}
    log = bench.logs / f"liftoff-{strategy}.log"
    for flow in ("export", "restore", "verify"):
        t = run_liftoff(bench, flow, runbook, env, log)
        result.parts[flow] = t.seconds
        result.rss[flow] = t
        if t.returncode != 0:
            result.notes.append(f"liftoff run {flow} exited {t.returncode} (see {log})")
            break
    if "restore" in result.parts:
        result.seconds = round(result.parts["export"] + result.parts["restore"], 2)
    result.ok = not result.notes
    shutil.rmtree(data["state_dir"], ignore_errors=True)
    return result


def bench_single_stream(bench: Bench, db: str) -> Result:
    result = Result("pg_dump -Fc | pg_restore")
    log = bench.logs / "single-stream.log"
    q = lambda argv: " ".join(f"'{a}'" for a in argv)  # noqa: E731 (nothing here holds a quote)
    # PGPASSWORD (source) comes from the environment; pg_restore gets the target's through its own variable.
    pipeline = (f"{q([PG_DUMP, '-Fc', '-n', 'public', *bench.src_args()])} | "
                f"PGPASSWORD=\"$BENCH_TARGET_PGPASSWORD\" "
                f"{q([PG_RESTORE, '--no-owner', '--no-acl', *bench.tgt_args(db)])}")
    shim = result.parts["auth shim"] = bench.auth_shim(db)
    t = run_timed(["bash", "-o", "pipefail", "-c", pipeline], log,
                  {"PGPASSWORD": bench.src_pw, "BENCH_TARGET_PGPASSWORD": bench.tgt_pw})
    result.parts["dump|restore"] = t.seconds
    result.seconds = round(shim + t.seconds, 2)
    _tool_outcome(result, t, log)
    return result


def bench_directory_jobs(bench: Bench, db: str) -> Result:
    result = Result(f"pg_dump -Fd -j{bench.jobs} + pg_restore -j{bench.jobs}")
    log = bench.logs / "directory-jobs.log"
    out = bench.workdir / "dump-directory"
    shutil.rmtree(out, ignore_errors=True)
    shim = result.parts["auth shim"] = bench.auth_shim(db)
    dump = run_timed([PG_DUMP, "-Fd", f"-j{bench.jobs}", "-f", str(out), "-n", "public", *bench.src_args()], log,
                     {"PGPASSWORD": bench.src_pw})
    result.parts["dump"] = dump.seconds
    if dump.returncode != 0:
        result.notes.append(f"pg_dump exited {dump.returncode} (see {log})")
        return result
    restore = run_timed([PG_RESTORE, "--no-owner", "--no-acl", f"-j{bench.jobs}", *bench.tgt_args(db), str(out)],
                        log, {"PGPASSWORD": bench.tgt_pw})
    result.parts["restore"] = restore.seconds
    result.seconds = round(shim + dump.seconds + restore.seconds, 2)
    _tool_outcome(result, restore, log)
    shutil.rmtree(out, ignore_errors=True)
    return result


def bench_pgcopydb(bench: Bench, db: str, compare: bool = False) -> Result:
    result = Result(f"pgcopydb clone{' + compare data' if compare else ''} (jobs {bench.jobs})")
    # pgcopydb 0.10 has no [include-only-schema] (later versions do): exclude every other schema instead,
    # except ``extensions``: excluding it drops CREATE EXTENSION but keeps COMMENT ON EXTENSION, which then
    # fails the pre-data restore. Liftoff creates the app's extensions on the target too.
    filters = bench.workdir / "pgcopydb-filters.ini"
    filters.write_text("[exclude-schema]\n" + "".join(f"{s}\n" for s in bench.other_schemas()))
    env = {"PGPASSFILE": str(bench.pgpass())}
    # As Liftoff: the non-superuser owner of public first; Supabase's superuser only if pgcopydb needs it.
    for user in (SOURCE_APP_USER, bench.src.superuser):
        workdir = bench.workdir / "pgcopydb"
        shutil.rmtree(workdir, ignore_errors=True)
        bench.fresh_target_db(db)
        shim = bench.auth_shim(db)
        log = bench.logs / f"pgcopydb-as-{user}.log"
        t = run_timed([PGCOPYDB, "clone", "--source", bench.uri(bench.src, user, SOURCE_DB),
                       "--target", bench.uri(bench.tgt, "postgres", db), "--dir", str(workdir),
                       "--table-jobs", str(bench.jobs), "--index-jobs", str(bench.jobs),
                       "--no-owner", "--no-acl", "--filters", str(filters)], log, env)
        shutil.rmtree(workdir, ignore_errors=True)
        if t.returncode == 0:
            fk_seconds, fks = bench.add_missing_foreign_keys(db)
            result.parts.update({"auth shim": shim, "clone": t.seconds, f"{fks} auth FKs": fk_seconds})
            result.seconds = round(shim + t.seconds + fk_seconds, 2)
            result.ok = True
            result.notes.append(f"source user {user}")
            if compare:
                seconds, differ = pgcopydb_compare_data(bench, db, user)
                result.parts["compare data"] = seconds
                result.seconds = round(result.seconds + seconds, 2)
                if differ:
                    result.ok = False
                    result.notes.append("compare data: DIFFER " + ", ".join(differ))
            break
        first_error = next((line.split("ERROR", 1)[1].strip() for line in log.read_text(errors="replace").splitlines()
                            if " ERROR " in line and "line ignored" not in line), f"exit {t.returncode}")
        result.notes.append(f"as {user} failed after {t.seconds}s: {first_error[:90]}")
    # pg_restore inside pgcopydb goes on past failing entries too; its "line ignored" warnings are harmless.
    ignored = len(re.findall(r"ERROR .*pg_restore: error", log.read_text(errors="replace")))
    if ignored:
        result.notes.append(f"{ignored} pg_restore errors logged")
    return result


def pgcopydb_compare_data(bench: Bench, db: str, user: str) -> tuple[float, list[str]]:
    """What ``pgcopydb compare data`` does, run here because Debian 12's pgcopydb 0.10 has no ``compare``
    command (it came in 0.14). The query is pgcopydb's own (``schema_send_table_checksum`` in its
    src/bin/pgcopydb/schema.c): per table ``count(1)`` and the SHA-256 of ``sum(hashtext(row::text))`` and the
    count, over ``ONLY`` the table, with the source's column list; run on both sides, the source side as the
    user the clone read with. pgcopydb's ``--table-jobs`` workers each send a table's query to the source and
    the target at once and then wait for both: here 2 x jobs connections, every table's two queries in
    flight side by side, tables shared out largest first. Returns (seconds, tables that differ). Not
    counted: pgcopydb's catalog read and its process start-up (it would add to its time, not ours)."""
    from concurrent.futures import ThreadPoolExecutor
    from queue import Queue

    started = time.monotonic()
    src_conninfo = bench.src.conninfo(SOURCE_DB) if user == bench.src.superuser \
        else bench.src.conninfo(SOURCE_DB, user=user, password=bench.src_pw)
    with psycopg.connect(src_conninfo) as conn:
        tables = conn.execute("""
            SELECT format('%I.%I', n.nspname, c.relname),
                   (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute a
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
             ORDER BY pg_relation_size(c.oid) DESC""").fetchall()

    def checksum_sql(table: str, columns: str | None) -> str:
        if not columns:
            return f"select count(1) as cnt, '0' as chksum from only {table}"
        return (f"select count(1) as cnt, encode(sha256(format('%s-%s', sum(hashtext(({columns})::text)::bigint), "
                f"count(1))::bytea), 'hex') as chksum from only {table}")

    # One connection per worker and side, as pgcopydb's workers hold theirs.
    pools = {side: Queue() for side in ("source", "target")}
    for _ in range(bench.jobs):
        pools["source"].put(psycopg.connect(src_conninfo, autocommit=True))
        pools["target"].put(psycopg.connect(bench.tgt.conninfo(db), autocommit=True))

    def one(side: str, table: str, columns: str | None):
        conn = pools[side].get()
        try:
            return conn.execute(checksum_sql(table, columns)).fetchone()
        finally:
            pools[side].put(conn)

    try:
        with ThreadPoolExecutor(max_workers=2 * bench.jobs) as pool:
            futures = [(t, pool.submit(one, "source", t, c), pool.submit(one, "target", t, c)) for t, c in tables]
            differ = [t for t, s, d in futures if s.result() != d.result()]
    finally:
        for q in pools.values():
            while not q.empty():
                q.get().close()
    return round(time.monotonic() - started, 2), differ


def _tool_outcome(result: Result, t: Timed, log: Path) -> None:
    errors = restore_errors(log)
    if t.returncode == 0:
        result.ok = True
    elif errors:  # pg_restore exits 1 when it went on past failed entries
        result.ok = True
        result.notes.append(f"pg_restore: {errors} entries failed (see {log.name})")
    else:
        result.notes.append(f"exit {t.returncode} (see {log})")


# ---------------------------------------------------------------------------------------------------------
# Report


def print_report(results: list[Result], db_bytes: int, public_bytes: int, source_rows: dict[str, int]) -> None:
    baseline = next((r for r in results if r.name.startswith("pg_dump -Fc") and r.seconds), None)
    print()
    print(f"source: pg_database_size = {db_bytes / MIB:,.0f} MiB ({db_bytes:,} bytes); public schema "
          f"{public_bytes / MIB:,.0f} MiB; public.bookings {source_rows.get('bookings', 0):,} rows")
    print("MiB/s = source database size / seconds; ratio = seconds / single-stream baseline seconds; rows: every "
          "public table's count equals the source's; objects: indexes, constraints, policies, triggers, ... in "
          "public, counted per kind, equal the source's")
    header = f"{'contender':<34} {'seconds':>8} {'MiB/s':>7} {'ratio':>6} {'bookings':>9}  rows  objects  notes"
    print(header)
    print("-" * len(header))
    for r in results:
        secs = f"{r.seconds:8.1f}" if r.seconds else f"{'-':>8}"
        rate = f"{db_bytes / MIB / r.seconds:7.1f}" if r.seconds else f"{'-':>7}"
        ratio = f"{r.seconds / baseline.seconds:6.2f}" if r.seconds and baseline else f"{'-':>6}"
        booked = r.rows.get("bookings")
        rows_ok = r.rows and all(r.rows.get(t) == n for t, n in source_rows.items())
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in r.parts.items())
        notes = "; ".join(([parts] if parts else []) + r.notes)
        print(f"{r.name:<34} {secs} {rate} {ratio} {booked if booked is not None else '-':>9}  "
              f"{'ok' if rows_ok else 'LOST':<4}  {'ok' if r.objects_ok else 'DIFFER':<7}  {notes}")

    pgc = next((r for r in results if r.name.startswith("pgcopydb clone (")), None)
    pgc_compare = next((r for r in results if r.name.startswith("pgcopydb clone + compare")), None)
    for lift in (r for r in results if r.name.startswith("liftoff run database")):
        _print_composed(lift, pgc, db_bytes, pgc_compare)
    for lift in (r for r in results if r.name.startswith("liftoff") and not r.name.startswith("liftoff run")):
        _print_liftoff(lift, pgc)


def _print_composed(lift: Result, pgc: Result | None, db_bytes: int, pgc_compare: Result | None = None) -> None:
    """The issue's targets for the run an operator makes: the whole run against pgcopydb clone alone, the
    gate's wall time after the copy against a quarter of the copy, the process' peak RSS, seconds per GB."""
    print()
    print(lift.name)
    print("  phases (ledger): " + ", ".join(f"{k} {v:.1f} s" for k, v in lift.parts.items()))
    if lift.overhead is not None:
        print(f"  fixed overhead (run's wall time {lift.seconds:.1f} s - its ledger steps {lift.steps_seconds:.1f} s): "
              f"{lift.overhead:.1f} s; at most 3 s: {'HOLDS' if lift.overhead <= 3 else 'FAILS'}")
    gate = lift.parts.get("verify")
    copy = lift.seconds - gate if lift.seconds and gate is not None else None
    t = lift.rss.get("database")
    peak = t.self_peak_kib / 1024 if t and t.self_peak_kib else None
    verdict = lambda ok: "HOLDS" if ok else "FAILS"  # noqa: E731
    if lift.seconds:
        print(f"  {lift.seconds / (db_bytes / 2**30):.1f} s per GiB of source database")
    if lift.seconds and pgc_compare and pgc_compare.seconds:
        print(f"  whole run at most 1.0x pgcopydb clone + compare data: "
              f"{verdict(lift.seconds <= pgc_compare.seconds)} ({lift.seconds:.1f} s vs {pgc_compare.seconds:.1f} s, "
              f"{lift.seconds / pgc_compare.seconds:.2f}x)")
    if lift.seconds and pgc and pgc.seconds:
        print(f"  whole run at most 1.25x pgcopydb clone alone: {verdict(lift.seconds <= 1.25 * pgc.seconds)} "
              f"({lift.seconds:.1f} s vs {pgc.seconds:.1f} s, {lift.seconds / pgc.seconds:.2f}x)")
    if copy:
        print(f"  gate's wall time after the copy at most a quarter of the copy: {verdict(gate <= copy / 4)} "
              f"({gate:.1f} s vs {copy:.1f} s before it, {gate / copy:.2f}; gate share of the run "
              f"{gate / lift.seconds:.0%})")
    if peak is not None:
        print(f"  peak RSS of the liftoff process under 300 MB: {verdict(peak < 300)} ({peak:.0f} MB; with "
              f"pg_dump/pg_restore children {t.tree_peak_kib / 1024:.0f} MB)")


def _print_liftoff(lift: Result, pgc: Result | None) -> None:
    print()
    print(lift.name.split(":")[0].capitalize())
    export, restore, verify = (lift.parts.get(k) for k in ("export", "restore", "verify"))
    fmt = lambda v: f"{v:.1f} s" if v is not None else "-"  # noqa: E731
    print(f"  export {fmt(export)}, restore {fmt(restore)}, export+restore {fmt(lift.seconds)}, verify {fmt(verify)}")
    ratio = verify / lift.seconds if verify and lift.seconds else None
    print(f"  verify / copy = {ratio:.2f}" if ratio is not None else "  verify / copy = -")
    peaks = {k: t.self_peak_kib for k, t in lift.rss.items() if t.self_peak_kib}
    trees = {k: t.tree_peak_kib for k, t in lift.rss.items() if t.tree_peak_kib}
    print("  peak RSS of the liftoff Python process: "
          + ", ".join(f"{k} {v / 1024:.0f} MB" for k, v in peaks.items()))
    print("  (for comparison, /usr/bin/time max RSS incl. pg_dump/pg_restore children: "
          + ", ".join(f"{k} {v / 1024:.0f} MB" for k, v in trees.items()) + ")")
    peak = max(peaks.values()) / 1024 if peaks else None

    print()
    print("Targets")
    verdict = lambda ok: "HOLDS" if ok else "FAILS"  # noqa: E731
    if lift.seconds and pgc and pgc.seconds:
        print(f"  Liftoff export+restore no slower than pgcopydb clone: {verdict(lift.seconds <= pgc.seconds)} "
              f"({lift.seconds:.1f} s vs {pgc.seconds:.1f} s, {lift.seconds / pgc.seconds:.2f}x)")
    else:
        print("  Liftoff export+restore no slower than pgcopydb clone: not measured")
    if ratio is not None:
        print(f"  verify under half the copy time: {verdict(ratio < 0.5)} ({verify:.1f} s vs {lift.seconds:.1f} s)")
    else:
        print("  verify under half the copy time: not measured")
    if peak is not None:
        print(f"  peak RSS under 300 MB: {verdict(peak < 300)} ({peak:.0f} MB)")
    else:
        print("  peak RSS under 300 MB: not measured")


# ---------------------------------------------------------------------------------------------------------


def _load() -> str:
    """uptime's three load averages: the machine is shared, every figure is printed beside them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bookings", type=int, default=620_000, help="scale of the source (620000 is about 1 GB)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs for every parallel contender")
    parser.add_argument("--only", default="database,liftoff,liftoff-stream,single,directory,pgcopydb,pgcopydb-compare",
                        help="comma-separated contenders to run (default: all seven; `database` is `liftoff run "
                             "database` in one process, the run an operator makes; `pgcopydb-compare` is pgcopydb "
                             "clone followed by pgcopydb's compare data)")
    parser.add_argument("--profile", action="store_true",
                        help="run each liftoff process under cProfile; the .prof files stay in logs/")
    args = parser.parse_args()
    only = set(args.only.split(","))

    for tool in (PG_DUMP, PG_RESTORE, PGCOPYDB, GNU_TIME):
        if not Path(tool).exists():
            sys.exit(f"{tool} is missing: apt-get install -y postgresql-15 pgcopydb time")

    def on_sigterm(*_):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (&)
    workdir = Path(tempfile.mkdtemp(prefix="liftoff-bench-"))
    # The clusters and the Prefect home go in a private temp dir, removed as a whole at the end.
    private_tmp = workdir / "tmp"
    private_tmp.mkdir()
    for path in (workdir, private_tmp):
        path.chmod(0o755)  # the postgres user must reach its data directory
    tempfile.tempdir = str(private_tmp)
    # The CRM without the Supabase example apps' patterns (auth hooks granted to supabase_auth_admin and
    # the like): pgcopydb and pg_restore stop at the first grant to a role the target lacks, and the
    # benchmark compares copy speed on the same objects. The tests cover those patterns.
    stack = LocalStack(bookings=args.bookings, workdir=workdir / "stack", apps=False)
    prefect = PrefectServer()
    results: list[Result] = []
    try:
        print(f"workdir {workdir}; starting the Prefect server ...", flush=True)
        prefect.start()
        started = time.monotonic()
        print(f"building the source: {args.bookings:,} bookings ...", flush=True)
        stack.start()
        bench = Bench(stack, workdir, args.jobs)
        if args.profile:
            global PROFILE_DIR
            PROFILE_DIR = bench.logs
        bench.settle_source()
        db_bytes, public_bytes = bench.source_size()
        source_rows = bench.row_counts(stack.source.conninfo(SOURCE_DB))
        source_objects = bench.objects(stack.source.conninfo(SOURCE_DB))
        print(f"source ready in {time.monotonic() - started:.0f} s: pg_database_size {db_bytes / MIB:,.0f} MiB "
              f"({db_bytes:,} bytes), public.bookings {source_rows['bookings']:,} rows", flush=True)

        contenders = [
            ("database", "bench_database", lambda db: bench_liftoff_database(bench, prefect, db)),
            ("liftoff", "bench_liftoff", lambda db: bench_liftoff(bench, prefect, db, "dump")),
            ("liftoff-stream", "bench_liftoff_stream", lambda db: bench_liftoff(bench, prefect, db, "stream")),
            ("single", "bench_single", lambda db: bench_single_stream(bench, db)),
            ("directory", "bench_dir", lambda db: bench_directory_jobs(bench, db)),
            ("pgcopydb", "bench_pgcopydb", lambda db: bench_pgcopydb(bench, db)),
            ("pgcopydb-compare", "bench_pgcopydb_compare", lambda db: bench_pgcopydb(bench, db, compare=True)),
        ]
        for key, db, run in contenders:
            if key not in only:
                continue
            bench.fresh_target_db(db)
            print(f"[{key}] copying into {db} (load average {_load()}) ...", flush=True)
            result = run(db)
            check_copy(bench, result, db, source_rows, source_objects)
            results.append(result)
            print(f"[{key}] {result.seconds} s, bookings {result.rows.get('bookings')}, "
                  f"{'; '.join(result.notes) or 'ok'} (load average {_load()})", flush=True)
            bench.drop_target_db(db)
        print_report(results, db_bytes, public_bytes, source_rows)
        print(f"\nload average at the end: {_load()} (2 cores; contenders compare only within this invocation)")
        print(f"\nlogs: {bench.logs}")
        return 0 if results and all(r.ok for r in results) else 1
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stack.stop()
        prefect.stop()
        for leftover in ("liftoff-state", "dump-directory", "pgcopydb", "stack", "pgpass", "tmp",
                         *(p.name for p in workdir.glob("liftoff-*.*")), "pgcopydb-filters.ini"):
            path = workdir / leftover
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
