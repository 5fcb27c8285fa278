"""Backups (the runbook's `backups` section): the migrated database and its files to the backup bucket, every
database backup proven by restoring it, and retention. ``backup`` runs on the runbook's schedules
(``backups.schedules``: daily 03:00 and hourly 09:00-18:00 on weekdays); ``restore-test`` re-proves the newest
backup alone."""

from __future__ import annotations

from prefect import flow
from pydantic import Field

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.errors import GateFailed
from liftoff.ledger import exclusive
from liftoff.reports import markdown_table, publish_markdown
from liftoff.tasks.backup.steps import (
    BackupPlan,
    RestoreTestReport,
    apply_retention,
    backup_files,
    make_backup,
    plan_backup,
    require_backups,
    run_restore_test,
)
from liftoff.flows.hooks import notify_on_failure
from liftoff.tasks.backup.tiers import tier_database, tier_of, tier_redis, tier_retention, where_label

# A backup reads target.direct and writes only to the backup bucket and the ledger: it takes its own lock, not
# the runbook's, so the daily backup runs while a migration (or a cutover) holds the runbook's.
BACKUP_LOCK = "backup"


class BackupOptions(RunOptions):
    tier: str | None = Field(None, description="One tier of backups.tiers (its schedule fills this in): back up "
                             "what it names to where it says and apply its retention. Empty: the database and "
                             "the files to the destination, restore-tested, with retention_days.",
                             examples=["daily"])


@flow(name="backup", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def backup(options: BackupOptions) -> dict:
    """With a tier: succeeds when what the tier names (database, files, Redis) is backed up where it says,
    with its SHA-256 and (database) its counts, and the tier's backups older than its keep are deleted.
    Without: succeeds when a new pg_dump -Fc of target.direct (made by a pg_dump at least as new as the server) is in
    the backup bucket with its size and SHA-256 as metadata and every table's row count from its snapshot
    beside it; the target S3 server's buckets are in the backup bucket (new and changed objects copied, MD5
    proven); the newest backup passed its restore test (SHA-256, pg_dump version, restored into a scratch
    database, row counts as at backup time; the RTO recorded); and then backups older than
    backups.retention_days were deleted, the newest backups.keep_newest always kept. A backup that fails its
    restore test fails the run, and retention does not run."""
    runbook = open_runbook(options, "backup")
    require_backups(runbook)
    if getattr(options, "tier", None):
        return back_up_tier(runbook, options.tier, options.dry_run)
    plan = plan_backup(runbook)
    publish_backup_plan(plan, options.dry_run)
    if options.dry_run:
        return {"dry_run": True, "key": plan.key, "files_to_copy": sum(len(f.to_copy) for f in plan.files),
                "would_delete": [b.key for b in plan.would_delete]}
    with exclusive(runbook.state_dir, lock=BACKUP_LOCK):
        made = make_backup(runbook)
        files = backup_files(runbook)
        try:
            report = run_restore_test(runbook, made["key"])  # this run's backup, whatever the clocks say
        except GateFailed as failed:  # retention does not run after a failed restore test
            publish_backup_summary(made, files, failed.report, "not run: the restore test failed")
            raise
        retention = apply_retention(runbook)
    publish_backup_summary(made, files, report, retention["summary"])
    return {"backup": made, "files": files, "restore_test": {"key": report.key, "rto_s": report.rto_s},
            "retention": retention}


@flow(name="restore-test", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def restore_test(options: RunOptions) -> dict:
    """Succeeds when the newest backup in the backup bucket downloads with the SHA-256 its metadata records,
    was made by a pg_dump at least as new as its server, restores into backups.restore_test_database on the
    target server without an error, and every table holds the rows counted when it was made; the scratch
    database is dropped afterwards, also on failure. Publishes the restore duration (the RTO)."""
    runbook = open_runbook(options, "backup")
    require_backups(runbook)
    if options.dry_run:
        publish_markdown("restore-test-summary", "# Restore test (dry run)\n\nWould download the newest backup of "
                         f"bucket {runbook.backups.destination.bucket}, check it, restore it into "
                         f"{runbook.backups.restore_test_database} and drop that database again.")
        return {"dry_run": True}
    with exclusive(runbook.state_dir, lock=BACKUP_LOCK):
        report = run_restore_test(runbook)
    return {"key": report.key, "rto_s": report.rto_s, "download_s": report.download_s,
            "restore_s": report.restore_s, "bytes": report.bytes, "tables": len(report.tables)}


def back_up_tier(runbook, name: str, dry_run: bool) -> dict:
    tier = tier_of(runbook, name)
    where = where_label(runbook, tier)
    if dry_run:
        publish_markdown("backup-plan", f"# Backup tier {tier.name} (dry run: nothing written)\n\n"
                         f"Would back up {', '.join(tier.what)} to {where} and delete this tier's backups older "
                         f"than {tier.keep}.")
        return {"dry_run": True, "tier": tier.name, "what": tier.what, "where": where}
    done: dict = {}
    with exclusive(runbook.state_dir, lock=BACKUP_LOCK):
        if "database" in tier.what:
            done["database"] = tier_database(runbook, tier.name)
        if "files" in tier.what:
            done["files"] = backup_files(runbook, keep_replaced=True)
        if "redis" in tier.what:
            done["redis"] = tier_redis(runbook, tier.name)
        done["retention"] = tier_retention(runbook, tier.name)
    publish_markdown("backup-summary", "\n".join([f"# Backup tier {tier.name}: done", "", *[
        f"- **{what}**: {result['summary']}" for what, result in done.items()]]))
    return {"tier": tier.name, "where": where, **done}


def publish_backup_plan(plan: BackupPlan, dry_run: bool) -> None:
    md = [f"# Backup plan{' (dry run: nothing written)' if dry_run else ''}", "",
          f"- **database**: {plan.server}, dumped by {plan.pg_dump} to `{plan.key}`",
          f"- **backups in the bucket**: {len(plan.backups)}", "",
          "## Files", markdown_table([f.row for f in plan.files]) if plan.files else "No buckets to back up.", "",
          "## Retention would delete",
          markdown_table([{"backup": b.key, "bytes": b.size, "last modified (epoch)": int(b.last_modified)}
                          for b in plan.would_delete]) if plan.would_delete else "nothing"]
    publish_markdown("backup-plan", "\n".join(md))


def publish_backup_summary(made: dict, files: dict, report: RestoreTestReport, retention: str) -> None:
    publish_markdown("backup-summary", "\n".join([
        f"# Backup {'PASSED' if report.ok else 'FAILED'}", "",
        f"- **database**: {made['summary']}",
        f"- **files**: {files['summary']}",
        f"- **restore test**: {report.summary()}",
        f"- **retention**: {retention}",
    ]))
