"""The VPS over SSH (paramiko): run a command, read a file, replace a file atomically; and the switch driver
that moves the apps by rewriting their env file there and running their restart command.

The server's host key is checked against the runbook's ``ssh.known_hosts`` and nothing else: an unknown key
is refused (never added), a changed one is refused louder. The private key comes from ``ssh.private_key`` (a
secret reference); the connection opens on first use and ``close()`` ends it.

``EnvFileSwitch`` edits the env file as docker compose reads it (``KEY=VALUE`` lines, comments, blank lines
and the order of lines kept), replaces it atomically and keeps the previous file beside it as
``FILE.liftoff-<UTC time>.bak``. Its undo record names that backup and the SHA-256 of the file before and
after, never a value: the values stay on the VPS, in the backup.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import secrets
import shlex
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from liftoff.errors import ConnectionRefused, RunbookInvalid, StepFailed
from liftoff.logs import get_logger
from liftoff.redaction import redact
from liftoff.runbooks.model import SshAccess, SshSwitch
from liftoff.systems.switch import SwitchDriver

log = get_logger(system="ssh")

CONNECT_TIMEOUT_S = 15
BACKUP_MARK = ".liftoff-"  # FILE.liftoff-20261126T101500123456Z.bak


@dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: str
    stderr: str


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey):
        super().__init__("unknown host key")
        self.key = key


class _RejectUnknownHost(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, keeping the offered key so the error can show its fingerprint."""

    def missing_host_key(self, client, hostname, key):
        raise _UnknownHostKey(key)


def load_private_key(text: str, field: str = "ssh.private_key") -> paramiko.PKey:
    """An Ed25519, ECDSA or RSA private key from its text (OpenSSH or PEM format, no passphrase)."""
    data = text.strip().encode() + b"\n"
    try:
        try:
            loaded = serialization.load_ssh_private_key(data, password=None)
        except ValueError:
            loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise ConnectionRefused(f"{field}: the private key is encrypted with a passphrase; give an unencrypted "
                                "key (ssh-keygen -p -N '' -f KEYFILE on a copy)") from None
    except (ValueError, paramiko.SSHException, IndexError):
        raise ConnectionRefused(f"{field}: not a private key (expected an OpenSSH or PEM Ed25519, ECDSA or RSA "
                                "key, '-----BEGIN ... PRIVATE KEY-----')") from None
    for kind, cls in ((ed25519.Ed25519PrivateKey, paramiko.Ed25519Key), (ec.EllipticCurvePrivateKey, paramiko.ECDSAKey),
                      (rsa.RSAPrivateKey, paramiko.RSAKey)):
        if isinstance(loaded, kind):
            return cls.from_private_key(io.StringIO(data.decode()))
    raise ConnectionRefused(f"{field}: unsupported key type {type(loaded).__name__}; use Ed25519, ECDSA or RSA")


