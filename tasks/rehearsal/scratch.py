"""The rehearsal's scratch resources: a scratch database on the target server, scratch buckets on the target
S3 server, and the scratch runbook that points the phase flows at them; plus the arithmetic of its report.

A rehearsal must never touch the real target. So every destructive function here checks the name it is
given against the rehearsal's own (``rehearsal.scratch_database``, buckets starting with
``rehearsal.bucket_prefix``) and refuses anything else with one line naming the server and the object;
the scratch database may not be the real target database nor one of PostgreSQL's own.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import psycopg
import yaml
from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from liftoff.errors import RunbookInvalid, StepFailed
from liftoff.logs import get_logger
from liftoff.redaction import first_line, redact
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import postgres
from liftoff.tasks.database.common import AUTH_USERS_FILE, DUMP_DIR

log = get_logger(phase="rehearsal")
PHASE = "rehearsal"
DONE = "rehearsal.done"  # the real ledger's event log; after: durations, sizes, gates, estimate
FAILED = "rehearsal.failed"
RESERVED_DATABASES = {"postgres", "template0", "template1"}
SCRATCH_RUNBOOK = "runbook.yaml"  # in the scratch state_dir: what the phase flows ran with
SUMMARY = "summary.json"  # what is kept of a rehearsal's state_dir besides its ledger and runbook


# ---------------------------------------------------------------------------------------------------------
# Names


def scratch_runbook_name(rb: Runbook) -> str:
    """The scratch runbook's name: its artifacts keep their own history, apart from production's."""
    return f"{rb.name}-rehearsal"


def bucket_prefix(rb: Runbook) -> str:
    """What every scratch bucket's name starts with: the rehearsal's prefix before the runbook's own."""
    return rb.rehearsal.bucket_prefix + rb.storage.bucket_prefix


def scratch_buckets(rb: Runbook) -> list[str]:
    return [bucket_prefix(rb) + b.name for b in rb.storage.buckets]


def check_scratch_settings(rb: Runbook) -> None:
    """Refuses a rehearsal whose scratch database would be the real target's or one of PostgreSQL's own."""
    name = rb.rehearsal.scratch_database
    if name == rb.target.direct.database:
        raise RunbookInvalid(f"runbook {rb.name}: rehearsal.scratch_database '{name}' is the real target database "
                             "(target.direct.database); the rehearsal drops it afterwards: choose another name")
    if name in RESERVED_DATABASES:
        raise RunbookInvalid(f"runbook {rb.name}: rehearsal.scratch_database '{name}' is one of PostgreSQL's own "
                             "databases; choose another name, e.g. liftoff_rehearsal")


def scratch_runbook(rb: Runbook, state_dir: Path) -> Runbook:
    """The real runbook pointed at scratch resources: the scratch database on the target server, scratch
    buckets, its own state_dir (its own ledger), no PgBouncer and no cutover switch. ``storage.rewrite`` is
    kept: it rewrites the scratch database only. Secrets stay references."""
    check_scratch_settings(rb)
    direct = rb.target.direct.model_copy(update={"database": rb.rehearsal.scratch_database})
    target = rb.target.model_copy(update={"direct": direct, "pooled": None})
    storage = rb.storage.model_copy(update={"bucket_prefix": bucket_prefix(rb)})
    cutover = rb.cutover.model_copy(update={"switch": None, "apps": []})
    return rb.model_copy(update={"name": scratch_runbook_name(rb), "state_dir": Path(state_dir), "target": target,
                                 "storage": storage, "cutover": cutover})


