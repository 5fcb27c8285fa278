"""The plan's Phase 0 (the runbook as a whole): every access the migration will need, checked at once before
anything changes, and the apps' environment as it is today kept with the runbook's state."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.hooks import notify_on_failure
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.tasks.prepare.steps import PHASE, check_every_access, keep_environment


@flow(name="prepare", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def prepare(options: RunOptions) -> dict:
    """Succeeds when every system the runbook names answers with the access it gives: the source database and
    its Storage (S3 keys or service key), the target database directly and through PgBouncer, Redis, the
    target S3 server, the backup destination (a probe object written, read back and deleted), SSH with the
    pinned host key, Coolify's token (it reads each application), the public DNS record; one line each,
    "not checked" for what the runbook does not name. Then the apps' whole environment is read through the
    switch driver and kept in state_dir/environment (owner-only), shown as names only. A failed access
    stops the run with exit 2, one line per access and its fix. A dry run checks the same (listing the backup
    destination instead of writing to it) and keeps nothing."""
    runbook = open_runbook(options, PHASE)
    access = check_every_access(runbook, options.dry_run)
    environment = keep_environment(runbook, options.dry_run)
    return {"access": access.summary(), "environment": environment.get("kept"),
            "apps": environment.get("apps") or {}}