def command_head(command: str) -> str:
    """The first words of a command, for messages: the program's name and up to two plain arguments (options,
    names, paths: nothing with ``=``, ``@``, ``:`` or spaces, which could hold a secret); leading
    ``VAR=value`` assignments are skipped."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    if not words:
        return "(command)"
    head = [posixpath.basename(words[0]) or words[0]]
    for word in words[1:3]:
        if not re.match(r"^[A-Za-z0-9_.,/+-]+$", word):
            break
        head.append(word)
    return redact(" ".join(head))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return redact(lines[-1][:300]) if lines else "no output on stderr"


class Remote:
    """One SSH connection to the VPS, opened on first use. A context manager; ``close()`` ends it."""

    def __init__(self, access: SshAccess, *, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.access = access
        self.connect_timeout = connect_timeout
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def where(self) -> str:
        """user@host:port, how messages name the VPS."""
        return f"{self.access.user}@{self.access.host}:{self.access.port}"

    @property
    def _hostport(self) -> str:
        return f"{self.access.host}:{self.access.port}"

    def _connect(self) -> paramiko.SSHClient:
        if self._client is not None:
            return self._client
        known_hosts = self.access.known_hosts
        if not known_hosts.is_file():
            raise ConnectionRefused(f"ssh.known_hosts: {known_hosts} does not exist; create it with the VPS's host "
                                    f"key (ssh-keyscan -p {self.access.port} {self.access.host} > {known_hosts}, "
                                    "then compare its fingerprint with ssh-keygen -lf on the VPS)")
        key = load_private_key(self.access.private_key.resolve("ssh.private_key"))
        client = paramiko.SSHClient()
        # Only the runbook's file: not the user's ~/.ssh/known_hosts, and nothing is ever written back.
        try:
            client.get_host_keys().load(str(known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectionRefused(f"ssh.known_hosts: {known_hosts} cannot be read ({type(exc).__name__}); "
                                    "expected lines like '[host]:port ssh-ed25519 AAAA...'") from None
        client.set_missing_host_key_policy(_RejectUnknownHost())
        try:
            client.connect(self.access.host, port=self.access.port, username=self.access.user, pkey=key,
                           timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout, allow_agent=False, look_for_keys=False)
        except _UnknownHostKey as exc:
            client.close()
            raise ConnectionRefused(
                f"ssh: the host key of {self._hostport} is not in ssh.known_hosts ({known_hosts}); it offered "
                f"{exc.key.get_name()} {exc.key.fingerprint}: verify that fingerprint on the VPS (ssh-keygen -lf "
                f"/etc/ssh/ssh_host_*_key.pub), then add it (ssh-keyscan -p {self.access.port} {self.access.host} "
                f">> {known_hosts})") from None
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise ConnectionRefused(
                f"ssh: HOST KEY CHANGED for {self._hostport}: {known_hosts} expects {exc.expected_key.fingerprint}, "
                f"the server offered {exc.key.fingerprint}. This may be an attack (man in the middle); do not "
                f"connect until the VPS's owner confirms the new key, then replace its line in {known_hosts}") from None
        except paramiko.AuthenticationException:
            client.close()
            raise ConnectionRefused(
                f"ssh: {self.where} refused the key from ssh.private_key ({key.get_name()} {key.fingerprint}); add "
                f"its public key to ~{self.access.user}/.ssh/authorized_keys on the VPS, or check ssh.user") from None
        except TimeoutError:  # socket.timeout is an alias
            client.close()
            raise ConnectionRefused(f"ssh: {self._hostport} did not answer within {self.connect_timeout:g} s; check "
                                    "ssh.host, ssh.port and the VPS's firewall") from None
        except (paramiko.SSHException, OSError) as exc:
            client.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
                reason = "connection refused"
            raise ConnectionRefused(f"ssh: cannot connect to {self._hostport} ({redact(reason)}); check ssh.host "
                                    "and ssh.port, and that sshd runs there") from None
        self._client = client
        log.info("ssh connected", where=self.where)
        return client

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._connect().open_sftp()
        return self._sftp

    def run(self, command: str, *, timeout: float = 300, check: bool = True) -> CommandResult:
        """Runs ``command`` through the login shell of ``ssh.user``; stdin is closed. Raises ``StepFailed`` if it
        outlives ``timeout`` seconds or (``check``) exits non-zero."""
        transport = self._connect().get_transport()
        channel = transport.open_session(timeout=self.connect_timeout)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            channel.exec_command(command)
            channel.shutdown_write()
            while True:
                busy = False
                if channel.recv_ready():
                    out += channel.recv(65536)
                    busy = True
                if channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                    busy = True
                if busy:
                    continue
                if channel.exit_status_ready() and (channel.eof_received or channel.closed):
                    break
                if time.monotonic() > deadline:
                    raise StepFailed(f"ssh {self._hostport}: `{command_head(command)}` did not finish within "
                                     f"{timeout:g} s; it may still be running there")
                channel.status_event.wait(0.02)
            while channel.recv_ready():  # what arrived between the last read and the end of the stream
                out += channel.recv(65536)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            rc = channel.recv_exit_status()
        finally:
            channel.close()
        result = CommandResult(rc, out.decode(errors="replace"), err.decode(errors="replace"))
        log.info("ssh command finished", where=self.where, command=command_head(command), rc=rc)
        if check and rc != 0:
            raise StepFailed(f"ssh {self._hostport}: `{command_head(command)}` exited {rc}: "
                             f"{_last_line(result.stderr)}")
        return result

    def read_bytes(self, path: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        try:
            with self._sftp_client().open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StepFailed(f"ssh {self._hostport}: cannot read {path} ({exc.strerror or exc})") from None

    def read_file(self, path: str) -> str | None:
        """The file's text (UTF-8), or None if it does not exist."""
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", errors="replace")

    def stat(self, path: str) -> paramiko.SFTPAttributes | None:
        try:
            return self._sftp_client().stat(path)
        except FileNotFoundError:
            return None

    def list_dir(self, path: str) -> list[str]:
        return self._sftp_client().listdir(path)

    def write_stream(self, path: str, chunks, *, mode: int = 0o600) -> tuple[int, str]:
        """Writes the byte chunks to ``path`` through a temporary name renamed at the end (a reader never sees a
        part); the folder is created. Returns (size, SHA-256 hex) of what was written."""
        sftp = self._sftp_client()
        directory, name = posixpath.split(path)
        self.run(f"mkdir -p -- {shlex.quote(directory)}", timeout=60)
        tmp = posixpath.join(directory, f".{name}.liftoff-tmp-{secrets.token_hex(4)}")
        sha, size = hashlib.sha256(), 0
        try:
            with sftp.open(tmp, "wb") as out:
                out.set_pipelined(True)
                for chunk in chunks:
                    sha.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            sftp.chmod(tmp, mode)
            self.run(f"sync -- {shlex.quote(tmp)}", check=False, timeout=600)
            sftp.posix_rename(tmp, path)
        except OSError as exc:
            try:
                sftp.remove(tmp)
            except OSError:
                pass
            raise StepFailed(f"ssh {self._hostport}: cannot write {path} ({exc.strerror or exc}); check the "
                             "folder's permissions and free space") from None
        return size, sha.hexdigest()

    def download(self, path: str, local, *, chunk_size: int = 1 << 20) -> tuple[int, str]:
        """Streams ``path`` into the local file ``local``; (size, SHA-256 hex) of what was read."""
        sha, size = hashlib.sha256(), 0
        try:
            with self._sftp_client().open(path, "rb") as src, open(local, "wb") as out:
                src.prefetch()
                while chunk := src.read(chunk_size):
                    sha.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            raise StepFailed(f"ssh {self._hostport}: {path} does not exist") from None
        except OSError as exc:
            raise StepFailed(f"ssh {self._hostport}: cannot read {path} ({exc.strerror or exc})") from None
        return size, sha.hexdigest()

    def files(self, directory: str) -> list[paramiko.SFTPAttributes]:
        """The entries of ``directory`` with their size and mtime; empty when it does not exist."""
        try:
            return self._sftp_client().listdir_attr(directory)
        except FileNotFoundError:
            return []

    def rename(self, path: str, to: str) -> None:
        self._sftp_client().posix_rename(path, to)

    def remove(self, path: str) -> None:
        try:
            self._sftp_client().remove(path)
        except FileNotFoundError:
            pass

    def write_file_atomic(self, path: str, content: str | bytes, *, mode: int = 0o600,
                          backup: bool = True) -> str | None:
        """Replaces ``path`` with ``content`` in one rename: a reader sees the old file or the new one, never a
        part. The new file gets ``mode`` and the previous file's owner. With ``backup`` the previous file is kept
        (mode 0600) as ``path.liftoff-<UTC time>.bak``, whose path is returned (None if there was no file)."""
        sftp = self._sftp_client()
        data = content.encode() if isinstance(content, str) else content
        directory, name = posixpath.split(path)
        tmp = posixpath.join(directory, f".{name}.liftoff-tmp-{secrets.token_hex(4)}")
        previous = self.stat(path)
        backup_path = None
        try:
            if backup and previous is not None:
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
                backup_path = f"{path}{BACKUP_MARK}{stamp}.bak"
                self._write_new(sftp, backup_path, self.read_bytes(path) or b"", 0o600)
            self._write_new(sftp, tmp, data, mode)
            if previous is not None:
                try:
                    sftp.chown(tmp, previous.st_uid, previous.st_gid)
                except OSError:
                    pass  # not root on the VPS: the file stays ours, as it would with any editor
            self.run(f"sync -- {shlex.quote(tmp)}", check=False, timeout=60)  # SFTP has no fsync
            sftp.posix_rename(tmp, path)
        except OSError as exc:
            try:
                sftp.remove(tmp)
            except OSError:
                pass
            raise StepFailed(f"ssh {self._hostport}: cannot replace {path} ({exc.strerror or exc}); "
                             "check the directory's permissions and free space") from None
        log.info("file replaced", where=self.where, path=path, backup=backup_path)
        return backup_path

    @staticmethod
    def _write_new(sftp: paramiko.SFTPClient, path: str, data: bytes, mode: int) -> None:
        with sftp.open(path, "wbx") as f:
            f.chmod(mode)  # before any byte is written: an env file holds secrets
            f.write(data)

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the env file, as docker compose reads it ------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^(?P<lead>\s*(?:export\s+)?)(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)(?P<eq>\s*=\s*)(?P<rest>.*)$")
_PLAIN = re.compile(r"^[A-Za-z0-9_./:@%+=,?&~-]*$")


