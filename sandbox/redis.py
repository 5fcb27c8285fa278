"""A throwaway Redis on a free loopback port, for the tests and the demo: Debian's ``redis-server`` run from a
config file in a temp directory (no persistence unless asked), optionally with a password.

A failed start raises with the log's last lines; ``stop()`` ends the process and removes the directory.
"""

from __future__ import annotations

import atexit
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_started: list["RedisServer"] = []


def redis_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise RuntimeError("redis-server not found; install the Debian package redis-server")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class RedisServer:
    password: str | None = field(default_factory=lambda: secrets.token_urlsafe(18))
    root: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    appendonly: bool = False

    def __post_init__(self):
        self.root = Path(self.root or tempfile.mkdtemp(prefix="liftoff-redis-"))
        self.log_path = self.root / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """A ``redis://`` URL with the password in it: give it to apps, never to a log line."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def _write_config(self) -> Path:
        lines = [f"port {self.port}", f"bind {self.host}", f"dir {self.root}", f"logfile {self.log_path}",
                 "daemonize no", 'save ""', f"appendonly {'yes' if self.appendonly else 'no'}",
                 "protected-mode yes"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        path = self.root / "redis.conf"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        return path

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self, **kw):
        import redis

        return redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=2,
                           socket_connect_timeout=2, **kw)

    def start(self, timeout: float = 15) -> "RedisServer":
        if not self.port:
            self.port = _free_port()
        return self._launch(self._write_config(), timeout)

    def restart(self, timeout: float = 15) -> "RedisServer":
        """Stops redis-server (a clean shutdown: the AOF is flushed) and starts it again on the same port from the
        same config file and directory, as a VPS reboot would: what CONFIG REWRITE wrote there, and the data
        persisted there, is what it comes back with."""
        self.stop(remove=False)
        return self._launch(self.root / "redis.conf", timeout)

    def _launch(self, config: Path, timeout: float) -> "RedisServer":
        self.proc = subprocess.Popen([redis_binary(), str(config)], cwd=self.root,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _started.append(self)
        probe = self.client()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.stop(remove=False)
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode} before port {self.port} "
                                       f"answered (log {self.log_path}); last lines:\n{self.log_tail()}")
                try:
                    if probe.ping():
                        return self
                except Exception:  # noqa: BLE001 - not listening yet
                    time.sleep(0.05)
        finally:
            probe.close()
        self.stop(remove=False)
        raise RuntimeError(f"redis-server port {self.port} did not answer within {timeout:.0f}s "
                           f"(log {self.log_path}); last lines:\n{self.log_tail()}")

    def stop(self, remove: bool = True) -> None:
        if self in _started:
            _started.remove(self)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_started() -> None:
    for server in list(_started):
        server.stop()


atexit.register(stop_started)
