"""A real ``prefect server start`` on a free loopback port, with its own PREFECT_HOME: what ``liftoff serve``
runs when no Prefect API is configured, and what the demo and the tests start."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """``database``: a PostgreSQL cluster for the server's own records, started and stopped with it (an object
    with ``start()``, ``stop(remove=)``, ``execute(sql)``, ``superuser``, ``password``, ``host``, ``port``, as
    the sandbox's ``PostgresServer``); without
    one, Prefect's embedded SQLite. Under concurrent writers (two test workers, a serving process and a UI
    click) SQLite answers some writes with SQLITE_BUSY_SNAPSHOT, which the server returns as 503: Prefect's
    Python client retries those, the UI does not ("Oops. Something went wrong." on Submit)."""

    def __init__(self, home: Path | None = None, port: int | None = None, database: Any = None):
        self.database = database
        self.port = port or free_port()
        self.home = home or Path(tempfile.mkdtemp(prefix="liftoff-prefect-"))
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true",
        }

    def start(self, timeout: float = 90) -> "PrefectServer":
        prefect = Path(sys.executable).parent / "prefect"
        env = {**os.environ, **self.env()}
        env.pop("PREFECT_API_URL")
        # Without it the UI served on this port calls the API at 127.0.0.1:4200 ("Can't connect to Server API").
        env["PREFECT_UI_API_URL"] = self.api_url
        if self.database is not None:
            self.database.start()
            self.database.execute("CREATE DATABASE prefect")
            db = self.database
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
                f"postgresql+asyncpg://{db.superuser}:{db.password}@{db.host}:{db.port}/prefect")
        self.log = open(self.home / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited early; see {self.home / 'server.log'}")
            try:
                with urllib.request.urlopen(self.api_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server did not answer within {timeout:.0f}s; see {self.home / 'server.log'}")

    def stop(self, remove: bool = True) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.database is not None:
            self.database.stop(remove=remove)
        if remove:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
