"""The cutover's write freeze on the source, as Supabase's non-superuser ``postgres``, and its exact undo.

``freeze_writes`` stops the app's writes by one of three methods (``cutover.freeze.method``) and returns a
record (plain JSON) of exactly what it changed and when writes stopped; ``lift_freeze`` puts back exactly
that, and is idempotent; ``freeze_problems`` tells beforehand, changing nothing, why a freeze could not be
done (for the pre-cutover checklist); ``freeze_holes`` tells whether a freeze in force still holds.

What the source user may do on Supabase (its migrations, and a hosted project's ``pg_dumpall --roles-only``):
``postgres`` is not a superuser; it has CREATEROLE (on PostgreSQL 16+ also ADMIN OPTION on ``anon``,
``authenticated``, ``service_role`` and ``authenticator``), so it may ``ALTER ROLE ... SET`` them; it is a
member of ``pg_signal_backend``, so it may end any non-superuser's session (without it, only sessions of
roles it is a member of: ``anon``, ``authenticated``, ``service_role``, which never log in); it owns the
app's tables in ``public`` and made their grants, so it may revoke and re-grant them; it does not own the
database ``postgres`` (``supabase_admin`` does), so ``ALTER DATABASE`` is refused to it.

The methods, and what each does NOT stop:

- ``role``: ``ALTER ROLE r IN DATABASE d SET default_transaction_read_only = on`` for each role (the role's
  previous setting in that database, or "not set", is recorded), then the role's sessions open in the
  database once that is committed are ended (``pg_terminate_backend``; found by login role and pid, which
  ``pg_stat_activity`` shows any user, so no ``pg_monitor`` is needed), and the freeze waits until they are
  gone (sessions logging in later, an app's pool reconnecting, are read-only by default already). The
  roles must be LOGIN roles: a role's settings apply when a session logs in as it, never on ``SET ROLE``.
  The roles' own write grants (INSERT, UPDATE, DELETE, TRUNCATE, direct and per column) on the migrated
  schemas are revoked too, as ``revoke`` does, since the read-only default does not stop a client that
  asks for a writable transaction (``BEGIN READ WRITE``, ``SET default_transaction_read_only = off``).
  Still not stopped: such a client writing through a table the role owns, a grant through PUBLIC or
  another role, or a schema not migrated. **PostgREST** logs in as ``authenticator``, ``SET ROLE``s to
  ``anon``/``authenticated``/``service_role`` and starts every write ``BEGIN ... READ WRITE``: use
  ``revoke`` for the API roles. At the lift, the sessions that logged in during the freeze (read-only for
  as long as they live) are ended, so the apps' pools reconnect writable.
- ``database``: ``ALTER DATABASE d SET default_transaction_read_only = on`` (previous setting recorded),
  then the listed roles' sessions are ended as above. Needs the database's owner: on hosted Supabase
  ``postgres`` is not, and the freeze is refused. Not stopped: the same explicit READ WRITE as ``role``, and
  any role with its own ``default_transaction_read_only`` setting (role settings override the database's;
  ``freeze_problems`` names them).
- ``revoke``: INSERT, UPDATE, DELETE and TRUNCATE are revoked from the roles on every table, view and
  foreign table of the schemas, column grants included (a table-level REVOKE removes them too); the grants
  it removed, and only those, are recorded with grantor and grant option, and the lift grants exactly those
  back. Then it waits until no transaction that wrote before the revoke is still open (``LOCK TABLE ... IN
  SHARE MODE`` on the tables it may lock), so ``frozen_at`` is when the last write committed. This is the
  method for Supabase's API roles (``anon``, ``authenticated``, ``service_role``): it stops PostgREST
  whatever transaction mode it asks for. Not stopped: SECURITY DEFINER functions (RPC) whose owner still
  has the privileges, triggers writing other schemas, a role's writes through membership of another role
  or through PUBLIC (``freeze_writes`` refuses when the roles could still write after the revoke), writes to
  schemas not listed (Auth's sign-ups in ``auth`` as ``supabase_auth_admin``, Storage's ``storage.objects``
  unless ``storage`` is listed), and login roles writing with their own grants (freeze those with ``role``).

Every change runs in an explicit READ WRITE transaction, so a freeze of the source user itself (the role
list may name it, for an app that logs in as ``postgres``) or a database freeze never locks Liftoff out of
lifting it; Liftoff's other source sessions only read, and the session running the freeze is never ended.
A second freeze while one is in force changes nothing more, and records the frozen state as its "previous"
one: lift with the first freeze's record (the ledger keeps the first) to get the original back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psycopg
from psycopg import sql

from liftoff.errors import StepFailed
from liftoff.logs import get_logger
from liftoff.redaction import redact
from liftoff.runbooks.model import Freeze

log = get_logger(phase="cutover", step="freeze")

SETTING = "default_transaction_read_only"
WRITE_PRIVILEGES = ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
WRITABLE_KINDS = ["r", "p", "v", "f"]  # tables, partitioned tables, (updatable) views, foreign tables
LOCKABLE_KINDS = ["r", "p"]
POLL_S = 0.1


# ---------------------------------------------------------------------------------------------------
# Public interface


def freeze_problems(conn: psycopg.Connection, freeze: Freeze, schemas: list[str]) -> list[str]:
    """Why ``freeze_writes`` would refuse, one line each (empty when it can go ahead); changes nothing.
    For ``revoke`` the revoke is tried in a transaction that is rolled back, so what the roles could still
    write afterwards (through PUBLIC, a membership or another grantor's grant) is found beforehand."""
    with _autocommit(conn):
        me = _whoami(conn)
        problems = _role_problems(conn, me, freeze)
        if problems:
            return problems
        if freeze.method == "database":
            problems += _database_problems(conn, me, freeze.roles)
        if freeze.method == "revoke":
            with _read_write(conn):
                problems += _revoke(conn, freeze.roles, schemas)[1]
                raise _RollBack
        return problems


def freeze_writes(conn: psycopg.Connection, freeze: Freeze, schemas: list[str], *, wait_s: float = 30.0) -> dict:
    """Stops the app's writes on the source by ``freeze.method`` for ``freeze.roles`` (``schemas``: the
    migrated schemas, used by ``revoke``); returns what ``lift_freeze`` needs to undo exactly this freeze,
    plain JSON: ``method``, ``database``, ``roles``, ``schemas``, the previous state (``settings`` per role,
    ``setting`` of the database, or the ``revoked`` grants), the pids of the ``ended_sessions``, and
    ``frozen_at`` (epoch seconds, the instant no session or transaction that could write was left).
    ``conn``: an idle connection as the source user (its autocommit mode is put back afterwards).

    Refuses with one line, changing nothing, when the source user may not do it (``freeze_problems``). If
    the freeze cannot be completed within ``wait_s`` (a session that will not end, a write transaction
    that will not finish), it is lifted again before StepFailed is raised: never a freeze nobody recorded.
    """
    with _autocommit(conn):
        me = _whoami(conn)
        problems = _role_problems(conn, me, freeze)
        if not problems and freeze.method == "database":
            problems = _database_problems(conn, me, freeze.roles)
        if problems:
            raise StepFailed(f"cannot freeze writes on source database {me['database']}: {'; '.join(problems)}")
        record = {"method": freeze.method, "database": me["database"], "roles": list(freeze.roles),
                  "schemas": list(schemas)}
        if freeze.method == "revoke":
            with _read_write(conn):
                record["revoked"], holes = _revoke(conn, freeze.roles, schemas)
                if holes:
                    raise StepFailed(f"cannot freeze writes on source database {me['database']} by revoking: "
                                     f"{'; '.join(holes)}; nothing was changed")
            _lift_on_failure(conn, record, lambda: _wait_for_writers(conn, schemas, wait_s))
        else:
            with _read_write(conn):
                if freeze.method == "role":
                    record["settings"] = {role: _role_setting(conn, role) for role in freeze.roles}
                    for role in freeze.roles:
                        _run(conn, sql.SQL("ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on")
                             .format(sql.Identifier(role), sql.Identifier(me["database"])), f"ALTER ROLE {role}")
                    # The read-only default does not stop a client that asks for BEGIN READ WRITE: their own
                    # write grants on the migrated schemas go too (recorded, granted back at the lift).
                    record["revoked"] = _revoke(conn, [r for r in freeze.roles if r != me["user"]], schemas)[0]
                else:
                    record["setting"] = _database_setting(conn)
                    _run(conn, sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on")
                         .format(sql.Identifier(me["database"])), f"ALTER DATABASE {me['database']}")
            # Sessions that log in from now on read the new setting; those open now are ended.
            record["ended_sessions"] = [pid for _, pid in _sessions(conn, freeze.roles)]
            _lift_on_failure(conn, record, lambda: _end_sessions(conn, freeze.roles, record["ended_sessions"],
                                                                  wait_s))
    record["frozen_at"] = time.time()
    log.info("source frozen", method=freeze.method, roles=freeze.roles, database=me["database"],
             revoked=len(record.get("revoked", [])), ended_sessions=len(record.get("ended_sessions", [])))
    return record


def lift_freeze(conn: psycopg.Connection, previous: dict, *, wait_s: float = 30.0) -> None:
    """Undoes exactly the freeze ``previous`` records (``freeze_writes``' return value): each role's or
    the database's previous setting back, "not set" included, or exactly the revoked grants back with
    their grant option (``role`` revokes the roles' own write grants too). Then the sessions of the frozen
    roles that logged in during the freeze, read-only by default for as long as they live, are ended.
    Idempotent. Raises StepFailed with one line if a grant could not be put back."""
    with _autocommit(conn):
        method = previous.get("method")
        if method not in ("role", "database", "revoke"):
            raise StepFailed(f"cannot lift the source's write freeze: its record names no known method ({method!r})")
        database = conn.execute("SELECT current_database()").fetchone()[0]
        if previous.get("database") != database:
            raise StepFailed(f"cannot lift the write freeze of source database {previous.get('database')} through a "
                             f"connection to database {database}; check source.database")
        with _read_write(conn):
            if method == "role":
                for role, value in previous["settings"].items():
                    if not _role_exists(conn, role):
                        log.warning("role gone, its setting cannot be put back", role=role)
                        continue
                    target = sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(role),
                                                                           sql.Identifier(database))
                    _run(conn, _setting_statement(target, value), f"ALTER ROLE {role}")
            elif method == "database":
                target = sql.SQL("ALTER DATABASE {}").format(sql.Identifier(database))
                _run(conn, _setting_statement(target, previous["setting"]), f"ALTER DATABASE {database}")
            if previous.get("revoked"):
                _grant_back(conn, previous["revoked"])
        ended = []
        if method in ("role", "database"):
            # A session that logged in while the freeze stood took the read-only default with it, and keeps
            # it after the lift: those are ended now (the freeze ended every earlier one), so the apps'
            # pools reconnect writable. Liftoff's own session is never among them.
            me = conn.execute("SELECT current_user").fetchone()[0]
            roles = [r for r in previous["roles"] if r != me]
            ended = [pid for _, pid in _sessions(conn, roles)]
            try:
                if ended:
                    _end_sessions(conn, roles, ended, wait_s)
            except StepFailed as exc:  # the freeze is lifted; a session left read-only must not stop a rollback
                log.warning("sessions from the freeze not ended; they stay read-only until they reconnect",
                            reason=str(exc))
    log.info("source freeze lifted", method=method, database=database, ended_sessions=len(ended))


