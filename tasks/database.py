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
from typing import Literal

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from liftoff.errors import ConnectionRefused, PreflightFailed, SecretUnavailable, StepFailed, ToolMissing
from liftoff.ledger import Ledger
from liftoff.logs import get_logger
from liftoff.redaction import is_weak_secret, redact
from liftoff.reports import Progress
from liftoff.steps import done as _done, recorded
from runbooks.model import Runbook
from tasks import pg_tools, postgres, privileges, supabase
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
    status: Literal["ok", "warn", "failed"]
    detail: str

    @property
    def ok(self) -> bool:
        """A warning does not stop the run: only a failed check does."""
        return self.status != "failed"


@dataclass
class PreflightReport:
    checks: list[Check] = field(default_factory=list)
    source_major: int | None = None
    target_major: int | None = None
    tools: str | None = None

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, "ok" if ok else "failed", redact(detail)))

    def warn(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "warn", redact(detail)))

    @property
    def failures(self) -> list[str]:
        return [c.detail for c in self.checks if c.status == "failed"]

    @property
    def warnings(self) -> list[str]:
        return [c.detail for c in self.checks if c.status == "warn"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        return (f"{len(self.checks)} checks, {len(self.failures)} failed, {len(self.warnings)} warnings"
                + (f": {'; '.join(self.failures[:3])}" if self.failures else ""))


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
@recorded("preflight", gate="preflight", read_only=True)
def run_preflight(rb: Runbook) -> PreflightReport:
    """Reads both servers and the local disk; writes nothing. Returns every check, passed or not."""
    report = PreflightReport()
    src_info = tgt_info = None
    try:
        with postgres.session(rb.source, "source") as src:
            src_info = postgres.server_info(src, rb.source)
            assessment = assess_source(rb, src)
            hidden = postgres.rls_hidden_tables(src, rb.database.schemas)
        report.source_major = src_info.major
        report.add("source reachable", True, f"source {rb.source.where}: PostgreSQL {src_info.version}")
    except ConnectionRefused as exc:
        report.add("source reachable", False, str(exc))
    try:
        with postgres.session(rb.target.direct, "target.direct") as tgt:
            tgt_info = postgres.server_info(tgt, rb.target.direct)
            tgt_available = postgres.available_extensions(tgt)
            foreign = postgres.list_tables(tgt, rb.database.schemas)
            wanted_roles = [r.name for r in rb.database.app_roles] + [
                p.target for p in (assessment.roles.values() if src_info else []) if p.target]
            roles = postgres.existing_roles(tgt, wanted_roles)
        report.target_major = tgt_info.major
        report.add("target reachable", True, f"target {rb.target.direct.where}: PostgreSQL {tgt_info.version}")
    except ConnectionRefused as exc:
        report.add("target reachable", False, str(exc))

    if src_info and tgt_info:
        ok = tgt_info.major >= src_info.major
        report.add("versions", ok, f"source PostgreSQL {src_info.major} -> target PostgreSQL {tgt_info.major}" + (
            "" if ok else "; a restore into an older major version is not supported: use a target of "
                          f"PostgreSQL {src_info.major} or newer (target.direct)"))
        needed = assessment.extensions_needed
        missing = sorted(set(needed) - tgt_available)
        unused = (f"; installed on the source but used by no migrated object, so not needed: "
                  f"{', '.join(assessment.extensions_unused)}" if assessment.extensions_unused else "")
        report.add("extensions", not missing,
                   (f"target offers every extension the migrated objects use ({', '.join(needed) or 'none'})"
                    + unused) if not missing else
                   f"target {rb.target.direct.host}:{rb.target.direct.port} lacks extensions the migrated objects "
                   f"use: {', '.join(missing)}; install them on the target (e.g. postgresql-contrib-{tgt_info.major})")
        _check_supabase_dependencies(rb, report, assessment, roles)
        ledger_path = rb.state_dir / "ledger.sqlite"
        owned = ledger_path.exists() and Ledger(rb.state_dir).owns_target(tgt_info.identity)
        names = [t.qualified for t in foreign]
        report.add("target is empty or ours", not names or owned,
                   "target holds no tables in the migrated schemas" if not names else
                   f"target holds tables written by this runbook ({len(names)}); the run resumes" if owned else
                   f"target {rb.target.direct.where} already holds data this runbook did not write "
                   f"({', '.join(names[:5])}{'...' if len(names) > 5 else ''}); restore into an empty database")
        created = {name for name, p in assessment.roles.items() if p.decision == "create"}
        absent = sorted({r.name for r in rb.database.app_roles} - roles - created)
        report.add("app roles", not absent, "every app role exists on the target (or database.roles creates it)"
                   if not absent else
                   f"target lacks roles named in database.app_roles: {', '.join(absent)}; create them first")
    if src_info:
        for table, policies in hidden.items():
            report.add("row-level security", False, _rls_hidden_message(rb, table, policies))
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
    check_locales(rb, report)
    check_weak_passwords(rb, report)
    return report


def assess_source(rb: Runbook, conn: psycopg.Connection) -> supabase.Assessment:
    """What the migrated schemas need from Supabase, and the runbook's decision for each (reads only)."""
    return supabase.assess(conn, rb.database.schemas, leftovers=rb.database.supabase_leftovers,
                           auth_triggers=rb.database.auth_triggers, roles=dict(rb.database.roles),
                           source_user=rb.source.user, target_user=rb.target.direct.user)


def _rls_hidden_message(rb: Runbook, table: str, policies: list[str]) -> str:
    shown = ", ".join(policies) or "none, so no row is visible"
    return (f"source table {table} has row-level security (policies: {shown}) and source user '{rb.source.user}' neither owns it nor has BYPASSRLS: its rows cannot all be "
            f"read; connect as the table's owner or a role with BYPASSRLS (source.user), or ALTER ROLE "
            f"{rb.source.user} BYPASSRLS")


def _check_supabase_dependencies(rb: Runbook, report: PreflightReport, a: supabase.Assessment,
                                 target_roles: set[str]) -> None:
    """Roles, and objects that use what Supabase provides: each gets a decision before anything is written."""
    for role, where in sorted(a.unmapped_roles.items()):
        more = f" and {len(where) - 3} more" if len(where) > 3 else ""
        report.add("roles", False,
                   f"role {role} is named by the migrated objects ({'; '.join(where[:3])}{more}) and database.roles "
                   f"has no decision for it: add `{role}: create`, `{role}: drop_references` or "
                   f"`{role}: {{map_to: TARGET_ROLE}}` under database.roles")
    created = {name for name, p in a.roles.items() if p.decision == "create"}
    for role, plan in sorted(a.roles.items()):
        if plan.decision == "map_to" and plan.target not in target_roles and plan.target not in created:
            report.add("roles", False, f"database.roles maps {role} to {plan.target}, which does not exist on target "
                                       f"{rb.target.direct.where}; create it first or map to an existing role")
    if not a.unmapped_roles:
        report.add("roles", True, "; ".join(f"{r} -> {p.target or 'references dropped'}"
                                            f"{' (' + p.decision + ')' if p.decision != 'map_to' else ''}"
                                            for r, p in sorted(a.roles.items())) or "no role named")
    for label, why in sorted(a.needs_decision.items()):
        report.add("needs a decision", False, f"{label}: {why}")
    touched = len(a.left_out) + len(a.kept_with_warning) + len(a.not_migrated)
    report.add("supabase dependencies", True,
               f"{len(a.left_out)} objects left out, {len(a.kept_with_warning)} kept with a warning, "
               f"{len(a.not_migrated)} outside the migrated schemas not migrated, {len(a.auth_triggers)} auth.users "
               f"triggers recreated{' (each listed in the export plan)' if touched else ''}")


def require(report: PreflightReport) -> None:
    if report.failures:
        raise PreflightFailed("\n".join(report.failures))


def check_weak_passwords(rb: Runbook, report: PreflightReport) -> None:
    """A weak password is masked only where it stands as a credential (liftoff/redaction.py): say so."""
    endpoints = [("source", rb.source), ("target.direct", rb.target.direct), ("target.pooled", rb.target.pooled)]
    for field_name, ep in endpoints:
        if ep is None:
            continue
        try:
            weak = is_weak_secret(ep.password.resolve(f"{field_name}.password"))
        except SecretUnavailable:  # reported by the check that needs it; target.pooled is not used here
            continue
        if weak:
            report.warn(f"{field_name}.password",
                        f"{field_name}.password: the password is weak (short or a common word); secrets are only "
                        "masked in credential contexts, change it before the migration")


def check_locales(rb: Runbook, report: PreflightReport) -> None:
    """The restore creates text indexes and compares text with the target database's encoding and locale, not
    the source's: a difference changes the app's ORDER BY results without an error."""
    if report.source_major is None or report.target_major is None:
        return
    try:
        with postgres.session(rb.source, "source") as src:
            source = postgres.database_locale(src)
        with postgres.session(rb.target.direct, "target.direct") as tgt:
            target = postgres.database_locale(tgt)
    except ConnectionRefused as exc:
        report.add("encoding and collation", False, str(exc))
        return
    if source.comparable == target.comparable:
        report.add("encoding and collation", True, f"source and target: {source}")
        return
    changes = ("ORDER BY on text, text comparisons and text indexes (rebuilt by the restore) follow the target's "
               "rules")
    if source.encoding != target.encoding:
        changes += f"; encoding {target.encoding} may refuse characters the source holds"
    detail = (f"source {rb.source.where} has {source}; target {rb.target.direct.where} has {target}: {changes}; "
              "to keep the source's behaviour create the target database (target.direct.database) with "
              f"{_create_database_like(source)} (database.collation_mismatch: {rb.database.collation_mismatch})")
    if rb.database.collation_mismatch == "fail":
        report.add("encoding and collation", False, detail)
    else:
        report.warn("encoding and collation", detail)


def _create_database_like(loc: postgres.DatabaseLocale) -> str:
    def quoted(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    clause = (f"LOCALE {quoted(loc.collate)}" if loc.collate == loc.ctype else
              f"LC_COLLATE {quoted(loc.collate)} LC_CTYPE {quoted(loc.ctype)}")
    if loc.provider == "icu":
        clause += f" LOCALE_PROVIDER icu ICU_LOCALE {quoted(loc.locale or '')}"
    elif loc.provider == "builtin":
        clause += f" LOCALE_PROVIDER builtin BUILTIN_LOCALE {quoted(loc.locale or '')}"
    return f"TEMPLATE template0 ENCODING {quoted(loc.encoding)} {clause}"


# ---------------------------------------------------------------------------------------------------
# Export


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
        assessment = assess_source(rb, src)
    tools = _tools(rb, info.major)
    argv = _pg_dump_argv(rb, tools, rb.state_dir / DUMP_DIR, "<snapshot>")
    return ExportPlan([t.qualified for t in tables], info.database_bytes, f"{tools.bin_dir} ({tools.major})",
                      " ".join(argv), supabase.RULES, assessment.decisions(), rb.database.supabase_leftovers,
                      _role_rows(assessment), assessment.extensions_needed, assessment.extensions_unused,
                      assessment.owners)


def _role_rows(a: supabase.Assessment) -> list[dict]:
    rows = [{"source role": name, "on the target": p.target or "(references dropped)",
             "decision": p.decision + (" (default)" if p.default else ""),
             "named by": "; ".join(p.uses[:3]) + (f" and {len(p.uses) - 3} more" if len(p.uses) > 3 else "")}
            for name, p in sorted(a.roles.items())]
    rows += [{"source role": name, "on the target": "?", "decision": "NONE: add it to database.roles",
              "named by": "; ".join(uses[:3])} for name, uses in sorted(a.unmapped_roles.items())]
    return rows


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
    _require_same_export_settings(rb, detail)
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
    # A new archive comes from a new snapshot: what was restored from the old one is loaded again.
    ledger.forget_steps("restore")
    started = time.monotonic()
    try:
        counts, assessment, facts, info, tools, proc, stderr = _dump_in_snapshot(rb, partial)
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
    detail = {
        "tables": counts, "archive": str(final), "archive_bytes": size, "seconds": round(time.monotonic() - started, 2),
        "source_major": info.major, "tools": str(tools.bin_dir), **facts,
        **_export_settings(rb),
        "decisions": assessment.decisions(),
    }
    log.info("export done", tables=len(counts), archive_bytes=size, seconds=detail["seconds"])
    return detail


def _export_settings(rb: Runbook) -> dict:
    """The runbook's choices an archive and the decisions recorded with it were made for."""
    return {"schemas": rb.database.schemas, "strategy": rb.database.strategy,
            "supabase_leftovers": rb.database.supabase_leftovers, "auth_triggers": rb.database.auth_triggers,
            "roles": {k: v if isinstance(v, str) else v.model_dump() for k, v in sorted(rb.database.roles.items())}}


def _require_same_export_settings(rb: Runbook, detail: dict) -> None:
    """An archive is reused only for the schemas, strategy and Supabase decisions it was made with."""
    wanted = _export_settings(rb)
    made = {k: detail.get(k, v) for k, v in wanted.items()}
    changed = [k for k in wanted if made[k] != wanted[k]]
    if changed:
        raise StepFailed(
            f"the export in {rb.state_dir} (state_dir) was made with "
            + ", ".join(f"database.{k} {made[k]}" for k in changed) + "; the runbook now says "
            + ", ".join(f"{wanted[k]}" for k in changed)
            + "; restore the runbook's values, or delete the export (state_dir/dump) to export again, or use a new "
              "state_dir and an empty target")


def _read_shim(rb: Runbook, conn: psycopg.Connection) -> supabase.AuthShim | None:
    if rb.database.supabase_leftovers != "shim":
        return None
    if conn.execute("SELECT to_regclass('auth.users')").fetchone()[0] is None:
        return None  # not a Supabase database: nothing to shim
    return supabase.read_auth_shim(conn)


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
                try:
                    counts[t.qualified] = postgres.count_rows(snap, t)
                except psycopg.errors.InsufficientPrivilege:
                    snap.rollback()  # the snapshot is lost with the error; the export stops here anyway
                    policies = postgres.rls_hidden_tables(snap, [t.schema]).get(t.qualified)
                    if policies is None:
                        raise
                    raise StepFailed(_rls_hidden_message(rb, t.qualified, policies)) from None
                progress.advance(f"{t.qualified}: {counts[t.qualified]} rows")
            assessment = assess_source(rb, snap)
            shim = _read_shim(rb, snap)
            if shim and rb.database.strategy == "dump":  # stream: read with the tables, in their snapshot
                supabase.export_auth_users(snap, shim, rb.state_dir / AUTH_USERS_FILE)
            facts = {"extensions": assessment.extensions_needed,
                     "index_tables": postgres.index_tables(snap, rb.database.schemas),
                     "catalog": {
                         "assessment": assessment.to_json(),
                         "grants": [list(vars(g).values()) for g in privileges.read_grants(snap, rb.database.schemas)],
                         "default_grants": [list(vars(g).values())
                                            for g in privileges.read_default_grants(snap, rb.database.schemas)],
                         "auth_shim": vars(shim) if shim else None}}
            leftovers = assessment
        finally:
            _, stderr = proc.communicate()
        if proc.returncode == 0:  # name each archive entry from the catalog pg_dump read, in its snapshot
            Ledger(rb.state_dir).record_archive_entries(pg_tools.archive_identities(snap, tools, partial))
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
    decisions: list[dict] = field(default_factory=list)  # each object the Supabase choices touched
    roles: list[dict] = field(default_factory=list)

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
    catalog = _catalog(detail)
    identities = {k: pg_tools.Identity(*v) for k, v in Ledger(rb.state_dir).archive_entries().items()}
    keep, left_out = [], []
    for entry in pg_tools.read_toc(tools, rb.state_dir / DUMP_DIR, identities or None):
        ok, why = supabase.keep_entry(entry, rb.database.schemas, catalog.assessment)
        (keep.append(entry) if ok else left_out.append((f"{entry.desc} {entry.schema}.{entry.name or entry.tag}", why)))
    kind = "TABLE DATA" if rb.database.strategy == "dump" else "TABLE"
    tables = {f"{e.schema}.{e.name or e.tag}": e for e in keep if e.desc == kind and e.schema in rb.database.schemas}
    shims = catalog.shim.objects if catalog.shim else []
    return RestorePlan(keep, left_out, tables, rb.database.supabase_leftovers, shims, detail["extensions"],
                       catalog.assessment.decisions(), _role_rows(catalog.assessment))


@dataclass
class ExportedCatalog:
    """What the export read from the source's catalog, in its snapshot, for the restore to apply."""

    assessment: supabase.Assessment
    grants: list[privileges.Grant]
    default_grants: list[privileges.DefaultGrant]
    shim: supabase.AuthShim | None


def _catalog(detail: dict) -> ExportedCatalog:
    if "catalog" not in detail:
        raise StepFailed("the export in state_dir was made by an older Liftoff that did not record the source's "
                         "roles and grants; delete state_dir/dump and export again")
    c = detail["catalog"]
    return ExportedCatalog(supabase.Assessment.from_json(c["assessment"]),
                           [privileges.Grant(*g) for g in c["grants"]],
                           [privileges.DefaultGrant(*g) for g in c["default_grants"]],
                           supabase.AuthShim(**c["auth_shim"]) if c.get("auth_shim") else None)


def _target_identity(rb: Runbook) -> str:
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        return postgres.server_info(tgt, rb.target.direct).identity


@task(name="prepare target", cache_policy=NO_CACHE)
@recorded("restore.prepare")
def prepare_target(rb: Runbook, plan: RestorePlan) -> dict:
    """Claims the target in the ledger; creates the roles database.roles creates, the extensions the
    migrated objects use and (policy shim) the auth shim, with the export's users (strategy dump; stream
    loads them with the tables, from the same snapshot)."""
    ledger = Ledger(rb.state_dir)
    ledger.claim_target(_target_identity(rb))
    catalog = _catalog(export_detail(rb))
    done = {"roles": [], "extensions": [], "shim_users_loaded": 0}
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        try:
            done["roles"] = supabase.create_roles(tgt, catalog.assessment.roles)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StepFailed(f"target {rb.target.direct.where}: cannot create the roles database.roles creates "
                             f"({redact(str(exc)).strip().splitlines()[0]}); create them as a superuser or "
                             "connect target.direct as one") from None
        for name, schema in sorted(plan.extensions.items()):
            postgres.execute(tgt, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)),
                             what=f"create schema {schema}")
            postgres.execute(tgt, sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}").format(
                sql.Identifier(name), sql.Identifier(schema)), what=f"create extension {name} on target")
            done["extensions"].append(name)
        if catalog.shim:
            supabase.create_auth_shim(tgt, catalog.shim)
            if rb.database.strategy == "dump" and not ledger.is_done("restore.data"):
                done["shim_users_loaded"] = supabase.load_auth_users(
                    tgt, catalog.shim, supabase.file_blocks(rb.state_dir / AUTH_USERS_FILE))
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
@recorded("restore.pre-data", skip_if=_done)
def restore_pre_data(rb: Runbook, plan: RestorePlan) -> dict:
    """Types, tables, functions, views: in one transaction, so a crash leaves nothing half-made."""
    ledger = Ledger(rb.state_dir)
    tools = _tools(rb, export_detail(rb)["source_major"])
    # Every non-data entry: pg_restore's --section picks by the archive's own section of each entry (a
    # COMMENT belongs to the section of what it comments on).
    entries = [e for e in plan.keep if e.section != "data"]
    # Pre-data commits whole or not at all: finding its objects on the target means a previous run
    # committed it and died before the ledger heard of it.
    created = [e for e in entries if e.section == "pre-data" and e.identity and e.identity.kind in _PRE_DATA_KINDS]
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        existing_schemas = {r[0] for r in tgt.execute("SELECT nspname FROM pg_namespace")}
        there = [e for e in created if _already_there(tgt, e)]
    if there and len(there) == len(created):
        return {"recovered": True}
    if there:
        missing = next(e for e in created if e not in there)
        raise StepFailed(
            f"target {rb.target.direct.where} holds {len(there)} of the {len(created)} objects the archive's "
            f"pre-data creates ({_entry_label(there[0])} is there, {_entry_label(missing)} is not); pre-data is "
            "restored in one transaction, so these were not written by this runbook's restore: restore into an "
            "empty database (target.direct.database)")
    entries = [e for e in entries if not (e.desc == "SCHEMA" and (e.name or e.tag) in existing_schemas)]
    _pg_restore(rb, tools, entries, f"restore pre-data into target {rb.target.direct.host}:{rb.target.direct.port}",
                "--section=pre-data", "--single-transaction")
    return {"entries": len(entries)}


