"""A throwaway OpenSSH server on a free loopback port: the VPS the SSH switch driver talks to in tests and the
demo.

It is Debian's real ``/usr/sbin/sshd`` (package openssh-server) run by hand: ``sshd -D -e -f CONFIG`` with a
temporary Ed25519 host key, a temporary client key pair whose public half is the only authorised key,
``UsePAM no`` (no PAM stack outside a real login), ``PermitRootLogin yes`` (the suite runs as root) and the
internal SFTP server. Everything lives in one temporary directory; ``stop()`` ends the daemon by its PID and
removes the directory. Commands run as the user who started it (``user``), as a login to a VPS would.

``known_hosts_path`` holds the host key in the ``[127.0.0.1]:PORT`` form OpenSSH and paramiko look up for a
non-default port; ``client_key_text`` is the private key (OpenSSH format) to hand over as a secret reference.
"""

from __future__ import annotations

import atexit
import base64
import getpass
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from liftoff_sandbox.postgres import free_port

SSHD = Path("/usr/sbin/sshd")
_started: list["SshServer"] = []


def key_fingerprint(public_key_line: str) -> str:
    """``SHA256:...`` of an OpenSSH public key line (``TYPE BASE64 [comment]``), as ``ssh-keygen -lf`` prints."""
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def new_key_pair(directory: Path, name: str) -> tuple[Path, str]:
    """An unencrypted Ed25519 key pair made by ``ssh-keygen``: (private key path, public key line)."""
    private = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(private)],
                   check=True, capture_output=True)
    return private, (directory / f"{name}.pub").read_text().strip()


class SshServer:
    """One sshd. ``start()`` returns once it answers with its SSH banner."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self.user = getpass.getuser()
        self.root: Path | None = None
        self._process: subprocess.Popen | None = None
        self.host_public_key = ""
        self.client_public_key = ""
        self.client_key_text = ""

    @property
    def known_hosts_path(self) -> Path:
        return self.root / "known_hosts"

    @property
    def host_key_fingerprint(self) -> str:
        return key_fingerprint(self.host_public_key)

    @property
    def log_path(self) -> Path:
        return self.root / "sshd.log"

    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {' '.join(self.host_public_key.split()[:2])}"

    def start(self) -> "SshServer":
        if not SSHD.exists():
            raise RuntimeError(f"{SSHD} not found; apt-get install openssh-server (scripts/install-system-deps.sh)")
        self.root = Path(tempfile.mkdtemp(prefix="liftoff-sshd-"))
        host_key, self.host_public_key = new_key_pair(self.root, "host_ed25519")
        client_key, self.client_public_key = new_key_pair(self.root, "client_ed25519")
        self.client_key_text = client_key.read_text()
        (self.root / "authorized_keys").write_text(self.client_public_key + "\n")
        if os.geteuid() == 0:
            # sshd's privilege-separation directory; a container without a booted init lacks it.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for _ in range(5):  # the free port can be taken between choosing it and sshd binding it
            self.port = free_port()
            self.known_hosts_path.write_text(self.known_hosts_line() + "\n")
            config = self.root / "sshd_config"
            config.write_text("\n".join([
                f"Port {self.port}",
                f"ListenAddress {self.host}",
                f"HostKey {host_key}",
                f"PidFile {self.root / 'sshd.pid'}",
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                "PermitRootLogin yes",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # the key files live under /tmp, which is world-writable: StrictModes would refuse them
                "StrictModes no",
                "PrintMotd no",
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "",
            ]))
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                                 stdout=log, stderr=log, start_new_session=True)
            if self._wait_ready(15):
                _started.append(self)
                return self
            self._end_process()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        self.stop()
        raise RuntimeError(f"sshd did not start on {self.host}: {' | '.join(tail)}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _end_process(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None

    def stop(self) -> None:
        """Ends the listener. Sessions still open end with their clients (each has its own process)."""
        if self in _started:
            _started.remove(self)
        self._end_process()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SshServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_started() -> None:
    for server in list(_started):
        server.stop()
