"""The decommission of the Supabase project (the plan's last cutover line: "Disable Supabase (don't delete yet,
keep as backup)"): a final archive of the project in the backup bucket, proven, with a manifest; what Liftoff
left on the source dropped; the steps left to the operator in Supabase's dashboard. Nothing on Supabase is
deleted: its rows, buckets and objects are only read.

The archive, under ``<decommission.archive_prefix><UTC time>/`` in ``backups.destination``:

- ``database.dump``: ``pg_dump -Fc`` of the source database as the runbook's source user (on Supabase the
  ``postgres`` role, no superuser: ``supabase_admin`` is Supabase's). That role may not read every schema
  (``supabase_migrations`` and ``realtime`` are Supabase's own), and ``pg_dump`` stops at the first it cannot
  lock; so the schemas it has no USAGE on, and the tables it may not SELECT, are left out by name and the
  manifest says so. The dump is taken from an exported snapshot in which every archived table is counted;
  the counts and the number of RLS policies travel next to it (``database.dump.json``).
- ``files/<bucket>/<key>``: every object of every bucket in ``storage.buckets`` (all of Supabase's buckets, not
  only the runbook's), through the storage phase's streaming copy (MD5 checked by the server per object).
- ``manifest.json`` and ``MANIFEST.md``: each file, its size, SHA-256, and what proved it.

What the proof proves (``verify_archive``, the phase's gate):

- the dump: the bytes read back hash to the SHA-256 recorded while it streamed up; it restores, with
  ``pg_restore --no-owner --no-acl``, into a scratch database on the target server (``decommission.
  restore_test_database``, dropped after) with every entry except the RLS policies, and there every archived
  table holds the rows counted in the dump's snapshot; the policies are counted in the archive's table of
  contents against the source's. It does NOT prove that the policies, owners and grants restore: they name
  Supabase's roles (``anon``, ``authenticated``, ``supabase_auth_admin``...), which exist only on a Supabase
  server, so restoring them whole needs a Supabase project (a new one, or Supabase's own restore).
- the files: per bucket, the archive holds as many objects and bytes as Supabase's listing (``storage.objects``)
  and every object, read back from the archive, hashes to the MD5 Supabase's listing claims (or, where it
  claims none, the MD5 the copy computed from the source's bytes).
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from liftoff.checks import FAILED, NOT_CHECKED, PASSED, CheckLine, GateReport, blocker_line, failed_line
from liftoff.errors import LiftoffError, PreflightFailed, RunbookInvalid, StepFailed
from liftoff.ledger import Ledger, current_run_id
from liftoff.logs import get_logger
from liftoff.redaction import redact
from liftoff.reports import check_table, markdown_table, publish_markdown
from liftoff.runbooks.model import Runbook
from liftoff.steps import done, recorded
from liftoff.systems import backups as archive
from liftoff.systems import pg_replication as repl
from liftoff.systems import postgres, s3
from liftoff.systems.supabase_storage import inventory, read_buckets
from liftoff.tasks.backup.steps import compare_counts, count_tables, destination_client, require_backups
from liftoff.tasks.cutover.common import FROZEN, since_last_rollback
from liftoff.tasks.cutover.replication import stop_replication
from liftoff.tasks.storage.common import storage_source

log = get_logger(phase="decommission")

PHASE = "decommission"
DUMP_NAME = "database.dump"
MANIFEST_NAME = "manifest.json"
NOT_RESTORED = {"POLICY"}  # they name Supabase's roles: see the module's docstring
MiB = 1024 * 1024
_SYSTEM = ("nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND nspname NOT LIKE 'pg_temp_%' "
           "AND nspname NOT LIKE 'pg_toast_temp_%'")


# ---------------------------------------------------------------------------------------------------------
# When it may run


def watch_not_passed(ledger: Ledger) -> str | None:
    """Why the watch does not allow the decommission (None: its latest gate passed)."""
    gate = ledger.latest_gate("watch")
    if gate is None:
        return "no watch on record (liftoff run watch)"
    if not gate.passed:
        return f"the latest watch failed ({gate.summary})"
    return None


def _where(rb: Runbook) -> str:
    return f"source ({rb.source.host}:{rb.source.port}/{rb.source.database})"


@task(name="start the decommission", cache_policy=NO_CACHE)
@recorded("decommission.start", skip_if=done)
def start_decommission(rb: Runbook, force_reason: str = "") -> dict:
    """Refuses (exit 2) before a passing watch unless forced with a reason, which is recorded; fixes where the
    archive goes (a re-run after a failure keeps it)."""
    require_backups(rb)
    ledger = Ledger(rb.state_dir)
    why = watch_not_passed(ledger)
    reason = force_reason.strip()
    if why and not reason:
        raise PreflightFailed(f"decommission: {why}; it runs after a passing watch, or forced with a reason "
                              "(force_reason: why Supabase may be archived now)")
    now = time.time()
    prefix = f"{rb.decommission.archive_prefix}{datetime.fromtimestamp(now, UTC):%Y-%m-%d_%H-%M-%S}/"
    gate = ledger.latest_gate("watch")
    detail = {"prefix": prefix, "bucket": rb.backups.destination.bucket, "started_at": now,
              "watch": gate.summary if gate else None, "forced": bool(why), "force_reason": reason if why else None,
              "refused_because": why}
    if why:
        ledger.record_event(PHASE, "decommission.forced", before={"watch": why}, after={"reason": reason},
                            flow_run_id=current_run_id())
        log.warning("decommission forced without a passing watch", why=why, reason=reason)
    return detail


def archive_prefix(rb: Runbook) -> str:
    return Ledger(rb.state_dir).step_detail("decommission.start")["prefix"]


# ---------------------------------------------------------------------------------------------------------
# The database


def _pattern(*parts: str) -> str:
    """A pg_dump pattern naming exactly this schema or table (quoted: no wildcard, case kept)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


