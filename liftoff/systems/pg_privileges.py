"""Grants: read from the source's catalog, applied to the target through a role map, GRANT and REVOKE alike.

``pg_restore --no-acl`` restores no grant at all, and ``pg_restore`` with ACLs fails on the first role the
target lacks. Reading the ACLs from the catalog instead lets each source role be created, renamed or
dropped on the way, and lets the target end with exactly the source's privileges for every mapped role:
what the target's defaults granted beyond them is revoked (a revoked grant stays revoked), and nothing the
source did not grant is added. An absent ACL means the object's default (``acldefault``), as on the server.
The owner's own privileges are not grants; ownership goes to the restoring user (``--no-owner``).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

PUBLIC = "PUBLIC"

_GRANTS = """
WITH ns AS (SELECT oid, nspname FROM pg_namespace WHERE nspname = ANY(%(s)s)),
members AS (SELECT classid, objid FROM pg_depend WHERE deptype = 'e')
SELECT CASE WHEN c.relkind = 'S' THEN 'sequence' ELSE 'table' END, ns.nspname, c.relname, NULL,
       coalesce(r.rolname, 'PUBLIC'), a.privilege_type
  FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
 CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault((CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END)::"char",
                                                             c.relowner))) a
  LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND a.grantee <> c.relowner
   AND NOT EXISTS (SELECT 1 FROM members m WHERE m.classid = 'pg_class'::regclass AND m.objid = c.oid)
UNION ALL
SELECT 'column', ns.nspname, c.relname, at.attname, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
  FROM pg_attribute at JOIN pg_class c ON c.oid = at.attrelid JOIN ns ON ns.oid = c.relnamespace
 CROSS JOIN LATERAL aclexplode(at.attacl) a
  LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE at.attnum > 0 AND NOT at.attisdropped AND a.grantee <> c.relowner
UNION ALL
SELECT 'function', ns.nspname, p.proname, pg_get_function_identity_arguments(p.oid), coalesce(r.rolname, 'PUBLIC'),
       a.privilege_type
  FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
 CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
  LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE a.grantee <> p.proowner
   AND NOT EXISTS (SELECT 1 FROM members m WHERE m.classid = 'pg_proc'::regclass AND m.objid = p.oid)
UNION ALL
SELECT 'schema', ns.nspname, ns.nspname, NULL, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
  FROM pg_namespace n JOIN ns ON ns.oid = n.oid
 CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
  LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE a.grantee <> n.nspowner AND coalesce(r.rolname, '') <> 'pg_database_owner'
"""

_DEFAULT_ACLS = """
SELECT o.rolname, n.nspname, d.defaclobjtype, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
  FROM pg_default_acl d JOIN pg_namespace n ON n.oid = d.defaclnamespace
  JOIN pg_roles o ON o.oid = d.defaclrole
 CROSS JOIN LATERAL aclexplode(d.defaclacl) a
  LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE n.nspname = ANY(%(s)s) AND a.grantee <> d.defaclrole
