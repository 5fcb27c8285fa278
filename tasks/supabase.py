"""Supabase: what its platform manages (left out of the migration) and what the app still uses of it.

The exclusion rules live here, in one place, and every report lists them. The leftovers policy decides
the fate of app objects that depend on Supabase's ``auth`` schema (RLS policies calling ``auth.uid()``,
foreign keys to ``auth.users``): ``shim`` recreates a small ``auth`` schema on the target so they keep
working; ``drop`` leaves them out. Either way the report names each object the choice touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from tasks.pg_tools import TocEntry

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
    ("ownership and grants", "pg_restore --no-owner --no-acl; grants re-applied to the runbook's app roles"),
]

PUBLISHED_ROLES = ("anon", "authenticated", "service_role")


@dataclass
class Leftovers:
    """App objects that depend on the auth schema, found in the source catalog."""

    policies: list[str] = field(default_factory=list)  # "schema.table policy"
    foreign_keys: list[str] = field(default_factory=list)  # "schema.table constraint"

    @property
    def objects(self) -> list[str]:
        return [f"policy {p}" for p in self.policies] + [f"foreign key {f}" for f in self.foreign_keys]


def find_leftovers(conn: psycopg.Connection, schemas: list[str]) -> Leftovers:
    policies = [
        f"{s}.{t} {p}" for s, t, p in conn.execute(
            """SELECT schemaname, tablename, policyname FROM pg_policies
               WHERE schemaname = ANY(%s)
                 AND (coalesce(qual, '') ~ 'auth\\.' OR coalesce(with_check, '') ~ 'auth\\.')
               ORDER BY 1, 2, 3""",
            (schemas,),
        )
    ]
    fks = [
        f"{s}.{t} {c}" for s, t, c in conn.execute(
            """SELECT n.nspname, t.relname, k.conname FROM pg_constraint k
               JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
               JOIN pg_class r ON r.oid = k.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
               WHERE k.contype = 'f' AND rn.nspname = 'auth' AND n.nspname = ANY(%s) ORDER BY 1, 2, 3""",
            (schemas,),
        )
    ]
    return Leftovers(policies, fks)


def app_extensions(source_extensions: dict[str, str]) -> dict[str, str]:
    """Extensions the app uses (name -> schema), without those the platform manages."""
    return {name: schema for name, schema in source_extensions.items() if name not in MANAGED_EXTENSIONS}


def keep_entry(entry: TocEntry, schemas: list[str], leftovers: Leftovers, policy: str) -> tuple[bool, str]:
    """Whether a dump TOC entry is restored, and if not, the rule that left it out."""
    if entry.desc in MANAGED_ENTRY_KINDS:
        return False, f"{entry.desc.lower()} managed by Supabase"
    if entry.schema not in ("-", *schemas) and entry.schema in MANAGED_SCHEMAS:
        return False, f"schema {entry.schema} managed by Supabase"
    if entry.desc == "EXTENSION":
        return False, "extensions are created before restore"
    if policy == "drop":
        if entry.desc == "POLICY" and f"{entry.schema}.{entry.tag}" in leftovers.policies:
            return False, "leftovers policy drop: policy uses auth"
        if entry.desc == "FK CONSTRAINT" and f"{entry.schema}.{entry.tag}" in leftovers.foreign_keys:
            return False, "leftovers policy drop: foreign key to auth.users"
    return True, ""


# ---------------------------------------------------------------------------------------------------
# Shims: a small auth schema on the target, so kept policies and foreign keys still work

AUTH_USERS_EXPORT = "COPY (SELECT id, email FROM auth.users ORDER BY id) TO STDOUT"

SHIM_SQL = """
CREATE SCHEMA IF NOT EXISTS auth;
CREATE TABLE IF NOT EXISTS auth.users (id uuid PRIMARY KEY, email text);
CREATE OR REPLACE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb $$;
CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
  SELECT nullif(coalesce(current_setting('request.jwt.claim.sub', true), auth.jwt() ->> 'sub'), '')::uuid $$;
CREATE OR REPLACE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
  SELECT nullif(coalesce(current_setting('request.jwt.claim.role', true), auth.jwt() ->> 'role'), '')::text $$;
"""
SHIM_OBJECTS = ["role anon", "role authenticated", "role service_role", "schema auth", "table auth.users (id, email)",
                "function auth.uid()", "function auth.jwt()", "function auth.role()"]


def create_shims(conn: psycopg.Connection, auth_users_file) -> int:
    """Creates the auth shim (idempotent) and loads auth.users ids from the export; returns rows added."""
    for role in PUBLISHED_ROLES:
        conn.execute(sql.SQL(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {r}) THEN "
            "CREATE ROLE {i} NOLOGIN; END IF; END $$").format(r=sql.Literal(role), i=sql.Identifier(role)))
    conn.execute(SHIM_SQL)
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE liftoff_auth_users (id uuid, email text) ON COMMIT DROP")
        with conn.cursor().copy("COPY liftoff_auth_users FROM STDIN") as copy, open(auth_users_file, "rb") as f:
            while block := f.read(1 << 16):
                copy.write(block)
        added = conn.execute(
            "INSERT INTO auth.users SELECT * FROM liftoff_auth_users ON CONFLICT (id) DO NOTHING").rowcount
    return added


def export_auth_users(conn: psycopg.Connection, path) -> None:
    with open(path, "wb") as f, conn.cursor().copy(AUTH_USERS_EXPORT) as copy:
        for block in copy:
            f.write(block)