def _data_loaded_before(rb: Runbook, detail: dict) -> dict:
    # Never again: after cutover, setting the sequences back to the source's values would reuse ids.
    return {"loaded": [], "already_loaded": len(detail.get("loaded", [])) + detail.get("already_loaded", 0),
            "skipped": True}


@task(name="restore table data", cache_policy=NO_CACHE)
@recorded("restore.data", skip_if=_done, on_skip=_data_loaded_before)
def restore_data(rb: Runbook, plan: RestorePlan) -> dict:
    """Loads each table not yet loaded, ``jobs`` at a time, each in one target transaction that starts with
    TRUNCATE, then the ledger marks it loaded: a table interrupted mid-load is reloaded whole. Strategy
    ``dump`` loads from the archive (pg_restore); ``stream`` copies from the source (COPY to COPY, all
    tables from one snapshot) and then sets the sequences from that snapshot."""
    ledger = Ledger(rb.state_dir)
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
    # Indexes and constraints of a table are built as soon as its data is in, while other tables load (as
    # pgcopydb does); foreign keys, triggers and policies wait for the post-data step.
    _drop_before_reload(rb, plan, todo)
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        own_post_data = _post_data_by_table(plan, export_detail(rb).get("index_tables", {}), tgt)

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
                shim = _catalog(export_detail(rb)).shim
                if shim:  # the users the loaded rows reference, from the same snapshot
                    with postgres.session(rb.source, "source", autocommit=False) as src, \
                            postgres.session(rb.target.direct, "target.direct") as tgt:
                        postgres.join_snapshot(src, snapshot_id)
                        users = supabase.stream_auth_users(src, tgt, shim)
                    log.info("auth users loaded into the shim", rows=users)
                with postgres.session(rb.target.direct, "target.direct") as tgt:
                    set_sequences = postgres.copy_sequence_values(snap, tgt, rb.database.schemas)
        for future in pending:
            future.result()
    return {"loaded": todo, "already_loaded": len(entries) - len(todo), "sequences": set_sequences}


