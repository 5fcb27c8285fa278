"""What the database phase's steps share: the export's record in the ledger (what restore and the gate
need from it), the runbook's Supabase decisions, and the pg_dump/pg_restore pair to use."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from liftoff.errors import StepFailed
from liftoff.ledger import Ledger
from liftoff.logs import get_logger
from runbooks.model import Runbook
from tasks import pg_tools, privileges, supabase

DUMP_DIR = "dump"
AUTH_USERS_FILE = "auth_users.copy"
log = get_logger(phase="database")


def pg_tools_for(rb: Runbook, min_major: int) -> pg_tools.PgTools:
    return pg_tools.find_pg_tools(min_major, rb.database.pg_bin_dirs)


def assess_source(rb: Runbook, conn: psycopg.Connection) -> supabase.Assessment:
    """What the migrated schemas need from Supabase, and the runbook's decision for each (reads only)."""
    return supabase.assess(conn, rb.database.schemas, leftovers=rb.database.supabase_leftovers,
                           auth_triggers=rb.database.auth_triggers, roles=dict(rb.database.roles),
                           source_user=rb.source.user, target_user=rb.target.direct.user)


def rls_hidden_message(rb: Runbook, table: str, policies: list[str]) -> str:
    shown = ", ".join(policies) or "none, so no row is visible"
    return (f"source table {table} has row-level security (policies: {shown}) and source user '{rb.source.user}' neither owns it nor has BYPASSRLS: its rows cannot all be "
            f"read; connect as the table's owner or a role with BYPASSRLS (source.user), or ALTER ROLE "
            f"{rb.source.user} BYPASSRLS")


def role_rows(a: supabase.Assessment) -> list[dict]:
    rows = [{"source role": name, "on the target": p.target or "(references dropped)",
             "decision": p.decision + (" (default)" if p.default else ""),
             "named by": "; ".join(p.uses[:3]) + (f" and {len(p.uses) - 3} more" if len(p.uses) > 3 else "")}
            for name, p in sorted(a.roles.items())]
    rows += [{"source role": name, "on the target": "?", "decision": "NONE: add it to database.roles",
              "named by": "; ".join(uses[:3])} for name, uses in sorted(a.unmapped_roles.items())]
    return rows


def export_settings(rb: Runbook) -> dict:
    """The runbook's choices an archive and the decisions recorded with it were made for."""
    return {"schemas": rb.database.schemas, "strategy": rb.database.strategy,
            "supabase_leftovers": rb.database.supabase_leftovers, "auth_triggers": rb.database.auth_triggers,
            "roles": {k: v if isinstance(v, str) else v.model_dump() for k, v in sorted(rb.database.roles.items())}}


def require_same_export_settings(rb: Runbook, detail: dict) -> None:
    """An archive is reused only for the schemas, strategy and Supabase decisions it was made with."""
    wanted = export_settings(rb)
    made = {k: detail.get(k, v) for k, v in wanted.items()}
    changed = [k for k in wanted if made[k] != wanted[k]]
    if changed:
        raise StepFailed(
            f"the export in {rb.state_dir} (state_dir) was made with "
            + ", ".join(f"database.{k} {made[k]}" for k in changed) + "; the runbook now says "
            + ", ".join(f"{wanted[k]}" for k in changed)
            + "; restore the runbook's values, or delete the export (state_dir/dump) to export again, or use a new "
              "state_dir and an empty target")


def read_shim(rb: Runbook, conn: psycopg.Connection) -> supabase.AuthShim | None:
    if rb.database.supabase_leftovers != "shim":
        return None
    if conn.execute("SELECT to_regclass('auth.users')").fetchone()[0] is None:
        return None  # not a Supabase database: nothing to shim
    return supabase.read_auth_shim(conn)


def export_done(rb: Runbook) -> bool:
    return (rb.state_dir / "ledger.sqlite").exists() and Ledger(rb.state_dir).is_done("export")


def export_detail(rb: Runbook) -> dict:
    ledger_file = rb.state_dir / "ledger.sqlite"
    if not ledger_file.exists() or not Ledger(rb.state_dir).is_done("export"):
        raise StepFailed(f"no complete export in {rb.state_dir} (state_dir); run the export flow first")
    return Ledger(rb.state_dir).step_detail("export")


@dataclass
class ExportedCatalog:
    """What the export read from the source's catalog, in its snapshot, for the restore to apply."""

    assessment: supabase.Assessment
    grants: list[privileges.Grant]
    default_grants: list[privileges.DefaultGrant]
    shim: supabase.AuthShim | None


def exported_catalog(detail: dict) -> ExportedCatalog:
    if "catalog" not in detail:
        raise StepFailed("the export in state_dir was made by an older Liftoff that did not record the source's "
                         "roles and grants; delete state_dir/dump and export again")
    c = detail["catalog"]
    return ExportedCatalog(supabase.Assessment.from_json(c["assessment"]),
                           [privileges.Grant(*g) for g in c["grants"]],
                           [privileges.DefaultGrant(*g) for g in c["default_grants"]],
                           supabase.AuthShim(**c["auth_shim"]) if c.get("auth_shim") else None)