def new_scratch_state_dir(rb: Runbook, now: float | None = None) -> Path:
    """A fresh ``state_dir/rehearsals/<UTC timestamp>`` (not created)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now or time.time()))
    base = rb.state_dir / "rehearsals"
    path, n = base / stamp, 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{n}"
    return path


def write_scratch_runbook(scratch: Runbook) -> Path:
    """Writes the scratch runbook as YAML in its state_dir (secrets as the references they are) and returns
    its path: the phase flows take it as their ``RunOptions.runbook``."""
    scratch.state_dir.mkdir(parents=True, exist_ok=True)
    data = scratch.model_dump(mode="json", exclude_none=True)
    path = scratch.state_dir / SCRATCH_RUNBOOK
    path.write_text("# Written by the rehearsal: the real runbook pointed at scratch resources.\n"
                    + yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------
# The scratch database


def _refuse_unless_scratch(rb: Runbook, name: str) -> None:
    check_scratch_settings(rb)
    ep = rb.target.direct
    if name != rb.rehearsal.scratch_database:
        raise StepFailed(f"target.direct ({ep.host}:{ep.port}): refusing to drop database '{name}': it is not the "
                         f"rehearsal's scratch database ('{rb.rehearsal.scratch_database}')")


def _where(rb: Runbook) -> str:
    return f"target.direct ({rb.target.direct.host}:{rb.target.direct.port})"


def scratch_database_exists(rb: Runbook, name: str | None = None) -> bool:
    name = name or rb.rehearsal.scratch_database
    with postgres.session(postgres.maintenance_endpoint(rb.target.direct), "target.direct", text_settings=False) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def drop_scratch_database(rb: Runbook, name: str | None = None) -> bool:
    """Drops the scratch database (its sessions terminated first); True when there was one. Refuses any
    other name. ``rb`` is the real runbook."""
    name = name or rb.rehearsal.scratch_database
    _refuse_unless_scratch(rb, name)
    with postgres.session(postgres.maintenance_endpoint(rb.target.direct), "target.direct", text_settings=False) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            return False
        try:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            force = sql.SQL(" WITH (FORCE)") if conn.info.server_version >= 130000 else sql.SQL("")
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)) + force)
        except psycopg.Error as exc:
            raise StepFailed(f"{_where(rb)}: cannot drop the scratch database '{name}': "
                             f"{redact(str(exc)).strip().splitlines()[0]}; drop it by hand") from None
    log.info("scratch database dropped", database=name)
    return True


def create_scratch_database(rb: Runbook) -> dict:
    """Creates the scratch database on the target server, dropping one a crashed rehearsal left first. It
    takes the real target database's encoding and locale when that exists, so the rehearsal sorts and
    compares text as production will. ``rb`` is the real runbook."""
    name = rb.rehearsal.scratch_database
    leftover = drop_scratch_database(rb, name)
    with postgres.session(postgres.maintenance_endpoint(rb.target.direct), "target.direct", text_settings=False) as conn:
        like = conn.execute("SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database "
                            "WHERE datname = %s", (rb.target.direct.database,)).fetchone()
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if like:
            statement += sql.SQL(" TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
                *(sql.Literal(v) for v in like))
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            raise StepFailed(f"{_where(rb)}: user '{rb.target.direct.user}' may not create the scratch database "
                             f"'{name}'; grant it CREATEDB (ALTER ROLE ... CREATEDB) or set "
                             "rehearsal.scratch_database to one it owns") from None
        except psycopg.Error as exc:
            raise StepFailed(f"{_where(rb)}: cannot create the scratch database '{name}': "
                             f"{redact(str(exc)).strip().splitlines()[0]}") from None
    log.info("scratch database created", database=name, dropped_leftover=leftover)
    return {"database": name, "host": f"{rb.target.direct.host}:{rb.target.direct.port}",
            "dropped_leftover": leftover, "like": rb.target.direct.database if like else None}


# ---------------------------------------------------------------------------------------------------------
# Scratch buckets


def _target_s3(rb: Runbook):
    from liftoff.tasks.storage.common import target_client

    return target_client(rb)


def _bucket_error(rb: Runbook, bucket: str, what: str, exc: Exception) -> StepFailed:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        reason = err.get("Code") or exc.response.get("Code") or str(exc.response.get("ResponseMetadata", {})
                                                                        .get("HTTPStatusCode", ""))
        reason = f"{reason}: {err.get('Message', '')}".rstrip(": ")
    else:
        reason = type(exc).__name__
    return StepFailed(f"storage.target ({rb.storage.target.endpoint_url}): cannot {what} scratch bucket '{bucket}' "
                      f"({redact(reason)}); delete it by hand")


def delete_scratch_buckets(rb: Runbook, buckets: Iterable[str] | None = None) -> dict:
    """Deletes every object, unfinished upload and then the bucket itself of each scratch bucket on the target
    S3 server; a bucket that does not exist is skipped. Refuses a name that does not start with the
    rehearsal's prefix. ``rb`` is the real runbook. Returns {bucket: objects deleted} of those deleted."""
    names = list(scratch_buckets(rb) if buckets is None else buckets)
    prefix = bucket_prefix(rb)
    for name in names:
        if not rb.rehearsal.bucket_prefix or not name.startswith(prefix):
            raise StepFailed(f"storage.target ({rb.storage.target.endpoint_url}): refusing to delete bucket "
                             f"'{name}': it does not start with the rehearsal's prefix '{prefix}'")
    if not names:
        return {}
    s3 = _target_s3(rb)
    deleted: dict[str, int] = {}
    for name in names:
        try:
            s3.head_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                continue
            raise _bucket_error(rb, name, "read", exc) from None
        except BotoCoreError as exc:
            raise _bucket_error(rb, name, "reach", exc) from None
        try:
            deleted[name] = _empty_bucket(s3, name)
            s3.delete_bucket(Bucket=name)
        except (ClientError, BotoCoreError) as exc:
            raise _bucket_error(rb, name, "delete", exc) from None
        log.info("scratch bucket deleted", bucket=name, objects=deleted[name])
    return deleted


