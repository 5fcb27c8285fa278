"""What the migrated schemas define, read from one server's catalog: the definitions and the access the
gate compares (``liftoff/systems/pg_compare.py``), beyond the names ``liftoff.systems.postgres.schema_objects`` lists.

Objects are keyed by their identity as a tuple of name parts, e.g. ``("public", "bookings", "bookings_audit")``
for a trigger, ``("public", "log_booking_event()")`` for a function: joined with dots it is the same string
``schema_objects`` and the runbook's ``left_out`` entries use. Objects that belong to an extension are skipped
(the extension defines them, on each side its own version).

Expressions and definitions are read with ``search_path`` set to '' so every name comes out schema-qualified,
the same on both sides whatever the connected role's search_path is.

Between PostgreSQL 15 and 16 (the production pair), the catalog functions used here print the same text for
the same object; the only normalisation needed is for newer majors: PostgreSQL 18 stores NOT NULL as
constraints (contype 'n'), which are left out of the constraints here (tables' and domains') because the
columns' and domains' NOT NULL is compared already.
"""

from __future__ import annotations

import contextlib

import psycopg

Identity = tuple[str, ...]
Definitions = dict[str, dict[Identity, dict]]

def _not_member(oid: str, catalog: str) -> str:
    """SQL condition: the object ``oid`` (of system catalog ``catalog``) is not part of an extension."""
    return (f"NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = '{catalog}'::regclass "
            f"AND d.objid = {oid} AND d.deptype = 'e')")


@contextlib.contextmanager
def qualified_names(conn: psycopg.Connection):
    """search_path = '' for the duration: catalog functions then qualify every name outside pg_catalog."""
    previous = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()[0]
    conn.execute("SELECT pg_catalog.set_config('search_path', '', false)")
    try:
        yield conn
    finally:
        conn.execute("SELECT pg_catalog.set_config('search_path', %s, false)", (previous,))


def _major(conn: psycopg.Connection) -> int:
    return int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000


