"""The database phase's Prefect tasks: preflight checks, export, restore steps and the gate.

Each task is idempotent and records what it did in the ledger, so a re-run after a crash continues where
the last run stopped. Tasks read the runbook; they never hold a secret longer than a connection needs it.
"""

from __future__ import annotations

import contextvars
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from liftoff.errors import ConnectionRefused, PreflightFailed, StepFailed, ToolMissing
from liftoff.ledger import Ledger
from liftoff.logs import get_logger
from liftoff.redaction import redact
from liftoff.reports import Progress
from runbooks.model import Runbook
from tasks import pg_tools, postgres, supabase
from tasks.verify import DatabaseReport, compare_databases

DUMP_DIR = "dump"
AUTH_USERS_FILE = "auth_users.copy"
log = get_logger(phase="database")


def _tools(rb: Runbook, min_major: int) -> pg_tools.PgTools:
    return pg_tools.find_pg_tools(min_major, rb.database.pg_bin_dirs)


# ---------------------------------------------------------------------------------------------------
# Preflight


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class PreflightReport:
    checks: list[Check] = field(default_factory=list)
    source_major: int | None = None
    target_major: int | None = None
    tools: str | None = None

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, redact(detail)))

    @property
    def failures(self) -> list[str]:
        return [c.detail for c in self.checks if not c.ok]


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _writable(path: Path) -> bool:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


@task(name="preflight checks", cache_policy=NO_CACHE)
def run_preflight(rb: Runbook) -> PreflightReport:
    """Reads both servers and the local disk; writes nothing. Returns every check, passed or not."""
    report = PreflightReport()
    src_info = tgt_info = None
    try:
        with postgres.session(rb.source, "source") as src:
            src_info = postgres.server_info(src, rb.source)
            src_ext = supabase.app_extensions(postgres.extensions(src))
        report.source_major = src_info.major
        report.add("source reachable", True, f"source {rb.source.where}: PostgreSQL {src_info.version}")
    except ConnectionRefused as exc:
        report.add("source reachable", False, str(exc))
    try:
        with postgres.session(rb.target.direct, "target.direct") as tgt:
            tgt_info = postgres.server_info(tgt, rb.target.direct)
            tgt_available = postgres.available_extensions(tgt)
            foreign = postgres.list_tables(tgt, rb.database.schemas)
            roles = postgres.existing_roles(tgt, [r.name for r in rb.database.app_roles])
        report.target_major = tgt_info.major
        report.add("target reachable", True, f"target {rb.target.direct.where}: PostgreSQL {tgt_info.version}")
    except ConnectionRefused as exc:
        report.add("target reachable", False, str(exc))

    if src_info and tgt_info:
        ok = tgt_info.major >= src_info.major
        report.add("versions", ok, f"source PostgreSQL {src_info.major} -> target PostgreSQL {tgt_info.major}" + (
            "" if ok else "; a restore into an older major version is not supported: use a target of "
                          f"PostgreSQL {src_info.major} or newer (target.direct)"))
        missing = sorted(set(src_ext) - tgt_available)
        report.add("extensions", not missing,
                   "target offers every extension the source uses" if not missing else
                   f"target {rb.target.direct.host}:{rb.target.direct.port} lacks extensions the source uses: "
                   f"{', '.join(missing)}; install them on the target (e.g. postgresql-contrib-{tgt_info.major})")
        ledger_path = rb.state_dir / "ledger.sqlite"
        owned = ledger_path.exists() and Ledger(rb.state_dir).owns_target(tgt_info.identity)
        names = [t.qualified for t in foreign]
        report.add("target is empty or ours", not names or owned,
                   "target holds no tables in the migrated schemas" if not names else
                   f"target holds tables written by this runbook ({len(names)}); the run resumes" if owned else
                   f"target {rb.target.direct.where} already holds data this runbook did not write "
                   f"({', '.join(names[:5])}{'...' if len(names) > 5 else ''}); restore into an empty database")
        absent = sorted({r.name for r in rb.database.app_roles} - roles)
        report.add("app roles", not absent, "every app role exists on the target" if not absent else
                   f"target lacks roles named in database.app_roles: {', '.join(absent)}; create them first")
    if src_info:
        try:
            tools = _tools(rb, src_info.major)
            report.tools = f"{tools.bin_dir} (PostgreSQL {tools.major})"
            report.add("pg_dump/pg_restore", True, f"using {report.tools}")
        except ToolMissing as exc:
            report.add("pg_dump/pg_restore", False, str(exc))
        state = rb.state_dir
        if not _writable(state):
            report.add("state directory", False,
                       f"dump directory {state} is not writable (state_dir); choose a writable path")
        else:
            free = _free_bytes(state)
            # The archive holds the data only with strategy dump, and only until the export is done.
            archive = 0 if rb.database.strategy == "stream" or (
                (state / "ledger.sqlite").exists() and Ledger(state).is_done("export")) else src_info.database_bytes
            need = archive + rb.database.min_free_disk_mb * 1024 * 1024
            ok = free >= need
            report.add("disk space", ok,
                       f"{state}: {free / 2**20:,.0f} MiB free, need {need / 2**20:,.0f} MiB (archive estimate "
                       f"{archive / 2**20:,.0f} MiB + database.min_free_disk_mb "
                       f"{rb.database.min_free_disk_mb})" + ("" if ok else "; free space or lower the reserve"))
    return report


