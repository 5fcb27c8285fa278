"""The plan's backup table as tiers (``backups.tiers``): each names what it backs up (the database, the files,
Redis), where to (``destination``: the backup bucket, B2; or ``ssh:/path``: a folder on the VPS) and how long
each backup is kept. A tier's run backs up what it names and then deletes its own backups older than its
``keep`` (the newest ``backups.keep_newest`` of the tier always stay). Restore tests are not part of a tier's
run: the restore-test deployment runs on ``backups.restore_test_schedule``.

Names: ``<prefix>_<UTC time>_<tier>.dump`` (with ``.json`` counts beside it) and ``<prefix>_<UTC time>_<tier>.rdb``,
so every tier keeps, and deletes, only its own. The files are a mirror (``<files_prefix><bucket>/``), not a
series of backups: a files tier keeps the versions the mirror replaces (overwritten or deleted on the source)
under ``<files_prefix>_replaced/<UTC time>/`` and purges them ``keep`` after that time.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import posixpath
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import RunbookInvalid
from liftoff.ledger import Ledger
from liftoff.logs import get_logger
from liftoff.runbooks.model import BackupTier, Runbook
from liftoff.steps import recorded
from liftoff.systems import backups as archive
from liftoff.systems import redis_server, s3
from liftoff.tasks.backup.steps import (
    MiB,
    PHASE,
    _protected,
    destination_client,
    dump_database,
    dump_prefix,
    replaced_prefix,
    require_backups,
)

log = get_logger(phase="backup")
RDB_SUFFIX = ".rdb"
TIER_DIR = "tier"  # under state_dir: the Redis snapshot on its way, removed after each run
SNAPSHOT_EVERY_S = 900  # the plan's Redis RDB: every 15 minutes


def tier_of(rb: Runbook, name: str) -> BackupTier:
    require_backups(rb)
    if not rb.backups.tiers:
        raise RunbookInvalid(f"runbook {rb.name}: backups.tiers: the run names tier '{name}' but the runbook has no "
                             "tiers; see runbooks/tour-crm.yaml")
    try:
        tier = rb.backups.tier(name)
    except KeyError:
        raise RunbookInvalid(f"runbook {rb.name}: backups.tiers: no tier named '{name}' (there are "
                             f"{', '.join(t.name for t in rb.backups.tiers)})") from None
    if tier.ssh_path and rb.ssh is None:
        raise RunbookInvalid(f"runbook {rb.name}: backups.tiers ({tier.name}): where {tier.where} needs the runbook's "
                             "ssh section (the VPS)")
    if "redis" in tier.what and rb.target.redis is None:
        raise RunbookInvalid(f"runbook {rb.name}: backups.tiers ({tier.name}): what redis needs target.redis")
    return tier


def _remote(rb: Runbook):
    from liftoff.systems.remote import Remote

    return Remote(rb.ssh)


LOCAL = "ssh:"  # a local tier's dump is named ssh:<folder>/<file> where a bucket's is named by its key


def local_dumps(rb: Runbook) -> list[archive.Backup]:
    """The dumps of the tiers kept on the VPS (``where: ssh:/path``), named ``ssh:<folder>/<file>``, with their
    size and mtime; a partial one (pg_dump still running) is not listed."""
    tiers = [t for t in rb.backups.tiers or [] if t.ssh_path and "database" in t.what]
    if not tiers:
        return []
    found = []
    with _remote(rb) as remote:
        for tier in tiers:
            suffix = f"_{tier.name}{archive.DUMP_SUFFIX}"
            found += [archive.Backup(f"{LOCAL}{posixpath.join(tier.ssh_path, e.filename)}", e.st_size, e.st_mtime)
                      for e in remote.files(tier.ssh_path)
                      if e.filename.startswith(f"{dump_prefix(rb)}_") and e.filename.endswith(suffix)]
    return found


def local_counts(rb: Runbook, key: str) -> dict | None:
    """The counts (and SHA-256) written beside a local tier's dump, or None."""
    with _remote(rb) as remote:
        text = remote.read_file(archive.counts_key(key[len(LOCAL):]))
    return json.loads(text) if text else None