def _functions(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    # SQL-standard bodies (BEGIN ATOMIC, PostgreSQL 14+) live in prosqlbody; prosrc is then empty.
    body = ("CASE WHEN p.prosqlbody IS NOT NULL THEN pg_catalog.pg_get_function_sqlbody(p.oid) ELSE p.prosrc END"
            if _major(conn) >= 14 else "p.prosrc")
    rows = conn.execute(f"""
        SELECT n.nspname, p.proname || '(' || pg_catalog.pg_get_function_identity_arguments(p.oid) || ')',
               CASE p.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate' WHEN 'w' THEN 'window'
                              ELSE 'function' END,
               l.lanname, {body}, pg_catalog.pg_get_function_result(p.oid),
               CASE p.provolatile WHEN 'i' THEN 'immutable' WHEN 's' THEN 'stable' ELSE 'volatile' END,
               p.proisstrict, p.prosecdef, p.proleakproof,
               CASE p.proparallel WHEN 's' THEN 'safe' WHEN 'r' THEN 'restricted' ELSE 'unsafe' END,
               pg_catalog.array_to_string(p.proconfig, ', ')
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        JOIN pg_catalog.pg_language l ON l.oid = p.prolang
        WHERE n.nspname = ANY(%(s)s) AND {_not_member('p.oid', 'pg_catalog.pg_proc')}
    """, {"s": schemas}).fetchall()
    return {(schema, name): {"kind": kind, "language": lang, "body": src, "returns": result, "volatility": vol,
                             "strict": strict, "security definer": secdef, "leakproof": leak, "parallel": par,
                             "settings": config}
            for schema, name, kind, lang, src, result, vol, strict, secdef, leak, par, config in rows}


def _triggers(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    rows = conn.execute("""
        SELECT n.nspname, c.relname, g.tgname, pg_catalog.pg_get_triggerdef(g.oid), g.tgenabled
        FROM pg_catalog.pg_trigger g
        JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT g.tgisinternal AND n.nspname = ANY(%(s)s)
    """, {"s": schemas}).fetchall()
    return {(s, t, g): {"definition": d, "enabled": e} for s, t, g, d, e in rows}


def _constraints(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    rows = conn.execute("""
        SELECT n.nspname, c.relname, k.conname, k.contype, pg_catalog.pg_get_constraintdef(k.oid)
        FROM pg_catalog.pg_constraint k
        JOIN pg_catalog.pg_class c ON c.oid = k.conrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY(%(s)s) AND k.contype <> 'n'
    """, {"s": schemas}).fetchall()
    return {(s, t, k): {"type": typ, "definition": d} for s, t, k, typ, d in rows}


# Fields that place an object rather than define it: read for the comparison, never compared themselves.
PLACEMENT = ("on table", "backs constraint")


def _indexes(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    # The definition names the table already; "on table" and "backs constraint" (the primary key, unique or
    # exclusion constraint the index belongs to) say whether an index on the target only matters.
    rows = conn.execute(f"""
        SELECT n.nspname, c.relname, pg_catalog.pg_get_indexdef(c.oid), t.relname,
               (SELECT k.conname FROM pg_catalog.pg_constraint k WHERE k.conindid = c.oid AND k.conrelid = t.oid
                  AND k.contype IN ('p', 'u', 'x'))
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_catalog.pg_index x ON x.indexrelid = c.oid JOIN pg_catalog.pg_class t ON t.oid = x.indrelid
        WHERE c.relkind IN ('i', 'I') AND n.nspname = ANY(%(s)s) AND {_not_member('c.oid', 'pg_catalog.pg_class')}
    """, {"s": schemas}).fetchall()
    return {(s, i): {"definition": d, "on table": t, "backs constraint": k} for s, i, d, t, k in rows}


def _views(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    rows = conn.execute(f"""
        SELECT n.nspname, c.relname, c.relkind, pg_catalog.pg_get_viewdef(c.oid),
               pg_catalog.array_to_string(ARRAY(SELECT o FROM pg_catalog.unnest(c.reloptions) o ORDER BY o), ', ')
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('v', 'm') AND n.nspname = ANY(%(s)s) AND {_not_member('c.oid', 'pg_catalog.pg_class')}
    """, {"s": schemas}).fetchall()
    return {(s, v): {"kind": "materialized view" if k == "m" else "view", "query": q, "options": o or None}
            for s, v, k, q, o in rows}


_TABLES = "c.relkind IN ('r', 'p') AND n.nspname = ANY(%(s)s)"


def _columns(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    rows = conn.execute(f"""
        SELECT n.nspname, c.relname, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
               CASE WHEN a.attgenerated = '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END,
               CASE WHEN a.attgenerated <> '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid)
                    || CASE a.attgenerated WHEN 's' THEN ' STORED' ELSE ' VIRTUAL' END END,
               CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default' END, co.collname
        FROM pg_catalog.pg_attribute a
        JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
        WHERE a.attnum > 0 AND NOT a.attisdropped AND {_TABLES} AND {_not_member('c.oid', 'pg_catalog.pg_class')}
    """, {"s": schemas}).fetchall()
    return {(s, t, col): {"type": typ, "not null": notnull, "default": default, "generated": generated,
                          "identity": identity, "collation": collation}
            for s, t, col, typ, notnull, default, generated, identity, collation in rows}


def _tables(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    # Replica identity: what an UPDATE or DELETE writes to the WAL to find the row again, which logical
    # replication (the cutover's catch-up) depends on; "index NAME" for USING INDEX.
    rows = conn.execute(f"""
        SELECT n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity,
               CASE c.relreplident WHEN 'd' THEN 'default' WHEN 'f' THEN 'full' WHEN 'n' THEN 'nothing'
                    ELSE 'index ' || coalesce((SELECT i.relname FROM pg_catalog.pg_index x
                                               JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid
                                               WHERE x.indrelid = c.oid AND x.indisreplident), '(none)') END
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE {_TABLES} AND {_not_member('c.oid', 'pg_catalog.pg_class')}
    """, {"s": schemas}).fetchall()
    return {(s, t): {"row level security": rls, "force row level security": force, "replica identity": ident}
            for s, t, rls, force, ident in rows}


def _types(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    """Enums (their labels, in order) and domains (base type, default, NOT NULL, and each CHECK constraint as a
    field "constraint NAME" whose value ends in NOT VALID when it was added without checking existing rows)."""
    rows = conn.execute(f"""
        SELECT n.nspname, t.typname, CASE t.typtype WHEN 'e' THEN 'enum' ELSE 'domain' END,
               CASE WHEN t.typtype = 'e' THEN pg_catalog.array_to_string(ARRAY(
                   SELECT pg_catalog.quote_literal(e.enumlabel) FROM pg_catalog.pg_enum e
                   WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder), ', ') END,
               CASE WHEN t.typtype = 'd' THEN pg_catalog.format_type(t.typbasetype, t.typtypmod) END,
               t.typdefault, CASE WHEN t.typtype = 'd' THEN t.typnotnull END,
               ARRAY(SELECT ARRAY[k.conname::text, pg_catalog.pg_get_constraintdef(k.oid)]
                     FROM pg_catalog.pg_constraint k WHERE k.contypid = t.oid AND k.contype <> 'n')
        FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
        WHERE t.typtype IN ('e', 'd') AND n.nspname = ANY(%(s)s) AND {_not_member('t.oid', 'pg_catalog.pg_type')}
    """, {"s": schemas}).fetchall()
    types = {}
    for s, name, kind, labels, base, default, notnull, constraints in rows:
        fields = {"kind": kind, "values": labels, "base type": base, "default": default, "not null": notnull}
        fields |= {f"constraint {con}": definition for con, definition in constraints}
        types[(s, name)] = fields
    return types


def _policies(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    rows = conn.execute("""
        SELECT n.nspname, c.relname, p.polname,
               CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                             WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
               CASE WHEN p.polpermissive THEN 'permissive' ELSE 'restrictive' END,
               ARRAY(SELECT CASE WHEN r = 0 THEN 'public'
                                 ELSE (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = r) END
                     FROM pg_catalog.unnest(p.polroles) r ORDER BY 1),
               pg_catalog.pg_get_expr(p.polqual, p.polrelid), pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid)
        FROM pg_catalog.pg_policy p
        JOIN pg_catalog.pg_class c ON c.oid = p.polrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY(%(s)s)
    """, {"s": schemas}).fetchall()
    return {(s, t, p): {"command": cmd, "as": permissive, "roles": list(roles), "qual": qual,
                        "with check": check}
            for s, t, p, cmd, permissive, roles, qual, check in rows}


def _sequences(conn: psycopg.Connection, schemas: list[str]) -> dict[Identity, dict]:
    rows = conn.execute(f"""
        SELECT n.nspname, c.relname, pg_catalog.format_type(q.seqtypid, NULL), q.seqstart, q.seqincrement,
               q.seqmin, q.seqmax, q.seqcache, q.seqcycle
        FROM pg_catalog.pg_sequence q
        JOIN pg_catalog.pg_class c ON c.oid = q.seqrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY(%(s)s) AND {_not_member('c.oid', 'pg_catalog.pg_class')}
    """, {"s": schemas}).fetchall()
    return {(s, q): {"data type": typ, "start": start, "increment": inc, "minimum": lo, "maximum": hi,
                     "cache": cache, "cycle": cycle}
            for s, q, typ, start, inc, lo, hi, cache, cycle in rows}


_READERS = {
    "function": _functions,
    "trigger": _triggers,
    "constraint": _constraints,
    "index": _indexes,
    "view": _views,
    "column": _columns,
    "table": _tables,
    "policy": _policies,
    "sequence": _sequences,
    "type": _types,
}


def read_definitions(conn: psycopg.Connection, schemas: list[str]) -> Definitions:
    """{kind: {identity: {field: value}}} for what ``schemas`` define on this server (extension members
    left out). Reads only."""
    with qualified_names(conn):
        return {kind: read(conn, schemas) for kind, read in _READERS.items()}


# ---------------------------------------------------------------------------------------------------
# Effective privileges

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
SEQUENCE_PRIVILEGES = ("USAGE", "SELECT", "UPDATE")
SCHEMA_PRIVILEGES = ("USAGE", "CREATE")
COLUMN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "REFERENCES")

Privileges = dict[str, dict[str, set[str]]]  # "table public.payments" -> role -> {"SELECT", ...}

# Each query yields (object label, oid or name the has_*_privilege function takes); %(s)s are the schemas.
_PRIVILEGE_OBJECTS = {
    "schema": ("has_schema_privilege", SCHEMA_PRIVILEGES,
               "SELECT 'schema ' || n.nspname, n.nspname::text FROM pg_catalog.pg_namespace n "
               "WHERE n.nspname = ANY(%(s)s)"),
    "relation": ("has_table_privilege", TABLE_PRIVILEGES,
                 "SELECT CASE c.relkind WHEN 'v' THEN 'view ' WHEN 'm' THEN 'materialized view ' "
                 "ELSE 'table ' END || n.nspname || '.' || c.relname, c.oid::text "
                 "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname = ANY(%(s)s) AND "
                 + _not_member("c.oid", "pg_catalog.pg_class")),
    "sequence": ("has_sequence_privilege", SEQUENCE_PRIVILEGES,
                 "SELECT 'sequence ' || n.nspname || '.' || c.relname, c.oid::text "
                 "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE c.relkind = 'S' AND n.nspname = ANY(%(s)s) AND "
                 + _not_member("c.oid", "pg_catalog.pg_class")),
    "function": ("has_function_privilege", ("EXECUTE",),
                 "SELECT CASE p.prokind WHEN 'p' THEN 'procedure ' ELSE 'function ' END || n.nspname || '.' || "
                 "p.proname || '(' || pg_catalog.pg_get_function_identity_arguments(p.oid) || ')', p.oid::text "
                 "FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
                 "WHERE n.nspname = ANY(%(s)s) AND " + _not_member("p.oid", "pg_catalog.pg_proc")),
}
_OID_ARG = {"has_schema_privilege": "o.ref", "has_table_privilege": "o.ref::oid",
            "has_sequence_privilege": "o.ref::oid", "has_function_privilege": "o.ref::oid"}


def columns_with_acl(conn: psycopg.Connection, schemas: list[str]) -> set[Identity]:
    """(schema, table, column) of the columns that carry their own GRANTs (a column ACL) on this server."""
    return {tuple(r) for r in conn.execute("""
        SELECT n.nspname, c.relname, a.attname FROM pg_catalog.pg_attribute a
        JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE a.attacl IS NOT NULL AND a.attnum > 0 AND NOT a.attisdropped AND n.nspname = ANY(%s)
    """, (schemas,))}


def read_privileges(conn: psycopg.Connection, schemas: list[str], roles: list[str],
                    columns: set[Identity] | None = None) -> Privileges:
    """Effective privileges (has_*_privilege: grants to the role, to PUBLIC, through membership, ownership)
    of each of ``roles`` on the schemas and every table, view, sequence and function in them, and on
    ``columns`` (default: the columns with a column ACL here). A role that does not exist on this server
    holds nothing. {object label: {role: privileges}}, every object and role listed."""
    existing = [r[0] for r in conn.execute(
        "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname = ANY(%s)", (list(roles),))]
    result: Privileges = {}
    for function, privileges, objects in _PRIVILEGE_OBJECTS.values():
        for label, _ in conn.execute(objects, {"s": schemas}):
            result[label] = {role: set() for role in roles}
        granted = conn.execute(f"""
            SELECT o.label, r.name, p.priv FROM ({objects}) o(label, ref)
            CROSS JOIN pg_catalog.unnest(%(roles)s::text[]) r(name)
            CROSS JOIN pg_catalog.unnest(%(privs)s::text[]) p(priv)
            WHERE pg_catalog.{function}(r.name::name, {_OID_ARG[function]}, p.priv)
        """, {"s": schemas, "roles": existing, "privs": list(privileges)})
        for label, role, privilege in granted:
            result[label][role].add(privilege)
    if columns is None:
        columns = columns_with_acl(conn, schemas)
    if columns:
        cols = sorted(columns)
        present = conn.execute("""
            SELECT c.sch, c.tab, c.col, a.attrelid, a.attnum FROM unnest(%(sch)s::text[], %(tab)s::text[],
                   %(col)s::text[]) c(sch, tab, col)
            JOIN pg_catalog.pg_namespace n ON n.nspname = c.sch
            JOIN pg_catalog.pg_class t ON t.relnamespace = n.oid AND t.relname = c.tab
            JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attname = c.col AND NOT a.attisdropped
        """, {"sch": [c[0] for c in cols], "tab": [c[1] for c in cols], "col": [c[2] for c in cols]}).fetchall()
        for sch, tab, col, relid, attnum in present:
            label = f"column {sch}.{tab}.{col}"
            result[label] = {role: set() for role in roles}
            for role, privilege in conn.execute("""
                SELECT r.name, p.priv FROM pg_catalog.unnest(%(roles)s::text[]) r(name)
                CROSS JOIN pg_catalog.unnest(%(privs)s::text[]) p(priv)
                WHERE pg_catalog.has_column_privilege(r.name::name, %(rel)s::oid, %(att)s::smallint, p.priv)
            """, {"roles": existing, "privs": list(COLUMN_PRIVILEGES), "rel": relid, "att": attnum}):
                result[label][role].add(privilege)
    return result
