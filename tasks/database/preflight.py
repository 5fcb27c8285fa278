"""Preflight's tasks (the runbook's `source`, `target` and `database` sections): read both servers and the local
disk, write nothing, and say what stops the migration before anything is written."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.checks import GateReport
from liftoff.errors import ConnectionRefused, PreflightFailed, SecretUnavailable, ToolMissing
from liftoff.ledger import Ledger
from liftoff.redaction import is_weak_secret, redact
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import postgres, supabase
from liftoff.tasks.database.common import assess_source, pg_tools_for, rls_hidden_message


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
class PreflightReport(GateReport):
    checks: list[Check] = field(default_factory=list)
    source_major: int | None = None
    target_major: int | None = None
    tools: str | None = None

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, "ok" if ok else "failed", redact(detail)))

    def warn(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "warn", redact(detail)))

    def failures(self) -> list[str]:
        return [c.detail for c in self.checks if c.status == "failed"]

    @property
    def warnings(self) -> list[str]:
        return [c.detail for c in self.checks if c.status == "warn"]

    def summary(self) -> str:
        failures = self.failures()
        return (f"{len(self.checks)} checks, {len(failures)} failed, {len(self.warnings)} warnings"
                + (f": {'; '.join(failures[:3])}" if failures else ""))

    def error(self, gate: str) -> PreflightFailed:
        """A failed preflight is the operator's to fix before anything starts (exit 2), not a difference."""
        return PreflightFailed("\n".join(self.failures()))


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


def publish_preflight(report: PreflightReport, rb: Runbook) -> None:
    shown = {"ok": "ok", "warn": "WARN", "failed": "FAILED"}
    rows = [{"check": c.name, "status": shown[c.status], "detail": c.detail} for c in report.checks]
    publish_table("preflight-checks", rows, "Preflight: every check, passed, warned or failed")
    verdict = "passed" if not report.failures() else f"FAILED ({len(report.failures())} checks)"
    if report.warnings:
        verdict += f" with {len(report.warnings)} warning{'s' if len(report.warnings) > 1 else ''}"
    publish_markdown("preflight-summary", f"# Preflight {verdict}\n\n" + markdown_table(rows))


@task(name="preflight checks", cache_policy=NO_CACHE)
@recorded("preflight", gate="preflight", publish=publish_preflight, read_only=True)
def run_preflight(rb: Runbook) -> PreflightReport:
    """Reads both servers and the local disk; writes nothing. Returns every check, passed or not."""
    report = PreflightReport()
    src_info = tgt_info = None
    try:
        with postgres.session(rb.source, "source") as src:
            src_info = postgres.server_info(src, rb.source)
            assessment = assess_source(rb, src, once_per_run=True)
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
            report.add("row-level security", False, rls_hidden_message(rb, table, policies))
    if src_info:
        try:
            tools = pg_tools_for(rb, src_info.major)
            report.tools = f"{tools.bin_dir} (PostgreSQL {tools.major})"
            if rb.database.strategy == "stream" and not os.access(tools.psql, os.X_OK):
                # the stream strategy reads each table with psql (pg_tools.CopyOut)
                report.add("pg_dump/pg_restore", False,
                           f"{tools.psql} is missing: database.strategy stream reads the source with psql; "
                           f"install postgresql-client-{tools.major}")
            else:
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