def freeze_holes(conn: psycopg.Connection, frozen: dict) -> list[str]:
    """What still lets the listed roles write under the freeze ``frozen`` records, one line each (empty: the
    freeze holds). Reads only. The explicit READ WRITE transactions ``role``/``database`` cannot stop are
    not listed here (no catalog shows them); see the module docstring."""
    with _autocommit(conn):
        return _holes(conn, frozen)


def _holes(conn: psycopg.Connection, frozen: dict) -> list[str]:
    holes = []
    method, roles = frozen["method"], frozen["roles"]
    if method == "role":
        for role in roles:
            value = _role_setting(conn, role)
            if value != "on":
                holes.append(f"role {role} has {SETTING} = {value or 'not set'} in database {frozen['database']}")
    elif method == "database":
        value = _database_setting(conn)
        if value != "on":
            holes.append(f"database {frozen['database']} has {SETTING} = {value or 'not set'}")
        holes += _overriding_settings(conn, roles)
    if method in ("role", "database"):
        for role, pid in _sessions(conn, roles, frozen["ended_sessions"]):
            holes.append(f"session {pid} of role {role}, open before the freeze, is still open")
    if method == "revoke":
        holes += _write_privileges(conn, roles, frozen["schemas"])
    return holes


# ---------------------------------------------------------------------------------------------------
# Who we are and what we may do