def _run_all(pool: ThreadPoolExecutor, fn, items: list) -> None:
    """Runs fn on every item in the pool, each in a copy of the caller's context (run id, Prefect run
    context), and raises the first error."""
    for future in [pool.submit(contextvars.copy_context().run, fn, item) for item in items]:
        future.result()


def _entry_label(e: pg_tools.TocEntry) -> str:
    i = e.identity
    if i is None:
        return f"{e.desc.lower()} {e.schema}.{e.tag}"
    where = ".".join(p for p in (i.schema, i.table) if p is not None)
    args = f"({i.arguments})" if i.arguments is not None else ""
    return f"{i.kind} {where + '.' if where else ''}{i.name}{args}"


def _post_data_by_table(plan: RestorePlan, index_tables: dict[str, str],
                        tgt: psycopg.Connection) -> dict[str, list[pg_tools.TocEntry]]:
    """Indexes and (primary key, unique, check, exclusion) constraints of each table, from the archive,
    that the target does not hold yet. ``index_tables`` names an index's table for an archive exported
    before entries carried their identity."""
    by_table: dict[str, list[pg_tools.TocEntry]] = {}
    for e in plan.section("post-data"):
        if e.desc not in ("INDEX", "CONSTRAINT"):
            continue
        table = f"{e.identity.schema}.{e.table}" if e.table is not None else index_tables.get(f"{e.schema}.{e.tag}")
        if table and not _already_there(tgt, e):
            by_table.setdefault(table, []).append(e)
    return by_table


