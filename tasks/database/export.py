"""The database export's tasks (the runbook's `database` section): pg_dump from one exported snapshot, with what
the restore needs from the source's catalog read in that same snapshot."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import StepFailed
from liftoff.ledger import ExportRecord, Ledger, current_run_id
from liftoff.redaction import redact
from liftoff.reports import Progress
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import pg_tools, postgres, pg_privileges as privileges, supabase
from liftoff.tasks.cutover.freeze import grants_withheld
from liftoff.tasks.database.common import (
    AUTH_USERS_FILE,
    DUMP_DIR,
    assess_source,
    exported_catalog,
    log,
    pg_tools_for,
    read_shim,
    record_export,
    require_same_export_settings,
    rls_hidden_message,
    role_rows,
)


@dataclass
class ExportPlan:
    tables: list[str]
    source_bytes: int
    tools: str
    command: str
    rules: list[tuple[str, str]]
    decisions: list[dict]  # each object the Supabase choices touched: object, decision, why
    leftovers_policy: str
    roles: list[dict]
    extensions_needed: dict[str, str]
    extensions_unused: list[str]
    owners: list[str] = field(default_factory=list)


@task(name="plan export", cache_policy=NO_CACHE)
def plan_export(rb: Runbook) -> ExportPlan:
    with postgres.session(rb.source, "source") as src:
        info = postgres.server_info(src, rb.source)
        tables = postgres.list_tables(src, rb.database.schemas)
        assessment = assess_source(rb, src, once_per_run=True)  # the preflight's, in a migrate-database run
    tools = pg_tools_for(rb, info.major)
    argv = _pg_dump_argv(rb, tools, rb.state_dir / DUMP_DIR, "<snapshot>")
    return ExportPlan([t.qualified for t in tables], info.database_bytes, f"{tools.bin_dir} ({tools.major})",
                      " ".join(argv), supabase.RULES, assessment.decisions(), rb.database.supabase_leftovers,
                      role_rows(assessment), assessment.extensions_needed, assessment.extensions_unused,
                      assessment.owners)


def _pg_dump_argv(rb: Runbook, tools: pg_tools.PgTools, out: Path, snapshot: str) -> list[str]:
    argv = [tools.pg_dump, "--format=directory", f"--jobs={rb.database.jobs}", f"--file={out}",
            f"--snapshot={snapshot}", f"--compress={rb.database.compression}", "--no-publications",
            "--no-subscriptions", "--quote-all-identifiers"]
    if rb.database.strategy == "stream":
        argv.append("--schema-only")  # the data goes server to server during restore
    argv += [f"--schema={s}" for s in rb.database.schemas]
    return argv


def _archive_reusable(rb: Runbook, ledger: Ledger) -> bool:
    return ledger.is_done("export") and (rb.state_dir / DUMP_DIR / "toc.dat").exists()


def _reuse_archive(rb: Runbook, detail: dict) -> dict:
    require_same_export_settings(rb, exported_catalog(rb).settings)
    log.info("export already done; reusing archive", dump=str(rb.state_dir / DUMP_DIR))
    return {**detail, "skipped": True}


@task(name="dump source", cache_policy=NO_CACHE)
@recorded("export", skip_if=_archive_reusable, on_skip=_reuse_archive)
def dump_source(rb: Runbook) -> dict:
    """pg_dump -Fd -j of the runbook's schemas from one exported snapshot, with per-table row counts taken
    in that snapshot. Skipped when the ledger records a complete archive."""
    ledger = Ledger(rb.state_dir)
    final = rb.state_dir / DUMP_DIR
    partial = rb.state_dir / (DUMP_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    ledger.forget_items("export")
    ledger.forget_export()
    # A new archive comes from a new snapshot: what was restored from the old one is loaded again.
    ledger.forget_steps("restore")
    started = time.monotonic()
    try:
        counts, catalog, info, tools, proc, stderr = _dump_in_snapshot(rb, partial)
    except OSError as exc:  # disk full or unwritable while writing the archive or the auth export
        raise StepFailed(f"export into state_dir {rb.state_dir} failed: {exc.strerror or exc}; free space there "
                         "or choose another state_dir, then re-run (the source was only read)") from None
    if proc.returncode != 0:
        lines = [l for l in stderr.splitlines() if "error" in l.lower()] or stderr.splitlines() or ["no output"]
        raise StepFailed(f"pg_dump from source {rb.source.host}:{rb.source.port} failed: {redact(lines[0])}")
    os.rename(partial, final)
    for name, rows in counts.items():
        ledger.set_table("export", name, "exported", rows)
    size = sum(f.stat().st_size for f in final.iterdir())
    assessment = catalog["assessment"]
    # What restore reads goes to the ledger's typed export tables; the step's detail is for the operator.
    record_export(rb, ExportRecord(
        archive=str(final), archive_bytes=size, source_major=info.major, tools=str(tools.bin_dir),
        strategy=rb.database.strategy, schemas=list(rb.database.schemas),
        supabase_leftovers=rb.database.supabase_leftovers, auth_triggers=rb.database.auth_triggers,
        auth_shim=catalog["shim"] is not None, snapshot_at=catalog["snapshot_at"], flow_run_id=current_run_id()),
        assessment, catalog["grants"], catalog["default_grants"], catalog["shim"], catalog["index_tables"])
    seconds = round(time.monotonic() - started, 2)
    decisions = assessment.decisions()
    detail = {
        "summary": f"{len(counts)} tables, {sum(n or 0 for n in counts.values()):,} rows, archive {size:,} bytes, "
                   f"{len(decisions)} Supabase decisions, {seconds} s",
        "tables": counts, "archive": str(final), "archive_bytes": size, "seconds": seconds,
        "decisions": decisions,
    }
    log.info("export done", tables=len(counts), archive_bytes=size, seconds=seconds)
    return detail


def _dump_in_snapshot(rb: Runbook, partial: Path):
    """Runs pg_dump on an exported snapshot while counting rows (and exporting auth users) in that same
    snapshot; returns the counts, what the source's catalog says in that snapshot (for restore) and how
    pg_dump ended."""
    with postgres.session(rb.source, "source", autocommit=False) as snap:
        snap.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        snap.read_only = True
        info = postgres.server_info(snap, rb.source)
        tools = pg_tools_for(rb, info.major)
        snapshot = snap.execute("SELECT pg_export_snapshot()").fetchone()[0]
        snapshot_at = time.time()
        argv = _pg_dump_argv(rb, tools, partial, snapshot)
        log.info("pg_dump started", tables_schemas=rb.database.schemas, jobs=rb.database.jobs, tools=str(tools.bin_dir))
        env = {**os.environ, **postgres.libpq_env(rb.source, "source")}
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            tables = postgres.list_tables(snap, rb.database.schemas)
            progress = Progress("export: counting rows in the snapshot", len(tables))
            counts = {}
            for t in tables:
                try:
                    counts[t.qualified] = postgres.count_rows(snap, t)
                except psycopg.errors.InsufficientPrivilege:
                    snap.rollback()  # the snapshot is lost with the error; the export stops here anyway
                    policies = postgres.rls_hidden_tables(snap, [t.schema]).get(t.qualified)
                    if policies is None:
                        raise
                    raise StepFailed(rls_hidden_message(rb, t.qualified, policies)) from None
                progress.advance(f"{t.qualified}: {counts[t.qualified]} rows")
            assessment = assess_source(rb, snap)
            shim = read_shim(rb, snap)
            if shim and rb.database.strategy == "dump":  # stream: read with the tables, in their snapshot
                supabase.export_auth_users(snap, shim, rb.state_dir / AUTH_USERS_FILE)
            # Frozen for a cutover, the source lacks the write grants the freeze took: the target gets the
            # source's access as it was before the freeze (the freeze's own record), never the frozen one.
            grants = privileges.read_grants(snap, rb.database.schemas)
            known = set(grants)
            grants += [g for g in privileges.from_freeze_record(grants_withheld(rb)) if g not in known]
            catalog = {"assessment": assessment, "grants": grants,
                       "default_grants": privileges.read_default_grants(snap, rb.database.schemas), "shim": shim,
                       "index_tables": postgres.index_tables(snap, rb.database.schemas), "snapshot_at": snapshot_at}
        finally:
            _, stderr = proc.communicate()
        if proc.returncode == 0:  # name each archive entry from the catalog pg_dump read, in its snapshot
            Ledger(rb.state_dir).record_archive_entries(pg_tools.archive_identities(snap, tools, partial))
        snap.rollback()
    return counts, catalog, info, tools, proc, stderr