def download_local(rb: Runbook, key: str, path: Path) -> dict:
    """Streams a local tier's dump from the VPS to ``path``: {"size", "sha256", "metadata": {"sha256"}} as
    ``archive.download`` answers for the bucket (the claimed SHA-256 is the one its counts file records)."""
    with _remote(rb) as remote:
        size, sha256 = remote.download(key[len(LOCAL):], path)
        text = remote.read_file(archive.counts_key(key[len(LOCAL):]))
    claimed = json.loads(text).get("sha256") if text else None
    return {"size": size, "sha256": sha256, "metadata": {"sha256": claimed} if claimed else {}}


def where_label(rb: Runbook, tier: BackupTier) -> str:
    return f"ssh {rb.ssh.host}:{tier.ssh_path}" if tier.ssh_path else f"bucket {rb.backups.destination.bucket}"


# ---------------------------------------------------------------------------------------------------------
# What a tier backs up


@task(name="back up the database (tier)", cache_policy=NO_CACHE)
@recorded("backup.tier-database")
def tier_database(rb: Runbook, name: str) -> dict:
    """The database dump of the tier, to the bucket (as every backup) or to the tier's folder on the VPS,
    streamed over SFTP (a temporary name until pg_dump finished), its counts beside it."""
    tier = tier_of(rb, name)
    if tier.ssh_path is None:
        return dump_database(rb, f"_{tier.name}")
    remote = _remote(rb)
    folder = tier.ssh_path

    def store(argv, env, key, metadata, sidecar):
        path = posixpath.join(folder, key)
        partial = path + archive.PARTIAL_SUFFIX
        try:
            size, sha256, seconds = archive.dump_to_sink(argv, env, lambda chunks: remote.write_stream(partial, chunks))
        except BaseException:
            remote.remove(partial)
            raise
        remote.write_stream(archive.counts_key(path), [json.dumps(
            {**sidecar, **metadata, "key": key, "size": size, "sha256": sha256}, indent=1, sort_keys=True).encode()])
        remote.rename(partial, path)
        return archive.StoredDump(key, size, sha256, 1, seconds)

    try:
        return dump_database(rb, f"_{tier.name}", store=store, where=where_label(rb, tier))
    finally:
        remote.close()


@task(name="snapshot Redis (tier)", cache_policy=NO_CACHE)
@recorded("backup.tier-redis")
def tier_redis(rb: Runbook, name: str) -> dict:
    """A fresh RDB snapshot of target.redis (``redis-cli --rdb``), stored with its SHA-256 in the bucket or the
    tier's folder on the VPS; and whether the server itself snapshots at least every 15 minutes (its ``save``
    rules: the plan's RDB), said, not changed (the cache phase owns the server's settings)."""
    tier = tier_of(rb, name)
    endpoint = rb.target.redis
    workdir = rb.state_dir / TIER_DIR
    workdir.mkdir(parents=True, exist_ok=True)
    taken = time.time()
    key = archive.backup_key(dump_prefix(rb), taken, f"_{tier.name}")[: -len(archive.DUMP_SUFFIX)] + RDB_SUFFIX
    local = workdir / key
    try:
        started = time.monotonic()
        redis_server.snapshot_rdb(endpoint, local)
        data_sha, size = _sha256_of(local)
        if tier.ssh_path is None:
            client, bucket = destination_client(rb), rb.backups.destination.bucket
            s3.call(s3.RetryPolicy(), "upload", lambda: client.upload_file(
                str(local), bucket, key, ExtraArgs={"Metadata": {"sha256": data_sha, "size": str(size)},
                                                    "ContentType": "application/octet-stream"}), client, bucket, key)
        else:
            remote = _remote(rb)
            try:
                remote.write_stream(posixpath.join(tier.ssh_path, key), _pieces(local))
            finally:
                remote.close()
        seconds = round(time.monotonic() - started, 2)
    finally:
        local.unlink(missing_ok=True)
    rules = redis_server.save_rules(endpoint)
    often = [r for r in rules if r[0] <= SNAPSHOT_EVERY_S]
    saving = (f"the server's own save rules snapshot at least every {SNAPSHOT_EVERY_S // 60} min "
              f"({' '.join(f'{a} {b}' for a, b in rules)})" if often else
              f"the server's own save rules ({' '.join(f'{a} {b}' for a, b in rules) or 'none: RDB off'}) do not "
              f"snapshot every {SNAPSHOT_EVERY_S // 60} min: this tier's snapshots are the only ones")
    Ledger(rb.state_dir).record_event(PHASE, "redis.snapshot", after={"key": key, "where": where_label(rb, tier),
                                                                      "bytes": size, "sha256": data_sha})
    log.info("redis snapshot stored", key=key, bytes=size, seconds=seconds)
    return {"summary": f"{key}: {size:,} bytes to {where_label(rb, tier)} in {seconds} s; {saving}", "key": key,
            "bytes": size, "sha256": data_sha, "seconds": seconds, "save_rules": rules, "saves_often": bool(often)}