def _split_value(rest: str) -> tuple[str, str] | None:
    """(the value as written, what follows it: an inline comment and spaces); None if a quoted value does not
    close on this line (a multi-line value)."""
    if rest[:1] in ("'", '"'):
        quote, i = rest[0], 1
        while i < len(rest):
            if rest[i] == "\\" and i + 1 < len(rest):
                i += 2
                continue
            if rest[i] == quote:
                return rest[:i + 1], rest[i + 1:]
            i += 1
        return None
    m = re.search(r"\s+#", rest)
    if m:
        return rest[:m.start()], rest[m.start():]
    stripped = rest.rstrip()
    return stripped, rest[len(stripped):]


def decode_env_value(written: str) -> str:
    """The value compose reads from ``written`` (single quotes literal but for \\', double quotes with the
    usual escapes; $$ as our encoding writes a literal $)."""
    if len(written) >= 2 and written[0] == written[-1] == "'":
        return written[1:-1].replace("\\'", "'")
    if len(written) >= 2 and written[0] == written[-1] == '"':
        escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
        body = written[1:-1].replace("$$", "\\$")
        return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), "\\" + m.group(1)), body)
    return written.strip()


def encode_env_value(value: str) -> str:
    """The shortest spelling compose reads back as ``value`` with no interpolation: bare, else single-quoted,
    else double-quoted with escapes."""
    if _PLAIN.match(value):
        return value
    if "'" not in value and "\\" not in value and "\n" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("\n", "\\n")
    return f'"{escaped}"'