def require(report: PreflightReport) -> None:
    if report.failures:
        raise PreflightFailed("\n".join(report.failures))


# ---------------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportPlan:
    tables: list[str]
    source_bytes: int
    tools: str
    command: str
    rules: list[tuple[str, str]]
    leftovers: list[str]
    leftovers_policy: str


@task(name="plan export", cache_policy=NO_CACHE)
def plan_export(rb: Runbook) -> ExportPlan:
    with postgres.session(rb.source, "source") as src:
        info = postgres.server_info(src, rb.source)
        tables = postgres.list_tables(src, rb.database.schemas)
        leftovers = supabase.find_leftovers(src, rb.database.schemas)
    tools = _tools(rb, info.major)
    argv = _pg_dump_argv(rb, tools, rb.state_dir / DUMP_DIR, "<snapshot>")
    return ExportPlan([t.qualified for t in tables], info.database_bytes, f"{tools.bin_dir} ({tools.major})",
                      " ".join(argv), supabase.RULES, leftovers.objects, rb.database.supabase_leftovers)


def _pg_dump_argv(rb: Runbook, tools: pg_tools.PgTools, out: Path, snapshot: str) -> list[str]:
    argv = [tools.pg_dump, "--format=directory", f"--jobs={rb.database.jobs}", f"--file={out}",
            f"--snapshot={snapshot}", f"--compress={rb.database.compression}", "--no-publications",
            "--no-subscriptions", "--quote-all-identifiers"]
    if rb.database.strategy == "stream":
        argv.append("--schema-only")  # the data goes server to server during restore
    argv += [f"--schema={s}" for s in rb.database.schemas]
    return argv