def _drop_before_reload(rb: Runbook, plan: RestorePlan, tables: list[str]) -> dict[str, list[str]]:
    """A new export reloads every table, also on a target a previous restore filled: its foreign keys make
    TRUNCATE fail and its triggers would fire during the load (an audit trigger adds rows). Drops the
    foreign keys that reference or belong to ``tables`` and the user triggers on them, those the archive's
    post-data creates: that step runs again after a new export and recreates whatever is missing."""
    recreated = {(e.identity.kind, e.identity.schema, e.identity.table, e.identity.name)
                 for e in plan.section("post-data") if e.identity and e.identity.kind in ("constraint", "trigger")}
    dropped: dict[str, list[str]] = {"foreign keys": [], "triggers": []}
    if not tables or not recreated or Ledger(rb.state_dir).is_done("restore.post-data"):
        return dropped
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        fks = tgt.execute(
            """SELECT n.nspname, t.relname, k.conname FROM pg_constraint k
               JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
               JOIN pg_class r ON r.oid = k.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
               WHERE k.contype = 'f' AND (n.nspname || '.' || t.relname = ANY(%(t)s)
                                          OR rn.nspname || '.' || r.relname = ANY(%(t)s))
               ORDER BY 1, 2, 3""", {"t": tables}).fetchall()
        triggers = tgt.execute(
            """SELECT n.nspname, t.relname, g.tgname FROM pg_trigger g
               JOIN pg_class t ON t.oid = g.tgrelid JOIN pg_namespace n ON n.oid = t.relnamespace
               WHERE NOT g.tgisinternal AND n.nspname || '.' || t.relname = ANY(%(t)s) ORDER BY 1, 2, 3""",
            {"t": tables}).fetchall()
        for schema, table, name in fks:
            if ("constraint", schema, table, name) in recreated:
                postgres.execute(tgt, sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                    sql.Identifier(schema, table), sql.Identifier(name)), what=f"drop foreign key {name} on target")
                dropped["foreign keys"].append(f"{schema}.{table}.{name}")
        for schema, table, name in triggers:
            if ("trigger", schema, table, name) in recreated:
                postgres.execute(tgt, sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(name), sql.Identifier(schema, table)), what=f"drop trigger {name} on target")
                dropped["triggers"].append(f"{schema}.{table}.{name}")
    if dropped["foreign keys"] or dropped["triggers"]:
        log.info("dropped before reloading tables a previous restore filled; post-data recreates them",
                 foreign_keys=dropped["foreign keys"], triggers=dropped["triggers"])
    return dropped


