"""The backup phase's steps, each recorded in the ledger: the dump (``backup.dump``), the files
(``backup.files``), the restore test (``backup.restore-test``, the phase's gate) and retention
(``backup.retention``).

What is backed up is the migrated database, ``target.direct`` (after the cutover it is the live one), as one
``pg_dump -Fc`` from an exported snapshot in which every table's rows are counted too; the counts travel with
the dump (a JSON object next to it, and the step's record in the ledger) so the restore test can hold the
restored copy against them. The files are the target S3 server's buckets (what the storage phase filled),
copied to ``<files_prefix><bucket>/`` in the backup bucket by the storage phase's streaming copy
(``liftoff.systems.s3.copy_batch_from``: MD5 proven per object), only what is new or changed since the last run.
A tier that backs up the files keeps what the mirror replaces: before an object is overwritten by a newer
version, or once it is deleted from the source, its backed-up copy goes to
``<files_prefix>_replaced/<UTC time>/<bucket>/<key>``, which the tier's retention purges after ``keep``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from liftoff.errors import LiftoffError, RunbookInvalid, StepFailed
from liftoff.ledger import Ledger
from liftoff.logs import get_logger
from liftoff.redaction import one_line, redact
from liftoff.reports import markdown_table, publish_markdown, publish_table
from liftoff.steps import recorded
from liftoff.runbooks.model import Endpoint, Runbook
from liftoff.systems import pg_tools, postgres, s3
from liftoff.systems import backups as archive
from liftoff.checks import FAILED, PASSED, CheckLine, GateReport, blocker_line, failed_line
from liftoff.tasks.storage.common import endpoint as s3_endpoint
from liftoff.tasks.storage.common import target_bucket, target_client
from liftoff.systems.supabase_storage import S3Source

log = get_logger(phase="backup")
PHASE = "backup"
DUMPS = "dump"  # ledger items: key = the dump's object name, status made / restore-tested / restore-failed
RESTORE_DIR = "restore-test"  # under state_dir: the downloaded archive, removed after each test
MiB = 1024 * 1024
_SYSTEM_SCHEMAS = "nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND nspname NOT LIKE 'pg_temp_%' " \
                  "AND nspname NOT LIKE 'pg_toast_temp_%'"


# ---------------------------------------------------------------------------------------------------------
# The runbook's backup settings


def require_backups(rb: Runbook) -> None:
    if rb.backups is None:
        raise RunbookInvalid(f"runbook {rb.name}: the backup phase needs backups.destination (the S3 bucket, e.g. "
                             "Backblaze B2); see runbooks/tour-crm.yaml")
    unknown = [b for b in rb.backups.files or [] if b not in {x.name for x in rb.storage.buckets}]
    if unknown:
        raise RunbookInvalid(f"runbook {rb.name}: backups.files names {', '.join(unknown)}, not in storage.buckets")


def dump_prefix(rb: Runbook) -> str:
    return rb.backups.name_prefix or rb.name.replace("-", "_")


def destination_client(rb: Runbook):
    return s3.client(s3_endpoint(rb.backups.destination, "backups.destination"),
                     max_pool_connections=rb.storage.concurrency + 2)


def _where(ep: Endpoint) -> str:
    return f"target.direct ({ep.host}:{ep.port})"


def _server(rb: Runbook) -> postgres.ServerInfo:
    with postgres.session(rb.target.direct, "target.direct") as conn:
        return postgres.server_info(conn, rb.target.direct)


def dump_tools(rb: Runbook, server: postgres.ServerInfo) -> pg_tools.PgTools:
    """The pg_dump to back up ``target.direct`` with; refuses one older than the server (one line)."""
    return archive.choose_pg_dump(server.major, server.version, _where(rb.target.direct), rb.database.pg_bin_dirs)


def user_schemas(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute(f"SELECT nspname FROM pg_namespace WHERE {_SYSTEM_SCHEMAS} ORDER BY 1")]


def count_tables(conn: psycopg.Connection) -> dict[str, int]:
    """Every user table's exact row count (``count(*) FROM ONLY``, as the database gate counts)."""
    return {t.qualified: postgres.count_rows(conn, t) for t in postgres.list_tables(conn, user_schemas(conn))}


