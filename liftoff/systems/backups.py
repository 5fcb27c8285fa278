"""Database backups in an S3-compatible bucket (Backblaze B2), and what proves them: plain functions over a
boto3 client (``liftoff.systems.s3.client``) and the pg_dump/pg_restore binaries; no Prefect, no runbook parsing.

How a dump reaches the bucket, memory bounded and never on local disk: ``pg_dump -Fc`` writes to a pipe, the
pipe is read in parts of ``part_size`` (the one part held in memory), and each part is uploaded with its
Content-MD5 (the server refuses a part that arrived otherwise) while SHA-256 and the size run over the bytes.
S3 takes user metadata only when an upload starts, and the SHA-256 is known only at its end. So the parts go
to ``<name>.partial``; once that upload is complete, a server-side copy writes the final ``<name>`` with
``sha256`` and ``size`` metadata (CopyObject with MetadataDirective=REPLACE; above CopyObject's 5 GiB limit,
a multipart copy, UploadPartCopy by range, whose metadata is given when it starts), and the partial object
is deleted. Nothing crosses the network twice, a final name exists only with its metadata, and a killed run
leaves at most a ``.partial`` that retention removes a day later.

Why the versions are checked, twice: GitLab's 2017 outage found months of empty backups made by a pg_dump of
an older major than its server. ``choose_pg_dump`` refuses such a pg_dump before anything runs, and the
restore test refuses an archive whose header says it was made that way (``archive_header``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from liftoff.errors import StepFailed, ToolMissing
from liftoff.redaction import redact
from liftoff.systems import pg_tools, s3

DUMP_SUFFIX = ".dump"
PARTIAL_SUFFIX = ".partial"
COUNTS_SUFFIX = ".json"  # the sidecar next to each dump: per-table row counts taken in the dump's snapshot
COPY_OBJECT_LIMIT = 5 * 1024**3  # S3's (and B2's) largest CopyObject source
COPY_PART = 1024**3  # range of one UploadPartCopy above that
_PIECE = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------
# Names


def backup_key(prefix: str, when: float, suffix: str = "") -> str:
    """``<prefix>_YYYY-MM-DD_HH-MM-SS<suffix>.dump``, UTC. Only for people: nothing here reads a date from a
    name (``suffix``: ``_before-recover`` for the recovery's safety dump)."""
    return f"{prefix}_{datetime.fromtimestamp(when, UTC):%Y-%m-%d_%H-%M-%S}{suffix}{DUMP_SUFFIX}"


def counts_key(key: str) -> str:
    return key + COUNTS_SUFFIX


# ---------------------------------------------------------------------------------------------------------
# pg_dump of the right major


def choose_pg_dump(server_major: int, server_version: str, where: str,
                   search_dirs: list[Path] | None = None) -> pg_tools.PgTools:
    """The oldest installed pair whose major is at least the server's. An older pg_dump is refused with one
    line naming the binary, both versions and the fix: it would refuse the server, or worse (GitLab 2017)
    make a backup that looks fine and is not."""
    found = pg_tools.installed_pg_tools(search_dirs)
    usable = sorted((t for t in found if t.major >= server_major), key=lambda t: t.major)
    if usable:
        return usable[0]
    if not found:
        raise ToolMissing(f"no pg_dump found (looked in {', '.join(str(d) for d in search_dirs or []) or 'the default places'})"
                          f"; install postgresql-client-{server_major} or list its bin directory in database.pg_bin_dirs")
    newest = max(found, key=lambda t: t.major)
    raise ToolMissing(
        f"{newest.pg_dump} is pg_dump {newest.version}, older than the server it would back up, {where} "
        f"(PostgreSQL {server_version}): an older pg_dump makes no usable backup; install "
        f"postgresql-client-{server_major} or list its bin directory in database.pg_bin_dirs")


# ---------------------------------------------------------------------------------------------------------
# Streaming a dump into the bucket


@dataclass(frozen=True)
class StoredDump:
    key: str
    size: int
    sha256: str
    parts: int
    seconds: float


def _read_part(stream, size: int) -> bytes:
    pieces, wanted = [], size
    while wanted > 0:
        piece = stream.read(min(wanted, _PIECE))
        if not piece:
            break
        pieces.append(piece)
        wanted -= len(piece)
    return b"".join(pieces)


def upload_stream(client, bucket: str, key: str, stream, part_size: int, *,
                  retry: s3.RetryPolicy = s3.RetryPolicy()) -> tuple[int, str, int]:
    """Uploads everything ``stream.read`` gives as one multipart upload of ``key``, one part in memory at a
    time; returns (size, SHA-256 hex, parts). Nothing read: no object, StepFailed. Aborted on any failure."""
    started = s3.call(retry, "start upload", lambda: client.create_multipart_upload(
        Bucket=bucket, Key=key, ContentType="application/octet-stream"), client, bucket, key)
    upload_id = started["UploadId"]
    try:
        sha, size, done = hashlib.sha256(), 0, []
        while True:
            data = _read_part(stream, part_size)
            if not data and done:
                break
            if not data:
                raise StepFailed(f"S3 bucket '{bucket}' key {key!r}: the dump is empty (pg_dump wrote nothing)")
            sha.update(data)
            size += len(data)
            number = len(done) + 1
            md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
            answer = s3.call(retry, f"upload part {number}", lambda data=data, number=number, md5=md5: client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, ContentMD5=md5),
                client, bucket, key)
            done.append({"PartNumber": number, "ETag": answer["ETag"]})
            del data
            if size % part_size:  # a short part is the last one
                break
        s3.call(retry, "complete upload", lambda: client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}), client, bucket, key)
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the upload's own error is the one to raise
            pass
        raise
    return size, sha.hexdigest(), len(done)