def readable(conn: psycopg.Connection) -> tuple[list[str], list[str], list[str]]:
    """(schemas the connected user may use, schemas it may not, tables of the former it may not SELECT)."""
    rows = conn.execute(f"SELECT nspname, has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE {_SYSTEM} "
                        "ORDER BY 1").fetchall()
    usable = [n for n, ok in rows if ok]
    blocked = conn.execute(
        """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname = ANY(%s)
              AND NOT has_table_privilege(c.oid, 'SELECT') ORDER BY 1, 2""", (usable,)).fetchall()
    return usable, [n for n, ok in rows if not ok], [f"{s}.{t}" for s, t in blocked]


def plan_archive(rb: Runbook) -> dict:
    """What would be archived (the dry run): the schemas, those left out and why, the buckets and objects."""
    with postgres.session(rb.source, "source") as conn:
        schemas, no_usage, no_select = readable(conn)
        buckets = []
        try:
            for b in read_buckets(conn):
                rows = list(inventory(conn, b.name))
                buckets.append({"bucket": b.name, "objects": len(rows), "bytes": sum(r.size or 0 for r in rows)})
        except psycopg.Error as exc:
            buckets = [{"bucket": "(none read)", "objects": 0, "bytes": 0, "why": str(exc).splitlines()[0]}]
        slots, publications = repl.liftoff_objects(conn)
    return {"schemas": schemas, "left_out_schemas": no_usage, "left_out_tables": no_select, "buckets": buckets,
            "liftoff_on_source": [f"slot {s.slot}" for s in slots] + [f"publication {p}" for p in publications]}