# ---------------------------------------------------------------------------------------------------------
# The plan (also the dry run): reads only


@dataclass
class FilesPlan:
    bucket: str  # the runbook's name for it
    source_bucket: str  # on storage.target
    prefix: str  # in the backup bucket
    objects: int = 0
    bytes: int = 0
    source: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (size, ETag)
    to_copy: list[str] = field(default_factory=list)
    to_copy_bytes: int = 0
    backed_up: dict[str, int] = field(default_factory=dict)  # key -> size, in the backup before this run

    @property
    def row(self) -> dict:
        return {"bucket": self.source_bucket, "backed up to": self.prefix, "objects": self.objects,
                "bytes": self.bytes, "new or changed": len(self.to_copy), "bytes to copy": self.to_copy_bytes}


def file_buckets(rb: Runbook) -> list[str]:
    if rb.storage.target is None:
        return []
    return list(rb.backups.files) if rb.backups.files is not None else [b.name for b in rb.storage.buckets]


def plan_files(rb: Runbook) -> list[FilesPlan]:
    """Per bucket, what is on the target S3 server and which objects the backup lacks or holds another version
    of: not in the backup, another size there, or an ETag other than the one the ledger recorded when it
    was copied (or, with no record, than the backup's own when both are plain MD5s)."""
    buckets = file_buckets(rb)
    if not buckets:
        return []
    src, dst, ledger = target_client(rb), destination_client(rb), Ledger(rb.state_dir)
    plans = []
    for name in buckets:
        plan = FilesPlan(name, target_bucket(rb, name), f"{rb.backups.files_prefix}{name}/")
        backed_up = {o.key[len(plan.prefix):]: (o.size, o.etag)
                     for o in s3.list_objects(dst, rb.backups.destination.bucket, plan.prefix)}
        plan.backed_up = {k: size for k, (size, _) in backed_up.items()}
        recorded_etag = {key: etag for key, _, _, etag in ledger.items(PHASE, f"file:{name}", status="copied")}
        for o in s3.list_objects(src, plan.source_bucket):
            plan.objects += 1
            plan.bytes += o.size
            plan.source[o.key] = (o.size, o.etag)
            have = backed_up.get(o.key)
            same = have is not None and have[0] == o.size and (
                recorded_etag.get(o.key) == o.etag
                or (s3.md5_of(o.etag, {}) is not None and s3.md5_of(have[1], {}) == s3.md5_of(o.etag, {})))
            if not same:
                plan.to_copy.append(o.key)
                plan.to_copy_bytes += o.size
        plans.append(plan)
    return plans


@dataclass
class BackupPlan:
    key: str
    server: str
    pg_dump: str
    files: list[FilesPlan]
    backups: list[archive.Backup]
    would_delete: list[archive.Backup]


def plan_backup(rb: Runbook, now: float | None = None) -> BackupPlan:
    """What a backup run would do; refuses a pg_dump older than the target server already here."""
    require_backups(rb)
    server = _server(rb)
    tools = dump_tools(rb, server)
    backups = archive.list_backups(destination_client(rb), rb.backups.destination.bucket, dump_prefix(rb))
    now = time.time() if now is None else now
    return BackupPlan(archive.backup_key(dump_prefix(rb), now), f"{_where(rb.target.direct)} PostgreSQL {server.version}",
                      f"{tools.pg_dump} ({tools.version})", plan_files(rb), backups,
                      archive.expired(backups, now=now, retention_days=rb.backups.retention_days,
                                      keep_newest=rb.backups.keep_newest, protect=_protected(rb, backups)))


# ---------------------------------------------------------------------------------------------------------
# The dump


@task(name="back up the database", cache_policy=NO_CACHE)
@recorded("backup.dump")
def make_backup(rb: Runbook) -> dict:
    """pg_dump -Fc of target.direct streamed to the backup bucket, with every table counted in the dump's own
    snapshot; succeeds when the object is stored with its size and SHA-256 metadata and its counts beside it."""
    return dump_database(rb)