def _empty_bucket(s3, bucket: str) -> int:
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StepFailed(f"bucket {bucket}: {len(answer['Errors'])} objects could not be deleted "
                                 f"({first.get('Key')}: {first.get('Code')})")
            count += len(keys)
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    for upload in uploads:
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return count


def remove_archive(state_dir: Path) -> list[str]:
    """Removes the scratch state_dir's dump archive and the auth users' export (the source's data); the
    ledger, the runbook and the summary stay."""
    removed = []
    for name in (DUMP_DIR, DUMP_DIR + ".partial", AUTH_USERS_FILE):
        path = Path(state_dir) / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------------------
# Prefect steps (recorded in the scratch ledger: ``scratch`` is the scratch runbook, ``real`` the real one)


@task(name="create scratch resources", cache_policy=NO_CACHE)
@recorded("rehearsal.prepare")
def prepare_scratch(scratch: Runbook, real: Runbook) -> dict:
    """The scratch database created afresh, and scratch buckets a crashed rehearsal left behind removed."""
    created = create_scratch_database(real)
    leftovers = delete_scratch_buckets(real) if real.storage.configured else {}
    return {**created, "leftover_buckets": sorted(leftovers)}


@task(name="tear down scratch resources", cache_policy=NO_CACHE)
@recorded("rehearsal.teardown")
def tear_down_scratch(scratch: Runbook, real: Runbook) -> dict:
    """Drops the scratch database, deletes the scratch buckets and removes the dump archive; each part is
    tried even when another failed. Raises after trying them all, naming what is left."""
    done: dict = {"database_dropped": False, "buckets": {}, "archive_removed": [], "problems": []}
    try:
        done["database_dropped"] = drop_scratch_database(real)
    except Exception as exc:  # keep tearing down; the error is reported below
        done["problems"].append(first_line(exc, type(exc).__name__))
    if real.storage.configured:
        try:
            done["buckets"] = delete_scratch_buckets(real)
        except Exception as exc:
            done["problems"].append(first_line(exc, type(exc).__name__))
    done["archive_removed"] = remove_archive(scratch.state_dir)
    if done["problems"]:
        raise StepFailed("rehearsal teardown left scratch resources behind: " + "; ".join(done["problems"]))
    return done