def copy_as_is(client, bucket: str, source_key: str, key: str, size: int, *,
               retry: s3.RetryPolicy = s3.RetryPolicy()) -> None:
    """A server-side copy of ``source_key`` to ``key`` keeping its metadata (above CopyObject's 5 GiB limit,
    a multipart copy carrying the user metadata; the content type becomes application/octet-stream)."""
    if size <= COPY_OBJECT_LIMIT:
        s3.call(retry, "copy", lambda: client.copy_object(
            Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": source_key}, MetadataDirective="COPY"),
            client, bucket, key)
        return
    head = s3.call(retry, "head", lambda: client.head_object(Bucket=bucket, Key=source_key), client, bucket, source_key)
    copy_with_metadata(client, bucket, source_key, key, size, head.get("Metadata", {}), retry=retry)


def delete_object(client, bucket: str, key: str, *, retry: s3.RetryPolicy = s3.RetryPolicy()) -> None:
    s3.call(retry, "delete", lambda: client.delete_object(Bucket=bucket, Key=key), client, bucket, key)


def copy_with_metadata(client, bucket: str, source_key: str, key: str, size: int, metadata: dict[str, str], *,
                       retry: s3.RetryPolicy = s3.RetryPolicy()) -> None:
    """A server-side copy of ``source_key`` to ``key`` carrying ``metadata`` (replacing the source's)."""
    source = {"Bucket": bucket, "Key": source_key}
    if size <= COPY_OBJECT_LIMIT:
        s3.call(retry, "copy with metadata", lambda: client.copy_object(
            Bucket=bucket, Key=key, CopySource=source, MetadataDirective="REPLACE", Metadata=metadata,
            ContentType="application/octet-stream"), client, bucket, key)
        return
    upload_id = s3.call(retry, "start copy", lambda: client.create_multipart_upload(
        Bucket=bucket, Key=key, Metadata=metadata, ContentType="application/octet-stream"), client, bucket, key)["UploadId"]
    try:
        parts = []
        for number, first in enumerate(range(0, size, COPY_PART), start=1):
            last = min(first + COPY_PART, size) - 1
            answer = s3.call(retry, f"copy part {number}", lambda number=number, first=first, last=last: client.upload_part_copy(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, CopySource=source,
                CopySourceRange=f"bytes={first}-{last}"), client, bucket, key)
            parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
        s3.call(retry, "complete copy", lambda: client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}), client, bucket, key)
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001
            pass
        raise


def put_json(client, bucket: str, key: str, value: dict, *, retry: s3.RetryPolicy = s3.RetryPolicy()) -> None:
    body = json.dumps(value, indent=1, sort_keys=True).encode()
    s3.call(retry, "put", lambda: client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json"),
            client, bucket, key)


def get_json(client, bucket: str, key: str, *, retry: s3.RetryPolicy = s3.RetryPolicy()) -> dict | None:
    from botocore.exceptions import ClientError

    def get():
        try:
            return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if s3.http_status(exc) == 404:
                return None
            raise

    return s3.call(retry, "get", get, client, bucket, key)