@task(name="archive the source database", cache_policy=NO_CACHE)
@recorded("decommission.dump", skip_if=done)
def archive_database(rb: Runbook) -> dict:
    """``pg_dump -Fc`` of the source, from an exported snapshot in which every archived table is counted,
    streamed to ``<prefix>database.dump`` with its SHA-256 and the counts beside it."""
    require_backups(rb)
    ep, dest = rb.source, rb.backups.destination
    client = destination_client(rb)
    key = archive_prefix(rb) + DUMP_NAME
    with postgres.session(ep, "source", autocommit=False) as snap:
        snap.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        snap.read_only = True
        server = postgres.server_info(snap, ep)
        tools = archive.choose_pg_dump(server.major, server.version, _where(rb), rb.database.pg_bin_dirs)
        snapshot = snap.execute("SELECT pg_export_snapshot()").fetchone()[0]
        taken = time.time()
        schemas, no_usage, no_select = readable(snap)
        counts = {t.qualified: postgres.count_rows(snap, t) for t in postgres.list_tables(snap, schemas)
                  if t.qualified not in no_select}
        policies = snap.execute("SELECT count(*) FROM pg_policies WHERE schemaname = ANY(%s)", (schemas,)).fetchone()[0]
        argv = [tools.pg_dump, "--format=custom", f"--compress={rb.backups.compression}", "--no-password",
                f"--snapshot={snapshot}", *[f"--exclude-schema={_pattern(s)}" for s in no_usage],
                *[f"--exclude-table={_pattern(*t.split('.', 1))}" for t in no_select], "--dbname", ep.database]
        sidecar = {"database": ep.database, "server": f"{ep.host}:{ep.port}", "server_version": server.version,
                   "server_major": server.major, "user": ep.user, "pg_dump_version": tools.version,
                   "snapshot_at": taken, "tables": counts, "policies": policies, "schemas": schemas,
                   "left_out_schemas": no_usage, "left_out_tables": no_select, "kind": "decommission"}
        log.info("archive dump started", key=key, tables=len(counts), left_out=no_usage + no_select)
        stored = archive.dump_to_bucket(argv, postgres.libpq_env(ep, "source"), client, dest.bucket, key,
                                        rb.backups.part_size_mb * MiB,
                                        {"server-version": server.version, "pg-dump-version": tools.version}, sidecar)
        snap.rollback()
    rows = sum(counts.values())
    return {"summary": f"{key}: {stored.size:,} bytes, {len(counts)} tables, {rows:,} rows"
                       + (f"; left out (no access for {ep.user}): {', '.join(no_usage + no_select)}"
                          if no_usage or no_select else ""),
            "key": key, "bytes": stored.size, "sha256": stored.sha256, "tables": len(counts), "rows": rows,
            "left_out_schemas": no_usage, "left_out_tables": no_select, "policies": policies,
            "pg_dump_version": tools.version, "server_version": server.version}


# ---------------------------------------------------------------------------------------------------------
# The files


def files_prefix(prefix: str, bucket: str) -> str:
    return f"{prefix}files/{bucket}/"


@task(name="archive the source's files", cache_policy=NO_CACHE)
@recorded("decommission.files", skip_if=done)
def archive_files(rb: Runbook) -> dict:
    """Copies every object of every Supabase bucket to ``<prefix>files/<bucket>/`` (the storage phase's
    streaming copy; MD5 checked by the archive's server per object); a re-run copies only what the archive
    lacks. Without ``storage.source`` nothing is copied and the archive says so."""
    if rb.storage.source is None:
        return {"summary": "no storage.source in the runbook: Supabase Storage's files are not archived",
                "configured": False}
    prefix, dest = archive_prefix(rb), rb.backups.destination.bucket
    dst, ledger = destination_client(rb), Ledger(rb.state_dir)
    copied = copied_bytes = total = 0
    failed: list[str] = []
    with postgres.session(rb.source, "source") as conn, storage_source(rb) as src:
        for bucket in read_buckets(conn):
            under = files_prefix(prefix, bucket.name)
            have = {o.key[len(under):]: o.size for o in s3.list_objects(dst, dest, under)}
            rows = list(inventory(conn, bucket.name))
            total += len(rows)
            todo = [under + r.key for r in rows if have.get(r.key) != r.size]

            def record(outcome, under=under, name=bucket.name) -> None:
                if isinstance(outcome, s3.CopiedObject):
                    ledger.set_items(PHASE, f"file:{name}", [(outcome.key[len(under):], "copied", outcome.size,
                                                              outcome.md5)])

            result = s3.copy_batch_from(todo, lambda dkey, under=under, name=bucket.name: src.open(
                name, dkey[len(under):]), dst, dest, part_size=rb.storage.part_size_mb * MiB,
                concurrency=rb.storage.concurrency, on_done=record)
            copied += len(result.copied)
            copied_bytes += result.bytes
            failed += [f"{bucket.name}/{f.key[len(under):]}: {f.error}" for f in result.failed]
    if failed:
        raise StepFailed(f"archive of the files: {len(failed)} objects failed ({'; '.join(failed[:3])}); re-run: "
                         "only what the archive lacks is copied")
    return {"summary": f"{copied} of {total} objects copied ({copied_bytes:,} bytes), the rest already archived",
            "configured": True, "copied": copied, "objects": total}


# ---------------------------------------------------------------------------------------------------------
# The proof: the phase's gate