def dump_database(rb: Runbook, suffix: str = "", kind: str = "backup", store=None, where: str | None = None) -> dict:
    """The dump itself (also the recovery's safety dump, ``suffix`` ``_before-recover``): ``pg_dump -Fc`` of
    target.direct from an exported snapshot in which every table is counted, to
    ``<prefix>_<UTC time><suffix>.dump`` with its counts beside it; recorded as a ledger item and event.
    ``store(argv, env, key, metadata, sidecar) -> StoredDump``: where it goes (default: the backup bucket,
    ``archive.dump_to_bucket``); ``where``: how the result names that place."""
    require_backups(rb)
    ep, dest = rb.target.direct, rb.backups.destination
    client = destination_client(rb)
    if store is None:
        def store(argv, env, key, metadata, sidecar):
            return archive.dump_to_bucket(argv, env, client, dest.bucket, key, rb.backups.part_size_mb * MiB,
                                          metadata, sidecar)
    where = where or f"bucket {dest.bucket}"
    with postgres.session(ep, "target.direct", autocommit=False) as snap:
        snap.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        snap.read_only = True
        server = postgres.server_info(snap, ep)
        tools = dump_tools(rb, server)  # before anything is written: an older pg_dump is refused here
        snapshot = snap.execute("SELECT pg_export_snapshot()").fetchone()[0]
        taken = time.time()
        counts = count_tables(snap)
        key = archive.backup_key(dump_prefix(rb), taken, suffix)
        argv = [tools.pg_dump, "--format=custom", f"--compress={rb.backups.compression}", "--no-password",
                f"--snapshot={snapshot}", "--dbname", ep.database]
        log.info(f"{kind} started", key=key, where=where, tables=len(counts), pg_dump=tools.version)
        sidecar = {"database": ep.database, "server": f"{ep.host}:{ep.port}", "server_version": server.version,
                   "pg_dump": tools.pg_dump, "pg_dump_version": tools.version, "snapshot_at": taken,
                   "tables": counts, "kind": kind}
        stored = store(argv, postgres.libpq_env(ep, "target.direct"), key,
                       {"server-version": server.version, "pg-dump-version": tools.version}, sidecar)
        snap.rollback()
    ledger = Ledger(rb.state_dir)
    if where.startswith("bucket "):  # the restore test and the recovery read the bucket's dumps
        ledger.set_items(PHASE, DUMPS, [(key, "made", stored.size, stored.sha256)])
    ledger.record_event(PHASE, f"{kind}.made", after={"key": key, "where": where, "bytes": stored.size,
                                                      "sha256": stored.sha256, "tables": counts})
    rows = sum(counts.values())
    log.info(f"{kind} stored", key=key, bytes=stored.size, sha256=stored.sha256, seconds=stored.seconds)
    return {"summary": f"{key}: {stored.size:,} bytes, {len(counts)} tables, {rows:,} rows, {stored.seconds} s",
            "key": key, "bucket": dest.bucket, "where": where, "bytes": stored.size, "sha256": stored.sha256, "tables": len(counts),
            "rows": rows, "seconds": stored.seconds, "pg_dump_version": tools.version,
            "server_version": server.version, "counts": counts, "taken_at": taken}


# ---------------------------------------------------------------------------------------------------------
# The files


REPLACED_DIR = "_replaced"  # S3 bucket names never start with "_": no bucket's mirror is under it


def replaced_prefix(rb: Runbook) -> str:
    """Where a tier keeps the versions the file mirror replaced: ``<files_prefix>_replaced/<UTC time>/``."""
    return f"{rb.backups.files_prefix}{REPLACED_DIR}/"


def set_aside_replaced(client, bucket: str, plan: FilesPlan, under: str) -> dict[str, int]:
    """Before the copy: each backed-up object the source has overwritten (about to be replaced in the mirror)
    or deleted is copied, server-side, to ``under<bucket>/<key>``; the deleted ones then leave the mirror."""
    overwritten = [k for k in plan.to_copy if k in plan.backed_up]
    deleted = [k for k in plan.backed_up if k not in plan.source]
    for key in overwritten + deleted:
        archive.copy_as_is(client, bucket, plan.prefix + key, f"{under}{plan.bucket}/{key}", plan.backed_up[key])
    for key in deleted:
        archive.delete_object(client, bucket, plan.prefix + key)
    if overwritten or deleted:
        log.info("replaced files kept aside", bucket=plan.bucket, under=under, overwritten=len(overwritten),
                 deleted=len(deleted))
    return {"overwritten": len(overwritten), "deleted": len(deleted)}