def dump_to_bucket(argv: list[str], env: dict[str, str], client, bucket: str, key: str, part_size: int,
                   metadata: dict[str, str], sidecar: dict) -> StoredDump:
    """Runs ``argv`` (a ``pg_dump -Fc`` writing to stdout) and streams its output to ``key``, with ``size``
    and ``sha256`` (plus ``metadata``) as object metadata and ``sidecar`` (plus size and SHA-256) as the JSON
    object next to it. A pg_dump that fails leaves nothing under ``key``; the one-line error is its own."""
    started = time.monotonic()
    partial = key + PARTIAL_SUFFIX
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    drain.start()  # a chatty pg_dump must never block on a full stderr pipe while we read stdout
    try:
        size, sha256, parts = upload_stream(client, bucket, partial, proc.stdout, part_size)
    except BaseException as exc:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        drain.join(5)
        said = stderr[0] if stderr else b""
        if isinstance(exc, StepFailed) and proc.returncode not in (0, -9) and said.strip():
            raise StepFailed(f"pg_dump failed (exit {proc.returncode}): {_first_error(said)}") from None
        raise
    proc.wait()
    drain.join(30)
    if proc.returncode != 0:
        _delete(client, bucket, partial)
        raise StepFailed(f"pg_dump failed (exit {proc.returncode}): {_first_error(stderr[0] if stderr else b'')}")
    try:
        put_json(client, bucket, counts_key(key), {**sidecar, "key": key, "size": size, "sha256": sha256})
        copy_with_metadata(client, bucket, partial, key, size, {**metadata, "sha256": sha256, "size": str(size)})
    finally:
        _delete(client, bucket, partial)
    return StoredDump(key, size, sha256, parts, round(time.monotonic() - started, 2))


