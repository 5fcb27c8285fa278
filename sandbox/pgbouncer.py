"""A throwaway PgBouncer on a free loopback port, for the tests and the demo: Debian's ``/usr/sbin/pgbouncer``
(1.18) run as the ``postgres`` user (it refuses to run as root) from a config directory.

    bouncer = PgBouncerServer.in_front_of(postgres_server).start()   # pools database "postgres" for its superuser
    psycopg.connect(bouncer.conninfo(password=postgres_server.password), prepare_threshold=None)

``PgBouncerServer(root=DIR)`` runs the ``pgbouncer.ini`` already in DIR (what ``liftoff run pooler`` wrote
there); without ``root`` it makes a temporary directory and ``start()`` writes a config from ``databases``,
``userlist`` and ``settings``. Either way it listens on ``host:port`` (a free port unless given), answers
``start()`` once it accepts connections (a failed start raises with the log's last lines), re-reads its files
on ``reload()`` (SIGHUP, as ``systemctl reload pgbouncer`` does), and ``stop()`` ends it. Servers not stopped
are stopped at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from liftoff_sandbox.postgres import _RUN_AS, _chown_for_server, free_port

if TYPE_CHECKING:
    from liftoff_sandbox.postgres import PostgresServer

PGBOUNCER = Path("/usr/sbin/pgbouncer")
_started: list["PgBouncerServer"] = []


def scram_userlist(server: "PostgresServer", users: list[str]) -> str:
    """``userlist.txt`` lines for ``users``, each with its secret copied verbatim from ``pg_authid`` (read as the
    server's superuser): a SCRAM secret there lets PgBouncer log in to a SCRAM server for the client."""
    names = ",".join("'" + u.replace("'", "''") + "'" for u in users)
    rows = dict(server.execute(f"SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ({names})"))
    missing = [u for u in users if not rows.get(u)]
    if missing:
        raise RuntimeError(f"no password stored in pg_authid for {', '.join(missing)}")
    return "".join(f'"{u}" "{rows[u]}"\n' for u in users)


@dataclass(eq=False)
class PgBouncerServer:
    """One PgBouncer. ``databases``: ``{name: "host=... port=... dbname=..."}`` for ``[databases]``;
    ``userlist``: the ``auth_file``'s text; ``settings``: ``[pgbouncer]`` keys over the defaults below (SCRAM
    auth, transaction pooling). All three are ignored when ``root`` already holds a ``pgbouncer.ini``."""

    databases: dict[str, str] = field(default_factory=dict)
    userlist: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    root: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    admin_user: str = "postgres"

    def __post_init__(self):
        self._own_root = self.root is None
        self.root = Path(self.root or tempfile.mkdtemp(prefix="liftoff-pgbouncer-"))
        self.root.chmod(0o755)
        self.log_path = self.root / "pgbouncer.log"
        self.proc: subprocess.Popen | None = None

    @classmethod
    def in_front_of(cls, server: "PostgresServer", database: str = "postgres", users: list[str] | None = None,
                    **settings: str) -> "PgBouncerServer":
        """A PgBouncer pooling ``database`` of ``server`` for ``users`` (default: its superuser), their SCRAM secrets
        copied from the server's ``pg_authid``; the first user is also the admin console's (SHOW POOLS, RELOAD)."""
        users = users or [server.superuser]
        return cls(databases={database: f"host={server.host} port={server.port} dbname={database}"},
                   userlist=scram_userlist(server, users), settings=settings, admin_user=users[0])

    @property
    def ini_path(self) -> Path:
        return self.root / "pgbouncer.ini"

    @property
    def userlist_path(self) -> Path:
        return self.root / "userlist.txt"

    def conninfo(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        parts = [f"host={self.host}", f"port={self.port}", f"dbname={dbname}", f"user={user or self.admin_user}"]
        if password is not None:
            parts.append(f"password={password}")
        return " ".join(parts)

    def write_config(self) -> None:
        """Writes ``pgbouncer.ini`` and ``userlist.txt`` (owned by the server's user, mode 0600)."""
        options = {
            "listen_addr": self.host, "listen_port": str(self.port), "unix_socket_dir": "",
            "auth_type": "scram-sha-256", "auth_file": str(self.userlist_path), "pool_mode": "transaction",
            "admin_users": self.admin_user, "ignore_startup_parameters": "extra_float_digits",
            **self.settings,
        }
        ini = ["[databases]", *(f"{name} = {spec}" for name, spec in self.databases.items()), "",
               "[pgbouncer]", *(f"{key} = {value}" for key, value in options.items()), ""]
        for path, text in ((self.ini_path, "\n".join(ini)), (self.userlist_path, self.userlist)):
            path.write_text(text)
            path.chmod(0o600)
            _chown_for_server(path)

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 15) -> "PgBouncerServer":
        if not PGBOUNCER.exists():
            raise RuntimeError(f"{PGBOUNCER} not found; apt-get install pgbouncer (scripts/install-system-deps.sh)")
        if not self.ini_path.exists():
            self.port = self.port or free_port()
            self.write_config()
        elif not self.port:
            self.port = _listen_port(self.ini_path.read_text())
        _chown_for_server(self.root)
        with open(self.log_path, "ab") as log:
            # pgbouncer itself is the child (no runuser in between), so signals reach it directly
            self.proc = subprocess.Popen([str(PGBOUNCER), str(self.ini_path)], cwd=self.root, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True, **_server_user())
        _started.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop(remove=False)
                raise RuntimeError(f"pgbouncer exited with {self.proc.returncode} before port {self.port} answered "
                                   f"(log {self.log_path}); last lines:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop(remove=False)
        raise RuntimeError(f"pgbouncer port {self.port} did not answer within {timeout:.0f}s "
                           f"(log {self.log_path}); last lines:\n{self.log_tail()}")

    def reload(self) -> None:
        """Re-reads ``pgbouncer.ini`` and the userlist (SIGHUP, as ``systemctl reload pgbouncer``)."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"pgbouncer on port {self.port} is not running; last lines:\n{self.log_tail()}")
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, remove: bool = True) -> None:
        if self in _started:
            _started.remove(self)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # pgbouncer's immediate shutdown (systemd's KillSignal)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if remove and self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PgBouncerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _server_user() -> dict:
    """Popen's arguments that run pgbouncer as the ``postgres`` user when we are root (it refuses root)."""
    return {"user": _RUN_AS, "group": _RUN_AS, "extra_groups": []} if os.geteuid() == 0 else {}


def _listen_port(ini: str) -> int:
    for line in ini.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "listen_port":
            return int(value.strip())
    return 6432


def stop_started() -> None:
    for server in list(_started):
        server.stop()


atexit.register(stop_started)
