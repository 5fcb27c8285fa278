"""PgBouncer: its config rendered from the runbook, SCRAM authentication that works, the admin console, and the
pooler's gate.

Why the userlist holds SCRAM secrets (``pooler.auth: userlist``, the only mode): PostgreSQL stores each
password as ``SCRAM-SHA-256$...`` in ``pg_authid``; copied verbatim into PgBouncer's ``auth_file``, it lets
PgBouncer check the client's SCRAM login and then log in to PostgreSQL with SCRAM for it, with no plaintext
password anywhere on the VPS. The alternative, ``auth_query`` through a SECURITY DEFINER function, needs a
function and a role in every pooled database (objects the database gate and the backups would carry) and the
``auth_user``'s password in plaintext in the userlist. The cost of the userlist: after a password change, run
``liftoff run pooler`` again. An ``md5...`` entry (Debian's default ``auth_type = md5`` and the usual
``md5(password || user)`` recipe) fails against a SCRAM server with "server login failed: wrong password
type": the preflight names it.

The admin console (``SHOW POOLS``, ``SHOW STATS``, ``SHOW CONFIG``, ``RELOAD``) speaks only the simple query
protocol and has no transactions: it is reached with autocommit and psycopg's ``ClientCursor``, as
``target.direct.user``, whose SCRAM secret the userlist also holds. It counts against ``max_client_conn``,
so the gate reads it before and after the load, and samples the server connections during the load from
PostgreSQL's side (``pg_stat_activity``), where they do not take a client slot.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from liftoff.checks import GateReport
from liftoff.errors import ConnectionRefused, RunbookInvalid, StepFailed
from liftoff.logs import get_logger
from liftoff.redaction import redact, register_secret
from liftoff.runbooks.model import Endpoint, Pooler, Runbook
from liftoff.systems import postgres

log = get_logger(phase="pooler")

PHASE = "pooler"
INI, USERLIST = "pgbouncer.ini", "userlist.txt"
_DEFAULT_MODES = {INI: 0o640, USERLIST: 0o600}
_WRONG_TYPE = "server login failed: wrong password type"


# ---------------------------------------------------------------------------------------------------------
# What the runbook asks for


@dataclass(frozen=True)
class PoolerPlan:
    """The runbook's pooler section with its defaults filled in from ``target``."""

    settings: Pooler
    pooled: Endpoint
    direct: Endpoint
    databases: list[str]
    users: list[str]  # pooled users, then the admin console's
    admin_user: str
    server_host: str
    server_port: int

    def path(self, name: str) -> str:
        return posixpath.join(self.settings.config_dir, name)

    @property
    def where(self) -> str:
        place = "the VPS (ssh)" if self.settings.write_via == "ssh" else "this machine"
        return f"{self.settings.config_dir} on {place}"

    @property
    def pool_limit(self) -> int:
        """Server connections one pool may open: default_pool_size, plus the reserve after reserve_pool_timeout."""
        return self.settings.default_pool_size + self.settings.reserve_pool_size


def plan_pooler(rb: Runbook) -> PoolerPlan:
    if rb.pooler is None:
        raise RunbookInvalid(f"runbook {rb.name}: the pooler phase needs a pooler section (see runbooks/tour-crm.yaml)")
    if rb.target.pooled is None:
        raise RunbookInvalid(f"runbook {rb.name}: the pooler phase needs target.pooled (the apps' connection "
                             "through PgBouncer: its port is PgBouncer's listen_port)")
    if rb.pooler.write_via == "ssh" and rb.ssh is None:
        raise RunbookInvalid(f"runbook {rb.name}: pooler.write_via ssh needs the ssh section (host, user, "
                             "private_key, known_hosts)")
    p, pooled, direct = rb.pooler, rb.target.pooled, rb.target.direct
    databases = p.databases or [pooled.database]
    if pooled.database not in databases:
        raise RunbookInvalid(f"runbook {rb.name}: pooler.databases does not list target.pooled.database "
                             f"({pooled.database}); the apps could not connect")
    pooled_users = p.users or [pooled.user]
    if pooled.user not in pooled_users:
        raise RunbookInvalid(f"runbook {rb.name}: pooler.users does not list target.pooled.user ({pooled.user})")
    users = list(dict.fromkeys([*pooled_users, direct.user]))
    return PoolerPlan(p, pooled, direct, databases, users, direct.user, p.server_host or direct.host,
                      p.server_port or direct.port)


