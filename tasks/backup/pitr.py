"""Point-in-time recovery's steps (``backups.pitr``), each recorded: pgBackRest configured on the VPS and the
target's WAL archived into the backup bucket (``pitr.configure``), a full or differential backup
(``pitr.backup``), ``pgbackrest check`` and ``info`` as the gate (``pitr.check``), and the recovery's restore of
the cluster to a point in time (``recover.pitr-restore``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.checks import GateReport
from liftoff.errors import LiftoffError, RunbookInvalid, StepFailed
from liftoff.ledger import Ledger, current_run_id
from liftoff.logs import get_logger
from liftoff.redaction import one_line
from liftoff.reports import markdown_table, publish_markdown
from liftoff.runbooks.model import Runbook
from liftoff.steps import recorded
from liftoff.systems import pgbackrest, postgres
from liftoff.systems.remote import Remote

log = get_logger(phase="backup")
PHASE = "backup"


def require_pitr(rb: Runbook) -> None:
    if rb.backups is None or rb.backups.pitr is None:
        raise RunbookInvalid(f"runbook {rb.name}: backups.pitr: point-in-time recovery needs its settings (the "
                             "cluster's data directory, its stop/start commands); see runbooks/model.py Pitr")
    if rb.ssh is None:
        raise RunbookInvalid(f"runbook {rb.name}: ssh: pgBackRest runs on the VPS, reached over ssh; add the section")


def _cluster(rb: Runbook) -> pgbackrest.Cluster:
    p = rb.backups.pitr
    return pgbackrest.Cluster(p.stanza, p.pg_path, p.pg_port, p.pg_socket_path, p.os_user)


def _repository(rb: Runbook) -> pgbackrest.Repository:
    dest = rb.backups.destination
    return pgbackrest.Repository(
        dest.endpoint_url, dest.bucket, dest.region,
        dest.access_key_id.resolve("backups.destination.access_key_id", sensitive=False),
        dest.secret_access_key.resolve("backups.destination.secret_access_key"), rb.backups.pitr.repo_path,
        rb.backups.pitr.ca_file, rb.backups.pitr.retention_days)


def run_pgbackrest(rb: Runbook, remote: Remote, *args: str, check: bool = True) -> str:
    """One pgbackrest command on the VPS; StepFailed with pgBackRest's own error line."""
    result = remote.run(pgbackrest.command(_cluster(rb), rb.backups.pitr.config, *args),
                        timeout=rb.backups.pitr.timeout_s, check=False)
    if check and result.rc != 0:
        raise StepFailed(f"pgbackrest {args[0]} on {remote.where} (stanza {rb.backups.pitr.stanza}) exited "
                         f"{result.rc}: {pgbackrest.first_error(result.stdout + result.stderr)}")
    return result.stdout


@task(name="configure pgBackRest and WAL archiving", cache_policy=NO_CACHE)
@recorded("pitr.configure")
def configure_pitr(rb: Runbook) -> dict:
    """Writes pgbackrest.conf on the VPS (0600, the cluster user's), sets archive_mode and archive_command on
    the target (restarting the cluster when archive_mode was off), and creates the stanza. Idempotent."""
    require_pitr(rb)
    p, cluster = rb.backups.pitr, _cluster(rb)
    text = pgbackrest.config_text(_repository(rb), cluster, p.work_dir)
    with Remote(rb.ssh) as remote:
        for folder in (p.work_dir, f"{p.work_dir}/log", f"{p.work_dir}/lock", f"{p.work_dir}/spool"):
            remote.run(f"mkdir -p {folder} && chown {p.os_user} {folder}", timeout=60)
        remote.run(f"mkdir -p $(dirname {p.config})", timeout=60)
        remote.write_file_atomic(p.config, text, mode=0o600, backup=False)
        remote.run(f"chown {p.os_user} {p.config}", timeout=60)
        command = pgbackrest.archive_command(p.config, p.stanza)
        with postgres.session(rb.target.direct, "target.direct") as conn:
            mode, current = (conn.execute(f"SHOW {name}").fetchone()[0] for name in ("archive_mode", "archive_command"))
            if current != command:
                conn.execute("ALTER SYSTEM SET archive_command = %s" % _literal(command))
            if mode == "off":
                conn.execute("ALTER SYSTEM SET archive_mode = 'on'")
            conn.execute("SELECT pg_reload_conf()")
        restarted = mode == "off"
        if restarted:  # archive_mode takes effect at a restart only
            remote.run(p.restart_command, timeout=p.timeout_s)
            _wait_up(rb)
        run_pgbackrest(rb, remote, "stanza-create")
    return {"summary": f"stanza {p.stanza}: WAL archived to bucket {rb.backups.destination.bucket}{p.repo_path}"
                       f"{' (cluster restarted: archive_mode was off)' if restarted else ''}",
            "restarted": restarted}


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _wait_up(rb: Runbook, recovered: bool = False) -> float:
    """Waits until target.direct answers (and, ``recovered``, is out of recovery: promoted); seconds waited."""
    started = time.monotonic()
    deadline = started + rb.backups.pitr.timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with postgres.session(rb.target.direct, "target.direct") as conn:
                if not recovered or not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return round(time.monotonic() - started, 2)
                last = "still in recovery"
        except Exception as exc:  # noqa: BLE001 - starting up
            last = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        time.sleep(0.2)
    raise StepFailed(f"target.direct ({rb.target.direct.host}:{rb.target.direct.port}) is not up"
                     f"{' and promoted' if recovered else ''} after {rb.backups.pitr.timeout_s} s "
                     f"(backups.pitr.timeout_s): {last}")


