"""A stand-in for the CRM app on the VPS: it reads its env file when it starts, as a container does, and its
health endpoint says which database (and Redis) it is connected to. The SSH switch driver restarts it in tests
and the demo; the cutover's smoke step polls its health.

    python -m liftoff_sandbox.crm_app restart --env-file F --port P --pid-file X --log-file L

stops the instance named in the pid file (if it runs), starts a new detached one reading ``F`` (``DATABASE_URL``,
optional ``REDIS_URL``), and returns once it listens on 127.0.0.1:P. ``GET /api/health`` answers the plan's
shape, 200 when healthy and 503 otherwise::

    {"status": "healthy", "timestamp": "...",
     "checks": {"database": {"status": "up", "latency_ms": 3, "database": "crm", "server_port": 5432},
                "redis": {"status": "up", "latency_ms": 1}}}

Each health request opens a new database connection, so a frozen or vanished database shows at once.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

CHECK_TIMEOUT_S = 3
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines as docker compose reads them (comments, ``export``, quotes; no interpolation)."""
    env = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*)$", line)
        if not m:
            continue
        key, rest = m.groups()
        if rest[:1] == "'":
            end = re.match(r"'((?:\\'|[^'])*)'", rest)
            value = end.group(1).replace("\\'", "'") if end else rest[1:]
        elif rest[:1] == '"':
            end = re.match(r'"((?:\\.|[^"\\])*)"', rest)
            body = (end.group(1) if end else rest[1:]).replace("$$", "\\$")
            value = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), body)
        else:
            value = re.split(r"\s+#", rest, maxsplit=1)[0].strip()
        env[key] = value
    return env


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", line)  # a URL's password, should a driver echo one


def check_database(url: str) -> dict:
    import psycopg

    started = time.monotonic()
    try:
        with psycopg.connect(url, connect_timeout=CHECK_TIMEOUT_S, autocommit=True) as conn:
            database, port = conn.execute("SELECT current_database(), inet_server_port()").fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure is the check's answer
        return {"status": "down", "error": _one_line(exc)}
    return {"status": "up", "latency_ms": round((time.monotonic() - started) * 1000, 1), "database": database,
            "server_port": port}


def check_redis(url: str) -> dict:
    """PING over RESP (``redis://[:password@]host[:port][/db]``), without a client library."""
    parts = urllib.parse.urlsplit(url)
    started = time.monotonic()
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379),
                                      timeout=CHECK_TIMEOUT_S) as s:
            commands = []
            if parts.password:
                auth = [parts.username, parts.password] if parts.username else [parts.password]
                commands.append(["AUTH", *[urllib.parse.unquote(a) for a in auth]])
            commands.append(["PING"])
            for command in commands:
                s.sendall(f"*{len(command)}\r\n".encode()
                          + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in command))
                answer = s.recv(512).decode(errors="replace").strip()
                if answer.startswith("-"):
                    return {"status": "down", "error": answer[1:]}
            if answer != "+PONG":
                return {"status": "down", "error": f"unexpected answer to PING: {answer[:80]}"}
    except OSError as exc:
        return {"status": "down", "error": _one_line(exc)}
    return {"status": "up", "latency_ms": round((time.monotonic() - started) * 1000, 1)}


def health(env: dict[str, str]) -> dict:
    checks = {"database": check_database(env["DATABASE_URL"]) if env.get("DATABASE_URL")
              else {"status": "down", "error": "DATABASE_URL is not set in the env file"}}
    if env.get("REDIS_URL"):
        checks["redis"] = check_redis(env["REDIS_URL"])
    healthy = all(c["status"] == "up" for c in checks.values())
    return {"status": "healthy" if healthy else "unhealthy",
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "checks": checks}


class HealthHandler(http.server.BaseHTTPRequestHandler):
    env: dict[str, str] = {}

    def do_GET(self):  # noqa: N802 - the stdlib's name
        if self.path.split("?")[0] != "/api/health":
            self._answer(404, {"error": "not found"})
            return
        body = health(self.env)
        self._answer(200 if body["status"] == "healthy" else 503, body)

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        sys.stderr.write(f"{self.log_date_time_string()} {format % args}\n")


def _exit_on_term(signum, frame):
    raise SystemExit(0)


WRITE_INTERVAL_S = 0.05