# ---------------------------------------------------------------------------------------------------------
# What the server stores


@dataclass
class ServerAuth:
    """Each user's stored password (``pg_authid.rolpassword``, verbatim) and the server's password_encryption."""

    secrets: dict[str, str | None] = field(default_factory=dict)  # user -> secret; None: no password / no role
    can_login: dict[str, bool] = field(default_factory=dict)
    password_encryption: str = ""
    unreadable: str = ""  # why pg_authid could not be read (not a superuser)


def read_server_auth(plan: PoolerPlan) -> ServerAuth:
    """Reads the users' secrets through ``target.direct`` (``pg_authid`` needs a superuser). Each secret is
    registered for redaction: it never reaches a log, an artifact or the ledger."""
    auth = ServerAuth()
    with postgres.session(plan.direct, "target.direct", text_settings=False) as conn:
        auth.password_encryption = conn.execute("SHOW password_encryption").fetchone()[0]
        try:
            rows = conn.execute("SELECT rolname, rolpassword, rolcanlogin FROM pg_authid WHERE rolname = ANY(%s)",
                                (plan.users,)).fetchall()
        except psycopg.errors.InsufficientPrivilege:
            auth.unreadable = (f"target.direct user {plan.direct.user} cannot read pg_authid (it needs a "
                               "superuser)")
            return auth
    for name, secret, can_login in rows:
        register_secret(secret)
        auth.secrets[name], auth.can_login[name] = secret, can_login
    return auth


def secret_kind(secret: str | None) -> str:
    if not secret:
        return "none"
    if secret.startswith("SCRAM-SHA-256$"):
        return "scram"
    if re.fullmatch(r"md5[0-9a-f]{32}", secret):
        return "md5"
    return "plain"


def parse_userlist(text: str) -> dict[str, str]:
    """``"user" "secret"`` lines of an auth_file (``""`` inside quotes is one ``"``); other lines are skipped."""
    entries = {}
    for line in text.splitlines():
        m = re.match(r'^\s*"((?:[^"]|"")*)"\s+"((?:[^"]|"")*)"', line)
        if m:
            entries[m.group(1).replace('""', '"')] = m.group(2).replace('""', '"')
    return entries


# ---------------------------------------------------------------------------------------------------------
# Preflight


@dataclass(frozen=True)
class PoolerCheck:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    blocking: bool = True  # a red line this run does not fix itself stops the flow before anything is written