@task(name="dump source", cache_policy=NO_CACHE)
def dump_source(rb: Runbook) -> dict:
    """pg_dump -Fd -j of the runbook's schemas from one exported snapshot, with per-table row counts taken
    in that snapshot. Skipped when the ledger records a complete archive."""
    ledger = Ledger(rb.state_dir)
    final = rb.state_dir / DUMP_DIR
    if ledger.is_done("export") and (final / "toc.dat").exists():
        detail = ledger.step_detail("export")
        _require_same_export_settings(rb, detail)
        log.info("export already done; reusing archive", dump=str(final))
        return {**detail, "skipped": True}
    partial = rb.state_dir / (DUMP_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    ledger.forget_steps("export")
    # A new archive comes from a new snapshot: what was restored from the old one is loaded again.
    ledger.forget_steps("restore")
    ledger.start_step("export")
    started = time.monotonic()
    try:
        counts, leftovers, facts, info, tools, proc, stderr = _dump_in_snapshot(rb, partial)
    except OSError as exc:  # disk full or unwritable while writing the archive or the auth export
        _safe_fail(ledger, "export", exc.strerror or str(exc))
        raise StepFailed(f"export into state_dir {rb.state_dir} failed: {exc.strerror or exc}; free space there "
                         "or choose another state_dir, then re-run (the source was only read)") from None
    if proc.returncode != 0:
        _safe_fail(ledger, "export", "pg_dump failed")
        lines = [l for l in stderr.splitlines() if "error" in l.lower()] or stderr.splitlines() or ["no output"]
        raise StepFailed(f"pg_dump from source {rb.source.host}:{rb.source.port} failed: {redact(lines[0])}")
    os.rename(partial, final)
    for name, rows in counts.items():
        ledger.set_table("export", name, "exported", rows)
    size = sum(f.stat().st_size for f in final.iterdir())
    detail = {
        "tables": counts, "archive": str(final), "archive_bytes": size, "seconds": round(time.monotonic() - started, 2),
        "source_major": info.major, "tools": str(tools.bin_dir), **facts,
        "schemas": rb.database.schemas, "strategy": rb.database.strategy,
        "leftovers": {"policies": leftovers.policies, "foreign_keys": leftovers.foreign_keys},
    }
    ledger.finish_step("export", detail)
    log.info("export done", tables=len(counts), archive_bytes=size, seconds=detail["seconds"])
    return detail


def _require_same_export_settings(rb: Runbook, detail: dict) -> None:
    """An archive is reused only for the schemas and strategy it was made with."""
    made = {"schemas": detail.get("schemas", rb.database.schemas), "strategy": detail.get("strategy", "dump")}
    wanted = {"schemas": rb.database.schemas, "strategy": rb.database.strategy}
    if made != wanted:
        raise StepFailed(
            f"the export in {rb.state_dir} (state_dir) was made with database.schemas {made['schemas']} and "
            f"database.strategy {made['strategy']}, the runbook now says {wanted['schemas']} and "
            f"{wanted['strategy']}; restore the runbook's values or use a new state_dir and an empty target")


def _safe_fail(ledger: Ledger, step: str, reason: str) -> None:
    try:
        ledger.fail_step(step, reason)
    except Exception:  # the ledger's disk may be the full one; the error we raise says what happened
        pass


def _dump_in_snapshot(rb: Runbook, partial: Path):
    """Runs pg_dump on an exported snapshot while counting rows (and exporting auth users) in that same
    snapshot; returns what the export step records."""
    with postgres.session(rb.source, "source", autocommit=False) as snap:
        snap.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        snap.read_only = True
        info = postgres.server_info(snap, rb.source)
        tools = _tools(rb, info.major)
        snapshot = snap.execute("SELECT pg_export_snapshot()").fetchone()[0]
        argv = _pg_dump_argv(rb, tools, partial, snapshot)
        log.info("pg_dump started", tables_schemas=rb.database.schemas, jobs=rb.database.jobs, tools=str(tools.bin_dir))
        env = {**os.environ, **postgres.libpq_env(rb.source, "source")}
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            tables = postgres.list_tables(snap, rb.database.schemas)
            progress = Progress("export: counting rows in the snapshot", len(tables))
            counts = {}
            for t in tables:
                counts[t.qualified] = postgres.count_rows(snap, t)
                progress.advance(f"{t.qualified}: {counts[t.qualified]} rows")
            leftovers = supabase.find_leftovers(snap, rb.database.schemas)
            if rb.database.supabase_leftovers == "shim":
                supabase.export_auth_users(snap, rb.state_dir / AUTH_USERS_FILE)
            facts = {"extensions": supabase.app_extensions(postgres.extensions(snap)),
                     "index_tables": postgres.index_tables(snap, rb.database.schemas)}
        finally:
            _, stderr = proc.communicate()
        snap.rollback()
    return counts, leftovers, facts, info, tools, proc, stderr


# ---------------------------------------------------------------------------------------------------
# Restore


@dataclass
class RestorePlan:
    keep: list[pg_tools.TocEntry]
    left_out: list[tuple[str, str]]  # (entry, rule)
    table_entries: dict[str, pg_tools.TocEntry]  # "schema.table" -> what loads it (TABLE DATA, or TABLE to stream)
    leftovers_policy: str
    shims: list[str]
    extensions: dict[str, str]

    @property
    def tables(self) -> list[str]:
        return list(self.table_entries)

    def section(self, name: str) -> list[pg_tools.TocEntry]:
        return [e for e in self.keep if e.section == name]


def export_done(rb: Runbook) -> bool:
    return (rb.state_dir / "ledger.sqlite").exists() and Ledger(rb.state_dir).is_done("export")


def export_detail(rb: Runbook) -> dict:
    ledger_file = rb.state_dir / "ledger.sqlite"
    if not ledger_file.exists() or not Ledger(rb.state_dir).is_done("export"):
        raise StepFailed(f"no complete export in {rb.state_dir} (state_dir); run the export flow first")
    return Ledger(rb.state_dir).step_detail("export")


@task(name="plan restore", cache_policy=NO_CACHE)
def plan_restore(rb: Runbook) -> RestorePlan:
    detail = export_detail(rb)
    _require_same_export_settings(rb, detail)
    tools = _tools(rb, detail["source_major"])
    leftovers = supabase.Leftovers(**detail["leftovers"])
    keep, left_out = [], []
    for entry in pg_tools.read_toc(tools, rb.state_dir / DUMP_DIR):
        ok, why = supabase.keep_entry(entry, rb.database.schemas, leftovers, rb.database.supabase_leftovers)
        (keep.append(entry) if ok else left_out.append((f"{entry.desc} {entry.schema}.{entry.tag}", why)))
    kind = "TABLE DATA" if rb.database.strategy == "dump" else "TABLE"
    tables = {f"{e.schema}.{e.tag}": e for e in keep if e.desc == kind and e.schema in rb.database.schemas}
    shims = supabase.SHIM_OBJECTS if rb.database.supabase_leftovers == "shim" else []
    return RestorePlan(keep, left_out, tables, rb.database.supabase_leftovers, shims, detail["extensions"])


def _target_identity(rb: Runbook) -> str:
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        return postgres.server_info(tgt, rb.target.direct).identity


@task(name="prepare target", cache_policy=NO_CACHE)
def prepare_target(rb: Runbook, plan: RestorePlan) -> dict:
    """Claims the target in the ledger, creates the app's extensions and (policy shim) the auth shim."""
    ledger = Ledger(rb.state_dir)
    ledger.claim_target(_target_identity(rb))
    done = {"extensions": [], "shim_users_added": 0}
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        for name, schema in sorted(plan.extensions.items()):
            postgres.execute(tgt, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)),
                             what=f"create schema {schema}")
            postgres.execute(tgt, sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}").format(
                sql.Identifier(name), sql.Identifier(schema)), what=f"create extension {name} on target")
            done["extensions"].append(name)
        if plan.leftovers_policy == "shim":
            done["shim_users_added"] = supabase.create_shims(tgt, rb.state_dir / AUTH_USERS_FILE)
    return done