class _RollBack(Exception):
    """Leaves a ``_read_write`` block by rolling its transaction back."""


def _whoami(conn: psycopg.Connection) -> dict:
    user, database, version = conn.execute(
        "SELECT current_user, current_database(), current_setting('server_version_num')::int").fetchone()
    return {"user": user, "database": database, "version": version}


def _role_problems(conn: psycopg.Connection, me: dict, freeze: Freeze) -> list[str]:
    if not freeze.roles:
        return ["cutover.freeze.roles is empty: name the roles the apps write as"]
    rows = conn.execute(
        """SELECT r.rolname, r.rolsuper, r.rolcanlogin,
                  pg_has_role(r.oid, 'USAGE') OR pg_has_role('pg_signal_backend', 'USAGE') AS may_signal,
                  CASE WHEN %(v)s >= 160000 THEN pg_has_role(r.oid, 'MEMBER WITH ADMIN OPTION')
                       ELSE (SELECT rolcreaterole FROM pg_roles WHERE rolname = current_user) END
                  OR r.rolname = current_user OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                  AS may_alter
             FROM pg_roles r WHERE r.rolname = ANY(%(roles)s)""",
        {"v": me["version"], "roles": list(freeze.roles)}).fetchall()
    found = {row[0]: row[1:] for row in rows}
    user, problems, no_login = me["user"], [], []
    for role in freeze.roles:
        if role not in found:
            problems.append(f"cutover.freeze.roles: role {role} does not exist on the source")
            continue
        superuser, can_login, may_signal, may_alter = found[role]
        if superuser:
            problems.append(f"cutover.freeze.roles: role {role} is a superuser: source user {user} can neither "
                            "freeze it nor end its sessions; the apps must not write as a superuser")
            continue
        if freeze.method == "role" and not can_login:
            no_login.append(role)
            continue
        if freeze.method == "role" and not may_alter:
            needs = "CREATEROLE and ADMIN OPTION on the role" if me["version"] >= 160000 else "CREATEROLE"
            problems.append(f"source user {user} may not ALTER ROLE {role} (it needs {needs})")
        if freeze.method in ("role", "database") and can_login and not may_signal:
            problems.append(f"source user {user} may not end role {role}'s sessions: GRANT pg_signal_backend TO "
                            f"{user} (Supabase grants it to postgres)")
    if no_login:
        problems.append(f"cutover.freeze.roles: {', '.join(no_login)} cannot log in, so a role setting never applies "
                        "(PostgREST logs in as authenticator and only SET ROLEs to the API roles); use "
                        "cutover.freeze.method revoke for the API roles, or name the roles the apps log in as")
    return problems