def _analyze(rb: Runbook, name: str) -> None:
    schema, table = name.split(".", 1)
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        postgres.execute(tgt, sql.SQL("ANALYZE {}").format(sql.Identifier(schema, table)), what=f"analyze {name}")


def _relation_exists(relkinds: str) -> str:
    return ("SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE c.relkind = ANY('{{{relkinds}}}') AND n.nspname = %(schema)s AND c.relname = %(name)s")


def _on_table_exists(catalog: str, table_col: str, name_col: str) -> str:
    return (f"SELECT 1 FROM {catalog} x JOIN pg_class t ON t.oid = x.{table_col} "
            "JOIN pg_namespace n ON n.oid = t.relnamespace "
            f"WHERE n.nspname = %(schema)s AND t.relname = %(table)s AND x.{name_col} = %(name)s")


# Whether the object an archive entry creates is on the target, by its identity (pg_tools.Identity).
_EXISTS = {
    "table": _relation_exists("r,p"),
    "view": _relation_exists("v"),
    "materialized view": _relation_exists("m"),
    "sequence": _relation_exists("S"),
    "foreign table": _relation_exists("f"),
    "index": _relation_exists("i,I"),
    "constraint": _on_table_exists("pg_constraint", "conrelid", "conname"),
    "trigger": _on_table_exists("pg_trigger", "tgrelid", "tgname"),
    "policy": _on_table_exists("pg_policy", "polrelid", "polname"),
    "rule": _on_table_exists("pg_rewrite", "ev_class", "rulename"),
    "domain constraint": "SELECT 1 FROM pg_constraint k JOIN pg_type d ON d.oid = k.contypid "
                         "JOIN pg_namespace n ON n.oid = d.typnamespace "
                         "WHERE n.nspname = %(schema)s AND d.typname = %(table)s AND k.conname = %(name)s",
    "statistics": "SELECT 1 FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace "
                  "WHERE n.nspname = %(schema)s AND s.stxname = %(name)s",
    "type": "SELECT 1 FROM pg_type y JOIN pg_namespace n ON n.oid = y.typnamespace "
            "WHERE n.nspname = %(schema)s AND y.typname = %(name)s",
    "function": "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(schema)s "
                "AND p.proname = %(name)s AND pg_get_function_identity_arguments(p.oid) = %(arguments)s",
}
_EXISTS["domain"] = _EXISTS["type"]
_EXISTS["procedure"] = _EXISTS["aggregate"] = _EXISTS["function"]
# Objects pre-data creates (schemas aside: they may exist before any restore).
_PRE_DATA_KINDS = {"table", "view", "materialized view", "sequence", "foreign table", "type", "domain", "function",
                   "procedure", "aggregate"}