def _restore_env(rb: Runbook) -> dict[str, str]:
    return postgres.libpq_env(rb.target.direct, "target.direct")


def _pg_restore(rb: Runbook, tools: pg_tools.PgTools, entries: list[pg_tools.TocEntry], what: str,
                *extra: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".list", dir=rb.state_dir, delete=False) as f:
        f.write("".join(e.line + "\n" for e in entries))
    try:
        argv = [tools.pg_restore, "--no-owner", "--no-acl", "--exit-on-error", f"--use-list={f.name}",
                f"--dbname={rb.target.direct.database}", *extra, str(rb.state_dir / DUMP_DIR)]
        pg_tools.run_tool(argv, _restore_env(rb), what)
    finally:
        os.unlink(f.name)


@task(name="restore schema (pre-data)", cache_policy=NO_CACHE)
def restore_pre_data(rb: Runbook, plan: RestorePlan) -> dict:
    """Types, tables, functions, views: in one transaction, so a crash leaves nothing half-made."""
    ledger = Ledger(rb.state_dir)
    if ledger.is_done("restore.pre-data"):
        return {"skipped": True}
    tools = _tools(rb, export_detail(rb)["source_major"])
    # Every non-data entry: pg_restore's --section picks by the archive's own section of each entry (a
    # COMMENT belongs to the section of what it comments on).
    entries = [e for e in plan.keep if e.section != "data"]
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        existing_schemas = {r[0] for r in tgt.execute("SELECT nspname FROM pg_namespace")}
        present = {t.qualified for t in postgres.list_tables(tgt, rb.database.schemas)}
    if plan.tables and set(plan.tables) <= present:
        # The previous run committed pre-data but died before the ledger heard of it.
        ledger.finish_step("restore.pre-data", {"recovered": True})
        return {"recovered": True}
    entries = [e for e in entries if not (e.desc == "SCHEMA" and e.tag in existing_schemas)]
    ledger.start_step("restore.pre-data")
    _pg_restore(rb, tools, entries, f"restore pre-data into target {rb.target.direct.host}:{rb.target.direct.port}",
                "--section=pre-data", "--single-transaction")
    ledger.finish_step("restore.pre-data", {"entries": len(entries)})
    return {"entries": len(entries)}


