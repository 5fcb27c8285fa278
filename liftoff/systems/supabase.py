"""Supabase: what its platform manages (left out of the migration) and what the app still uses of it.

The exclusion rules live here, in one place, and every report lists them. The leftovers policy decides
the fate of app objects that depend on Supabase's ``auth`` schema (RLS policies calling ``auth.uid()``,
foreign keys to ``auth.users``): ``shim`` recreates a small ``auth`` schema on the target so they keep
working; ``drop`` leaves them out. Either way the report names each object the choice touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from liftoff.systems import pg_dependencies as dependencies, postgres, pg_privileges as privileges
from liftoff.systems.pg_definitions import qualified_names
from liftoff.systems.pg_tools import TocEntry

# Schemas the Supabase platform owns; never migrated as app data.
MANAGED_SCHEMAS = frozenset({
    "auth", "storage", "extensions", "realtime", "_realtime", "supabase_functions", "supabase_migrations",
    "graphql", "graphql_public", "pgsodium", "pgsodium_masks", "vault", "net", "pgbouncer", "cron",
    "_analytics", "pgtle", "information_schema", "pg_catalog", "pg_toast",
})
# Extensions the platform installs for itself; the app's own (uuid-ossp, pgcrypto, ...) are migrated.
MANAGED_EXTENSIONS = frozenset({
    "plpgsql", "pg_graphql", "pg_stat_statements", "pgsodium", "supabase_vault", "pg_net", "pgjwt",
    "pg_cron", "pgtle", "wrappers", "index_advisor", "hypopg",
})
# TOC entry kinds that belong to the platform, whatever schema they name.
MANAGED_ENTRY_KINDS = frozenset({"EVENT TRIGGER", "PUBLICATION", "PUBLICATION TABLE",
                                 "PUBLICATION TABLES IN SCHEMA", "SUBSCRIPTION"})

RULES = [
    ("schemas managed by Supabase", ", ".join(sorted(MANAGED_SCHEMAS - {"information_schema", "pg_catalog", "pg_toast"}))),
    ("extensions managed by Supabase", ", ".join(sorted(MANAGED_EXTENSIONS))),
    ("event triggers", "Supabase installs its own (pg_graphql, pg_net, ...)"),
    ("publications", "supabase_realtime and other logical-replication publications"),
    ("ownership", "pg_restore --no-owner: the target's restoring user owns every object"),
    ("grants", "read from the source's catalog and applied per database.roles (GRANT and REVOKE as on the "
               "source); database.app_roles add reported extras"),
]

PUBLISHED_ROLES = ("anon", "authenticated", "service_role")
# What Supabase's own roles become unless database.roles says otherwise. The API roles carry the app's
# policies and grants; the platform's service roles have nothing to do on a self-hosted target.
DEFAULT_ROLES: dict[str, str] = {
    "anon": "create", "authenticated": "create", "service_role": "create",
    **{r: "drop_references" for r in (
        "authenticator", "supabase_admin", "supabase_auth_admin", "supabase_storage_admin",
        "supabase_realtime_admin", "supabase_replication_admin", "supabase_read_only_user",
        "supabase_functions_admin", "supabase_etl_admin", "dashboard_user", "pgbouncer", "pgsodium_keyholder",
        "pgsodium_keyiduser", "pgsodium_keymaker")},
}
# What the shim provides on the target (policy shim): references to these keep working.
SHIM_FUNCTIONS = ("uid", "role", "jwt", "email")


def shim_covers(ref: str) -> bool:
    """Whether a reference to an object outside the migrated schemas (as pg_identify_object names it, or a
    name found in a function body) is provided by the auth shim."""
    return (ref == "schema auth" or ref == "auth.users" or ref.startswith("auth.users.") or ref == "auth.users_pkey"
            or ref in {f"auth.{f}()" for f in SHIM_FUNCTIONS})


# ---------------------------------------------------------------------------------------------------
# What the migrated objects need from Supabase, and what the runbook decided about each


@dataclass
class RolePlan:
    decision: str  # create, drop_references, map_to
    target: str | None  # the target role that takes its grants and policies; None when dropped
    uses: list[str]
    inherit: bool = False
    bypassrls: bool = False
    default: bool = False  # the decision came from DEFAULT_ROLES or the source user rule


@dataclass
class AuthTrigger:
    name: str
    definition: str
    enabled: str
    function: str


@dataclass
class Assessment:
    """Every object of the migrated schemas that needs something the target will not have, with the
    decision taken: left out of the restore, kept with a warning, or a stop until the runbook decides."""

    left_out: dict[str, str] = field(default_factory=dict)  # label -> reason
    kept_with_warning: dict[str, str] = field(default_factory=dict)
    needs_decision: dict[str, str] = field(default_factory=dict)
    not_migrated: dict[str, str] = field(default_factory=dict)  # objects outside the schemas that use the app
    roles: dict[str, RolePlan] = field(default_factory=dict)
    unmapped_roles: dict[str, list[str]] = field(default_factory=dict)
    owners: list[str] = field(default_factory=list)
    extensions_needed: dict[str, str] = field(default_factory=dict)  # name -> schema on the source
    extensions_unused: list[str] = field(default_factory=list)
    auth_triggers: list[AuthTrigger] = field(default_factory=list)  # recreated on the shim's auth.users
    policies_rewritten: list[dict] = field(default_factory=list)  # created with mapped roles after pg_restore

    @property
    def role_map(self) -> dict[str, str | None]:
        return {name: plan.target for name, plan in self.roles.items()}

    def decisions(self) -> list[dict]:
        """One row per object the choice touched, for the plans and the gate's report."""
        rows = [{"object": o, "decision": "left out", "why": w} for o, w in sorted(self.left_out.items())]
        rows += [{"object": o, "decision": "kept, may fail when used", "why": w}
                 for o, w in sorted(self.kept_with_warning.items())]
        rows += [{"object": o, "decision": "NEEDS A DECISION", "why": w} for o, w in sorted(self.needs_decision.items())]
        rows += [{"object": o, "decision": "not migrated", "why": w} for o, w in sorted(self.not_migrated.items())]
        rows += [{"object": f"trigger auth.users.{t.name}", "decision": "recreated on the shim's auth.users",
                  "why": f"calls {t.function}"} for t in self.auth_triggers]
        rows += [{"object": f"policy {p['schema']}.{p['table']}.{p['name']}", "decision": "created with mapped roles",
                  "why": f"TO {', '.join(p['roles'])} (source: {', '.join(p['source_roles'])})"}
                 for p in self.policies_rewritten]
        return rows

    def gate_left_out(self) -> set[str]:
        """The left-out objects in the gate's naming ("constraint s.t.name", "view s.v", ...)."""
        names = set()
        for label in self.left_out:
            kind, _, name = label.partition(" ")
            if label.startswith("foreign key "):
                names.add("constraint " + label.removeprefix("foreign key "))
            elif label.startswith("materialized view "):
                names |= {"view " + label.removeprefix("materialized view "),
                          "populated materialized view " + label.removeprefix("materialized view ")}
            else:
                names.add(label)
        return names