@dataclass
class PoolerPreflight:
    checks: list[PoolerCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(not c.ok and c.blocking for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}; fix: {c.fix}" for c in self.checks if not c.ok]

    def summary(self) -> str:
        if self.ok:
            fixed = sum(1 for c in self.checks if not c.ok)
            return f"pooler preflight passed ({len(self.checks)} checks" + (
                f", {fixed} red line(s) this run fixes or only warns about)" if fixed else ")")
        return "pooler preflight failed: " + "; ".join(self.failures())

    def rows(self) -> list[dict]:
        return [{"check": c.name, "status": "passed" if c.ok else ("FAILED" if c.blocking else "warning"),
                 "detail": c.detail, "fix": c.fix} for c in self.checks]


def preflight_pooler(plan: PoolerPlan, auth: ServerAuth, current_userlist: str | None, *,
                     dry_run: bool = False) -> PoolerPreflight:
    """What stands between the runbook and a PgBouncer that logs in with SCRAM. The userlist found at the
    destination comes first: an md5 entry there against a SCRAM secret on the server is the plan's "server
    login failed: wrong password type" (this run replaces it; a dry run says so)."""
    checks: list[PoolerCheck] = []
    rerun = "run `liftoff run pooler` without --dry-run" if dry_run else "this run"
    path = plan.path(USERLIST)
    if current_userlist is None:
        checks.append(PoolerCheck("current userlist", True, f"no {path} yet"))
    else:
        entries = parse_userlist(current_userlist)
        stale = [u for u in plan.users if secret_kind(entries.get(u)) == "md5"
                 and secret_kind(auth.secrets.get(u)) == "scram"]
        if stale:
            checks.append(PoolerCheck(
                "current userlist", False,
                f"{path} holds an md5 hash for {', '.join(stale)} while PostgreSQL stores a SCRAM secret: PgBouncer "
                f"answers '{_WRONG_TYPE}'",
                f"{rerun} replaces it with the SCRAM secret from pg_authid (auth_type scram-sha-256)", blocking=False))
        else:
            checks.append(PoolerCheck("current userlist", True, f"{path}: no md5 entry for the pooled users"))
    if auth.unreadable:
        checks.append(PoolerCheck("reads pg_authid", False, auth.unreadable,
                                  "give target.direct a superuser (the userlist copies each SCRAM secret from "
                                  "pg_authid)"))
        return PoolerPreflight(checks)
    checks.append(PoolerCheck("reads pg_authid", True, f"as {plan.direct.user} through target.direct"))
    for user in plan.users:
        secret, name = auth.secrets.get(user), f"{user}'s stored password"
        kind = secret_kind(secret)
        if user not in auth.secrets:
            checks.append(PoolerCheck(name, False, f"role {user} does not exist on the target",
                                      "create it on the target, or correct pooler.users / target.pooled.user"))
        elif kind == "none":
            checks.append(PoolerCheck(name, False, f"role {user} has no password",
                                      f"ALTER ROLE {user} PASSWORD '...' on the target (psql: \\password {user})"))
        elif kind == "md5":
            checks.append(PoolerCheck(
                name, False, f"pg_authid holds an md5 hash for {user} (set while password_encryption was md5): "
                f"PgBouncer cannot log in with SCRAM ('{_WRONG_TYPE}')",
                f"on the target: SET password_encryption = 'scram-sha-256'; then set the same password again "
                f"(psql: \\password {user}); re-run"))
        elif not auth.can_login.get(user):
            checks.append(PoolerCheck(name, False, f"role {user} cannot log in (NOLOGIN)",
                                      f"ALTER ROLE {user} LOGIN on the target"))
        else:
            checks.append(PoolerCheck(name, True, f"{user}: SCRAM-SHA-256 secret in pg_authid"))
    if auth.password_encryption != "scram-sha-256":
        checks.append(PoolerCheck(
            "password_encryption", False, f"the target's password_encryption is {auth.password_encryption}: the "
            "next password change stores md5 and breaks PgBouncer's login",
            "ALTER SYSTEM SET password_encryption = 'scram-sha-256'; SELECT pg_reload_conf();", blocking=False))
    else:
        checks.append(PoolerCheck("password_encryption", True, "scram-sha-256"))
    return PoolerPreflight(checks)


# ---------------------------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class PoolerConfig:
    files: dict[str, str]  # file name -> text (the userlist holds the SCRAM secrets)

    def masked(self) -> dict[str, str]:
        """The files with every secret replaced by its kind: what a dry run shows."""
        masked = dict(self.files)
        masked[USERLIST] = "".join(f'"{u}" "<{secret_kind(s)} secret from pg_authid>"\n'
                                   for u, s in parse_userlist(self.files[USERLIST]).items())
        return masked

    def sha256(self) -> dict[str, str]:
        return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in self.files.items()}


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def render_config(plan: PoolerPlan, auth: ServerAuth) -> PoolerConfig:
    """``pgbouncer.ini`` and ``userlist.txt`` from the runbook; the same input gives the same bytes."""
    p = plan.settings
    lines = ["; Written by Liftoff (liftoff run pooler) from the runbook's pooler section; edits here are replaced.",
             "[databases]"]
    lines += [f"{db} = host={plan.server_host} port={plan.server_port} dbname={db}" for db in plan.databases]
    options = {
        "listen_addr": p.listen_addr, "listen_port": plan.pooled.port,
        "auth_type": "scram-sha-256", "auth_file": plan.path(USERLIST),
        "pool_mode": p.pool_mode, "max_client_conn": p.max_client_conn,
        "default_pool_size": p.default_pool_size, "min_pool_size": p.min_pool_size,
        "reserve_pool_size": p.reserve_pool_size, "reserve_pool_timeout": p.reserve_pool_timeout,
        "server_lifetime": p.server_lifetime, "server_idle_timeout": p.server_idle_timeout,
        "admin_users": plan.admin_user, "stats_users": plan.admin_user,
        "ignore_startup_parameters": "extra_float_digits",
        **p.settings,
    }
    lines += ["", "[pgbouncer]", *(f"{key} = {value}" for key, value in options.items()), ""]
    userlist = "".join(f"{_quote(u)} {_quote(auth.secrets[u])}\n" for u in plan.users if auth.secrets.get(u))
    return PoolerConfig({INI: "\n".join(lines), USERLIST: userlist})