def parse_env_file(text: str) -> dict[str, str | None]:
    """Every variable an env file assigns, with the value compose reads (the last assignment wins; None for a
    quoted value over several lines, which this reader does not follow)."""
    found: dict[str, str | None] = {}
    for line in text.splitlines():
        m = _ASSIGNMENT.match(line)
        if m is None:
            continue
        split = _split_value(m.group("rest"))
        found[m.group("key")] = None if split is None else decode_env_value(split[0])
    return found


def apply_env_changes(text: str, changes: dict[str, str], *, where: str = "the env file") -> str:
    """``text`` with each key of ``changes`` set: every line that assigns it gets the new value (its ``export``,
    spacing and inline comment kept); a key not there is appended. Other lines stay byte for byte."""
    lines = text.splitlines(keepends=True)
    seen: set[str] = set()
    for i, line in enumerate(lines):
        body = line.rstrip("\r\n")
        m = _ASSIGNMENT.match(body)
        if not m or m.group("key") not in changes:
            continue
        key = m.group("key")
        split = _split_value(m.group("rest"))
        if split is None:
            raise StepFailed(f"{key} in {where} is a quoted value over several lines; edit it by hand to one line, "
                             "then re-run")
        written, trailing = split
        seen.add(key)
        if decode_env_value(written) == changes[key]:
            continue  # already set: keep the line as the operator wrote it
        lines[i] = f"{m.group('lead')}{key}{m.group('eq')}{encode_env_value(changes[key])}{trailing}" + line[len(body):]
    added = [f"{key}={encode_env_value(value)}\n" for key, value in changes.items() if key not in seen]
    if added and lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines + added)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EnvFileSwitch(SwitchDriver):
    """The SSH switch driver: the apps' env file on the VPS, and their restart command."""

    def __init__(self, remote: Remote, settings: SshSwitch, *, restart_timeout: float = 600):
        self.remote = remote
        self.settings = settings
        self.restart_timeout = restart_timeout
        self.where = f"{remote.where}:{settings.env_file}"

    @property
    def env_file(self) -> str:
        return self.settings.env_file

    def _current(self) -> bytes:
        data = self.remote.read_bytes(self.env_file)
        if data is None:
            raise StepFailed(f"ssh {self.remote.where}: env file {self.env_file} does not exist; check "
                             "cutover.switch.ssh.env_file")
        return data

    def _changed(self, data: bytes, changes: dict[str, str]) -> bytes:
        where = f"{self.env_file} on {self.remote.where}"
        return apply_env_changes(data.decode("utf-8"), changes, where=where).encode()

    def read_env(self) -> dict[str, dict[str, str | None]]:
        return {self.where: parse_env_file(self._current().decode("utf-8", errors="replace"))}

    def apply_env(self, changes: dict[str, str]) -> dict:
        for key, value in changes.items():
            if "\n" in value or "\r" in value:
                raise StepFailed(f"cutover.switch.env.{key}: the value holds a line break; an env file value must "
                                 "be one line")
        before = self._current()
        after = self._changed(before, changes)
        if after == before:
            return self._undo_of_earlier_apply(before, changes)
        info = self.remote.stat(self.env_file)
        backup = self.remote.write_file_atomic(self.env_file, after, mode=stat.S_IMODE(info.st_mode), backup=True)
        log.info("env file switched", where=self.where, keys=sorted(changes), backup=backup)
        return {"env_file": self.env_file, "backup": backup, "sha256_before": _sha256(before),
                "sha256_after": _sha256(after)}

    def _undo_of_earlier_apply(self, current: bytes, changes: dict[str, str]) -> dict:
        """The file already has these values: the newest backup this driver left that these changes turn into
        the current file is the environment before the first apply."""
        directory, name = posixpath.split(self.env_file)
        prefix = name + BACKUP_MARK
        backups = sorted((n for n in self.remote.list_dir(directory or ".") if n.startswith(prefix)
                          and n.endswith(".bak")), reverse=True)[:20]
        for backup_name in backups:
            backup = posixpath.join(directory, backup_name)
            data = self.remote.read_bytes(backup)
            if data is not None and data != current:
                try:
                    if self._changed(data, changes) == current:
                        return {"env_file": self.env_file, "backup": backup, "sha256_before": _sha256(data),
                                "sha256_after": _sha256(current)}
                except (StepFailed, UnicodeDecodeError):
                    continue
        # Nothing to undo: the file had these values before any switch.
        return {"env_file": self.env_file, "backup": None, "sha256_before": _sha256(current),
                "sha256_after": _sha256(current)}

    def restore_env(self, undo: dict) -> None:
        if undo.get("env_file") != self.env_file:
            raise StepFailed(f"the undo record is for env file {undo.get('env_file')}, not {self.env_file} "
                             "(cutover.switch.ssh.env_file changed since the switch); restore it by hand")
        current = _sha256(self._current())
        if current == undo["sha256_before"] or undo.get("backup") is None:
            log.info("env file already as before the switch", where=self.where)
            return
        backup = undo["backup"]
        if current != undo["sha256_after"]:
            raise StepFailed(f"ssh {self.remote.where}: {self.env_file} was edited since the switch (it is neither "
                             f"the file before nor after it); compare it with {backup}, put back what the apps need "
                             f"(e.g. cp -p {backup} {self.env_file}), then re-run the rollback")
        data = self.remote.read_bytes(backup)
        if data is None:
            raise StepFailed(f"ssh {self.remote.where}: cannot restore {self.env_file}: its backup {backup} is gone; "
                             "put the previous values back by hand (the ledger lists the switched keys), then re-run "
                             "the rollback")
        if _sha256(data) != undo["sha256_before"]:
            raise StepFailed(f"ssh {self.remote.where}: the backup {backup} was changed since the switch; check it and "
                             f"restore {self.env_file} by hand, then re-run the rollback")
        info = self.remote.stat(self.env_file)
        self.remote.write_file_atomic(self.env_file, data, mode=stat.S_IMODE(info.st_mode), backup=True)
        log.info("env file restored", where=self.where, backup=backup)

    def redeploy(self) -> None:
        self.remote.run(self.settings.restart, timeout=self.restart_timeout)
        log.info("apps restarted", where=self.where, command=command_head(self.settings.restart))

    def stop_apps(self) -> None:
        if not self.settings.stop:
            raise RunbookInvalid("cutover.switch.ssh.stop: the recovery stops the apps before it replaces their "
                                 "database: give the command that stops them (e.g. 'docker compose stop')")
        self.remote.run(self.settings.stop, timeout=self.restart_timeout)
        log.info("apps stopped", where=self.where, command=command_head(self.settings.stop))

    def start_apps(self) -> None:
        command = self.settings.start or self.settings.restart
        self.remote.run(command, timeout=self.restart_timeout)
        log.info("apps started", where=self.where, command=command_head(command))

    def close(self) -> None:
        self.remote.close()
