"""What ``liftoff demo --keep`` leaves behind, and how ``liftoff demo --stop DIR`` takes it down again: every
process the demo started, by pid (``DIR/demo-processes.json``, each with its command line, so a pid the kernel
gave to someone else since is never signalled), and the secrets the runbook names in an env file (0600) the
operator sources to run any flow against the kept stack. Nothing here kills by name."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

PROCESSES = "demo-processes.json"
ENV_FILE = "demo.env"


@dataclass(frozen=True)
class Kept:
    name: str
    pid: int
    group: bool  # started in its own session: the whole process group is signalled
    cmdline: str
    stop_signal: int = signal.SIGTERM


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process(name: str, pid: int, *, group: bool, stop_signal: int = signal.SIGTERM) -> Kept:
    return Kept(name, pid, group, cmdline(pid), stop_signal)


def postgres(name: str, server) -> Kept:
    """A cluster pg_ctl daemonized: its postmaster's pid from postmaster.pid; SIGINT is its fast shutdown."""
    pid = int((server.datadir / "postmaster.pid").read_text().split()[0])
    return process(name, pid, group=False, stop_signal=signal.SIGINT)


def detach(*servers) -> None:
    """Takes sandbox servers off their module's stop-at-exit list (``_started``): they outlive this process."""
    for server in servers:
        started = getattr(sys.modules[type(server).__module__], "_started", None)
        if started is not None and server in started:
            started.remove(server)


def record(workdir: Path, kept: list[Kept]) -> Path:
    path = Path(workdir) / PROCESSES
    path.write_text(json.dumps([asdict(k) for k in kept], indent=1))
    os.chmod(path, 0o600)
    return path


def runbook_env_names(runbook: Path) -> list[str]:
    """Every environment variable the runbook reads a secret from (``{env: NAME}``), in order, once."""
    names: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("env"), str) and set(node) <= {"env"}:
                names.append(node["env"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(Path(runbook).read_text()))
    return list(dict.fromkeys(names))


def write_env(workdir: Path, runbook: Path, extra: dict[str, str]) -> Path:
    """``DIR/demo.env`` (owner-only): an ``export`` line per secret the runbook reads, plus ``extra``
    (PREFECT_API_URL). Values are shell-quoted; a private key keeps its line breaks inside its quotes."""
    values = {name: os.environ[name] for name in runbook_env_names(runbook) if name in os.environ}
    values.update(extra)
    path = Path(workdir) / ENV_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# liftoff demo --keep: the kept stack's secrets; source this file, then run liftoff against "
                f"{runbook}\n")
        for name, value in values.items():
            f.write(f"export {name}={shlex.quote(value)}\n")
    os.chmod(path, 0o600)
    return path


def _alive(k: Kept) -> bool:
    return bool(k.cmdline) and cmdline(k.pid) == k.cmdline


def _exiting(k: Kept) -> bool:
    """Signalled and on its way out: its command line is already gone (the kernel released its memory) but
    its pid is not yet (not a zombie waiting to be reaped either): --stop waits for that too."""
    try:
        state = Path(f"/proc/{k.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and cmdline(k.pid) == ""


def stop(workdir: Path, timeout: float = 30) -> list[str]:
    """Stops each recorded process still running as recorded (same pid, same command line): its signal, then
    SIGKILL after ``timeout``. Returns a line per process; removes the record and the env file."""
    path = Path(workdir) / PROCESSES
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a directory `liftoff demo --keep` printed")
    kept = [Kept(**k) for k in json.loads(path.read_text())]
    said = []
    for k in kept:
        if not _alive(k):
            said.append(f"{k.name}: pid {k.pid} already gone")
            continue
        try:
            (os.killpg if k.group else os.kill)(k.pid, k.stop_signal)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for k in kept:
        if not k.cmdline:
            continue
        while (_alive(k) or _exiting(k)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(k):
            (os.killpg if k.group else os.kill)(k.pid, signal.SIGKILL)
            said.append(f"{k.name}: pid {k.pid} killed (did not stop within {timeout:g} s)")
        elif not any(line.startswith(f"{k.name}:") for line in said):
            said.append(f"{k.name}: pid {k.pid} stopped")
    path.unlink()
    (Path(workdir) / ENV_FILE).unlink(missing_ok=True)
    return said


def serve_storage_api_detached(workdir: Path, fake, s3_endpoint: str, access_key: str, secret_key: str) -> Kept:
    """Moves the Storage API fake (a thread of this process) into a process of its own on the same port, so it
    outlives the demo. Its secrets reach it through its environment, never its command line."""
    port = fake.port
    env = {**os.environ, "LIFTOFF_KEPT_CONNINFO": fake.conninfo, "LIFTOFF_KEPT_S3_ENDPOINT": s3_endpoint,
           "LIFTOFF_KEPT_S3_KEY": access_key, "LIFTOFF_KEPT_S3_SECRET": secret_key,
           "LIFTOFF_KEPT_SERVICE_KEY": fake.service_role_key}
    fake.stop()
    log = open(Path(workdir) / "storage-api.log", "ab")
    child = subprocess.Popen([sys.executable, "-m", "liftoff_sandbox.kept", "storage-api", str(port)], env=env,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the Storage API fake did not start again; see {workdir}/storage-api.log")
        if re.search(rf"listening on 127\.0\.0\.1:{port}\b", (Path(workdir) / "storage-api.log").read_text()):
            return process("Storage API fake", child.pid, group=True)
        time.sleep(0.1)
    raise RuntimeError(f"the Storage API fake did not answer on port {port}; see {workdir}/storage-api.log")


def _serve_storage_api(port: int) -> None:
    import boto3
    from botocore.config import Config

    from liftoff_sandbox.storage_api import StorageApiFake

    env = os.environ
    client = boto3.client("s3", endpoint_url=env["LIFTOFF_KEPT_S3_ENDPOINT"], aws_access_key_id=env["LIFTOFF_KEPT_S3_KEY"],
                          aws_secret_access_key=env["LIFTOFF_KEPT_S3_SECRET"], region_name="us-east-1",
                          config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    fake = StorageApiFake(env["LIFTOFF_KEPT_CONNINFO"], client, service_role_key=env["LIFTOFF_KEPT_SERVICE_KEY"],
                          port=port).start()
    print(f"storage api {os.getpid()} listening on 127.0.0.1:{fake.port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    fake.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["storage-api"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        _serve_storage_api(int(sys.argv[2]))