# ---------------------------------------------------------------------------------------------------------
# Where the config goes


class LocalConfigDir:
    """``pooler.config_dir`` on this machine."""

    def __init__(self, plan: PoolerPlan):
        self.plan = plan

    def read(self, name: str) -> str | None:
        try:
            return Path(self.plan.path(name)).read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StepFailed(f"pooler.config_dir: cannot read {self.plan.path(name)} ({exc.strerror})") from None

    def write(self, name: str, text: str) -> None:
        """Replaces the file in one rename, keeping the previous file's mode and owner (a new file gets the
        directory's owner: PgBouncer runs as it and must read the file)."""
        path = Path(self.plan.path(name))
        try:
            previous = path.stat() if path.exists() else None
            owner = previous or path.parent.stat()
            tmp = path.with_name(f".{name}.liftoff-tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, previous.st_mode & 0o777 if previous else _DEFAULT_MODES[name])
                if os.geteuid() == 0:
                    os.fchown(fd, owner.st_uid, owner.st_gid)
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            raise StepFailed(f"pooler.config_dir: cannot write {path} ({exc.strerror}); check the directory "
                             "exists and is writable") from None

    def run(self, command: str) -> None:
        proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise StepFailed(f"pooler.reload_command exited {proc.returncode}: {redact(last[0])}")

    def close(self) -> None:
        pass


class RemoteConfigDir:
    """``pooler.config_dir`` on the VPS, over SSH (``liftoff/systems/remote.py``)."""

    def __init__(self, plan: PoolerPlan, rb: Runbook):
        from liftoff.systems.remote import Remote

        self.plan = plan
        self.remote = Remote(rb.ssh)

    def read(self, name: str) -> str | None:
        return self.remote.read_file(self.plan.path(name))

    def write(self, name: str, text: str) -> None:
        path = self.plan.path(name)
        info = self.remote.stat(path)
        mode = (info.st_mode & 0o777) if info is not None else _DEFAULT_MODES[name]
        self.remote.write_file_atomic(path, text, mode=mode, backup=True)

    def run(self, command: str) -> None:
        self.remote.run(command, timeout=120)

    def close(self) -> None:
        self.remote.close()


@contextlib.contextmanager
def config_dir(plan: PoolerPlan, rb: Runbook):
    place = RemoteConfigDir(plan, rb) if plan.settings.write_via == "ssh" else LocalConfigDir(plan)
    try:
        yield place
    finally:
        place.close()


# ---------------------------------------------------------------------------------------------------------
# The admin console


@contextlib.contextmanager
def admin_console(plan: PoolerPlan):
    """PgBouncer's admin console (database ``pgbouncer``) as target.direct.user: autocommit, simple protocol."""
    ep = plan.pooled
    password = plan.direct.password.resolve("target.direct.password")
    where = f"PgBouncer's admin console (target.pooled, {ep.host}:{ep.port})"
    try:
        conn = psycopg.connect(host=ep.host, port=ep.port, dbname="pgbouncer", user=plan.admin_user,
                               password=password, sslmode=ep.sslmode, connect_timeout=10, autocommit=True,
                               prepare_threshold=None, cursor_factory=psycopg.ClientCursor)
    except psycopg.OperationalError as exc:
        last = redact(str(exc)).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConnectionRefused(
            f"{where}: cannot log in as {plan.admin_user} ({last.strip()}); PgBouncer must run there with "
            f"admin_users = {plan.admin_user} and its SCRAM secret in the userlist (for the first run, set "
            "pooler.reload: command with reload_command 'systemctl reload pgbouncer')") from None
    try:
        yield conn
    finally:
        conn.close()


def admin_show(conn: psycopg.Connection, what: str) -> list[dict]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def reload_pgbouncer(plan: PoolerPlan, place) -> str:
    if plan.settings.reload == "command":
        place.run(plan.settings.reload_command)
        return f"ran pooler.reload_command ({plan.settings.reload_command.split()[0]})"
    with admin_console(plan) as conn:
        conn.execute("RELOAD")
    return "RELOAD on the admin console"


# ---------------------------------------------------------------------------------------------------------
# Writing it (the ledger step pooler.config)


def read_current(plan: PoolerPlan, rb: Runbook) -> dict[str, str | None]:
    with config_dir(plan, rb) as place:
        return {name: place.read(name) for name in (INI, USERLIST)}


# ---------------------------------------------------------------------------------------------------------
# The gate (the ledger step verify-pooler)


@dataclass
class PoolerReport(GateReport):
    clients: int = 0
    connected: int = 0
    transactions: int = 0
    seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)  # one-line message -> clients that got it
    max_server_connections: int = 0
    server_connections_after: int = 0
    pool_size: int = 0
    pool_limit: int = 0
    clients_waiting_after: int = 0
    pgbouncer_transactions: int = 0
    config_problems: list[str] = field(default_factory=list)
    database_url: str = ""  # what connecting with cutover.switch.env.DATABASE_URL gave ("" when not in the runbook)
    problems: list[str] = field(default_factory=list)  # the gate could not run a part of itself

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def tps(self) -> float:
        return round(self.transactions / self.seconds, 1) if self.seconds else 0.0

    def failures(self) -> list[str]:
        return self.blockers() + self.differences_found()

    def blockers(self) -> list[str]:
        """What kept the gate from measuring: a refused login or an unreachable PgBouncer (the runbook's
        target.pooled or the apps' DATABASE_URL to fix), not a finding about the pool."""
        out = list(self.problems)
        for message, count in self.errors.most_common():
            if _cannot_connect(message):
                out.append(f"{count} of {self.clients} clients could not connect: {message} (fix: check "
                           "target.pooled (host, port, user, password) and that PgBouncer runs)")
        if self.database_url and _cannot_connect(self.database_url):
            out.append(f"cutover.switch.env.DATABASE_URL: {self.database_url} (fix: correct the URL or the secret "
                       "behind its password)")
        return out

    def differences_found(self) -> list[str]:
        out = list(self.config_problems)
        for message, count in self.errors.most_common():
            if not _cannot_connect(message):
                out.append(f"{count} of {self.clients} clients failed: {message}{_hint(message)}")
        if self.max_server_connections > self.pool_limit:
            out.append(f"server connections reached {self.max_server_connections}, above default_pool_size + "
                       f"reserve_pool_size = {self.pool_limit}")
        if self.clients_waiting_after:
            out.append(f"{self.clients_waiting_after} clients still waiting for a server connection after the load")
        if (self.database_url and not self.database_url.startswith("works")
                and not _cannot_connect(self.database_url)):
            out.append(f"cutover.switch.env.DATABASE_URL: {self.database_url}")
        return out

    def summary(self) -> str:
        if not self.ok:
            return "; ".join(self.failures())
        return (f"passed: {self.clients} clients, {self.transactions} transactions in {self.seconds:.1f} s "
                f"({self.tps} per s), max {self.max_server_connections} server connections "
                f"(pool {self.pool_size} + {self.pool_limit - self.pool_size} reserve), 0 errors")

    def rows(self) -> list[dict]:
        rows = [("clients (connected at once)", f"{self.connected} of {self.clients}"),
                ("transactions committed", self.transactions),
                ("transactions per second", self.tps),
                ("errors", self.error_count),
                ("max server connections seen", f"{self.max_server_connections} (limit {self.pool_limit}: "
                                                f"pool {self.pool_size} + reserve {self.pool_limit - self.pool_size})"),
                ("server connections after (SHOW POOLS)", self.server_connections_after),
                ("transactions PgBouncer counted (SHOW STATS)", self.pgbouncer_transactions),
                ("running config (SHOW CONFIG)", "; ".join(self.config_problems) or "as the runbook says"),
                ("DATABASE_URL", self.database_url or "not in the runbook (cutover.switch.env)")]
        return [{"figure": k, "value": v} for k, v in rows]


