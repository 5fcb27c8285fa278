"""The recovery's steps (the plan's "Recovery Procedures"), each recorded in the ledger: the chosen backup
fetched and proven (``recover.fetch``), the apps stopped (``recover.stop-apps``), a safety dump of the
database as it is (``recover.safety-dump``), the database replaced by the backup (``recover.restore``), its
rows held against the counts recorded at backup time (``recover.compare``), the apps started, healthy and
smoke-tested (``recover.start-apps``); and, when anything after the stop failed, the safety dump put back
(``recover.put-back``).

The database is replaced whole: ``DROP DATABASE ... WITH (FORCE)``, then ``pg_restore --create`` recreates
it from the archive with its encoding, collation, settings and grants (``--no-owner``: the restoring user owns
what it restores, as after the migration). Everything the apps wrote after the backup was taken is in the
safety dump, in the backup bucket, named ``<prefix>_<time>_before-recover.dump``; it is a backup like the
others (listed, restore-testable, recoverable).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from liftoff.errors import GateFailed, RunbookInvalid, StepFailed
from liftoff.ledger import Ledger, current_run_id
from liftoff.logs import get_logger
from liftoff.runbooks.model import Runbook
from liftoff.steps import recorded
from liftoff.systems import backups as archive
from liftoff.systems import postgres
from liftoff.tasks.backup.steps import (
    DUMPS,
    PHASE,
    compare_counts,
    count_tables,
    destination_client,
    dump_database,
    dump_prefix,
    dump_tools,
    require_backups,
)
from liftoff.tasks.backup.tiers import LOCAL, download_local, local_counts, local_dumps
from liftoff.tasks.cutover.smoke import run_smoke_queries, wait_apps_healthy
from liftoff.tasks.cutover.switch import switch_driver

log = get_logger(phase="recover")
RECOVER_DIR = "recover"  # under state_dir: the downloaded archives, removed after the run
SAFETY_SUFFIX = "_before-recover"


def require_recovery(rb: Runbook) -> None:
    """What a recovery needs beyond a backup: a way to stop and start the apps (the cutover's switch driver)."""
    require_backups(rb)
    switch = rb.cutover.switch
    if switch is None:
        raise RunbookInvalid(f"runbook {rb.name}: cutover.switch: the recovery stops the apps through the cutover's "
                             "switch driver (ssh or coolify) before it replaces their database; add it")
    if switch.driver == "ssh" and not switch.ssh.stop:
        raise RunbookInvalid(f"runbook {rb.name}: cutover.switch.ssh.stop: the recovery stops the apps before it "
                             "replaces their database: give the command that stops them (e.g. 'docker compose stop')")


# ---------------------------------------------------------------------------------------------------------
# The plan: reads only


@dataclass
class BackupListed:
    key: str
    bytes: int
    age_s: float
    restore_test: str  # passed / FAILED / not tested
    kind: str  # backup / safety dump

    @property
    def row(self) -> dict:
        return {"backup": self.key, "bytes": self.bytes, "age": _age(self.age_s), "restore test": self.restore_test,
                "kind": self.kind}


@dataclass
class RecoveryPlan:
    database: str
    where: str
    apps: list[str]
    stop_with: str
    backups: list[BackupListed]
    key: str
    taken_at: float | None
    tables: list[dict] = field(default_factory=list)  # table, rows at backup, rows now, written after the backup

    @property
    def lost(self) -> int:
        return sum(max(t["written after the backup"], 0) for t in self.tables)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def list_recoverable(rb: Runbook, now: float | None = None) -> list[BackupListed]:
    """Every dump in the backup bucket, newest first, with its size, age and restore-test result (the
    ledger's record of it)."""
    now = time.time() if now is None else now
    tested = {key: status for key, status, _, _ in Ledger(rb.state_dir).items(PHASE, DUMPS)}
    shown = {"restore-tested": "passed", "restore-failed": "FAILED"}
    in_bucket = [BackupListed(b.key, b.size, max(now - b.last_modified, 0), shown.get(tested.get(b.key), "not tested"),
                              "safety dump" if b.key.endswith(SAFETY_SUFFIX + archive.DUMP_SUFFIX) else "backup")
                 for b in archive.list_backups(destination_client(rb), rb.backups.destination.bucket, dump_prefix(rb))]
    on_vps = [BackupListed(b.key, b.size, max(now - b.last_modified, 0), "not tested", "on the VPS")
              for b in local_dumps(rb)]
    return sorted(in_bucket + on_vps, key=lambda b: b.age_s)


def plan_recovery(rb: Runbook, key: str | None = None, counts_only: bool = False) -> RecoveryPlan:
    """The backups there are, the one to restore (``key``, or the newest backup whose restore test did not
    fail) and, per table, the rows the live database holds now against those counted when it was taken:
    what the recovery loses. ``counts_only`` (a point-in-time recovery): every table's rows now. Reads only."""
    require_recovery(rb)
    listed = list_recoverable(rb)
    if counts_only:
        with postgres.session(rb.target.direct, "target.direct") as conn:
            now = count_tables(conn)
        ep = rb.target.direct
        return RecoveryPlan(ep.database, f"target.direct ({ep.host}:{ep.port})", [a.name for a in rb.cutover.apps],
                            _stop_with(rb), listed, "", None,
                            [{"table": t, "rows now": n, "written after the backup": 0} for t, n in sorted(now.items())])
    if key is None:
        usable = [b for b in listed if b.kind == "backup" and b.restore_test != "FAILED"]
        if not usable:
            raise StepFailed(f"no backup to recover from in bucket {rb.backups.destination.bucket} (named "
                             f"{dump_prefix(rb)}_*.dump, restore test not failed); run liftoff run backup")
        key = usable[0].key
    elif key not in {b.key for b in listed}:
        raise RunbookInvalid(f"backup: {key!r} is not in bucket {rb.backups.destination.bucket} nor in a tier's "
                             "folder on the VPS; a dry run of recover lists the backups there")
    sidecar = _counts_of(rb, key)
    if not sidecar or "tables" not in sidecar:
        raise StepFailed(f"backup {key} has no row counts beside it ({archive.counts_key(key)}); the recovery "
                         "holds the restored rows against them: choose another backup")
    ep = rb.target.direct
    with postgres.session(ep, "target.direct") as conn:
        now = count_tables(conn)
    at = sidecar["tables"]
    tables = [{"table": t, "rows at backup": at.get(t, 0), "rows now": now.get(t, 0),
               "written after the backup": now.get(t, 0) - at.get(t, 0)} for t in sorted(set(at) | set(now))]
    return RecoveryPlan(ep.database, f"target.direct ({ep.host}:{ep.port})", [a.name for a in rb.cutover.apps],
                        _stop_with(rb), listed, key, sidecar.get("snapshot_at"), tables)


def _stop_with(rb: Runbook) -> str:
    switch = rb.cutover.switch
    return (f"ssh {rb.ssh.host}: {switch.ssh.stop}" if switch.driver == "ssh"
            else f"Coolify {switch.coolify.url}: stop {', '.join(switch.coolify.applications)}")


# ---------------------------------------------------------------------------------------------------------
# Before the stop: the chosen backup, downloaded and proven


@task(name="fetch and check the backup", cache_policy=NO_CACHE)
@recorded("recover.fetch")
def fetch_backup(rb: Runbook, key: str) -> dict:
    """Downloads ``key`` into state_dir/recover, checks its SHA-256 against its metadata and its header (made
    by a pg_dump at least as new as the server it was taken from), reads its row counts. All before the apps
    stop: a damaged backup costs no downtime."""
    return _fetch(rb, key)


def _counts_of(rb: Runbook, key: str) -> dict | None:
    if key.startswith(LOCAL):
        return local_counts(rb, key)
    return archive.get_json(destination_client(rb), rb.backups.destination.bucket, archive.counts_key(key))


def _fetch(rb: Runbook, key: str) -> dict:
    client, bucket = destination_client(rb), rb.backups.destination.bucket
    workdir = rb.state_dir / RECOVER_DIR
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / Path(key).name
    started = time.monotonic()
    local = key.startswith(LOCAL)
    got = download_local(rb, key, path) if local else archive.download(client, bucket, key, path)
    seconds = round(time.monotonic() - started, 2)
    claimed = got["metadata"].get("sha256")
    if claimed != got["sha256"]:
        path.unlink(missing_ok=True)
        raise StepFailed(f"backup {key}{'' if local else f' in bucket {bucket}'} is damaged: its "
                         f"{'counts file' if local else 'metadata'} says SHA-256 {claimed or '(none)'}, the bytes "
                         f"read hash to {got['sha256']}; choose another backup")
    sidecar = _counts_of(rb, key)
    if not sidecar or "tables" not in sidecar:
        raise StepFailed(f"backup {key} has no row counts beside it ({archive.counts_key(key)}); choose another")
    with postgres.session(rb.target.direct, "target.direct") as conn:
        server = postgres.server_info(conn, rb.target.direct)
    tools = dump_tools(rb, server)
    header = archive.archive_header(tools.pg_restore, path)
    made_from, made_by = archive.ArchiveHeader.major(header.dumped_from), archive.ArchiveHeader.major(header.dumped_by)
    if made_from is None or made_by is None or made_by < made_from:
        raise StepFailed(f"backup {key} was dumped from PostgreSQL {header.dumped_from} by pg_dump "
                         f"{header.dumped_by}: an older pg_dump than its server makes no usable backup; choose another")
    return {"summary": f"{key}: {got['size']:,} bytes, SHA-256 as stored, dumped from PostgreSQL "
                       f"{header.dumped_from} by pg_dump {header.dumped_by}, {len(sidecar['tables'])} tables counted",
            "key": key, "path": str(path), "bytes": got["size"], "sha256": got["sha256"], "download_s": seconds,
            "counts": sidecar["tables"], "pg_restore": tools.pg_restore}


# ---------------------------------------------------------------------------------------------------------
# After the approval


@task(name="stop the apps", cache_policy=NO_CACHE)
@recorded("recover.stop-apps")
def stop_apps(rb: Runbook) -> dict:
    with switch_driver(rb) as driver:
        driver.stop_apps()
        Ledger(rb.state_dir).record_event(PHASE, "recover.apps-stopped", after={"where": driver.where, "at": time.time()},
                                          flow_run_id=current_run_id())
        return {"summary": f"apps stopped ({driver.where})", "where": driver.where}


@task(name="keep a safety dump of the database as it is", cache_policy=NO_CACHE)
@recorded("recover.safety-dump")
def safety_dump(rb: Runbook) -> dict:
    """A backup of the live database, apps stopped, with its counts: whatever the recovery replaces (the rows
    written after the chosen backup) is kept, and put back if the recovery fails."""
    return dump_database(rb, SAFETY_SUFFIX, kind="safety dump")


def _replace_database(rb: Runbook, pg_restore: str, path: Path) -> float:
    """Drops target.direct's database and recreates it from the archive at ``path`` (``pg_restore --create``:
    the archive's encoding, collation, settings and grants). Returns the seconds it took."""
    ep = rb.target.direct
    maintenance = postgres.maintenance_endpoint(ep)
    started = time.monotonic()
    with postgres.session(maintenance, "target.direct", text_settings=False) as conn:
        try:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(ep.database)))
        except psycopg.errors.InsufficientPrivilege:
            raise StepFailed(f"target.direct ({ep.host}:{ep.port}): user '{ep.user}' may not drop database "
                             f"'{ep.database}' to replace it: recover as its owner or a superuser") from None
    error = archive.recreate_from_archive(pg_restore, path, postgres.libpq_env(maintenance, "target.direct"),
                                          rb.database.jobs)
    if error:
        raise StepFailed(f"restoring {path.name} into {ep.database} on {ep.host}:{ep.port} failed: {error}")
    return round(time.monotonic() - started, 2)