@task(name="back up the files", cache_policy=NO_CACHE)
@recorded("backup.files")
def backup_files(rb: Runbook, keep_replaced: bool = False) -> dict:
    """Copies each backed-up bucket's new and changed objects from storage.target to the backup bucket (the
    storage phase's streaming copy, MD5 proven per object); then every object of the source bucket is in
    the backup with its size. Objects deleted from the source stay in the backup, unless ``keep_replaced``
    (a tier with a ``keep``): then the versions the mirror replaces, overwritten or deleted on the source,
    go under ``replaced_prefix`` with the time, for the tier's retention to purge."""
    require_backups(rb)
    plans = plan_files(rb)
    if not plans:
        return {"summary": "no files to back up (no storage.target, or backups.files is empty)", "copied": 0}
    src, dst, ledger = S3Source(target_client(rb)), destination_client(rb), Ledger(rb.state_dir)
    dest = rb.backups.destination.bucket
    copied = copied_bytes = 0
    failed: list[str] = []
    aside = {"overwritten": 0, "deleted": 0}
    under = replaced_prefix(rb) + time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime()) + "/"
    for plan in plans:
        if keep_replaced:
            for what, n in set_aside_replaced(dst, dest, plan, under).items():
                aside[what] += n
        def record(outcome, plan=plan) -> None:
            key = outcome.key[len(plan.prefix):]
            if isinstance(outcome, s3.CopiedObject):
                ledger.set_items(PHASE, f"file:{plan.bucket}", [(key, "copied", outcome.size, plan.source[key][1])])

        result = s3.copy_batch_from([plan.prefix + k for k in plan.to_copy],
                                    lambda dkey, plan=plan: src.open(plan.source_bucket, dkey[len(plan.prefix):]),
                                    dst, dest, part_size=rb.storage.part_size_mb * MiB,
                                    concurrency=rb.storage.concurrency, on_done=record)
        copied += len(result.copied)
        copied_bytes += result.bytes
        failed += [f"{plan.bucket}/{f.key}: {f.error}" for f in result.failed]
        backed_up = {o.key[len(plan.prefix):]: o.size for o in s3.list_objects(dst, dest, plan.prefix)}
        failed += [f"{plan.bucket}/{k}: not in the backup with its size {size}"
                   for k, (size, _) in plan.source.items() if backed_up.get(k) != size][:5]
    if failed:
        raise StepFailed(f"file backup: {len(failed)} objects failed ({'; '.join(failed[:3])}); re-run: only "
                         "what is missing or changed is copied")
    total = sum(p.objects for p in plans)
    kept = (f"; the backed-up versions of {aside['overwritten']} overwritten and {aside['deleted']} deleted "
            f"objects kept under {under}" if keep_replaced else "")
    return {"summary": f"{copied} of {total} objects copied ({copied_bytes:,} bytes), the rest unchanged since "
                       f"the last backup{kept}", "copied": copied, "bytes": copied_bytes, "objects": total,
            **({"replaced": aside, "replaced_under": under} if keep_replaced else {}),
            "buckets": {p.bucket: {"objects": p.objects, "copied": len(p.to_copy)} for p in plans}}


# ---------------------------------------------------------------------------------------------------------
# The restore test: the gate