def _already_there(tgt: psycopg.Connection, e: pg_tools.TocEntry) -> bool:
    """Whether the target holds the exact object the entry creates (by schema, table and name from the
    source catalog: spaces, quotes, unicode and case are just characters here)."""
    i = e.identity
    q = _EXISTS.get(i.kind) if i else None
    if q is None or (i.kind in ("function", "procedure", "aggregate") and i.arguments is None):
        return False
    return tgt.execute(q, i._asdict()).fetchone() is not None


@task(name="restore indexes and constraints (post-data)", cache_policy=NO_CACHE)
@recorded("restore.post-data", skip_if=_done)
def restore_post_data(rb: Runbook, plan: RestorePlan) -> dict:
    """Foreign keys, triggers, policies and whatever index or constraint is not there yet, with ``jobs``
    parallel builds; entries already present on the target (built during the data step, or by a run that
    died midway) are not built again."""
    tools = _tools(rb, export_detail(rb)["source_major"])
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        entries = [e for e in plan.keep if e.section != "data" and not _already_there(tgt, e)]
    if any(e.section == "post-data" for e in entries):
        _pg_restore(rb, tools, entries, f"restore post-data into target {rb.target.direct.host}:{rb.target.direct.port}",
                    "--section=post-data", f"--jobs={rb.database.jobs}")
    catalog = _catalog(export_detail(rb))
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        refreshed = postgres.refresh_unpopulated_matviews(tgt, rb.database.schemas)
        policies = supabase.create_rewritten_policies(tgt, catalog.assessment.policies_rewritten)
        triggers = supabase.recreate_auth_triggers(tgt, catalog.assessment.auth_triggers) if catalog.shim else []
    done = {"entries": len(entries), "refreshed": refreshed, "policies_with_mapped_roles": policies,
            "auth_triggers": triggers}
    return done