@task(name="replace the database with the backup", cache_policy=NO_CACHE)
@recorded("recover.restore")
def restore_backup(rb: Runbook, fetched: dict) -> dict:
    seconds = _replace_database(rb, fetched["pg_restore"], Path(fetched["path"]))
    log.info("database replaced", key=fetched["key"], seconds=seconds)
    return {"summary": f"{rb.target.direct.database} replaced by {fetched['key']} in {seconds} s", "seconds": seconds}


def held_against(rb: Runbook, recorded_counts: dict[str, int], what: str) -> list[dict]:
    """Every table's rows now against ``recorded_counts``; GateFailed naming the first tables that differ."""
    with postgres.session(rb.target.direct, "target.direct") as conn:
        rows = compare_counts(recorded_counts, count_tables(conn))
    differ = [t for t in rows if t["status"] != "match"]
    if differ:
        raise GateFailed.of(f"recovery from {what}", [
            f"table {t['table']}: {t['rows at backup']} rows at backup, {t['rows restored']} restored ({t['status']})"
            for t in differ])
    return rows


@task(name="compare every table with the counts at backup time", cache_policy=NO_CACHE)
@recorded("recover.compare")
def compare_with_backup(rb: Runbook, fetched: dict) -> dict:
    rows = held_against(rb, fetched["counts"], fetched["key"])
    return {"summary": f"{len(rows)} tables, {sum(t['rows restored'] for t in rows):,} rows as counted at backup "
                       "time", "tables": rows}