@dataclass
class ArchiveReport(GateReport):
    prefix: str = ""
    bucket: str = ""
    checks: list[CheckLine] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)  # key, size, sha256, md5, proved by
    tables: list[dict] = field(default_factory=list)  # compare_counts rows of the restore test
    left_out: dict = field(default_factory=dict)  # schemas, tables (no access); restore entries not restored
    proves: list[str] = field(default_factory=list)
    does_not_prove: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not any(c.status == FAILED for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status == FAILED]

    def blockers(self) -> list[str]:
        return [blocker_line(c.name, c.detail, c.fix) for c in self.checks if c.status == FAILED and c.blocked]

    def differences_found(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status == FAILED and not c.blocked]

    def summary(self) -> str:
        if not self.ok:
            return "archive not proven: " + "; ".join(self.failures())
        size = sum(f["size"] for f in self.files)
        unchecked = [c.name for c in self.checks if c.status == NOT_CHECKED]
        return (f"archive proven: s3://{self.bucket}/{self.prefix}, {len(self.files)} files, {size:,} bytes; "
                f"{len(self.tables)} tables restored with the rows counted at the dump"
                + (f"; not checked: {', '.join(unchecked)}" if unchecked else ""))

    def check(self, name: str, status: str, detail: str, fix: str = "") -> bool:
        self.checks.append(CheckLine(name, status, redact(detail), fix))
        return status == PASSED

    def rows(self) -> list[dict]:
        return self.files


def _scratch_database(rb: Runbook, create: bool) -> None:
    """Drops ``decommission.restore_test_database`` on the target server (a leftover of a killed run too) and,
    with ``create``, makes it afresh."""
    name, ep = rb.decommission.restore_test_database, rb.target.direct
    if name == ep.database:
        raise RunbookInvalid(f"runbook {rb.name}: decommission.restore_test_database '{name}' is target.direct.database; "
                             "the restore test drops it: choose another name")
    with postgres.session(postgres.maintenance_endpoint(ep), "target.direct", text_settings=False) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if create:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
            except psycopg.errors.InsufficientPrivilege:
                raise StepFailed(f"target.direct ({ep.host}:{ep.port}): user '{ep.user}' may not create the scratch "
                                 f"database '{name}'; grant it CREATEDB or set decommission.restore_test_database "
                                 "to one it may create") from None