@task(name="restore grants", cache_policy=NO_CACHE)
@recorded("restore.grants")
def restore_grants(rb: Runbook) -> list[str]:
    """Gives every mapped role exactly the source's privileges on the migrated objects (GRANT and REVOKE,
    default privileges, and on the auth shim), then adds the runbook's app_roles grants as reported extras
    that never widen what a source role was allowed unless the runbook says so. Idempotent."""
    catalog = _catalog(export_detail(rb))
    role_map, owner, schemas = catalog.assessment.role_map, rb.target.direct.user, rb.database.schemas
    done = []
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        statements = privileges.plan_grants(catalog.grants, privileges.read_grants(tgt, schemas),
                                            privileges.grantable_objects(tgt, schemas), role_map, owner=owner)
        statements += privileges.plan_default_grants(catalog.default_grants, privileges.read_default_grants(tgt, schemas),
                                                     role_map, owner)
        for statement in statements:
            postgres.execute(tgt, statement, what="restore the source's grants on target")
        done.append(f"source grants: {len(statements)} GRANT/REVOKE statements for "
                    f"{', '.join(sorted({r for r in role_map.values() if r and r != owner})) or 'no role'} and PUBLIC")
        if catalog.shim:
            n = supabase.grant_auth_shim(tgt, catalog.shim, role_map, owner)
            done.append(f"auth shim grants: {n} statements")
        source_roles = {r for r in role_map.values() if r}
        for role in rb.database.app_roles:
            if role.name in source_roles and not role.widen:
                done.append(f"{role.name}: the source's grants only (a source role; database.app_roles "
                            f"widen: true adds {role.privileges} on top)")
                continue
            r = sql.Identifier(role.name)
            table_privs = "SELECT, INSERT, UPDATE, DELETE" if role.privileges == "read_write" else "SELECT"
            seq_privs = "USAGE, SELECT, UPDATE" if role.privileges == "read_write" else "USAGE, SELECT"
            for schema in schemas:
                s = sql.Identifier(schema)
                for stmt in (
                    sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT " + table_privs + " ON ALL TABLES IN SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT " + seq_privs + " ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {} TO {}").format(s, r),
                    sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT " + table_privs + " ON TABLES TO {}").format(s, r),
                ):
                    postgres.execute(tgt, stmt, what=f"grant to {role.name}")
            done.append(f"extra: {role.name} gets {role.privileges} on {', '.join(schemas)} (database.app_roles"
                        f"{'; widens a source role' if role.name in source_roles else ''})")
    return done