def _first_error(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").splitlines()
    picked = [l for l in lines if "error" in l.lower() or "fatal" in l.lower()] or lines or ["no output"]
    return redact(picked[0].strip())


def _delete(client, bucket: str, key: str) -> None:
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except Exception:  # noqa: BLE001 - housekeeping; retention removes a leftover later
        pass


# ---------------------------------------------------------------------------------------------------------
# What the bucket holds, and what retention deletes


@dataclass(frozen=True)
class Backup:
    key: str
    size: int
    last_modified: float  # the object's LastModified (epoch seconds), as the server stamped it


def list_backups(client, bucket: str, prefix: str, *, suffix: str = DUMP_SUFFIX,
                 retry: s3.RetryPolicy = s3.RetryPolicy()) -> list[Backup]:
    """The dumps named ``<prefix>_...<suffix>`` in the bucket, newest first by LastModified."""
    found: list[Backup] = []
    kwargs = {"Bucket": bucket, "Prefix": f"{prefix}_"}
    while True:
        page = s3.call(retry, "list", lambda kwargs=dict(kwargs): client.list_objects_v2(**kwargs), client, bucket)
        found += [Backup(o["Key"], o["Size"], o["LastModified"].timestamp())
                  for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    return newest_first(found)


def newest_first(backups: Iterable[Backup]) -> list[Backup]:
    return sorted(backups, key=lambda b: (b.last_modified, b.key), reverse=True)


def expired(backups: Iterable[Backup], *, now: float, retention_days: int, keep_newest: int,
            protect: Iterable[str] = ()) -> list[Backup]:
    """The backups retention deletes: older than ``retention_days`` by their LastModified, except the newest
    ``keep_newest`` (so a clock far in the future, which makes every backup look old, still keeps them) and
    the keys in ``protect`` (the newest backup whose restore test passed)."""
    keep = set(protect)
    cutoff = now - retention_days * 86400
    return [b for b in newest_first(backups)[keep_newest:] if b.last_modified < cutoff and b.key not in keep]


def delete_backup(client, bucket: str, key: str, *, retry: s3.RetryPolicy = s3.RetryPolicy()) -> None:
    """Deletes a dump and its sidecar."""
    for name in (key, counts_key(key)):
        s3.call(retry, "delete", lambda name=name: client.delete_object(Bucket=bucket, Key=name), client, bucket, name)


# ---------------------------------------------------------------------------------------------------------
# Reading a backup back


def download(client, bucket: str, key: str, path: Path, *, retry: s3.RetryPolicy = s3.RetryPolicy()) -> dict:
    """Streams ``key`` into ``path``; returns its metadata with the SHA-256 and size of what was read."""

    def get():
        sha, size = hashlib.sha256(), 0
        answer = client.get_object(Bucket=bucket, Key=key)
        with open(path, "wb") as out:
            for piece in answer["Body"].iter_chunks(_PIECE):
                sha.update(piece)
                size += len(piece)
                out.write(piece)
        return {"metadata": dict(answer.get("Metadata") or {}), "sha256": sha.hexdigest(), "size": size}

    return s3.call(retry, "download", get, client, bucket, key)


@dataclass(frozen=True)
class ArchiveHeader:
    dumped_from: str  # "16.2 (Debian ...)": the server's version
    dumped_by: str  # the pg_dump's version

    @staticmethod
    def major(version: str) -> int | None:
        m = re.match(r"\s*(\d+)", version)
        return int(m.group(1)) if m else None


def archive_header(pg_restore: str, path: Path) -> ArchiveHeader:
    """What ``pg_restore -l`` says made the archive: "Dumped from database version" and "Dumped by pg_dump
    version". StepFailed when pg_restore cannot read it."""
    proc = subprocess.run([pg_restore, "-l", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise StepFailed(f"pg_restore -l cannot read the archive: {_first_error(proc.stderr.encode())}")
    found = dict(re.findall(r"^;\s+Dumped (from database|by pg_dump) version:\s*(.+)$", proc.stdout, re.MULTILINE))
    return ArchiveHeader(found.get("from database", "unknown"), found.get("by pg_dump", "unknown"))


def restore_archive(pg_restore: str, path: Path, env: dict[str, str], jobs: int) -> str | None:
    """``pg_restore --no-owner --no-acl -j jobs`` of the archive into the database ``env`` names; returns
    None when it restored without an error, else its first error line (redacted)."""
    argv = [pg_restore, "--no-owner", "--no-acl", "--no-password", f"--jobs={jobs}", "--dbname", env["PGDATABASE"],
            str(path)]
    proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True)
    if proc.returncode == 0:
        return None
    return f"pg_restore exit {proc.returncode}: {_first_error(proc.stderr)}"


def restore_archive_leaving_out(pg_restore: str, path: Path, env: dict[str, str], jobs: int,
                                leave_out: set[str], list_dir: Path) -> tuple[str | None, list[str]]:
    """``restore_archive`` of every entry of the archive except those whose kind (``pg_restore -l``'s
    description: ``POLICY``, ...) is in ``leave_out``, through a ``-L`` list written to ``list_dir``. Returns
    (None, or pg_restore's first error line; the TOC lines left out)."""
    listed = subprocess.run([pg_restore, "-l", str(path)], capture_output=True)
    if listed.returncode != 0:
        raise StepFailed(f"pg_restore -l cannot read the archive: {_first_error(listed.stderr)}")
    listing = pg_tools.parse_toc(listed.stdout.decode())
    left_out = [e.line for e in listing if e.desc in leave_out]
    chosen = list_dir / (path.name + ".list")
    chosen.write_text("".join(("; " if e.desc in leave_out else "") + e.line + "\n" for e in listing))
    argv = [pg_restore, "--no-owner", "--no-acl", "--no-password", f"--jobs={jobs}", "--use-list", str(chosen),
            "--dbname", env["PGDATABASE"], str(path)]
    try:
        proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True)
    finally:
        chosen.unlink(missing_ok=True)
    if proc.returncode == 0:
        return None, left_out
    return f"pg_restore exit {proc.returncode}: {_first_error(proc.stderr)}", left_out


def recreate_from_archive(pg_restore: str, path: Path, env: dict[str, str], jobs: int) -> str | None:
    """``pg_restore --create --no-owner --exit-on-error -j jobs`` of the archive, connected to the maintenance
    database ``env`` names: the archive's database is created (with its encoding, collation, settings and
    grants) and filled. Returns None when it restored without an error, else its first error line (redacted)."""
    argv = [pg_restore, "--create", "--no-owner", "--exit-on-error", "--no-password", f"--jobs={jobs}",
            "--dbname", env["PGDATABASE"], str(path)]
    proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True)
    if proc.returncode == 0:
        return None
    return f"pg_restore exit {proc.returncode}: {_first_error(proc.stderr)}"


def dump_to_sink(argv: list[str], env: dict[str, str], sink) -> tuple[int, str, float]:
    """Runs ``argv`` (a ``pg_dump -Fc`` writing to stdout) and hands its output, in pieces, to
    ``sink(chunks) -> (size, sha256)``; returns (size, sha256, seconds). A pg_dump that fails or writes
    nothing is StepFailed with its own first error line (what the sink wrote is then the caller's to drop)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    drain.start()

    def chunks():
        while piece := proc.stdout.read(_PIECE):
            yield piece

    try:
        size, sha256 = sink(chunks())
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    proc.wait()
    drain.join(30)
    if proc.returncode != 0 or size == 0:
        raise StepFailed(f"pg_dump failed (exit {proc.returncode}): {_first_error(stderr[0] if stderr else b'')}")
    return size, sha256, round(time.monotonic() - started, 2)