def _restore_test(rb: Runbook, report: ArchiveReport, client, dumped: dict) -> None:
    """The dump downloaded (SHA-256 as recorded), restored into the scratch database without the policies,
    every table's rows as counted at the dump, the policies counted in its table of contents."""
    key, bucket = dumped["key"], report.bucket
    workdir = rb.state_dir / "decommission-test"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / DUMP_NAME
    try:
        got = archive.download(client, bucket, key, path)
        if not report.check("dump: SHA-256 as stored", PASSED if got["sha256"] == dumped["sha256"] else FAILED,
                            f"{key}: {got['size']:,} bytes read back hash to {got['sha256']}; recorded while it "
                            f"streamed up: {dumped['sha256']}", "the archive is damaged: re-run with a new archive"):
            return
        report.files.append({"file": key, "size": got["size"], "sha256": got["sha256"], "md5": None,
                             "proved by": "read back: SHA-256 as recorded at upload; restored into a scratch "
                                          "database with every table's rows as counted at the dump"})
        sidecar = archive.get_json(client, bucket, archive.counts_key(key)) or {}
        raw = json.dumps(sidecar, indent=1, sort_keys=True).encode()
        report.files.append({"file": archive.counts_key(key), "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                             "md5": None, "proved by": "read back and parsed (the dump's counts)"})
        report.left_out.update(schemas=sidecar.get("left_out_schemas", []), tables=sidecar.get("left_out_tables", []))
        with postgres.session(rb.target.direct, "target.direct") as conn:
            server = postgres.server_info(conn, rb.target.direct)
        tools = archive.choose_pg_dump(max(server.major, int(sidecar.get("server_major") or 0)), server.version,
                                       f"target.direct ({rb.target.direct.host}:{rb.target.direct.port})",
                                       rb.database.pg_bin_dirs)
        _scratch_database(rb, create=True)
        try:
            scratch = rb.target.direct.model_copy(update={"database": rb.decommission.restore_test_database})
            started = time.monotonic()
            error, left_out = archive.restore_archive_leaving_out(
                tools.pg_restore, path, postgres.libpq_env(scratch, "target.direct"), rb.database.jobs,
                NOT_RESTORED, workdir)
            report.left_out["not restored"] = left_out
            if not report.check("dump: restores", FAILED if error else PASSED,
                                error or f"into {scratch.database} on target.direct in "
                                         f"{time.monotonic() - started:.1f} s (pg_restore {tools.version}, "
                                         f"--no-owner --no-acl, {len(left_out)} policies left out)",
                                "read pg_restore's error: the archive does not restore as it is"):
                return
            with postgres.session(scratch, "target.direct") as conn:
                report.tables = compare_counts(sidecar.get("tables", {}), count_tables(conn))
            differ = [t for t in report.tables if t["status"] != "match" and t["rows at backup"] is not None]
            report.check("dump: rows as counted at the dump", FAILED if differ else PASSED,
                         "; ".join(f"{t['table']}: {t['rows at backup']} counted, {t['rows restored']} restored "
                                   f"({t['status']})" for t in differ[:5])
                         or f"{sum(1 for t in report.tables if t['rows at backup'] is not None)} tables, "
                            f"{sum(t['rows restored'] for t in report.tables):,} rows",
                         "the archive does not hold what was counted: make a new one and find out why")
            policies = sidecar.get("policies")
            report.check("dump: RLS policies in the archive", PASSED if policies == len(left_out) else FAILED,
                         f"{len(left_out)} in its table of contents, {policies} on the source (not restored here: "
                         "they name Supabase's roles)", "make a new archive: the dump lacks policies")
        finally:
            _scratch_database(rb, create=False)
    finally:
        path.unlink(missing_ok=True)


def _read_back(client, bucket: str, key: str) -> tuple[int, str, str]:
    """(size, MD5, SHA-256) of the archived object's bytes, streamed."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    md5, sha, size = hashlib.md5(), hashlib.sha256(), 0
    for chunk in iter(lambda: body.read(MiB), b""):
        md5.update(chunk)
        sha.update(chunk)
        size += len(chunk)
    return size, md5.hexdigest(), sha.hexdigest()


def _files_proof(rb: Runbook, report: ArchiveReport, client) -> None:
    """Per bucket: the archive's objects against Supabase's listing: count, bytes, and each object's MD5 read
    back from the archive against the listing's (or the copy's, where the listing claims none)."""
    ledger = Ledger(rb.state_dir)
    with postgres.session(rb.source, "source") as conn:
        buckets = read_buckets(conn)
        listing = {b.name: list(inventory(conn, b.name)) for b in buckets}
    with ThreadPoolExecutor(max_workers=rb.storage.concurrency) as pool:
        for name, rows in listing.items():
            under = files_prefix(report.prefix, name)
            archived = {o.key[len(under):]: o for o in s3.list_objects(client, report.bucket, under)}
            copied_md5 = {key: md5 for key, _, _, md5 in ledger.items(PHASE, f"file:{name}")}
            read = dict(zip(archived, pool.map(lambda k: _read_back(client, report.bucket, under + k), archived)))
            problems = []
            for row in rows:
                got = read.get(row.key)
                if got is None:
                    problems.append(f"{row.key}: not in the archive")
                    continue
                size, md5, sha = got
                claimed, by = (row.md5, "Supabase's listing") if row.md5 else (copied_md5.get(row.key), "the copy")
                if size != row.size:
                    problems.append(f"{row.key}: {size} bytes archived, {row.size} listed")
                elif claimed != md5:
                    problems.append(f"{row.key}: MD5 {md5} archived, {claimed or 'none'} from {by}")
                else:
                    report.files.append({"file": under + row.key, "size": size, "sha256": sha, "md5": md5,
                                         "proved by": f"read back: size and MD5 equal to {by}"})
            extra = sorted(set(read) - {r.key for r in rows})
            problems += [f"{k}: in the archive, not in Supabase's listing" for k in extra]
            total = sum(r.size or 0 for r in rows)
            report.check(f"files: bucket {name}", FAILED if problems else PASSED,
                         "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
                         if problems else f"{len(rows)} objects, {total:,} bytes, as Supabase lists them; every MD5 "
                                          "read back equal",
                         "re-run the decommission: only what the archive lacks is copied")


@task(name="prove the archive (gate)", cache_policy=NO_CACHE)
@recorded("decommission.verify", gate=PHASE, title="archive", publish=lambda report, rb, *a: publish_proof(report))
def verify_archive(rb: Runbook) -> ArchiveReport:
    """Passes when the dump restores with every table's rows as counted at the dump and every archived object
    matches Supabase's listing (count, bytes, MD5 read back). A check that raises is its own failed line."""
    ledger = Ledger(rb.state_dir)
    start, dumped, files = (ledger.step_detail(s) for s in ("decommission.start", "decommission.dump",
                                                             "decommission.files"))
    report = ArchiveReport(prefix=start["prefix"], bucket=start["bucket"])
    client = destination_client(rb)
    for name, check in (("dump", lambda: _restore_test(rb, report, client, dumped)),
                        ("files", lambda: _files_proof(rb, report, client) if files.get("configured") else
                         report.check("files", NOT_CHECKED, files["summary"],
                                      "add storage.source to the runbook to archive Supabase Storage"))):
        try:
            check()
        except (LiftoffError, psycopg.Error, OSError) as exc:
            report.checks.append(failed_line(f"{name}: proof ran", exc, redact(str(exc).splitlines()[0] if str(exc)
                                                                               else type(exc).__name__),
                                             "correct what the line names, then run the decommission again"))
    report.proves = [
        "the dump's bytes are those pg_dump wrote (SHA-256 read back equals the one computed while it streamed up)",
        "it restores with pg_restore --no-owner --no-acl into an empty database (every entry but the RLS policies)",
        "every archived table holds, restored, exactly the rows counted in the dump's own snapshot",
        "the archive's table of contents holds as many RLS policies as the source had",
        "each bucket's archived objects are as many, as large and with the same MD5 as Supabase's listing"]
    report.does_not_prove = [
        "that the RLS policies, owners and grants restore: they name Supabase's roles (anon, authenticated, "
        "supabase_auth_admin...), which exist on a Supabase server only",
        "anything in the schemas and tables the source user may not read: " +
        (", ".join(report.left_out.get("schemas", []) + report.left_out.get("tables", [])) or "none here"),
        "that the values equal the source's row by row (the database gate did that at the cutover)"]
    log.info("archive proof", ok=report.ok, files=len(report.files), failures=report.failures())
    return report


def publish_proof(report: ArchiveReport) -> None:
    publish_markdown("decommission-proof", "\n".join([
        f"# Archive {'PROVEN' if report.ok else 'NOT PROVEN'}", "", report.summary(), "", check_table(report.checks)]))


# ---------------------------------------------------------------------------------------------------------
# The manifest


def manifest(rb: Runbook, report: ArchiveReport) -> dict:
    start = Ledger(rb.state_dir).step_detail("decommission.start")
    return {"runbook": rb.name, "source": f"{rb.source.host}:{rb.source.port}/{rb.source.database}",
            "archive": f"s3://{report.bucket}/{report.prefix}",
            "made_at": datetime.fromtimestamp(start["started_at"], UTC).isoformat(),
            "watch": start.get("watch"), "forced": start.get("forced"), "force_reason": start.get("force_reason"),
            "proven": report.ok, "checks": [{"check": c.name, "status": c.status, "detail": c.detail}
                                            for c in report.checks],
            "restore_test": {"proves": report.proves, "does_not_prove": report.does_not_prove},
            "left_out": {"schemas (no USAGE for the source user)": report.left_out.get("schemas", []),
                         "tables (no SELECT for the source user)": report.left_out.get("tables", []),
                         "archived, not restored by the test": report.left_out.get("not restored", [])},
            "files": report.files}


def manifest_markdown(m: dict, limit: int = 200) -> str:
    files = m["files"]
    md = [f"# Decommission manifest: {m['runbook']}", "",
          f"- **archive**: {m['archive']} ({len(files)} files, {sum(f['size'] for f in files):,} bytes)",
          f"- **source**: {m['source']}", f"- **made**: {m['made_at']}",
          f"- **watch**: {m['watch'] or 'none passed'}"
          + (f"; **forced**: {m['force_reason']}" if m["forced"] else ""),
          f"- **proven**: {'yes' if m['proven'] else 'NO'}", "",
          "## What the proof proves", *[f"- {p}" for p in m["restore_test"]["proves"]], "",
          "## What it does not prove", *[f"- {p}" for p in m["restore_test"]["does_not_prove"]], "",
          "## Left out", *[f"- {k}: {', '.join(v) if v else 'none'}" for k, v in m["left_out"].items()
                           if k != "archived, not restored by the test"],
          f"- archived, not restored by the test: {len(m['left_out']['archived, not restored by the test'])} "
          "RLS policies", "",
          "## Checks", markdown_table(m["checks"]), "## Files",
          markdown_table([{**f, "sha256": f["sha256"], "md5": f["md5"] or ""} for f in files[:limit]])]
    if len(files) > limit:
        md.append(f"... and {len(files) - limit} more files in manifest.json")
    return "\n".join(md)


@task(name="write the manifest", cache_policy=NO_CACHE)
@recorded("decommission.manifest")
def write_manifest(rb: Runbook, report: ArchiveReport) -> dict:
    """``manifest.json`` and ``MANIFEST.md`` next to the archive, and the manifest as an artifact."""
    m = manifest(rb, report)
    client, bucket = destination_client(rb), report.bucket
    archive.put_json(client, bucket, report.prefix + MANIFEST_NAME, m)
    text = manifest_markdown(m)
    s3.call(s3.RetryPolicy(), "put", lambda: client.put_object(
        Bucket=bucket, Key=report.prefix + "MANIFEST.md", Body=redact(text).encode(), ContentType="text/markdown"),
        client, bucket, report.prefix + "MANIFEST.md")
    publish_markdown("decommission-manifest", text)
    return {"summary": f"manifest: s3://{bucket}/{report.prefix}{MANIFEST_NAME}, {len(m['files'])} files",
            "key": report.prefix + MANIFEST_NAME, "files": len(m["files"])}


# ---------------------------------------------------------------------------------------------------------
# What Liftoff left on the source


def freeze_in_force(rb: Runbook) -> dict | None:
    if not (rb.state_dir / "ledger.sqlite").exists():
        return None
    frozen = [e for e in since_last_rollback(Ledger(rb.state_dir)) if e.what == FROZEN]
    return frozen[0].after if frozen else None


@task(name="drop what Liftoff left on the source", cache_policy=NO_CACHE)
@recorded("decommission.source-cleanup")
def drop_leftovers(rb: Runbook) -> dict:
    """Drops this runbook's replication (its subscription on the target, its slots and publication on the
    source) and every other slot and publication named ``liftoff_`` on the source; succeeds when none is
    left. The write freeze stays in force: lifting it would let the apps write to Supabase again."""
    dropped = stop_replication(rb, "decommission")
    with postgres.session(rb.source, "source") as src:
        dropped += repl.drop_liftoff_objects(src)
        slots, publications = repl.liftoff_objects(src)
    left = [f"slot {s.slot}" for s in slots] + [f"publication {p}" for p in publications]
    if left:
        raise StepFailed(f"{_where(rb)}: still there after the drop: {', '.join(left)}; run the decommission again")
    frozen = freeze_in_force(rb)
    kept = (f"the write freeze ({', '.join(frozen.get('methods', []))}) stays in force: lifting it would let the "
            "apps write to Supabase again" if frozen else "no write freeze of Liftoff's is in force")
    Ledger(rb.state_dir).record_event(PHASE, "decommission.dropped", after={"dropped": dropped, "kept": kept},
                                      flow_run_id=current_run_id())
    log.info("dropped on the source", dropped=dropped)
    return {"summary": f"dropped: {', '.join(dropped) or 'nothing (none left)'}; {kept}", "dropped": dropped,
            "kept": kept}


def operator_steps(rb: Runbook, report: ArchiveReport | None, cleanup: dict | None) -> list[str]:
    """What only the operator can do, in Supabase's dashboard and elsewhere."""
    project = rb.storage.source.project_url if rb.storage.source else rb.source.host
    steps = [f"In Supabase's dashboard, pause the project ({project}): Project Settings, General, Pause project. "
             "Do not delete it: the plan keeps it as a backup.",
             "Keep the project paused, not deleted, for as long as the plan says; note the date you may delete it."]
    if report is not None:
        steps.append(f"Keep the archive: s3://{report.bucket}/{report.prefix} (manifest.json lists every file with "
                     "its SHA-256). Backup retention does not touch it; a lifecycle rule on the bucket might: check.")
        left = report.left_out.get("schemas", []) + report.left_out.get("tables", [])
        if left:
            steps.append(f"Not archived (the source user may not read them): {', '.join(left)}. If you need them, "
                         "export them with Supabase's help before you delete the project.")
    if cleanup is not None:
        steps.append(cleanup["kept"][0].upper() + cleanup["kept"][1:] + "; the paused project takes no connections.")
    steps.append("Remove Supabase's keys and connection strings from the apps' and CI's secrets.")
    return steps