_SEPARABLE = {"policy", "view", "materialized view", "trigger", "foreign key", "index", "rule"}
_POLICY_CMDS = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}


def assess(conn: psycopg.Connection, schemas: list[str], *, leftovers: str, auth_triggers: str,
           roles: dict, source_user: str, target_user: str) -> Assessment:
    """Reads the source's catalog and decides, for the runbook's choices, what happens to each object of the
    migrated schemas that needs Supabase (its schemas, roles, extensions). Reads only."""
    deps = dependencies.read_dependencies(conn, schemas)
    out = Assessment()
    covered = shim_covers if leftovers == "shim" else (lambda ref: False)
    why_missing = "not on the target: supabase_leftovers is drop" if leftovers == "drop" else \
        "not on the target: not migrated and not provided by the auth shim"

    # Objects that cannot be created without something the target lacks, and everything built on them.
    broken: dict[dependencies.Key, str] = {}
    body_only: dict[dependencies.Key, str] = {}
    for key, refs in deps.outside.items():
        by_catalog = sorted(r for r, how in refs.items() if how == "catalog" and not covered(r))
        in_body = sorted(r for r, how in refs.items() if how == "body" and not covered(r))
        if by_catalog:
            broken[key] = f"uses {', '.join(by_catalog)} ({why_missing})"
        elif in_body:
            body_only[key] = f"calls {', '.join(in_body)} ({why_missing})"
    for key in deps.dependents(set(broken)) - set(broken):
        broken[key] = "built on " + (", ".join(sorted(
            deps.objects[r].label for r in deps.edges.get(key, ()) if r in broken)) or "an object left out")
    for key, why in broken.items():
        obj = deps.objects[key]
        if obj.kind in _SEPARABLE and not (obj.kind == "policy" and obj.detail == "restrictive"):
            out.left_out[obj.label] = why
        else:
            hint = "leaving out a restrictive policy would widen access; " if obj.kind == "policy" else ""
            out.needs_decision[obj.label] = (
                f"{why}; {hint}use supabase_leftovers: shim or change it on the source" if leftovers == "drop"
                else f"{why}; change it on the source or migrate without it")
    # Objects that can be created but would fail when they run: a call reaches a missing object.
    runtime = {k: v for k, v in body_only.items() if k not in broken}
    for key in deps.dependents(set(runtime), through_bodies=True) - set(runtime) - set(broken):
        via = sorted(deps.objects[r].label for r in deps.edges.get(key, set()) | deps.body_edges.get(key, set())
                     if r in runtime)
        runtime[key] = f"calls {', '.join(via) or 'a function'} which {why_missing.replace('not on', 'needs objects not on')}"
    for key, why in runtime.items():
        obj = deps.objects[key]
        if obj.kind == "policy" and obj.detail != "restrictive":
            out.left_out[obj.label] = why + " (a permissive policy left out can only narrow access)"
        elif obj.kind == "policy":
            out.needs_decision[obj.label] = why + "; leaving out a restrictive policy would widen access"
        else:
            out.kept_with_warning[obj.label] = why

    _assess_roles(conn, schemas, out, roles, source_user, target_user)
    _assess_policies(conn, schemas, out)
    _assess_outside_users(conn, schemas, out, leftovers, auth_triggers)
    installed = {n: s for n, s in postgres.extensions(conn).items() if n not in MANAGED_EXTENSIONS}
    needed = deps.needed_extensions() - MANAGED_EXTENSIONS
    out.extensions_needed = {n: installed.get(n, "public") for n in sorted(needed)}
    out.extensions_unused = sorted(set(installed) - needed)
    return out