@task(name="restore table data", cache_policy=NO_CACHE)
def restore_data(rb: Runbook, plan: RestorePlan) -> dict:
    """Loads each table not yet loaded, ``jobs`` at a time, each in one target transaction that starts with
    TRUNCATE, then the ledger marks it loaded: a table interrupted mid-load is reloaded whole. Strategy
    ``dump`` loads from the archive (pg_restore); ``stream`` copies from the source (COPY to COPY, all
    tables from one snapshot) and then sets the sequences from that snapshot."""
    ledger = Ledger(rb.state_dir)
    if ledger.is_done("restore.data"):
        # Never again: after cutover, setting the sequences back to the source's values would reuse ids.
        return {"loaded": [], "already_loaded": len(plan.tables), "skipped": True}
    tools = _tools(rb, export_detail(rb)["source_major"])
    exported = {name: rows for name, (_, rows) in ledger.tables("export").items()}
    state = ledger.tables("restore")
    entries = plan.table_entries
    if rb.database.strategy == "stream":
        with postgres.session(rb.target.direct, "target.direct") as tgt:
            holding_rows = postgres.plain_tables(tgt, rb.database.schemas)
        entries = {name: e for name, e in entries.items() if name in holding_rows}
    todo = [name for name in entries if state.get(name, ("",))[0] != "loaded"]
    todo.sort(key=lambda name: -(exported.get(name) or 0))  # largest first: the long pole starts early
    progress = Progress("restore: loading tables", len(entries))
    for _ in range(len(entries) - len(todo)):
        progress.advance("already loaded")
    ledger.start_step("restore.data")
    # Indexes and constraints of a table are built as soon as its data is in, while other tables load (as
    # pgcopydb does); foreign keys, triggers and policies wait for the post-data step.
    own_post_data = _post_data_by_table(plan, export_detail(rb).get("index_tables", {}))

    def from_archive(name: str) -> int | None:
        entry = entries[name]
        with postgres.session(rb.target.direct, "target.direct") as tgt:
            postgres.execute(tgt, sql.SQL("TRUNCATE ONLY {}").format(sql.Identifier(entry.schema, entry.tag)),
                             what=f"truncate {name} on target")
        _pg_restore(rb, tools, [entry], f"load {name} into target", "--data-only", "--single-transaction")
        return exported.get(name)

    with ThreadPoolExecutor(max_workers=rb.database.jobs) as builds:
        pending = []

        def loaded_with(copy_table):
            def load(name: str) -> None:
                ledger.set_table("restore", name, "loading")
                rows = copy_table(name)
                ledger.set_table("restore", name, "loaded", rows)
                log.info("table loaded", table=name, rows=rows)
                progress.advance(f"{name}: {rows} rows")
                for entry in own_post_data.get(name, []):
                    pending.append(builds.submit(contextvars.copy_context().run, _pg_restore, rb, tools, [entry],
                                                 f"build {entry.desc.lower()} {entry.tag}", "--section=post-data"))
                pending.append(builds.submit(contextvars.copy_context().run, _analyze, rb, name))
            return load

        if rb.database.strategy == "dump":
            with ThreadPoolExecutor(max_workers=rb.database.jobs) as pool:
                _run_all(pool, loaded_with(from_archive), todo)
            sequences = [e for e in plan.section("data") if e.desc == "SEQUENCE SET"]
            if sequences:
                _pg_restore(rb, tools, sequences, "set sequence values on target", "--data-only",
                            "--single-transaction")
            set_sequences = len(sequences)
        else:
            with postgres.exported_snapshot(rb.source, "source") as (snap, snapshot_id):
                def streamed(name: str) -> int:
                    schema, table = name.split(".", 1)
                    with postgres.session(rb.source, "source", autocommit=False) as src, \
                            postgres.session(rb.target.direct, "target.direct", autocommit=False) as tgt:
                        postgres.join_snapshot(src, snapshot_id)
                        return postgres.stream_table(src, tgt, schema, table)

                with ThreadPoolExecutor(max_workers=rb.database.jobs) as pool:
                    _run_all(pool, loaded_with(streamed), todo)
                with postgres.session(rb.target.direct, "target.direct") as tgt:
                    set_sequences = postgres.copy_sequence_values(snap, tgt, rb.database.schemas)
        for future in pending:
            future.result()
    ledger.finish_step("restore.data", {"tables_loaded": len(todo), "sequences": set_sequences})
    return {"loaded": todo, "already_loaded": len(entries) - len(todo)}


