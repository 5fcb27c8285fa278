"""pgBackRest (https://pgbackrest.org), the anchor of point-in-time recovery: its configuration for one
cluster whose repository is an S3 bucket, and the command lines Liftoff runs on the VPS as the cluster's
operating-system user. No Prefect, no SSH: the caller runs the lines (over ``liftoff.systems.remote``).

What pgBackRest needs, checked here (Debian 12's pgbackrest 2.45, SeaweedFS's S3 gateway over HTTPS):
- S3 only over TLS (``ERROR: [029]: expected protocol 'https'``); the certificate is checked against the
  endpoint's host name, and 2.45 matches DNS names only (a certificate for IP 127.0.0.1 is refused):
  reach a local server as ``localhost``.
- 2.45 does not know PostgreSQL 16's control file (``VersionNotSupportedError: unexpected control version =
  1300``): a PostgreSQL 16 cluster needs a newer pgbackrest (apt.postgresql.org's).
- The key and secret live in the configuration file (the archive_command runs in the server's environment):
  it is written 0600 and owned by the cluster's user.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit

from liftoff.errors import RunbookInvalid


@dataclass(frozen=True)
class Repository:
    endpoint_url: str  # https://host[:port]
    bucket: str
    region: str
    key: str
    secret: str
    path: str = "/pgbackrest"
    ca_file: str | None = None
    retention_days: int = 30


@dataclass(frozen=True)
class Cluster:
    stanza: str
    pg_path: str
    pg_port: int = 5432
    socket_path: str | None = None
    os_user: str = "postgres"


def config_text(repo: Repository, cluster: Cluster, work_dir: str, field: str = "backups.destination") -> str:
    """pgbackrest.conf for the cluster and its S3 repository (path-style, full backups kept
    ``retention_days`` days, with the WAL they need)."""
    url = urlsplit(repo.endpoint_url)
    if url.scheme != "https":
        raise RunbookInvalid(f"{field}.endpoint_url: pgBackRest reaches S3 only over HTTPS, got {repo.endpoint_url}")
    lines = ["[global]", "repo1-type=s3", f"repo1-path={repo.path}", f"repo1-s3-bucket={repo.bucket}",
             f"repo1-s3-endpoint={url.hostname}", f"repo1-s3-region={repo.region}", f"repo1-s3-key={repo.key}",
             f"repo1-s3-key-secret={repo.secret}", "repo1-s3-uri-style=path",
             "repo1-retention-full-type=time", f"repo1-retention-full={repo.retention_days}",
             f"log-path={work_dir}/log", f"lock-path={work_dir}/lock", f"spool-path={work_dir}/spool",
             "start-fast=y", "log-level-console=warn", "log-level-file=info", "archive-timeout=60"]
    if url.port:
        lines.append(f"repo1-storage-port={url.port}")
    if repo.ca_file:
        lines.append(f"repo1-storage-ca-file={repo.ca_file}")
    lines += ["", f"[{cluster.stanza}]", f"pg1-path={cluster.pg_path}", f"pg1-port={cluster.pg_port}"]
    if cluster.socket_path:
        lines.append(f"pg1-socket-path={cluster.socket_path}")
    return "\n".join(lines) + "\n"


def archive_command(config: str, stanza: str) -> str:
    """What PostgreSQL runs for every WAL segment (``%p``)."""
    return f"pgbackrest --config={shlex.quote(config)} --stanza={shlex.quote(stanza)} archive-push %p"


def command(cluster: Cluster, config: str, *args: str) -> str:
    """A pgbackrest command line run as the cluster's user (``runuser``: Liftoff logs in to the VPS as root)."""
    return " ".join(["runuser", "-u", shlex.quote(cluster.os_user), "--", "pgbackrest",
                     f"--config={shlex.quote(config)}", f"--stanza={shlex.quote(cluster.stanza)}",
                     *(shlex.quote(a) for a in args)])


@dataclass(frozen=True)
class BackupSet:
    label: str
    type: str  # full / diff / incr
    started: float
    stopped: float
    size: int  # database size
    repo_size: int  # what it takes in the repository


@dataclass(frozen=True)
class Info:
    status: str
    backups: list[BackupSet]
    archive_min: str | None
    archive_max: str | None

    @property
    def earliest_s(self) -> float | None:
        """The earliest time a point-in-time restore can reach: the end of the oldest backup."""
        return min((b.stopped for b in self.backups), default=None)


def parse_info(text: str, stanza: str) -> Info:
    """``pgbackrest info --output=json`` for one stanza."""
    found = next((s for s in json.loads(text or "[]") if s.get("name") == stanza), None)
    if found is None:
        return Info("missing", [], None, None)
    backups = [BackupSet(b["label"], b["type"], b["timestamp"]["start"], b["timestamp"]["stop"],
                         b["info"]["size"], b["info"]["repository"]["delta"]) for b in found.get("backup", [])]
    archive = (found.get("archive") or [{}])[-1]
    return Info(found.get("status", {}).get("message", "unknown"), backups, archive.get("min"), archive.get("max"))


def first_error(output: str) -> str:
    """pgBackRest's ``ERROR: [NNN]: ...`` line (or the last line), the one an operator acts on."""
    lines = [l.strip() for l in output.splitlines() if l.strip()]
    picked = next((l for l in lines if l.startswith("ERROR:")), lines[-1] if lines else "no output")
    if "VersionNotSupportedError" in output:
        picked = ("this pgbackrest does not support the cluster's PostgreSQL version (VersionNotSupportedError); "
                  "install a newer one (apt.postgresql.org): " + picked)
    return picked