@task(name="pgBackRest backup", cache_policy=NO_CACHE)
@recorded("pitr.backup")
def pitr_backup(rb: Runbook, kind: str) -> dict:
    """A full or differential backup into the repository; pgBackRest expires what is past the retention."""
    require_pitr(rb)
    started = time.monotonic()
    with Remote(rb.ssh) as remote:
        run_pgbackrest(rb, remote, "backup", f"--type={kind}")
        info = pgbackrest.parse_info(run_pgbackrest(rb, remote, "info", "--output=json"), rb.backups.pitr.stanza)
    newest = info.backups[-1]
    return {"summary": f"{kind} backup {newest.label}: {newest.size:,} bytes of database, {newest.repo_size:,} in "
                       f"the repository, {round(time.monotonic() - started, 1)} s", "label": newest.label,
            "seconds": round(time.monotonic() - started, 2)}


@dataclass
class PitrReport(GateReport):
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    info: pgbackrest.Info | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, ok, detail in self.checks if not ok]

    def summary(self) -> str:
        return "; ".join(f"{name}: {detail}" for name, _, detail in self.checks)


def pitr_rows(report: PitrReport) -> list[dict]:
    return [{"check": name, "status": "passed" if ok else "FAILED", "detail": detail.replace("|", "/")}
            for name, ok, detail in report.checks]


def publish_pitr(report: PitrReport, rb: Runbook, configured: dict, made: dict | None) -> None:
    backups = [{"backup": b.label, "type": b.type, "database bytes": b.size, "repository bytes": b.repo_size}
               for b in (report.info.backups if report.info else [])]
    publish_markdown("pitr-summary", "\n".join([
        f"# Point-in-time recovery {'ready' if report.ok else 'NOT READY'}", "", f"- **configured**: {configured['summary']}",
        f"- **backup**: {made['summary'] if made else 'none asked for'}", "", markdown_table(pitr_rows(report)), "",
        "## Backups in the repository", markdown_table(backups) if backups else "none"]))


@task(name="pgbackrest check (gate)", cache_policy=NO_CACHE)
@recorded("pitr.check", gate="pitr", title="pgbackrest check", publish=publish_pitr)
def pitr_check(rb: Runbook, configured: dict, made: dict | None = None) -> PitrReport:
    """pgBackRest's own verification: ``check`` (the archive_command works: a WAL switch reaches the bucket)
    and ``info`` (the stanza is ok, a backup exists, the archive's range)."""
    require_pitr(rb)
    report = PitrReport()
    with Remote(rb.ssh) as remote:
        try:
            run_pgbackrest(rb, remote, "check")
            report.checks.append(("pgbackrest check", True, "WAL archiving into the bucket works"))
        except StepFailed as exc:
            report.checks.append(("pgbackrest check", False, str(exc)))
            return report
        info = pgbackrest.parse_info(run_pgbackrest(rb, remote, "info", "--output=json"), rb.backups.pitr.stanza)
    report.info = info
    report.checks.append(("stanza", info.status == "ok", f"{rb.backups.pitr.stanza}: {info.status}"))
    report.checks.append(("a backup to recover from", bool(info.backups),
                          f"{len(info.backups)} backup(s), WAL {info.archive_min} .. {info.archive_max}"
                          if info.backups else "none: run liftoff run pitr"))
    return report