def _sha256_of(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    for piece in _pieces(path):
        sha.update(piece)
        size += len(piece)
    return sha.hexdigest(), size


def _pieces(path: Path):
    with open(path, "rb") as f:
        while piece := f.read(MiB):
            yield piece


# ---------------------------------------------------------------------------------------------------------
# Each tier's retention


@task(name="apply the tier's retention", cache_policy=NO_CACHE)
@recorded("backup.tier-retention")
def tier_retention(rb: Runbook, name: str, now: float | None = None) -> dict:
    """Deletes the tier's backups (its dumps with their counts, its snapshots) older than its ``keep`` by their
    time stamp (the object's LastModified, the file's mtime), keeping its newest ``backups.keep_newest`` and,
    in the bucket, the newest restore-tested dump."""
    tier = tier_of(rb, name)
    now = time.time() if now is None else now
    days = tier.keep_s / 86400
    suffixes = [f"_{tier.name}{archive.DUMP_SUFFIX}", f"_{tier.name}{RDB_SUFFIX}"]
    deleted: list[str] = []
    kept = 0
    if tier.ssh_path is None:
        client, bucket = destination_client(rb), rb.backups.destination.bucket
        for suffix in suffixes:
            found = archive.list_backups(client, bucket, dump_prefix(rb), suffix=suffix)
            doomed = archive.expired(found, now=now, retention_days=days, keep_newest=rb.backups.keep_newest,
                                     protect=_protected(rb, found))
            for b in doomed:
                archive.delete_backup(client, bucket, b.key)
            deleted += [b.key for b in doomed]
            kept += len(found) - len(doomed)
    else:
        remote = _remote(rb)
        try:
            entries = remote.files(tier.ssh_path)
            for suffix in suffixes:
                found = [archive.Backup(e.filename, e.st_size, e.st_mtime) for e in entries
                         if e.filename.startswith(f"{dump_prefix(rb)}_") and e.filename.endswith(suffix)]
                doomed = archive.expired(found, now=now, retention_days=days, keep_newest=rb.backups.keep_newest)
                for b in doomed:
                    remote.remove(posixpath.join(tier.ssh_path, b.key))
                    remote.remove(posixpath.join(tier.ssh_path, archive.counts_key(b.key)))
                deleted += [b.key for b in doomed]
                kept += len(found) - len(doomed)
        finally:
            remote.close()
    for key in deleted:
        log.info("backup deleted by the tier's retention", tier=tier.name, key=key)
    purged = purge_replaced_files(rb, tier, now) if "files" in tier.what else []
    return {"summary": f"tier {tier.name}: {len(deleted)} backups deleted (older than {tier.keep}), {kept} kept in "
                       f"{where_label(rb, tier)}" + (f"; {len(purged)} replaced file versions purged" if purged else ""),
            "deleted": deleted, "kept": kept, "purged_files": purged}


def purge_replaced_files(rb: Runbook, tier: BackupTier, now: float) -> list[str]:
    """Deletes the file versions the mirror replaced (``<files_prefix>_replaced/<UTC time>/...``) more than the
    tier's ``keep`` ago, by the time in their key: when they stopped being the source's."""
    client, bucket, prefix = destination_client(rb), rb.backups.destination.bucket, replaced_prefix(rb)
    cutoff = now - tier.keep_s
    doomed = []
    for o in s3.list_objects(client, bucket, prefix):
        stamp = o.key[len(prefix):].split("/", 1)[0]
        try:
            at = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H-%M-%SZ"))
        except ValueError:
            continue  # not ours: left alone
        if at < cutoff:
            archive.delete_object(client, bucket, o.key)
            doomed.append(o.key)
    if doomed:
        log.info("replaced file versions purged", tier=tier.name, count=len(doomed), keep=tier.keep)
    return doomed