def _database_problems(conn: psycopg.Connection, me: dict, roles: list[str]) -> list[str]:
    owner, owns = conn.execute("SELECT datdba::regrole::text, pg_has_role(datdba, 'USAGE') FROM pg_database "
                               "WHERE datname = current_database()").fetchone()
    if not owns:
        return [(f"cutover.freeze.method database: ALTER DATABASE {me['database']} needs its owner ({owner}) and "
                 f"source user {me['user']} is not (as on hosted Supabase); use cutover.freeze.method role or revoke")]
    return _overriding_settings(conn, roles)


def _overriding_settings(conn: psycopg.Connection, roles: list[str]) -> list[str]:
    """Roles whose own default_transaction_read_only (for every database, or this one) overrides the
    database's."""
    rows = conn.execute(
        """SELECT r.rolname, split_part(c, '=', 2)
             FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole, unnest(s.setconfig) c
            WHERE r.rolname = ANY(%s) AND c LIKE 'default\\_transaction\\_read\\_only=%%'
              AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
              AND split_part(c, '=', 2) <> 'on'""", (list(roles),)).fetchall()
    return [f"role {role} has its own {SETTING} = {value}, which overrides the database's: ALTER ROLE {role} "
            f"RESET {SETTING}, or use cutover.freeze.method role" for role, value in rows]