_CANNOT_CONNECT = ("password authentication failed", "sasl authentication failed", "no such user",
                   "does not exist", "connection refused", "could not translate host name", "timeout expired",
                   "no password supplied")


def _cannot_connect(message: str) -> bool:
    """A client's error that says the login or the address is wrong (the operator's to fix), not the pool."""
    low = message.lower()
    return any(marker in low for marker in _CANNOT_CONNECT)


def _hint(message: str) -> str:
    low = message.lower()
    if "max_client_conn" in low:
        return " (PgBouncer refused clients above max_client_conn; raise pooler.max_client_conn above the apps' " \
               "connections plus monitoring)"
    if "query_wait_timeout" in low or "timed out waiting" in low:
        return " (the pool was exhausted: clients waited past query_wait_timeout; raise pooler.default_pool_size " \
               "or shorten the transactions holding it)"
    if "wrong password type" in low:
        return " (the userlist holds md5 hashes against SCRAM: run `liftoff run pooler` to rewrite it)"
    return ""


def server_line(exc: BaseException) -> str:
    text = redact(str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = next((ln for ln in lines if "FATAL" in ln or "ERROR" in ln), lines[-1] if lines else type(exc).__name__)
    # one message per cause, not per client: drop the client's own port
    return re.sub(r'connection to server at "[^"]+", port \d+ failed: ', "", line)


_CHECKED_CONFIG = ("pool_mode", "max_client_conn", "default_pool_size", "min_pool_size", "reserve_pool_size",
                   "reserve_pool_timeout", "server_lifetime", "server_idle_timeout", "auth_type")


def _config_problems(plan: PoolerPlan, shown: list[dict]) -> list[str]:
    running = {row["key"]: str(row["value"]) for row in shown}
    wanted = {k: str(getattr(plan.settings, k)) for k in _CHECKED_CONFIG if k != "auth_type"}
    wanted["auth_type"] = "scram-sha-256"
    return [f"SHOW CONFIG: {k} is {running.get(k)}, the runbook says {v}; reload PgBouncer (pooler.reload)"
            for k, v in wanted.items() if running.get(k) != v]


def _pool_row(plan: PoolerPlan, pools: list[dict]) -> dict:
    return next((r for r in pools if r["database"] == plan.pooled.database and r["user"] == plan.pooled.user), {})


def _server_count(row: dict) -> int:
    return sum(int(row.get(k, 0)) for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))