def _assess_roles(conn, schemas, out: Assessment, roles: dict, source_user: str, target_user: str) -> None:
    uses = dependencies.role_uses(conn, schemas)
    out.owners = dependencies.owners(conn, schemas)
    facts = dependencies.role_facts(conn, list(uses))
    for role, where in sorted(uses.items()):
        decision, default = roles.get(role), False
        if decision is None:
            decision = DEFAULT_ROLES.get(role) or ({"map_to": target_user} if role == source_user else None)
            default = decision is not None
        if decision is None:
            out.unmapped_roles[role] = where
            continue
        f = facts.get(role)
        if isinstance(decision, dict) or hasattr(decision, "map_to"):
            target = decision["map_to"] if isinstance(decision, dict) else decision.map_to
            out.roles[role] = RolePlan("map_to", target, where, default=default)
        elif decision == "create":
            out.roles[role] = RolePlan("create", role, where, f.inherit if f else False, f.bypassrls if f else False,
                                       default=default)
        else:
            out.roles[role] = RolePlan("drop_references", None, where, default=default)


def _assess_policies(conn, schemas, out: Assessment) -> None:
    """Policies whose TO list names a role that is renamed or dropped: pg_restore would fail on them (or
    grant to the wrong role), so they are created from the catalog with the mapped roles instead."""
    role_map = out.role_map
    with qualified_names(conn):
        rows = conn.execute(
            """SELECT n.nspname, c.relname, p.polname, p.polpermissive, p.polcmd,
                      array(SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(r)::text END
                              FROM unnest(p.polroles) r),
                      pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
                 FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = ANY(%s) ORDER BY 1, 2, 3""", (schemas,)).fetchall()
    for schema, table, name, permissive, cmd, source_roles, qual, check in rows:
        label = f"policy {schema}.{table}.{name}"
        if label in out.left_out or label in out.needs_decision:
            continue
        mapped = [r if r == "PUBLIC" else role_map.get(r, r) for r in source_roles]
        if mapped == list(source_roles):
            continue
        kept = [r for r in mapped if r]
        if not kept:
            dropped = ", ".join(source_roles)
            if not permissive:
                out.needs_decision[label] = (f"a restrictive policy for {dropped} only, whose references "
                                             "database.roles drops: leaving it out would widen access")
            else:
                out.left_out[label] = f"for {dropped} only, whose references database.roles drops"
            continue
        out.policies_rewritten.append({
            "schema": schema, "table": table, "name": name, "permissive": permissive, "cmd": _POLICY_CMDS[cmd],
            "roles": list(dict.fromkeys(kept)), "source_roles": list(source_roles), "qual": qual, "check": check})