# ---------------------------------------------------------------------------------------------------
# Settings (role and database)


def _role_setting(conn: psycopg.Connection, role: str) -> str | None:
    """The role's own default_transaction_read_only in this database, as written, or None (not set)."""
    return _setting_of(conn, role)


def _database_setting(conn: psycopg.Connection) -> str | None:
    """The database's default_transaction_read_only (for every role), as written, or None (not set)."""
    return _setting_of(conn, None)


def _setting_of(conn: psycopg.Connection, role: str | None) -> str | None:
    row = conn.execute(
        """SELECT substr(c, length('default_transaction_read_only=') + 1)
             FROM pg_db_role_setting s, unnest(s.setconfig) c
            WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND s.setrole = CASE WHEN %(role)s::text IS NULL THEN 0
                                 ELSE (SELECT oid FROM pg_roles WHERE rolname = %(role)s::text) END
              AND c LIKE 'default\\_transaction\\_read\\_only=%%'""", {"role": role}).fetchone()
    return row[0] if row else None


def _setting_statement(target: sql.Composable, value: str | None) -> sql.Composed:
    if value is None:
        return sql.SQL("{} RESET default_transaction_read_only").format(target)
    return sql.SQL("{} SET default_transaction_read_only = {}").format(target, sql.Literal(value))


def _role_exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


# ---------------------------------------------------------------------------------------------------
# Sessions


def _sessions(conn: psycopg.Connection, roles: list[str], pids: list[int] | None = None) -> list[tuple[str, int]]:
    """The roles' sessions in this database (only those of ``pids`` if given), never this one. Reads only
    what pg_stat_activity shows any user (the login role and pid): no pg_read_all_stats needed."""
    # autocommit: each statement its own transaction, so pg_stat_activity is read afresh each time
    return conn.execute(
        "SELECT usename, pid FROM pg_stat_activity WHERE datname = current_database() AND usename = ANY(%s) "
        "AND pid <> pg_backend_pid() AND (%s::int[] IS NULL OR pid = ANY(%s::int[])) ORDER BY pid",
        (list(roles), pids, pids)).fetchall()


def _end_sessions(conn: psycopg.Connection, roles: list[str], pids: list[int], wait_s: float) -> None:
    """Ends these sessions of the roles and waits until they are gone. Sessions that log in later already
    have the read-only default (an app's pool reconnecting at once is expected), so they are left alone."""
    deadline = time.monotonic() + wait_s
    signalled: set[int] = set()
    while sessions := _sessions(conn, roles, pids):
        if time.monotonic() > deadline:
            role, pid = sessions[0]
            raise StepFailed(f"{len(sessions)} session(s) of the frozen roles on the source did not end within "
                             f"{wait_s:g} s (first: role {role}, pid {pid})")
        for role, pid in sessions:
            if pid not in signalled:
                _run(conn, sql.SQL("SELECT pg_terminate_backend({})").format(sql.Literal(pid)),
                     f"ending session {pid} of role {role}")
                signalled.add(pid)
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------------
# Grants