@task(name="put the safety dump back", cache_policy=NO_CACHE)
@recorded("recover.put-back")
def put_back(rb: Runbook, safety: dict) -> dict:
    """The recovery failed after the stop: the database as it was before it (the safety dump, SHA-256 proven)
    comes back, and its rows are held against the dump's counts."""
    fetched = _fetch(rb, safety["key"])
    seconds = _replace_database(rb, fetched["pg_restore"], Path(fetched["path"]))
    rows = held_against(rb, fetched["counts"], safety["key"])
    Ledger(rb.state_dir).record_event(PHASE, "recover.put-back", after={"key": safety["key"], "seconds": seconds},
                                      flow_run_id=current_run_id())
    return {"summary": f"the database as before the recovery is back ({safety['key']}, {seconds} s)",
            "seconds": seconds, "tables": rows}


@task(name="start the apps, wait for health, run the smoke queries", cache_policy=NO_CACHE)
@recorded("recover.start-apps")
def start_apps(rb: Runbook) -> dict:
    with switch_driver(rb) as driver:
        driver.start_apps()
    waited = wait_apps_healthy(rb)
    answered = run_smoke_queries(rb)
    return {"summary": f"apps started and healthy, {answered} smoke queries answered", "healthy_after_s": waited,
            "smoke_queries": answered}


def clean_downloads(rb: Runbook) -> None:
    workdir = rb.state_dir / RECOVER_DIR
    for leftover in workdir.glob("*") if workdir.exists() else []:
        leftover.unlink(missing_ok=True)