def _assess_outside_users(conn, schemas, out: Assessment, leftovers: str, auth_triggers: str) -> None:
    """Triggers and policies outside the migrated schemas that belong to the app: triggers on auth.users
    calling the app's functions (recreated on the shim, or listed), and policies on storage tables."""
    with qualified_names(conn):
        triggers = conn.execute(
            """SELECT tn.nspname, c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled,
                      fn.nspname || '.' || p.proname || '()'
                 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace tn ON tn.oid = c.relnamespace
                 JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace fn ON fn.oid = p.pronamespace
                WHERE NOT t.tgisinternal AND fn.nspname = ANY(%s) AND NOT tn.nspname = ANY(%s)
                ORDER BY 1, 2, 3""", (schemas, schemas)).fetchall()
    for schema, table, name, definition, enabled, function in triggers:
        label = f"trigger {schema}.{table}.{name}"
        if (schema, table) == ("auth", "users") and leftovers == "shim" and auth_triggers == "recreate":
            out.auth_triggers.append(AuthTrigger(name, definition, enabled, function))
        elif (schema, table) == ("auth", "users"):
            out.not_migrated[label] = (f"calls {function} on sign-up; left out (database.auth_triggers: drop or "
                                       "supabase_leftovers: drop): the target's auth must do this itself")
        else:
            out.not_migrated[label] = f"calls {function}; {schema}.{table} is not migrated"
    for schema, table, name, roles in conn.execute(
            """SELECT schemaname, tablename, policyname, array_to_string(roles, ', ') FROM pg_policies
                WHERE schemaname IN ('storage') ORDER BY 1, 2, 3"""):
        out.not_migrated[f"policy {schema}.{table}.{name}"] = (
            f"guards Supabase Storage (TO {roles}); MinIO has no row policies: the storage phase keeps such "
            "buckets private and the app serves their files through presigned URLs")


_ENTRY_KINDS = {"POLICY": "policy", "FK CONSTRAINT": "foreign key", "CONSTRAINT": "constraint", "TRIGGER": "trigger",
                "RULE": "rule", "INDEX": "index", "VIEW": "view", "MATERIALIZED VIEW": "materialized view",
                "MATERIALIZED VIEW DATA": "materialized view"}