# ---------------------------------------------------------------------------------------------------
# Verify


@task(name="verify database (gate)", cache_policy=NO_CACHE)
@recorded("verify", gate="database")
def run_gate(rb: Runbook) -> DatabaseReport:
    with postgres.session(rb.source, "source") as src:
        tables = postgres.list_tables(src, rb.database.schemas)
        # The decisions the restore applied, as the export recorded them; read afresh when the gate runs
        # alone against a target this state_dir did not restore.
        assessment = _catalog(export_detail(rb)).assessment if export_done(rb) else assess_source(rb, src)
        if _read_shim(rb, src):  # the shim's copy of the users is compared like a migrated table
            tables += [t for t in postgres.list_tables(src, ["auth"]) if t.name == "users"]
    left_out = assessment.gate_left_out()
    progress = Progress("verify: comparing tables", len(tables))
    report = compare_databases(
        lambda: postgres.connect(rb.source, "source"),
        lambda: postgres.connect(rb.target.direct, "target.direct"),
        tables, rb.database.schemas, left_out=left_out, roles=assessment.role_map,
        ignored_extensions=supabase.MANAGED_EXTENSIONS | set(assessment.extensions_unused),
        jobs=rb.database.jobs, on_table_done=lambda c: progress.advance(f"{c.table}: {c.status}"),
        outside_triggers=[("auth", "users", t.name) for t in assessment.auth_triggers],
    )
    return report


def report_rows(report: DatabaseReport, exported: dict[str, int] | None = None) -> list[dict]:
    exported = exported or {}
    return [
        {"table": t.table, "exported rows": exported.get(t.table, ""), "source rows": t.source_rows,
         "target rows": t.target_rows, "source checksum": t.source_checksum[:12],
         "target checksum": t.target_checksum[:12], "status": t.status}
        for t in report.tables
    ]

