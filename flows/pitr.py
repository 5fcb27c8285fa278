"""Point-in-time recovery with pgBackRest (``backups.pitr``): the target's WAL archived into the backup bucket,
full and differential backups on their schedules, and pgBackRest's own ``check`` as the gate. The recovery to
a point in time is ``recover`` with a target time."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import Field

from liftoff.flows.backup import BACKUP_LOCK
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import exclusive
from liftoff.reports import publish_markdown
from liftoff.flows.hooks import notify_on_failure
from liftoff.tasks.backup.pitr import configure_pitr, pitr_backup, pitr_check, pitr_rows, require_pitr


class PitrOptions(RunOptions):
    backup_type: Literal["full", "diff", "none"] = Field(
        "diff", description="full or differential (diff) backup after the configuration; none: configure and "
        "check only. The schedules fill this in (backups.pitr.full_schedule, diff_schedule)")


@flow(name="pitr", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def pitr(options: PitrOptions) -> dict:
    """Succeeds when pgBackRest on the VPS archives the target's WAL into the backup bucket (its config written,
    archive_mode on, the stanza created), the backup asked for is in the repository (pgBackRest expired what
    is older than backups.pitr.retention_days), and ``pgbackrest check`` passed with a backup to recover from."""
    runbook = open_runbook(options, "backup")
    require_pitr(runbook)
    if options.dry_run:
        publish_markdown("pitr-summary", f"# Point-in-time recovery (dry run: nothing changed)\n\nWould configure "
                         f"stanza {runbook.backups.pitr.stanza} on {runbook.ssh.host}, archive WAL to bucket "
                         f"{runbook.backups.destination.bucket}, take a {options.backup_type} backup and run "
                         "pgbackrest check.")
        return {"dry_run": True}
    with exclusive(runbook.state_dir, lock=BACKUP_LOCK):
        configured = configure_pitr(runbook)
        made = pitr_backup(runbook, options.backup_type) if options.backup_type != "none" else None
        report = pitr_check(runbook, configured, made)
    rows = pitr_rows(report)
    return {"configured": configured, "backup": made, "checks": rows}