def _write_grants(conn: psycopg.Connection, roles: list[str], schemas: list[str]) -> list[dict]:
    """The roles' direct write grants (table and column level) on the writable relations of ``schemas``."""
    rows = conn.execute(
        """SELECT n.nspname, c.relname, NULL::text, g.rolname, r.rolname, a.privilege_type, a.is_grantable
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN LATERAL aclexplode(c.relacl) a
             JOIN pg_roles g ON g.oid = a.grantee JOIN pg_roles r ON r.oid = a.grantor
            WHERE n.nspname = ANY(%(schemas)s) AND c.relkind = ANY(%(kinds)s)
              AND g.rolname = ANY(%(roles)s) AND a.privilege_type = ANY(%(privs)s)
           UNION ALL
           SELECT n.nspname, c.relname, att.attname, g.rolname, r.rolname, a.privilege_type, a.is_grantable
             FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN LATERAL aclexplode(att.attacl) a
             JOIN pg_roles g ON g.oid = a.grantee JOIN pg_roles r ON r.oid = a.grantor
            WHERE n.nspname = ANY(%(schemas)s) AND c.relkind = ANY(%(kinds)s) AND att.attnum > 0
              AND NOT att.attisdropped AND g.rolname = ANY(%(roles)s) AND a.privilege_type = ANY(%(privs)s)
            ORDER BY 1, 2, 3 NULLS FIRST, 4, 6""",
        {"schemas": list(schemas), "kinds": WRITABLE_KINDS, "roles": list(roles), "privs": WRITE_PRIVILEGES})
    keys = ("schema", "table", "column", "grantee", "grantor", "privilege", "grantable")
    return [dict(zip(keys, row)) for row in rows.fetchall()]


def _write_privileges(conn: psycopg.Connection, roles: list[str], schemas: list[str]) -> list[str]:
    """What the roles may still write, however they got it (direct grant, membership, PUBLIC, ownership)."""
    rows = conn.execute(
        """SELECT format('%%I.%%I', n.nspname, c.relname), r.rolname, pg_get_userbyid(c.relowner) = r.rolname,
                  array_agg(p.priv ORDER BY p.priv)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN pg_roles r CROSS JOIN unnest(%(privs)s::text[]) AS p(priv)
            WHERE n.nspname = ANY(%(schemas)s) AND c.relkind = ANY(%(kinds)s) AND r.rolname = ANY(%(roles)s)
              AND CASE WHEN p.priv IN ('INSERT', 'UPDATE') THEN has_any_column_privilege(r.oid, c.oid, p.priv)
                       ELSE has_table_privilege(r.oid, c.oid, p.priv) END
            GROUP BY 1, 2, 3 ORDER BY 1, 2""",
        {"schemas": list(schemas), "kinds": WRITABLE_KINDS, "roles": list(roles), "privs": WRITE_PRIVILEGES})
    grouped: dict[tuple, list[str]] = {}
    for table, role, owner, privileges in rows.fetchall():
        grouped.setdefault((table, "/".join(privileges), owner), []).append(role)
    out = []
    for (table, privileges, owner), holders in grouped.items():
        how = ("it owns the table" if owner else
               "through PUBLIC, a role it is a member of, or a grant the source user may not revoke")
        out.append(f"{', '.join(holders)} can still {privileges} on {table} ({how})")
    return out


def _revoke(conn: psycopg.Connection, roles: list[str], schemas: list[str]) -> tuple[list[dict], list[str]]:
    """Revokes the roles' write privileges (inside the caller's transaction); returns the grants that
    disappeared and what the roles could still write."""
    before = _write_grants(conn, roles, schemas)
    for schema, table in sorted({(g["schema"], g["table"]) for g in before}):
        _run(conn, sql.SQL("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE {} FROM {}").format(
            sql.Identifier(schema, table), sql.SQL(", ").join(map(sql.Identifier, roles))),
            f"REVOKE on {schema}.{table}")
    after = {_grant_key(g) for g in _write_grants(conn, roles, schemas)}
    return [g for g in before if _grant_key(g) not in after], _write_privileges(conn, roles, schemas)


def _grant_key(grant: dict) -> tuple:
    return tuple(grant[k] for k in ("schema", "table", "column", "grantee", "grantor", "privilege", "grantable"))