_PER_TABLE = {"policy", "foreign key", "constraint", "trigger", "rule"}


def entry_label(entry: TocEntry) -> str | None:
    """The archive entry's object in the assessment's naming, for the kinds a restore can leave out."""
    kind = _ENTRY_KINDS.get(entry.desc)
    if kind is None:
        return None
    if kind in _PER_TABLE:
        table, name = entry.table_and_name
        return f"{kind} {entry.schema}.{table}.{name}"
    return f"{kind} {entry.schema}.{entry.tag}"


def keep_entry(entry: TocEntry, schemas: list[str], assessment: Assessment) -> tuple[bool, str]:
    """Whether a dump TOC entry is restored by pg_restore, and if not, the rule that left it out."""
    if entry.desc in MANAGED_ENTRY_KINDS:
        return False, f"{entry.desc.lower()} managed by Supabase"
    if entry.schema not in ("-", *schemas) and entry.schema in MANAGED_SCHEMAS:
        return False, f"schema {entry.schema} managed by Supabase"
    if entry.desc == "EXTENSION":
        return False, "extensions are created before restore"
    label = entry_label(entry)
    if label in assessment.left_out:
        return False, assessment.left_out[label]
    if entry.desc == "POLICY" and label in {f"policy {p['schema']}.{p['table']}.{p['name']}"
                                            for p in assessment.policies_rewritten}:
        return False, "created after the restore with the roles database.roles maps"
    return True, ""


# ---------------------------------------------------------------------------------------------------
# The auth shim: Supabase's auth.users and auth functions on the target, so kept policies, foreign keys,
# defaults and views keep working for the API roles exactly as on the source


# Supabase's definitions, used only when the source lacks one of them (the source's own are copied).
_SUPABASE_AUTH_FUNCTIONS = {
    "uid": """CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
  select coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                  (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid $$""",
    "role": """CREATE OR REPLACE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
  select coalesce(nullif(current_setting('request.jwt.claim.role', true), ''),
                  (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'))::text $$""",
    "email": """CREATE OR REPLACE FUNCTION auth.email() RETURNS text LANGUAGE sql STABLE AS $$
  select coalesce(nullif(current_setting('request.jwt.claim.email', true), ''),
                  (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email'))::text $$""",
    "jwt": """CREATE OR REPLACE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
  select coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                  nullif(current_setting('request.jwt.claims', true), ''))::jsonb $$""",
}


@dataclass
class AuthShim:
    """The shim as the source defines it: auth.users' columns (all of them: the users' own data, needed to
    move them to another auth provider later), the auth functions and the grants on both."""

    columns: list[list]  # [name, type, not null, default (only when it names nothing outside pg_catalog)]
    functions: dict[str, str]  # name -> CREATE OR REPLACE FUNCTION statement
    grants: list[list]  # privileges.Grant fields

    @property
    def objects(self) -> list[str]:
        return (["schema auth", f"table auth.users ({len(self.columns)} columns, rows from the export snapshot)"]
                + [f"function auth.{name}()" for name in sorted(self.functions)])


def read_auth_shim(conn: psycopg.Connection) -> AuthShim:
    with qualified_names(conn):
        columns = [[name, typ, notnull, default if default and _only_catalog_names(default) else None]
                   for name, typ, notnull, default in conn.execute(
            """SELECT a.attname,
                      CASE WHEN tn.nspname = 'pg_catalog' THEN format_type(a.atttypid, a.atttypmod) ELSE 'text' END,
                      a.attnotnull, CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                 JOIN pg_namespace tn ON tn.oid = t.typnamespace
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                WHERE a.attrelid = 'auth.users'::regclass AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY a.attnum""")]
        functions = dict(conn.execute(
            """SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p
                WHERE p.pronamespace = 'auth'::regnamespace AND p.proname = ANY(%s) AND p.pronargs = 0""",
            (list(SHIM_FUNCTIONS),)).fetchall())
    for name in SHIM_FUNCTIONS:
        functions.setdefault(name, _SUPABASE_AUTH_FUNCTIONS[name])
    shim_objects = {("schema", "auth", "auth", None), ("table", "auth", "users", None)} | {
        ("function", "auth", f, "") for f in SHIM_FUNCTIONS}
    grants = [list(vars(g).values()) for g in privileges.read_grants(conn, ["auth"])
              if g.object in shim_objects or (g.kind == "column" and g.name == "users")]
    return AuthShim(columns, functions, grants)