def write_while_running(env: dict[str, str]) -> None:
    """With ``WRITE_TABLE`` in the env file, the app writes as a booking app does while it runs: one row
    (``INSERT ... DEFAULT VALUES``) every 50 ms into that table, each in its own transaction, reconnecting
    after an error. A recovery's tests count these rows: they stop when the app is stopped."""
    import psycopg

    table = env["WRITE_TABLE"]
    conn = None
    while True:
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(env["DATABASE_URL"], connect_timeout=CHECK_TIMEOUT_S, autocommit=True)
            conn.execute(f"INSERT INTO {table} DEFAULT VALUES")
        except Exception as exc:  # noqa: BLE001 - a database away (being recovered): try again next tick
            print(f"write failed: {_one_line(exc)}", file=sys.stderr, flush=True)
            try:
                if conn is not None:
                    conn.close()
            except Exception:  # noqa: BLE001
                pass
            conn = None
        time.sleep(WRITE_INTERVAL_S)


def serve(env_file: Path, port: int, pid_file: Path) -> None:
    HealthHandler.env = read_env_file(env_file)
    if HealthHandler.env.get("WRITE_TABLE") and HealthHandler.env.get("DATABASE_URL"):
        import threading

        threading.Thread(target=write_while_running, args=(HealthHandler.env,), daemon=True).start()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), HealthHandler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, _exit_on_term)
    # Written once listening: ``restart`` waits for this file to name this process.
    tmp = pid_file.with_name(pid_file.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, pid_file)
    print(f"crm app {os.getpid()} listening on 127.0.0.1:{port}, env from {env_file}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _is_ours(pid: int) -> bool:
    try:
        return b"liftoff_sandbox.crm_app" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop(pid_file: Path, timeout: float = 10) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    if _is_ours(pid):  # a pid file outliving its process may name someone else's by now
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_ours(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_ours(pid):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def restart(env_file: Path, port: int, pid_file: Path, log_file: Path, timeout: float = 30) -> int:
    if not env_file.is_file():
        print(f"crm_app: env file {env_file} does not exist", file=sys.stderr)
        return 2
    stop(pid_file)
    with open(log_file, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "liftoff_sandbox.crm_app", "serve", "--env-file", str(env_file), "--port",
             str(port), "--pid-file", str(pid_file)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            print(f"crm_app: the new instance exited {child.returncode}: {tail[0]}", file=sys.stderr)
            return 1
        try:
            if int(pid_file.read_text().strip()) == child.pid:
                return 0
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    print(f"crm_app: the new instance did not listen on 127.0.0.1:{port} within {timeout:g} s", file=sys.stderr)
    return 1


class CrmApp:
    """One instance of the stand-in app as the tests and the demo run it: its env file (pointing at
    ``database_url``), the restart command the SSH switch runs, and its health URL, on a free port."""

    def __init__(self, workdir: Path, database_url: str, write_table: str | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.env_file = Path(workdir) / f"crm-app-{self.port}.env"
        writes = f"WRITE_TABLE={write_table}\n" if write_table else ""  # see write_while_running
        self.env_file.write_text(f"# the CRM's environment\nDATABASE_URL={database_url}\nAPP_NAME=crm\n{writes}")
        os.chmod(self.env_file, 0o600)
        self.pid_file = Path(workdir) / f"crm-app-{self.port}.pid"
        self.log_file = Path(workdir) / f"crm-app-{self.port}.log"
        self.restart_command = (f"{sys.executable} -m liftoff_sandbox.crm_app restart --env-file {self.env_file} "
                                f"--port {self.port} --pid-file {self.pid_file} --log-file {self.log_file}")
        self.stop_command = f"{sys.executable} -m liftoff_sandbox.crm_app stop --pid-file {self.pid_file}"
        self.health_url = f"http://127.0.0.1:{self.port}/api/health"

    def start(self) -> "CrmApp":
        restart(self.env_file, self.port, self.pid_file, self.log_file)
        return self

    def _database_check(self) -> dict:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.health_url, timeout=5) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        except OSError:
            return {}
        return body.get("checks", {}).get("database", {})

    def database(self) -> str | None:
        """The database its health check is connected to (None when it does not answer)."""
        return self._database_check().get("database")

    def server_port(self) -> int | None:
        """The port of the PostgreSQL server it is connected to (tells the source from the target)."""
        return self._database_check().get("server_port")

    def stop(self) -> None:
        stop(self.pid_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liftoff_sandbox.crm_app")
    parser.add_argument("action", choices=["restart", "serve", "stop"])
    parser.add_argument("--env-file", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("--log-file", type=Path)
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop(args.pid_file)
        return 0
    if args.env_file is None or args.port is None:
        parser.error(f"{args.action} needs --env-file and --port")
    if args.action == "serve":
        serve(args.env_file, args.port, args.pid_file)
        return 0
    return restart(args.env_file, args.port, args.pid_file, args.log_file or args.pid_file.with_suffix(".log"))


if __name__ == "__main__":
    sys.exit(main())