@dataclass
class RestoreTestReport(GateReport):
    key: str | None = None
    database: str = ""
    checks: list[CheckLine] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)  # table, rows at backup, rows restored, status
    bytes: int = 0
    sha256: str | None = None
    download_s: float | None = None
    restore_s: float | None = None

    @property
    def rto_s(self) -> float | None:
        """How long getting the database back took: download plus restore (the recovery time objective)."""
        if self.download_s is None or self.restore_s is None:
            return None
        return round(self.download_s + self.restore_s, 2)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.status == PASSED for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status != PASSED]

    def blockers(self) -> list[str]:
        return [blocker_line(c.name, c.detail, c.fix) for c in self.checks if c.status != PASSED and c.blocked]

    def differences_found(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status != PASSED and not c.blocked]

    def summary(self) -> str:
        if not self.ok:
            return "restore test failed: " + "; ".join(self.failures())
        rows = sum(t["rows restored"] for t in self.tables)
        return (f"restore test passed: {self.key} ({self.bytes:,} bytes) restored into {self.database} in "
                f"{self.rto_s} s (RTO: download {self.download_s} s + restore {self.restore_s} s), "
                f"{len(self.tables)} tables, {rows:,} rows as counted at backup time")

    def rows(self) -> list[dict]:
        return self.tables

    def check(self, name: str, status: str, detail: str, fix: str = "") -> bool:
        self.checks.append(CheckLine(name, status, redact(detail), fix))
        return status == PASSED


def compare_counts(recorded: dict[str, int], restored: dict[str, int]) -> list[dict]:
    """One row per table of either side: rows at backup time, rows restored, match or what differs."""
    rows = []
    for table in sorted(set(recorded) | set(restored)):
        at, got = recorded.get(table), restored.get(table)
        status = ("match" if at == got else "missing in the restore" if got is None
                  else "not in the backup's counts" if at is None else "DIFFERS")
        rows.append({"table": table, "rows at backup": at, "rows restored": got if got is not None else 0,
                     "status": status})
    return rows


def _scratch_endpoint(rb: Runbook) -> Endpoint:
    return rb.target.direct.model_copy(update={"database": rb.backups.restore_test_database})