def _run_all(pool: ThreadPoolExecutor, fn, items: list) -> None:
    """Runs fn on every item in the pool, each in a copy of the caller's context (run id, Prefect run
    context), and raises the first error."""
    for future in [pool.submit(contextvars.copy_context().run, fn, item) for item in items]:
        future.result()


def _post_data_by_table(plan: RestorePlan, index_tables: dict[str, str]) -> dict[str, list[pg_tools.TocEntry]]:
    """Indexes and (primary key, unique, check, exclusion) constraints of each table, from the archive."""
    by_table: dict[str, list[pg_tools.TocEntry]] = {}
    for e in plan.section("post-data"):
        if e.desc == "INDEX":
            table = index_tables.get(f"{e.schema}.{e.tag}")
        elif e.desc == "CONSTRAINT":
            table = f"{e.schema}.{e.table_and_name[0]}"
        else:
            continue
        if table:
            by_table.setdefault(table, []).append(e)
    return by_table


def _analyze(rb: Runbook, name: str) -> None:
    schema, table = name.split(".", 1)
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        postgres.execute(tgt, sql.SQL("ANALYZE {}").format(sql.Identifier(schema, table)), what=f"analyze {name}")


_EXISTS = {
    "INDEX": "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
    "CONSTRAINT": "SELECT 1 FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s AND t.relname = %s AND k.conname = %s",
    "TRIGGER": "SELECT 1 FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s AND t.relname = %s AND g.tgname = %s",
    "POLICY": "SELECT 1 FROM pg_policies WHERE schemaname = %s AND tablename = %s AND policyname = %s",
}
_EXISTS["FK CONSTRAINT"] = _EXISTS["CONSTRAINT"]
_EXISTS["RULE"] = "SELECT 1 FROM pg_rules WHERE schemaname = %s AND tablename = %s AND rulename = %s"
_EXISTS["STATISTICS"] = ("SELECT 1 FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace "
                         "WHERE n.nspname = %s AND s.stxname = %s")


def _already_there(tgt: psycopg.Connection, e: pg_tools.TocEntry) -> bool:
    q = _EXISTS.get(e.desc)
    if q is None:
        return False
    # TOC tags are raw names (--quote-all-identifiers quotes only the SQL), so they compare as they are.
    if e.desc in ("INDEX", "STATISTICS"):
        params = (e.schema, e.tag)
    else:
        table, name = e.table_and_name
        params = (e.schema, table, name)
    return tgt.execute(q, params).fetchone() is not None