def _only_catalog_names(expression: str) -> bool:
    """A default the shim can keep: it names nothing outside pg_catalog (``now()``, ``false``, a literal)."""
    return all(schema == "pg_catalog" for schema in re.findall(r'"?([A-Za-z_][\w$]*)"?\s*\.\s*"?[A-Za-z_]',
                                                              re.sub(r"'[^']*'", "", expression)))


def auth_users_columns(shim: AuthShim) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c[0]) for c in shim.columns)


def export_auth_users(conn: psycopg.Connection, shim: AuthShim, path) -> None:
    """Every column of every user, from the connection's snapshot, in COPY text form."""
    query = sql.SQL("COPY (SELECT {} FROM auth.users ORDER BY id) TO STDOUT").format(auth_users_columns(shim))
    with open(path, "wb") as f, conn.cursor().copy(query) as copy:
        for block in copy:
            f.write(block)


def create_roles(conn: psycopg.Connection, roles: dict[str, RolePlan]) -> list[str]:
    """Creates the roles the runbook decided to create (NOLOGIN, with the source's INHERIT and BYPASSRLS);
    a role that exists already is kept as it is. Returns what it created."""
    created = []
    for name, plan in sorted(roles.items()):
        if plan.decision != "create":
            continue
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
            continue
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN {} {}").format(
            sql.Identifier(name), sql.SQL("INHERIT" if plan.inherit else "NOINHERIT"),
            sql.SQL("BYPASSRLS" if plan.bypassrls else "NOBYPASSRLS")))
        created.append(f"role {name} (NOLOGIN{', BYPASSRLS' if plan.bypassrls else ''})")
    return created


def create_auth_shim(conn: psycopg.Connection, shim: AuthShim) -> None:
    """Schema auth, auth.users with the source's columns (a table from an older shim gains the missing
    ones) and the auth functions. Idempotent."""
    conn.execute("CREATE SCHEMA IF NOT EXISTS auth")
    cols = [sql.SQL("{} {}{}{}").format(sql.Identifier(n), sql.SQL(t), sql.SQL(" NOT NULL" if nn else ""),
                                        sql.SQL(f" DEFAULT {d}" if d else ""))
            for n, t, nn, *rest in shim.columns for d in [rest[0] if rest else None]]
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS auth.users ({}, PRIMARY KEY (id))").format(sql.SQL(", ").join(cols)))
    for n, t, *_ in shim.columns:
        conn.execute(sql.SQL("ALTER TABLE auth.users ADD COLUMN IF NOT EXISTS {} {}").format(sql.Identifier(n), sql.SQL(t)))
    for name in SHIM_FUNCTIONS:
        conn.execute(shim.functions[name])


def grant_auth_shim(conn: psycopg.Connection, shim: AuthShim, role_map: dict[str, str | None], owner: str) -> int:
    """The source's grants on the shim's objects, for the mapped roles (USAGE on auth, EXECUTE on its
    functions for the API roles): without them every policy calling auth.uid() fails for them."""
    source = [privileges.Grant(*g) for g in shim.grants]
    target = [g for g in privileges.read_grants(conn, ["auth"])
              if g.kind in ("schema", "function") or g.name == "users"]
    present = {o for o in privileges.grantable_objects(conn, ["auth"])
               if o[0] == "schema" or o[2] == "users" or (o[0] == "function" and o[2] in SHIM_FUNCTIONS)}
    statements = privileges.plan_grants(source, target, present, role_map, owner=owner)
    for statement in statements:
        conn.execute(statement)
    return len(statements)