def _drop_scratch(rb: Runbook) -> None:
    name = rb.backups.restore_test_database
    if name == rb.target.direct.database:  # the model refuses PostgreSQL's own; this is the live database
        raise RunbookInvalid(f"runbook {rb.name}: backups.restore_test_database '{name}' is target.direct.database; "
                             "the restore test drops it: choose another name")
    with postgres.session(postgres.maintenance_endpoint(rb.target.direct), "target.direct", text_settings=False) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND pid <> pg_backend_pid()", (name,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _create_scratch(rb: Runbook) -> None:
    """The scratch database, fresh (a leftover of a killed test is dropped), with the live database's
    encoding and collation so it sorts and compares as the live one does."""
    _drop_scratch(rb)
    name, ep = rb.backups.restore_test_database, rb.target.direct
    with postgres.session(postgres.maintenance_endpoint(ep), "target.direct", text_settings=False) as conn:
        like = conn.execute("SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database "
                            "WHERE datname = %s", (ep.database,)).fetchone()
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
        if like:
            statement += sql.SQL(" ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(*(sql.Literal(v) for v in like))
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            raise StepFailed(f"{_where(ep)}: user '{ep.user}' may not create the scratch database '{name}'; grant "
                             "it CREATEDB or set backups.restore_test_database to one it may create") from None


def restore_test(rb: Runbook, key: str | None = None) -> RestoreTestReport:
    """Downloads the newest backup (or ``key``), checks its SHA-256 against its metadata, refuses an archive
    made by a pg_dump older than its server, restores it into ``backups.restore_test_database`` on the target
    server and holds every table's row count against the counts recorded at backup time; the scratch
    database is dropped afterwards, also when something failed. A check that raises is its own failed line."""
    require_backups(rb)
    report = RestoreTestReport(database=rb.backups.restore_test_database)
    client, bucket = destination_client(rb), rb.backups.destination.bucket
    workdir = rb.state_dir / RESTORE_DIR
    try:
        if key is None:
            found = archive.list_backups(client, bucket, dump_prefix(rb))
            if not report.check("a backup exists", PASSED if found else FAILED,
                                f"{len(found)} backups named {dump_prefix(rb)}_*.dump in bucket {bucket}",
                                "run liftoff run backup --runbook FILE"):
                return report
            key = found[0].key
        report.key = key
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / Path(key).name
        started = time.monotonic()
        got = archive.download(client, bucket, key, path)
        report.download_s, report.bytes, report.sha256 = round(time.monotonic() - started, 2), got["size"], got["sha256"]
        claimed = got["metadata"].get("sha256")
        if not report.check("SHA-256 as stored", PASSED if claimed == got["sha256"] else FAILED,
                            f"{key}: metadata sha256 {claimed or '(none)'}, the bytes read hash to {got['sha256']}",
                            "this backup is damaged or incomplete: make a new one (liftoff run backup)"):
            return report
        sidecar = archive.get_json(client, bucket, archive.counts_key(key))
        if not report.check("row counts recorded", PASSED if sidecar and "tables" in sidecar else FAILED,
                            f"{archive.counts_key(key)}: " + (f"{len(sidecar['tables'])} tables" if sidecar and
                                                              "tables" in sidecar else "missing"),
                            "make a new backup: its counts are written with it"):
            return report
        server = _server(rb)
        tools = dump_tools(rb, server)
        header = archive.archive_header(tools.pg_restore, path)
        made_from, made_by = archive.ArchiveHeader.major(header.dumped_from), archive.ArchiveHeader.major(header.dumped_by)
        older = made_from is None or made_by is None or made_by < made_from
        if not report.check("made by a pg_dump as new as its server", FAILED if older else PASSED,
                            f"{key}: dumped from PostgreSQL {header.dumped_from} by pg_dump {header.dumped_by}",
                            f"back up with pg_dump {made_from or server.major} or newer "
                            f"(postgresql-client-{made_from or server.major}); this archive is not a backup"):
            return report
        try:
            _create_scratch(rb)
            started = time.monotonic()
            error = archive.restore_archive(tools.pg_restore, path, postgres.libpq_env(_scratch_endpoint(rb),
                                            "target.direct"), rb.database.jobs)
            report.restore_s = round(time.monotonic() - started, 2)
            if not report.check("restored", FAILED if error else PASSED,
                                error or f"into {report.database} on {_where(rb.target.direct)} in {report.restore_s} s",
                                "read pg_restore's error: the backup does not restore as it is"):
                return report
            with postgres.session(_scratch_endpoint(rb), "target.direct") as conn:
                report.tables = compare_counts(sidecar["tables"], count_tables(conn))
            differ = [t for t in report.tables if t["status"] != "match"]
            report.check("row counts as at backup time", FAILED if differ else PASSED,
                         "; ".join(f"{t['table']}: {t['rows at backup']} at backup, {t['rows restored']} restored "
                                   f"({t['status']})" for t in differ[:5])
                         or f"{len(report.tables)} tables, {sum(t['rows restored'] for t in report.tables):,} rows",
                         "the backup does not hold what was counted: make a new one and find out why")
        finally:
            _drop_scratch(rb)
    except LiftoffError as exc:  # a refused key or an unreachable server: the test could not run (exit 2)
        report.checks.append(failed_line("restore test ran", exc, redact(str(exc).splitlines()[0] if str(exc)
                                                                          else type(exc).__name__),
                                         "correct what the line names (backups.destination, target.direct)"))
    finally:
        for leftover in workdir.glob("*") if workdir.exists() else []:
            leftover.unlink(missing_ok=True)
        if report.key:
            ledger = Ledger(rb.state_dir)
            ledger.set_items(PHASE, DUMPS, [(report.key, "restore-tested" if report.ok else "restore-failed",
                                             report.bytes or None, report.sha256)])
            ledger.record_event(PHASE, "backup.restore-tested", after={
                "key": report.key, "passed": report.ok, "bytes": report.bytes, "download_s": report.download_s,
                "restore_s": report.restore_s, "rto_s": report.rto_s, "failures": report.failures()})
    return report


def publish_restore_test(report: RestoreTestReport, rb: Runbook, key: str | None = None) -> None:
    publish_table("restore-test-tables", report.rows(), "Restore test: rows per table at backup time and restored")
    rto = [{"backup": report.key, "bytes": report.bytes, "download s": report.download_s,
            "restore s": report.restore_s, "RTO s": report.rto_s}]
    publish_table("restore-test-rto", rto, "Restore test: how long getting the database back took (the RTO)")
    md = [f"# Restore test {'PASSED' if report.ok else 'FAILED'}", "", report.summary(), "",
          "## Checks", markdown_table([{"check": c.name, "status": c.status, "detail": c.detail.replace("|", "/"),
                                        "fix": c.fix if c.status != "passed" else ""} for c in report.checks]),
          "## Recovery time (RTO)", markdown_table(rto)]
    if report.tables:
        md += ["## Tables", markdown_table(report.tables)]
    publish_markdown("restore-test-summary", "\n".join(md))


@task(name="restore-test the newest backup (gate)", cache_policy=NO_CACHE)
@recorded("backup.restore-test", gate=PHASE, title="backup restore test", publish=publish_restore_test)
def run_restore_test(rb: Runbook, key: str | None = None) -> RestoreTestReport:
    """The restore test of ``key`` (default: the newest backup in the bucket), recorded as the backup gate."""
    report = restore_test(rb, key)
    log.info("restore test", ok=report.ok, key=report.key, rto_s=report.rto_s, failures=report.failures())
    return report


# ---------------------------------------------------------------------------------------------------------
# Retention


def _protected(rb: Runbook, backups: list[archive.Backup]) -> set[str]:
    """The newest backup whose restore test passed: kept whatever its age, so a run of broken backups
    never leaves nothing restorable."""
    tested = {key for key, status, _, _ in Ledger(rb.state_dir).items(PHASE, DUMPS) if status == "restore-tested"}
    return next(({b.key} for b in backups if b.key in tested), set())


@task(name="apply retention", cache_policy=NO_CACHE)
@recorded("backup.retention")
def apply_retention(rb: Runbook, now: float | None = None) -> dict:
    """Deletes the dumps (and their counts) older than backups.retention_days by LastModified, keeping the
    newest backups.keep_newest and the newest restore-tested one; and partial uploads a killed run left a
    day ago or more."""
    require_backups(rb)
    client, bucket = destination_client(rb), rb.backups.destination.bucket
    now = time.time() if now is None else now
    backups = archive.list_backups(client, bucket, dump_prefix(rb))
    doomed = archive.expired(backups, now=now, retention_days=rb.backups.retention_days,
                             keep_newest=rb.backups.keep_newest, protect=_protected(rb, backups))
    for b in doomed:
        archive.delete_backup(client, bucket, b.key)
        log.info("backup deleted by retention", key=b.key, age_days=round((now - b.last_modified) / 86400, 1))
    partials = [p for p in archive.list_backups(client, bucket, dump_prefix(rb),
                                                suffix=archive.DUMP_SUFFIX + archive.PARTIAL_SUFFIX)
                if p.last_modified < now - 86400]
    for p in partials:
        client.delete_object(Bucket=bucket, Key=p.key)
    kept = len(backups) - len(doomed)
    return {"summary": f"{len(doomed)} backups deleted (older than {rb.backups.retention_days} days), {kept} kept",
            "deleted": [b.key for b in doomed], "kept": kept, "partials_deleted": [p.key for p in partials]}


def restore_test_newest_if_untested(rb: Runbook) -> RestoreTestReport | None:
    """The cutover's checklist reads the backup gate: before it does, the newest backup in the bucket is
    restore-tested unless the ledger has its result already (a tier's run does not test what it made).
    Returns the new report, or None when there was nothing to test (or the test failed: the gate it recorded
    is what the checklist's line reads and shows)."""
    if rb.backups is None:
        return None
    found = archive.list_backups(destination_client(rb), rb.backups.destination.bucket, dump_prefix(rb))
    if not found:
        return None
    status = {key: s for key, s, _, _ in Ledger(rb.state_dir).items(PHASE, DUMPS)}.get(found[0].key)
    if status in ("restore-tested", "restore-failed"):
        return None
    try:
        return run_restore_test(rb, found[0].key)
    except LiftoffError as exc:
        log.warning("restore test before the checklist failed", key=found[0].key, reason=one_line(exc))
        return None