def pitr_info(rb: Runbook) -> pgbackrest.Info:
    require_pitr(rb)
    with Remote(rb.ssh) as remote:
        return pgbackrest.parse_info(run_pgbackrest(rb, remote, "info", "--output=json"), rb.backups.pitr.stanza)


def _back_to_the_stop(rb: Runbook, remote: Remote, failure: str) -> str:
    """The restore failed part-way: pgBackRest removes global/pg_control first, so the cluster cannot start on
    the half-restored files. Brings it back to the end of its WAL archive (everything written until the
    stop: ``check`` archived it) from the newest backup set that restores, started and promoted, so the
    safety dump can go back in; says what it did, or why the cluster stays down. A set the failure names (a
    file of it missing or damaged in the repository) is not tried again."""
    p = rb.backups.pitr
    found = pgbackrest.parse_info(run_pgbackrest(rb, remote, "info", "--output=json"), p.stanza).backups
    sets = sorted((b for b in found if f"/{b.label}/" not in failure), key=lambda b: b.stopped, reverse=True)
    tried = [f"{b.label}: named by the failure" for b in found if f"/{b.label}/" in failure]
    for backup_set in sets:
        try:
            run_pgbackrest(rb, remote, "restore", "--delta", "--type=default", f"--set={backup_set.label}")
            remote.run(p.start_command, timeout=p.timeout_s)
            _wait_up(rb, recovered=True)
        except LiftoffError as exc:
            tried.append(f"{backup_set.label}: {one_line(str(exc))[:200]}")
            continue
        log.warning("cluster brought back to the end of its archive after a failed restore", set=backup_set.label)
        return (f"the cluster was brought back to the end of its WAL archive (the moment the apps stopped) from "
                f"backup set {backup_set.label}")
    return (f"bringing the cluster back to the end of its WAL archive failed too ({'; '.join(tried) or 'no backup set'}"
            f"): {p.pg_path} holds a partial restore and PostgreSQL cannot start on it; restore it with pgbackrest "
            "by hand (pgbackrest --stanza=... --delta restore), then put the safety dump back")


@task(name="restore the cluster to a point in time", cache_policy=NO_CACHE)
@recorded("recover.pitr-restore")
def restore_to_time(rb: Runbook, target: datetime) -> dict:
    """The apps are stopped: ``check`` archives the last WAL, the cluster is stopped, ``restore --delta
    --type=time`` puts back its files as of the newest backup before ``target`` with the WAL to replay up to
    ``target``, the cluster is started and promoted there."""
    require_pitr(rb)
    p = rb.backups.pitr
    started = time.monotonic()
    with postgres.session(rb.target.direct, "target.direct", autocommit=False) as conn:
        # Recovery to a time stops at the first commit after it; with none in the archive (nothing written
        # since the target time) PostgreSQL ends recovery "before the target was reached" and does not start.
        conn.execute("SELECT pg_current_xact_id()")
        conn.commit()
    with Remote(rb.ssh) as remote:
        run_pgbackrest(rb, remote, "check")  # every write until now is in the archive, that commit too
        remote.run(p.stop_command, timeout=p.timeout_s)
        try:
            run_pgbackrest(rb, remote, "restore", "--delta", "--type=time", f"--target={target.isoformat(sep=' ')}",
                           "--target-action=promote")
        except LiftoffError as exc:
            raise StepFailed(f"{one_line(str(exc))}; {_back_to_the_stop(rb, remote, str(exc))}") from None
        remote.run(p.start_command, timeout=p.timeout_s)
    waited = _wait_up(rb, recovered=True)
    Ledger(rb.state_dir).record_event(PHASE, "recover.pitr-restored", after={"target": target.isoformat()},
                                      flow_run_id=current_run_id())
    return {"summary": f"cluster restored to {target.isoformat()} in {round(time.monotonic() - started, 2)} s "
                       f"(replay and promotion {waited} s)", "seconds": round(time.monotonic() - started, 2)}