def _grant_back(conn: psycopg.Connection, revoked: list[dict]) -> None:
    """Grants back exactly the revoked grants, each by its grantor (as the grantor when the source user
    may act as it), then checks each is there again."""
    user = conn.execute("SELECT current_user").fetchone()[0]
    for g in revoked:
        table = sql.Identifier(g["schema"], g["table"])
        privilege = sql.SQL(g["privilege"]) if g["column"] is None else sql.SQL("{} ({})").format(
            sql.SQL(g["privilege"]), sql.Identifier(g["column"]))
        statement = sql.SQL("GRANT {} ON TABLE {} TO {}{}").format(
            privilege, table, sql.Identifier(g["grantee"]), sql.SQL(" WITH GRANT OPTION" if g["grantable"] else ""))
        as_grantor = g["grantor"] != user and conn.execute("SELECT pg_has_role(%s, 'MEMBER')",
                                                            (g["grantor"],)).fetchone()[0]
        if as_grantor:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(g["grantor"])))
        _run(conn, statement, f"GRANT {g['privilege']} on {g['schema']}.{g['table']} to {g['grantee']}")
        if as_grantor:
            conn.execute("RESET ROLE")
    present = {_grant_key(g) for g in _write_grants(conn, sorted({g["grantee"] for g in revoked}),
                                                   sorted({g["schema"] for g in revoked}))}
    missing = [g for g in revoked if _grant_key(g) not in present]
    if missing:
        g = missing[0]
        column = f" ({g['column']})" if g["column"] else ""
        raise StepFailed(f"cannot put back {len(missing)} grant(s) the write freeze revoked on the source, first: "
                         f"{g['privilege']}{column} on {g['schema']}.{g['table']} to {g['grantee']} granted by "
                         f"{g['grantor']}; grant it as {g['grantor']} or the table's owner")


def _wait_for_writers(conn: psycopg.Connection, schemas: list[str], wait_s: float) -> None:
    """Waits until no transaction that wrote to the schemas' tables is still open: a SHARE lock conflicts
    with the lock every INSERT/UPDATE/DELETE holds until its transaction ends, and new writers are refused
    by the revoke already. Tables the source user may not lock are left out."""
    tables = conn.execute(
        """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY(%s) AND c.relkind = ANY(%s)
              AND (pg_has_role(c.relowner, 'USAGE') OR has_table_privilege(c.oid, 'UPDATE, DELETE, TRUNCATE'))
            ORDER BY 1, 2""", (list(schemas), LOCKABLE_KINDS)).fetchall()
    if not tables:
        return
    try:
        with _read_write(conn):
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(wait_s * 1000)}ms")))
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(
                sql.SQL(", ").join(sql.Identifier(s, t) for s, t in tables)))
    except psycopg.errors.LockNotAvailable:
        raise StepFailed(f"transactions writing to the source's tables in {', '.join(schemas)} were still open "
                         f"after {wait_s:g} s") from None


# ---------------------------------------------------------------------------------------------------
# Transactions and statements


@contextlib.contextmanager
def _read_write(conn: psycopg.Connection) -> Iterator[None]:
    """One transaction that may write even where read-only is the default (a frozen source user)."""
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ WRITE")
            yield
    except _RollBack:
        pass


@contextlib.contextmanager
def _autocommit(conn: psycopg.Connection) -> Iterator[None]:
    """Each bare statement its own transaction (catalog and pg_stat_activity read afresh), writes only in
    ``_read_write`` blocks; the caller's mode is put back."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise StepFailed("the write freeze needs a source connection with no transaction open")
    was = conn.autocommit
    conn.autocommit = True
    try:
        yield
    finally:
        conn.autocommit = was


def _run(conn: psycopg.Connection, statement: sql.Composable, what: str) -> None:
    try:
        conn.execute(statement)
    except psycopg.Error as exc:
        raise StepFailed(f"{what} on the source failed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = redact(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _lift_on_failure(conn: psycopg.Connection, record: dict, step):
    """Runs the rest of a freeze; if it fails, the freeze is lifted before the error goes on, so no freeze
    stands that the caller holds no record of."""
    try:
        return step()
    except (StepFailed, psycopg.Error) as exc:
        reason = str(exc) if isinstance(exc, StepFailed) else f"freezing failed: {_first_line(exc)}"
        try:
            lift_freeze(conn, record)
        except Exception as lift_exc:  # noqa: BLE001 - both go into the one line
            raise StepFailed(f"{reason}; lifting the partial freeze failed too: {_first_line(lift_exc)}; lift it "
                             f"by hand ({record['method']} on {', '.join(record['roles'])})") from None
        raise StepFailed(f"{reason}; the freeze was lifted") from None