def _xacts(plan: PoolerPlan, stats: list[dict]) -> int:
    return next((int(r["total_xact_count"]) for r in stats if r["database"] == plan.pooled.database), 0)


def run_load(plan: PoolerPlan, report: PoolerReport) -> None:
    """``gate.clients`` threads, each connected through PgBouncer as an app is (target.pooled, no prepared
    statements), all connected at once, then ``transactions_per_client`` short transactions each. Server
    connections of the pool are sampled meanwhile in pg_stat_activity (through target.direct)."""
    g = plan.settings.gate
    report.clients = g.clients
    conninfo = postgres.conninfo(plan.pooled, "target.pooled")
    lock, committed, connected = threading.Lock(), [0], [0]
    everyone_connected = threading.Barrier(g.clients, timeout=g.timeout_s)
    stop_sampling = threading.Event()

    def client() -> None:
        conn = None
        try:
            conn = psycopg.connect(conninfo, prepare_threshold=None)
            with lock:
                connected[0] += 1
        except psycopg.Error as exc:
            with lock:
                report.errors[server_line(exc)] += 1
        with contextlib.suppress(threading.BrokenBarrierError):
            everyone_connected.wait()  # a client that failed waits too, so the others do not time out
        if conn is None:
            return
        try:
            for _ in range(g.transactions_per_client):
                with conn.transaction():
                    conn.execute("SELECT pg_sleep(%s)", (g.transaction_ms / 1000,))
                with lock:
                    committed[0] += 1
        except psycopg.Error as exc:
            with lock:
                report.errors[server_line(exc)] += 1
        finally:
            conn.close()

    def sample() -> None:
        with postgres.session(plan.direct, "target.direct", text_settings=False) as conn:
            while not stop_sampling.is_set():
                n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = %s "
                                 "AND pid <> pg_backend_pid()", (plan.pooled.database, plan.pooled.user)).fetchone()[0]
                report.max_server_connections = max(report.max_server_connections, n)
                stop_sampling.wait(0.02)

    sampler = threading.Thread(target=sample, name="pooler-gate-sampler", daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, name=f"pooler-gate-{i}", daemon=True) for i in range(g.clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    deadline = started + g.timeout_s + g.transactions_per_client * (g.transaction_ms / 1000 + 1)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    report.seconds = round(time.monotonic() - started, 2)
    stop_sampling.set()
    sampler.join(10)
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        report.errors[f"still running after {report.seconds:.0f} s (pooler.gate.timeout_s)"] += stuck
    report.connected, report.transactions = connected[0], committed[0]


def check_pooler(plan: PoolerPlan) -> PoolerReport:
    """The pooler's gate, minus the apps' DATABASE_URL (which the cutover's switch settings name): the
    running config is the runbook's, ``pooler.gate.clients`` clients connected at once through PgBouncer do
    short transactions without an error, and the pool's server connections stay at or under
    default_pool_size + reserve_pool_size."""
    report = PoolerReport(pool_size=plan.settings.default_pool_size, pool_limit=plan.pool_limit)
    with admin_console(plan) as conn:
        report.config_problems = _config_problems(plan, admin_show(conn, "CONFIG"))
        before = _xacts(plan, admin_show(conn, "STATS"))
    run_load(plan, report)
    with admin_console(plan) as conn:
        pool = _pool_row(plan, admin_show(conn, "POOLS"))
        report.pgbouncer_transactions = _xacts(plan, admin_show(conn, "STATS")) - before
    report.server_connections_after = _server_count(pool)
    report.clients_waiting_after = int(pool.get("cl_waiting", 0))
    report.max_server_connections = max(report.max_server_connections, report.server_connections_after)
    return report