def load_auth_users(conn: psycopg.Connection, shim: AuthShim, blocks) -> int:
    """Loads users (COPY text blocks of the shim's columns) into auth.users in one transaction: new ones are
    added, known ones updated. Returns the rows loaded. ``conn`` must be in autocommit mode."""
    cols = auth_users_columns(shim)
    updates = sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c[0]))
                                 for c in shim.columns if c[0] != "id")
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE liftoff_auth_users (LIKE auth.users) ON COMMIT DROP")
        with conn.cursor().copy(sql.SQL("COPY liftoff_auth_users ({}) FROM STDIN").format(cols)) as copy:
            for block in blocks:
                copy.write(block)
        return conn.execute(sql.SQL(
            "INSERT INTO auth.users ({c}) SELECT {c} FROM liftoff_auth_users ON CONFLICT (id) DO UPDATE SET {u}").format(
            c=cols, u=updates)).rowcount


def file_blocks(path):
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            yield block


def stream_auth_users(source: psycopg.Connection, target: psycopg.Connection, shim: AuthShim) -> int:
    """auth.users from ``source``'s current snapshot (the one the tables are read in) into the shim."""
    query = sql.SQL("COPY (SELECT {} FROM auth.users ORDER BY id) TO STDOUT").format(auth_users_columns(shim))
    with source.cursor().copy(query) as out:
        rows = load_auth_users(target, shim, out)
    source.rollback()
    return rows


def recreate_auth_triggers(conn: psycopg.Connection, triggers: list[AuthTrigger]) -> list[str]:
    """The app's triggers on auth.users (say, a profile created on sign-up) on the shim's table, as on the
    source, enabled state included. Idempotent."""
    done = []
    for t in triggers:
        with conn.transaction():
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON auth.users").format(sql.Identifier(t.name)))
            conn.execute(t.definition)
            if t.enabled == "D":
                conn.execute(sql.SQL("ALTER TABLE auth.users DISABLE TRIGGER {}").format(sql.Identifier(t.name)))
            elif t.enabled in ("R", "A"):
                mode = "REPLICA" if t.enabled == "R" else "ALWAYS"
                conn.execute(sql.SQL("ALTER TABLE auth.users ENABLE {} TRIGGER {}").format(sql.SQL(mode),
                                                                                          sql.Identifier(t.name)))
        done.append(f"trigger auth.users.{t.name}")
    return done


def create_rewritten_policies(conn: psycopg.Connection, policies: list[dict]) -> list[str]:
    """Policies whose TO list names renamed or dropped roles, created from the source's definition with the
    mapped roles. Idempotent (each replaces its previous version in one transaction)."""
    done = []
    for p in policies:
        table = sql.Identifier(p["schema"], p["table"])
        roles = sql.SQL(", ").join(sql.SQL("PUBLIC") if r == "PUBLIC" else sql.Identifier(r) for r in p["roles"])
        statement = sql.SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}").format(
            sql.Identifier(p["name"]), table, sql.SQL("PERMISSIVE" if p["permissive"] else "RESTRICTIVE"),
            sql.SQL(p["cmd"]), roles)
        if p["qual"] is not None:
            statement += sql.SQL(" USING ({})").format(sql.SQL(p["qual"]))
        if p["check"] is not None:
            statement += sql.SQL(" WITH CHECK ({})").format(sql.SQL(p["check"]))
        with conn.transaction():
            conn.execute(sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(sql.Identifier(p["name"]), table))
            conn.execute(statement)
        done.append(f"policy {p['schema']}.{p['table']}.{p['name']}")
    return done
