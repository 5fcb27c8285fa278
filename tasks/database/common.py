"""What the database phase's steps share: the export's record in the ledger (what restore and the gate
need from it), the runbook's Supabase decisions, and the pg_dump/pg_restore pair to use."""

from __future__ import annotations

import json
from dataclasses import dataclass

import psycopg

from liftoff.errors import StepFailed
from liftoff.ledger import ExportFacts, ExportRecord, Ledger, current_run_id
from liftoff.logs import get_logger
from liftoff.runbooks.model import Runbook
from liftoff.systems import pg_tools, pg_privileges as privileges, supabase

DUMP_DIR = "dump"
AUTH_USERS_FILE = "auth_users.copy"
log = get_logger(phase="database")


def pg_tools_for(rb: Runbook, min_major: int) -> pg_tools.PgTools:
    return pg_tools.find_pg_tools(min_major, rb.database.pg_bin_dirs)


def assess_source(rb: Runbook, conn: psycopg.Connection, *, once_per_run: bool = False) -> supabase.Assessment:
    """What the migrated schemas need from Supabase, and the runbook's decision for each (reads only).

    ``once_per_run``: the preflight and the export's plan of one flow run (``migrate-database`` runs both
    in its own run) share one read of the source's catalog; each run alone reads its own. The export's
    snapshot reads it again regardless: what it records, and the restore applies, is the snapshot's."""
    key = (current_run_id(), rb.source.where, json.dumps(export_settings(rb), sort_keys=True)) if once_per_run else None
    if key is not None and key[0] is not None and key in _ASSESSED:
        return _ASSESSED[key]
    assessment = supabase.assess(conn, rb.database.schemas, leftovers=rb.database.supabase_leftovers,
                                 auth_triggers=rb.database.auth_triggers, roles=dict(rb.database.roles),
                                 source_user=rb.source.user, target_user=rb.target.direct.user)
    if key is not None and key[0] is not None:
        _ASSESSED.clear()  # one run's at a time
        _ASSESSED[key] = assessment
    return assessment


_ASSESSED: dict[tuple, supabase.Assessment] = {}


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


def require_same_export_settings(rb: Runbook, made: dict) -> None:
    """An archive is reused only for the schemas, strategy and Supabase decisions it was made with
    (``made``: ``ExportedCatalog.settings``)."""
    wanted = export_settings(rb)
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


@dataclass
class ExportedCatalog:
    """What the export read from the source's catalog, in its snapshot, for the restore to apply; from the
    ledger's typed export tables."""

    export: ExportRecord
    settings: dict  # the runbook's choices the export was made with, as export_settings shapes them
    assessment: supabase.Assessment
    grants: list[privileges.Grant]
    default_grants: list[privileges.DefaultGrant]
    shim: supabase.AuthShim | None
    index_tables: dict[str, str]  # "schema.index" -> "schema.table"


def record_export(rb: Runbook, export: ExportRecord, assessment: supabase.Assessment,
                  grants: list[privileges.Grant], default_grants: list[privileges.DefaultGrant],
                  shim: supabase.AuthShim | None, index_tables: dict[str, str]) -> None:
    """Writes, in one ledger transaction, what restore reads from this export (replacing a previous one's)."""
    a = assessment
    decisions = [(category, o, why) for category in _DECISION_CATEGORIES for o, why in getattr(a, category).items()]
    roles = [(name, p.decision, p.target, p.inherit, p.bypassrls, p.default, p.uses) for name, p in a.roles.items()]
    roles += [(name, None, None, False, False, False, uses) for name, uses in a.unmapped_roles.items()]
    shim_grants = [("auth_shim", *g) for g in shim.grants] if shim else []
    Ledger(rb.state_dir).record_export(export, ExportFacts(
        role_settings=[(role, "map_to", d["map_to"]) if isinstance(d, dict) else (role, d, None)
                       for role, d in export_settings(rb)["roles"].items()],
        grants=[("schemas", *vars(g).values()) for g in grants] + shim_grants,
        default_grants=[tuple(vars(g).values()) for g in default_grants],
        extensions=[(n, s, True) for n, s in a.extensions_needed.items()] + [(n, None, False) for n in a.extensions_unused],
        index_tables=list(index_tables.items()),
        roles=roles,
        decisions=decisions,
        policies=[(p["schema"], p["table"], p["name"], p["permissive"], p["cmd"], p["roles"], p["source_roles"],
                   p["qual"], p["check"]) for p in a.policies_rewritten],
        auth_triggers=[(t.name, t.definition, t.enabled, t.function) for t in a.auth_triggers],
        auth_columns=[(i, *c) for i, c in enumerate(shim.columns, 1)] if shim else [],
        auth_functions=list(shim.functions.items()) if shim else [],
    ))


_DECISION_CATEGORIES = ("left_out", "kept_with_warning", "needs_decision", "not_migrated")


def exported_catalog(rb: Runbook) -> ExportedCatalog:
    """What the runbook's complete export recorded for restore, or a one-line StepFailed saying what to do."""
    if not export_done(rb):
        raise StepFailed(f"no complete export in {rb.state_dir} (state_dir); run the export flow first")
    found = Ledger(rb.state_dir).exported()
    if found is None:
        raise StepFailed(f"the export in {rb.state_dir} (state_dir) was made by an older Liftoff that did not record "
                         "the source's roles and grants in the ledger; delete state_dir/dump and export again")
    export, facts = found
    a = supabase.Assessment()
    for category, o, why in facts.decisions:
        getattr(a, category)[o] = why
    for name, decision, target, inherit, bypassrls, default, uses in facts.roles:
        if decision is None:
            a.unmapped_roles[name] = uses
        else:
            a.roles[name] = supabase.RolePlan(decision, target, uses, bool(inherit), bool(bypassrls), bool(default))
    a.extensions_needed = {n: s for n, s, needed in facts.extensions if needed}
    a.extensions_unused = [n for n, _, needed in facts.extensions if not needed]
    a.auth_triggers = [supabase.AuthTrigger(*t) for t in facts.auth_triggers]
    a.policies_rewritten = [
        {"schema": schema, "table": table, "name": name, "permissive": bool(permissive), "cmd": cmd, "roles": roles,
         "source_roles": source_roles, "qual": qual, "check": check}
        for schema, table, name, permissive, cmd, roles, source_roles, qual, check in facts.policies]
    grants = [(scope, privileges.Grant(*g)) for scope, *g in facts.grants]
    shim = supabase.AuthShim([[n, t, bool(nn), d] for _, n, t, nn, d in facts.auth_columns],
                             dict(facts.auth_functions),
                             [list(vars(g).values()) for scope, g in grants if scope == "auth_shim"]) \
        if export.auth_shim else None
    settings = {"schemas": export.schemas, "strategy": export.strategy,
                "supabase_leftovers": export.supabase_leftovers, "auth_triggers": export.auth_triggers,
                "roles": {role: {"map_to": map_to} if decision == "map_to" else decision
                          for role, decision, map_to in sorted(facts.role_settings)}}
    return ExportedCatalog(export, settings, a, [g for scope, g in grants if scope == "schemas"],
                           [privileges.DefaultGrant(*g) for g in facts.default_grants], shim, dict(facts.index_tables))