"""
_DEFAULT_OBJECTS = {"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS", "T": "TYPES", "n": "SCHEMAS"}


@dataclass(frozen=True)
class Grant:
    """One privilege on one object for one grantee (a role name or PUBLIC)."""

    kind: str  # table (any relation but sequences), sequence, column, function, schema
    schema: str
    name: str  # relation, function or schema name
    detail: str | None  # a column's name, a function's identity arguments
    grantee: str
    privilege: str

    @property
    def object(self) -> tuple[str, str, str, str | None]:
        return (self.kind, self.schema, self.name, self.detail)

    @property
    def label(self) -> str:
        if self.kind == "function":
            return f"function {self.schema}.{self.name}({self.detail})"
        if self.kind == "column":
            return f"column {self.schema}.{self.name}.{self.detail}"
        return f"{self.kind} {self.schema}" if self.kind == "schema" else f"{self.kind} {self.schema}.{self.name}"


@dataclass(frozen=True)
class DefaultGrant:
    """``ALTER DEFAULT PRIVILEGES FOR ROLE owner IN SCHEMA schema GRANT privilege ON objects TO grantee``."""

    owner: str
    schema: str
    objects: str  # r S f T n, as pg_default_acl.defaclobjtype
    grantee: str
    privilege: str


def read_grants(conn: psycopg.Connection, schemas: list[str]) -> list[Grant]:
    return [Grant(*row) for row in conn.execute(_GRANTS, {"s": schemas})]


def from_freeze_record(revoked: list[dict]) -> list[Grant]:
    """The grants a write freeze revoked (``liftoff.systems.pg_freeze``'s record), as grants read here are."""
    return [Grant("table" if g["column"] is None else "column", g["schema"], g["table"], g["column"], g["grantee"],
                  g["privilege"]) for g in revoked]


_GRANTABLE = """
SELECT CASE WHEN c.relkind = 'S' THEN 'sequence' ELSE 'table' END, n.nspname, c.relname, NULL
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = ANY(%(s)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
UNION ALL
SELECT 'function', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = ANY(%(s)s)
UNION ALL
SELECT 'schema', nspname, nspname, NULL FROM pg_namespace WHERE nspname = ANY(%(s)s)
"""


def grantable_objects(conn: psycopg.Connection, schemas: list[str]) -> set[tuple]:
    """(kind, schema, name, detail) of every object of the schemas a grant can name (as ``Grant.object``)."""
    return {tuple(r) for r in conn.execute(_GRANTABLE, {"s": schemas})}


def read_default_grants(conn: psycopg.Connection, schemas: list[str]) -> list[DefaultGrant]:
    return [DefaultGrant(*row) for row in conn.execute(_DEFAULT_ACLS, {"s": schemas})]


# What objects a role creates later get, as the gate compares it: the schemas' entries, and the global ones
# (``ALTER DEFAULT PRIVILEGES FOR ROLE r`` without IN SCHEMA, which apply in every schema). A global entry
# replaces PostgreSQL's built-in default for its owner and kind (``acldefault``: EXECUTE on functions and
# USAGE on types to PUBLIC), so it is read as what it grants beyond that default and what of that default it
# takes away (``granted`` false): a global REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC shows.
_DEFAULT_PRIVILEGES = """
WITH d AS (SELECT d.defaclrole, d.defaclobjtype, d.defaclacl, n.nspname
             FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
            WHERE d.defaclnamespace = 0 OR n.nspname = ANY(%(s)s)),
builtin AS (SELECT d.defaclrole, d.defaclobjtype, d.defaclacl, b.grantee, b.privilege_type FROM d
             CROSS JOIN LATERAL aclexplode(acldefault(
                 (CASE d.defaclobjtype WHEN 'S' THEN 's' ELSE d.defaclobjtype END)::"char", d.defaclrole)) b
            WHERE d.nspname IS NULL AND b.grantee <> d.defaclrole)
SELECT o.rolname, d.nspname, d.defaclobjtype, coalesce(r.rolname, 'PUBLIC'), a.privilege_type, true
  FROM d CROSS JOIN LATERAL aclexplode(d.defaclacl) a
  JOIN pg_roles o ON o.oid = d.defaclrole LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE a.grantee <> d.defaclrole
   AND NOT (d.nspname IS NULL AND EXISTS (SELECT 1 FROM builtin b WHERE b.defaclrole = d.defaclrole
            AND b.defaclobjtype = d.defaclobjtype AND b.grantee = a.grantee AND b.privilege_type = a.privilege_type))
UNION ALL
SELECT o.rolname, NULL, b.defaclobjtype, coalesce(r.rolname, 'PUBLIC'), b.privilege_type, false
  FROM builtin b JOIN pg_roles o ON o.oid = b.defaclrole LEFT JOIN pg_roles r ON r.oid = b.grantee
 WHERE NOT EXISTS (SELECT 1 FROM aclexplode(b.defaclacl) a
                    WHERE a.grantee = b.grantee AND a.privilege_type = b.privilege_type)
"""


@dataclass(frozen=True)
class DefaultPrivilege:
    """What an object ``owner`` creates later in ``schema`` (None: any schema, a global entry) gets: ``grantee``
    is given ``privilege``, or (``granted`` false, global entries only) denied one PostgreSQL gives by default."""

    owner: str
    schema: str | None
    objects: str  # r S f T n (L), as pg_default_acl.defaclobjtype
    grantee: str
    privilege: str
    granted: bool = True

    @property
    def label(self) -> str:
        where = f"in schema {self.schema}" if self.schema else "in every schema"
        objects = {**_DEFAULT_OBJECTS, "L": "LARGE OBJECTS"}.get(self.objects, self.objects).lower()
        return f"for role {self.owner} {where} on {objects} to {self.grantee}"


def read_default_privileges(conn: psycopg.Connection, schemas: list[str]) -> list[DefaultPrivilege]:
    """Every role's default privileges in ``schemas`` and its global ones (``_DEFAULT_PRIVILEGES``)."""
    return [DefaultPrivilege(*row) for row in conn.execute(_DEFAULT_PRIVILEGES, {"s": schemas})]


def restored_default_grantee(source_owner: str, grantee: str, roles: dict[str, str | None],
                             owner: str) -> str | None:
    """Whom the restore gives, on the target, a default privilege the source's ``source_owner`` gives
    ``grantee``: the grantee through the role map (PUBLIC stays PUBLIC), as a default privilege of ``owner``
    (the restoring user) when the map sends ``source_owner`` to it or does not name it. None: not restored
    (the map drops the grantee, or sends the owner to another role)."""
    if roles.get(source_owner, owner) != owner:
        return None
    return _target_of(grantee, roles)


def _target_of(grantee: str, roles: dict[str, str | None]) -> str | None:
    return PUBLIC if grantee == PUBLIC else roles.get(grantee)


def _on(obj: tuple[str, str, str, str | None]) -> sql.Composable:
    kind, schema, name, detail = obj
    if kind == "function":
        return sql.SQL("FUNCTION {}.{}({})").format(sql.Identifier(schema), sql.Identifier(name), sql.SQL(detail or ""))
    if kind == "schema":
        return sql.SQL("SCHEMA {}").format(sql.Identifier(schema))
    if kind == "sequence":
        return sql.SQL("SEQUENCE {}").format(sql.Identifier(schema, name))
    return sql.SQL("TABLE {}").format(sql.Identifier(schema, name))


def _grantee(name: str) -> sql.Composable:
    return sql.SQL("PUBLIC") if name == PUBLIC else sql.Identifier(name)


def _privileges(obj, privileges: set[str]) -> sql.Composable:
    items = [sql.SQL(p) for p in sorted(privileges)]
    if obj[0] == "column":
        return sql.SQL("{} ({})").format(sql.SQL(", ").join(items), sql.Identifier(obj[3]))
    return sql.SQL(", ").join(items)


def plan_grants(source: list[Grant], target: list[Grant], present: set[tuple], roles: dict[str, str | None],
                owner: str | None = None) -> list[sql.Composable]:
    """GRANT and REVOKE statements that give every mapped role (and PUBLIC) on the target exactly the
    privileges its source role has, on the objects ``present`` on the target (``grantable_objects``); other
    target roles are left alone, and so is ``owner`` (the restoring user, who owns every object)."""
    wanted: dict[tuple, set[str]] = {}
    for g in source:
        grantee = _target_of(g.grantee, roles)
        if grantee and grantee != owner:
            wanted.setdefault((g.object, grantee), set()).add(g.privilege)
    in_scope = {PUBLIC} | {r for r in roles.values() if r and r != owner}
    have: dict[tuple, set[str]] = {}
    for g in target:
        if g.grantee in in_scope:
            have.setdefault((g.object, g.grantee), set()).add(g.privilege)
    statements = []
    for (obj, grantee) in sorted(set(wanted) | set(have), key=lambda k: (k[0][0], k[0][1], k[0][2], k[0][3] or "", k[1])):
        if (("table", obj[1], obj[2], None) if obj[0] == "column" else obj) not in present:
            continue  # not on the target: left out of the restore, and reported there
        more = wanted.get((obj, grantee), set()) - have.get((obj, grantee), set())
        fewer = have.get((obj, grantee), set()) - wanted.get((obj, grantee), set())
        target_obj = ("table", obj[1], obj[2], None) if obj[0] == "column" else obj
        if more:
            statements.append(sql.SQL("GRANT {} ON {} TO {}").format(
                _privileges(obj, more), _on(target_obj), _grantee(grantee)))
        if fewer:
            statements.append(sql.SQL("REVOKE {} ON {} FROM {}").format(
                _privileges(obj, fewer), _on(target_obj), _grantee(grantee)))
    return statements


def plan_default_grants(source: list[DefaultGrant], target: list[DefaultGrant], roles: dict[str, str | None],
                        owner: str) -> list[sql.Composable]:
    """Default privileges of the source's object owners, given to the target's owner (``owner``, the
    restoring user) for the mapped roles; those of the target beyond them are revoked."""
    wanted = {(d.schema, d.objects, grantee, d.privilege) for d in source
              if (grantee := restored_default_grantee(d.owner, d.grantee, roles, owner))}
    in_scope = {PUBLIC} | {r for r in roles.values() if r}
    have = {(d.schema, d.objects, d.grantee, d.privilege) for d in target if d.owner == owner and d.grantee in in_scope}
    statements = []
    for verb, rows in (("GRANT", wanted - have), ("REVOKE", have - wanted)):
        for schema, objects, grantee, privilege in sorted(rows):
            statements.append(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} {} {} ON {} {} {}").format(
                sql.Identifier(owner), sql.Identifier(schema), sql.SQL(verb), sql.SQL(privilege),
                sql.SQL(_DEFAULT_OBJECTS[objects]), sql.SQL("TO" if verb == "GRANT" else "FROM"), _grantee(grantee)))
    return statements