@task(name="restore indexes and constraints (post-data)", cache_policy=NO_CACHE)
def restore_post_data(rb: Runbook, plan: RestorePlan) -> dict:
    """Foreign keys, triggers, policies and whatever index or constraint is not there yet, with ``jobs``
    parallel builds; entries already present on the target (built during the data step, or by a run that
    died midway) are not built again."""
    ledger = Ledger(rb.state_dir)
    if ledger.is_done("restore.post-data"):
        return {"skipped": True}
    tools = _tools(rb, export_detail(rb)["source_major"])
    ledger.start_step("restore.post-data")
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        entries = [e for e in plan.keep if e.section != "data" and not _already_there(tgt, e)]
    if any(e.section == "post-data" for e in entries):
        _pg_restore(rb, tools, entries, f"restore post-data into target {rb.target.direct.host}:{rb.target.direct.port}",
                    "--section=post-data", f"--jobs={rb.database.jobs}")
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        refreshed = postgres.refresh_unpopulated_matviews(tgt, rb.database.schemas)
    ledger.finish_step("restore.post-data", {"entries": len(entries), "refreshed": refreshed})
    return {"entries": len(entries), "refreshed": refreshed}


@task(name="grant app roles", cache_policy=NO_CACHE)
def grant_app_roles(rb: Runbook) -> list[str]:
    """Re-applies, idempotently, the grants --no-acl left out, for the runbook's app roles."""
    Ledger(rb.state_dir).start_step("restore.grants")
    done = []
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        for role in rb.database.app_roles:
            r = sql.Identifier(role.name)
            table_privs = "SELECT, INSERT, UPDATE, DELETE" if role.privileges == "read_write" else "SELECT"
            seq_privs = "USAGE, SELECT, UPDATE" if role.privileges == "read_write" else "USAGE, SELECT"
            for schema in rb.database.schemas:
                s = sql.Identifier(schema)
                for stmt in (
                    sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT " + table_privs + " ON ALL TABLES IN SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT " + seq_privs + " ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {} TO {}").format(s, r),
                    sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT " + table_privs + " ON TABLES TO {}").format(s, r),
                ):
                    postgres.execute(tgt, stmt, what=f"grant to {role.name}")
            done.append(f"{role.name}: {role.privileges} on {', '.join(rb.database.schemas)}")
    Ledger(rb.state_dir).finish_step("restore.grants", {"roles": done})
    return done


# ---------------------------------------------------------------------------------------------------
# Verify


@task(name="verify database (gate)", cache_policy=NO_CACHE)
def run_gate(rb: Runbook) -> DatabaseReport:
    with postgres.session(rb.source, "source") as src:
        tables = postgres.list_tables(src, rb.database.schemas)
    left_out: set[str] = set()
    ledger_file = rb.state_dir / "ledger.sqlite"
    if rb.database.supabase_leftovers == "drop" and ledger_file.exists():
        lo = Ledger(rb.state_dir).step_detail("export").get("leftovers", {})
        left_out |= {"policy " + p.replace(" ", ".", 1) for p in lo.get("policies", [])}
        left_out |= {"constraint " + f.replace(" ", ".", 1) for f in lo.get("foreign_keys", [])}
    progress = Progress("verify: comparing tables", len(tables))
    report = compare_databases(
        lambda: postgres.connect(rb.source, "source"),
        lambda: postgres.connect(rb.target.direct, "target.direct"),
        tables, rb.database.schemas, left_out=left_out, ignored_extensions=supabase.MANAGED_EXTENSIONS,
        jobs=rb.database.jobs, on_table_done=lambda c: progress.advance(f"{c.table}: {c.status}"),
    )
    if ledger_file.exists():
        Ledger(rb.state_dir).finish_step("verify", {"ok": report.ok, "failures": report.failures()})
    return report


def report_rows(report: DatabaseReport, exported: dict[str, int] | None = None) -> list[dict]:
    exported = exported or {}
    return [
        {"table": t.table, "exported rows": exported.get(t.table, ""), "source rows": t.source_rows,
         "target rows": t.target_rows, "source checksum": t.source_checksum[:12],
         "target checksum": t.target_checksum[:12], "status": t.status}
        for t in report.tables
    ]

