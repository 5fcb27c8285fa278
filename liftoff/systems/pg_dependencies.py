"""What the migrated schemas need from outside themselves, read from one server's catalog.

A migration copies some schemas of a database. Objects in them may depend on objects it leaves behind
(Supabase's ``auth`` and ``storage`` schemas), on extensions and on roles (policy ``TO``, grants, owners).
``pg_depend`` records most of these edges exactly: policy and default expressions, views, foreign keys,
column types, triggers. Function bodies in a string (plpgsql, most SQL functions) are opaque to it, so
their text is scanned for schema-qualified names as well; an unqualified name that resolves through
``search_path`` is not seen (Supabase's own guidance is to qualify names and set ``search_path = ''``).

Nothing here decides what a reference means for the migration; ``liftoff/systems/supabase.py`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psycopg

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")

# Every object of the migrated schemas that a restore creates as a separate step, with a label in the
# gate's convention ("kind schema.table.name" for per-table objects, "kind schema.name" otherwise).
_OBJECTS = """
WITH ns AS (SELECT oid, nspname FROM pg_namespace WHERE nspname = ANY(%(s)s)),
members AS (SELECT classid, objid FROM pg_depend WHERE deptype = 'e')
SELECT 'pg_class'::regclass::oid, c.oid,
       CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
            WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence' WHEN 'f' THEN 'foreign table'
            ELSE 'index' END,
       ns.nspname, NULL, c.relname, NULL
  FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'i', 'I')
   AND (c.relkind NOT IN ('i', 'I') OR NOT EXISTS (
        SELECT 1 FROM pg_constraint k WHERE k.conindid = c.oid AND k.contype IN ('p', 'u', 'x')))
   AND NOT EXISTS (SELECT 1 FROM members m WHERE m.classid = 'pg_class'::regclass AND m.objid = c.oid)
UNION ALL
SELECT 'pg_proc'::regclass::oid, p.oid, 'function', ns.nspname, NULL,
       p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', p.proname
  FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
 WHERE NOT EXISTS (SELECT 1 FROM members m WHERE m.classid = 'pg_proc'::regclass AND m.objid = p.oid)
UNION ALL
SELECT 'pg_type'::regclass::oid, t.oid, 'type', ns.nspname, NULL, t.typname, NULL
  FROM pg_type t JOIN ns ON ns.oid = t.typnamespace
 WHERE (t.typtype IN ('e', 'd', 'r', 'm') OR (t.typtype = 'c' AND
       (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
   AND NOT EXISTS (SELECT 1 FROM members m WHERE m.classid = 'pg_type'::regclass AND m.objid = t.oid)
UNION ALL
SELECT 'pg_constraint'::regclass::oid, k.oid, CASE k.contype WHEN 'f' THEN 'foreign key' ELSE 'constraint' END,
       ns.nspname, c.relname, k.conname, NULL
  FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN ns ON ns.oid = c.relnamespace
UNION ALL
SELECT 'pg_trigger'::regclass::oid, g.oid, 'trigger', ns.nspname, c.relname, g.tgname, NULL
  FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid JOIN ns ON ns.oid = c.relnamespace
 WHERE NOT g.tgisinternal
UNION ALL
SELECT 'pg_policy'::regclass::oid, p.oid, 'policy', ns.nspname, c.relname, p.polname,
       CASE WHEN p.polpermissive THEN 'permissive' ELSE 'restrictive' END
  FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN ns ON ns.oid = c.relnamespace
UNION ALL
SELECT 'pg_attrdef'::regclass::oid, d.oid, 'default', ns.nspname, c.relname, a.attname, NULL
  FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid JOIN ns ON ns.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
UNION ALL
SELECT 'pg_rewrite'::regclass::oid, r.oid, CASE WHEN r.rulename = '_RETURN' THEN 'view rule' ELSE 'rule' END,
       ns.nspname, c.relname, r.rulename, c.oid::text
  FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class JOIN ns ON ns.oid = c.relnamespace
"""

# Every normal dependency recorded for those kinds of object, with what the referenced object is.
_DEPENDS = """
SELECT d.classid, d.objid, d.refclassid, d.refobjid, r.type, r.schema, r.identity,
       (SELECT e.extname FROM pg_depend m JOIN pg_extension e ON e.oid = m.refobjid
         WHERE m.classid = d.refclassid AND m.objid = d.refobjid AND m.deptype = 'e' LIMIT 1)
  FROM pg_depend d
 CROSS JOIN LATERAL pg_identify_object(d.refclassid, d.refobjid, d.refobjsubid) r
 WHERE d.deptype = 'n'
   AND d.classid IN ('pg_class'::regclass, 'pg_proc'::regclass, 'pg_type'::regclass, 'pg_constraint'::regclass,
                     'pg_trigger'::regclass, 'pg_policy'::regclass, 'pg_attrdef'::regclass, 'pg_rewrite'::regclass)
"""

# Names a function body may mention outside the migrated schemas: functions and relations, with the
# extension each belongs to.
_OUTSIDE_NAMES = """
SELECT n.nspname, p.proname, true,
       (SELECT e.extname FROM pg_depend m JOIN pg_extension e ON e.oid = m.refobjid
         WHERE m.classid = 'pg_proc'::regclass AND m.objid = p.oid AND m.deptype = 'e' LIMIT 1)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE NOT n.nspname = ANY(%(s)s) AND NOT n.nspname = ANY(%(sys)s)
UNION ALL
SELECT n.nspname, c.relname, false,
       (SELECT e.extname FROM pg_depend m JOIN pg_extension e ON e.oid = m.refobjid
         WHERE m.classid = 'pg_class'::regclass AND m.objid = c.oid AND m.deptype = 'e' LIMIT 1)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND NOT n.nspname = ANY(%(s)s) AND NOT n.nspname = ANY(%(sys)s)
"""

_QUALIFIED = re.compile(r'(?<![\w$."])"?([A-Za-z_][\w$]*)"?\s*\.\s*"?([A-Za-z_][\w$]*)"?(\s*\()?')

Key = tuple[int, int]  # (catalog oid, object oid)


@dataclass(frozen=True)
class CatalogObject:
    kind: str  # table, view, materialized view, sequence, index, function, type, constraint, foreign key,
    #            trigger, policy, default, rule
    schema: str
    table: str | None  # the table a per-table object belongs to
    name: str
    detail: str | None = None  # a policy's permissiveness

    @property
    def label(self) -> str:
        """How reports and the gate name it: "policy public.bookings.own rows", "function public.f(uuid)"."""
        where = f"{self.schema}.{self.table}.{self.name}" if self.table else f"{self.schema}.{self.name}"
        return f"{self.kind} {where}"


@dataclass
class Dependencies:
    """The migrated schemas' objects and what each needs: other migrated objects (``edges``), objects outside
    (``outside``: identity -> how it was found) and extensions."""

    objects: dict[Key, CatalogObject] = field(default_factory=dict)
    edges: dict[Key, set[Key]] = field(default_factory=dict)  # recorded by pg_depend: creation needs them
    body_edges: dict[Key, set[Key]] = field(default_factory=dict)  # named in a function body: calls need them
    outside: dict[Key, dict[str, str]] = field(default_factory=dict)  # key -> {"auth.uid()": "catalog"|"body"}
    extensions: dict[Key, set[str]] = field(default_factory=dict)

    def dependents(self, keys: set[Key], *, through_bodies: bool = False) -> set[Key]:
        """Every migrated object that needs one of ``keys``, directly or through others: to be created
        (``edges``), or also to run (``through_bodies``)."""
        reverse: dict[Key, set[Key]] = {}
        pairs = list(self.edges.items()) + (list(self.body_edges.items()) if through_bodies else [])
        for k, refs in pairs:
            for r in refs:
                reverse.setdefault(r, set()).add(k)
        seen, todo = set(), list(keys)
        while todo:
            for d in reverse.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    def needed_extensions(self) -> set[str]:
        return set().union(*self.extensions.values()) if self.extensions else set()


def read_dependencies(conn: psycopg.Connection, schemas: list[str]) -> Dependencies:
    deps = Dependencies()
    views_of_rules: dict[int, int] = {}
    by_name: dict[tuple[str, str], set[Key]] = {}
    for classid, oid, kind, schema, table, name, extra in conn.execute(_OBJECTS, {"s": schemas}):
        if kind == "view rule":  # a view's query: its dependencies are the view's
            views_of_rules[oid] = int(extra)
            continue
        detail = extra if kind == "policy" else None
        deps.objects[(classid, oid)] = CatalogObject(kind, schema, table, name, detail)
        plain = extra if kind == "function" else (name if table is None else None)
        if plain:
            by_name.setdefault((schema, plain), set()).add((classid, oid))
    class_oid, rewrite_oid = conn.execute("SELECT 'pg_class'::regclass::oid, 'pg_rewrite'::regclass::oid").fetchone()

    def own_key(classid: int, objid: int) -> Key | None:
        if classid == rewrite_oid:
            view = views_of_rules.get(objid)
            return (class_oid, view) if view else None
        key = (classid, objid)
        return key if key in deps.objects else None

    for classid, objid, refclassid, refobjid, ref_type, ref_schema, ref_identity, extension in conn.execute(_DEPENDS):
        key = own_key(classid, objid)
        if key is None:
            continue
        ref = own_key(refclassid, refobjid) or ((refclassid, refobjid) if (refclassid, refobjid) in deps.objects
                                               else None)
        if ref is not None:
            if ref != key:
                deps.edges.setdefault(key, set()).add(ref)
        elif extension:
            deps.extensions.setdefault(key, set()).add(extension)
        elif ref_type == "extension":
            deps.extensions.setdefault(key, set()).add(ref_identity)
        elif ref_schema and ref_schema not in schemas and ref_schema not in SYSTEM_SCHEMAS:
            deps.outside.setdefault(key, {})[ref_identity] = "catalog"
        elif ref_type == "schema" and ref_identity not in schemas and ref_identity not in SYSTEM_SCHEMAS:
            deps.outside.setdefault(key, {})[f"schema {ref_identity}"] = "catalog"
    _scan_function_bodies(conn, schemas, deps, by_name)
    return deps


def _scan_function_bodies(conn: psycopg.Connection, schemas: list[str], deps: Dependencies,
                          by_name: dict[tuple[str, str], set[Key]]) -> None:
    outside: dict[tuple[str, str], tuple[bool, str | None]] = {}
    for schema, name, is_function, extension in conn.execute(_OUTSIDE_NAMES, {"s": schemas,
                                                                              "sys": list(SYSTEM_SCHEMAS)}):
        if (schema, name) not in outside or is_function:
            outside[(schema, name)] = (is_function, extension)
    functions = [k for k, o in deps.objects.items() if o.kind == "function"]
    if not functions:
        return
    bodies = conn.execute(
        "SELECT 'pg_proc'::regclass::oid, p.oid, coalesce(p.prosrc, '') FROM pg_proc p JOIN pg_language l "
        "ON l.oid = p.prolang WHERE p.oid = ANY(%s) AND l.lanname NOT IN ('c', 'internal')",
        ([oid for _, oid in functions],)).fetchall()
    for classid, oid, body in bodies:
        key = (classid, oid)
        for m in _QUALIFIED.finditer(_without_comments(body)):
            schema, name = m.group(1), m.group(2)
            if schema in schemas:
                for ref in by_name.get((schema, name), ()):
                    if ref != key:
                        deps.body_edges.setdefault(key, set()).add(ref)
            elif (schema, name) in outside:
                is_function, extension = outside[(schema, name)]
                if extension:
                    deps.extensions.setdefault(key, set()).add(extension)
                else:
                    ident = f"{schema}.{name}()" if is_function else f"{schema}.{name}"
                    deps.outside.setdefault(key, {}).setdefault(ident, "body")


def _without_comments(body: str) -> str:
    body = re.sub(r"/\*.*?\*/", " ", body, flags=re.S)
    return re.sub(r"--[^\n]*", " ", body)


# ---------------------------------------------------------------------------------------------------
# Roles the migrated objects name


_ROLE_USES = """
WITH ns AS (SELECT oid, nspname FROM pg_namespace WHERE nspname = ANY(%(s)s))
SELECT r.rolname, 'policy ' || ns.nspname || '.' || c.relname || '.' || p.polname || ' (TO)'
  FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN ns ON ns.oid = c.relnamespace
  CROSS JOIN LATERAL unnest(p.polroles) AS pr(oid) JOIN pg_roles r ON r.oid = pr.oid
UNION ALL
SELECT r.rolname, 'grant on ' || ns.nspname || '.' || c.relname
  FROM pg_class c JOIN ns ON ns.oid = c.relnamespace CROSS JOIN LATERAL aclexplode(c.relacl) a
  JOIN pg_roles r ON r.oid = a.grantee WHERE a.grantee <> c.relowner
UNION ALL
SELECT r.rolname, 'grant on column ' || ns.nspname || '.' || c.relname || '.' || at.attname
  FROM pg_attribute at JOIN pg_class c ON c.oid = at.attrelid JOIN ns ON ns.oid = c.relnamespace
  CROSS JOIN LATERAL aclexplode(at.attacl) a JOIN pg_roles r ON r.oid = a.grantee
UNION ALL
SELECT r.rolname, 'grant on function ' || ns.nspname || '.' || p.proname
  FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace CROSS JOIN LATERAL aclexplode(p.proacl) a
  JOIN pg_roles r ON r.oid = a.grantee WHERE a.grantee <> p.proowner
UNION ALL
SELECT r.rolname, 'grant on schema ' || ns.nspname
  FROM pg_namespace n JOIN ns ON ns.oid = n.oid CROSS JOIN LATERAL aclexplode(n.nspacl) a
  JOIN pg_roles r ON r.oid = a.grantee WHERE a.grantee <> n.nspowner AND r.rolname <> 'pg_database_owner'
UNION ALL
SELECT r.rolname, 'default privileges in schema ' || ns.nspname
  FROM pg_default_acl d JOIN ns ON ns.oid = d.defaclnamespace CROSS JOIN LATERAL aclexplode(d.defaclacl) a
  JOIN pg_roles r ON r.oid = a.grantee WHERE a.grantee <> d.defaclrole
"""

_OWNERS = """
WITH ns AS (SELECT oid, nspname FROM pg_namespace WHERE nspname = ANY(%(s)s))
SELECT DISTINCT r.rolname FROM pg_class c JOIN ns ON ns.oid = c.relnamespace JOIN pg_roles r ON r.oid = c.relowner
UNION SELECT r.rolname FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace JOIN pg_roles r ON r.oid = p.proowner
UNION SELECT r.rolname FROM pg_default_acl d JOIN ns ON ns.oid = d.defaclnamespace
       JOIN pg_roles r ON r.oid = d.defaclrole
"""


@dataclass(frozen=True)
class RoleFacts:
    name: str
    inherit: bool
    bypassrls: bool
    login: bool


def role_uses(conn: psycopg.Connection, schemas: list[str]) -> dict[str, list[str]]:
    """{role: [where it is named]} for every role a policy, grant or default privilege of the schemas names
    (the owner of an object is not listed for its own grants; PUBLIC is not a role)."""
    uses: dict[str, set[str]] = {}
    for role, where in conn.execute(_ROLE_USES, {"s": schemas}):
        uses.setdefault(role, set()).add(where)
    # In a fixed order, policies first: the catalog's scan order changes whenever a grant is changed and
    # changed back (the row moves), and the ledger's copy must compare equal to a fresh read.
    return {role: sorted(found, key=_use_rank) for role, found in uses.items()}


# (prefix, rank), longest prefixes first so "grant on column" is not taken for a table's "grant on"
_USE_KINDS = (("policy ", 0), ("grant on column ", 2), ("grant on function ", 3), ("grant on schema ", 4),
              ("grant on ", 1), ("default privileges ", 5))


def _use_rank(where: str) -> tuple[int, str]:
    return next((rank for kind, rank in _USE_KINDS if where.startswith(kind)), len(_USE_KINDS)), where


def owners(conn: psycopg.Connection, schemas: list[str]) -> list[str]:
    return sorted(r[0] for r in conn.execute(_OWNERS, {"s": schemas}))


def role_facts(conn: psycopg.Connection, names: list[str]) -> dict[str, RoleFacts]:
    return {r[0]: RoleFacts(*r) for r in conn.execute(
        "SELECT rolname, rolinherit, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s)", (names,))}
