"""The whole migration as one run: every access checked (prepare), the database phase, the storage phase,
then the cutover, which asks a named operator for an approval before it changes anything the apps see."""

from __future__ import annotations

import contextlib

from prefect import flow

from liftoff.flows.cutover import cutover
from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions, open_runbook
from liftoff.flows.prepare import prepare
from liftoff.flows.storage import migrate_storage
from liftoff.ledger import exclusive
from liftoff.phases import PHASES
from liftoff.reports import markdown_table, publish_markdown
from liftoff.runbooks.model import Runbook
from liftoff.flows.hooks import notify_on_failure


@flow(name="migrate", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def migrate(options: RunOptions) -> dict:
    """Succeeds when every access the runbook needs answered and the apps' environment was kept (prepare),
    then the database phase passed its gate, then the storage phase passed its gate (when the
    runbook configures storage), then the cutover succeeded: its checklist passed, a named operator approved
    it in its form (the one approval of this run, shown on the `cutover` sub-run before the write freeze),
    and the apps run on the target. A phase the runbook does not configure is skipped and named in the
    `migrate-plan` artifact. Each phase is a sub-run that resumes as when run alone."""
    runbook = open_runbook(options, "migrate")
    skipped = phases_not_configured(runbook)
    publish_migrate_plan(skipped, options.dry_run)
    done: dict = {"skipped": skipped, "prepare": prepare(options)}
    # One lock from the first write to the storage gate; the cutover takes it again once approved, so the
    # lock is not held while the run waits for a person (as when the cutover runs alone).
    with contextlib.nullcontext() if options.dry_run else exclusive(runbook.state_dir):
        done["database"] = migrate_database(options)
        if "storage" not in skipped:
            done["storage"] = migrate_storage(options)
    if "cutover" not in skipped:
        done["cutover"] = cutover(options)
    return done


def phases_not_configured(runbook: Runbook) -> dict[str, str]:
    """Phases this runbook leaves out, with why. Storage half-configured is not skipped: its own flow names
    what is missing."""
    skipped = {}
    if not runbook.storage.wanted:
        skipped["storage"] = "no storage.source / storage.target in the runbook"
    if runbook.cutover.switch is None:
        skipped["cutover"] = "no cutover.switch in the runbook: the apps stay on the source"
    return skipped


def publish_migrate_plan(skipped: dict[str, str], dry_run: bool) -> None:
    rows = []
    for phase in PHASES:
        if phase.name in skipped:
            runs = f"skipped: {skipped[phase.name]}"
        elif phase.name == "prepare":
            runs = "yes, first: stops here (exit 2) on an access that fails"
        elif phase.name == "cutover":
            runs = "yes: pauses for your approval on its `cutover` sub-run (Resume) before the write freeze"
        else:
            runs = "yes, up to its gate"
        rows.append({"phase": phase.name, "what": phase.title, "runs": runs})
    publish_markdown("migrate-plan", "\n".join([
        f"# Migration plan{' (dry run: nothing written)' if dry_run else ''}",
        "Each phase runs as its own sub-run, in this order; a failed gate stops the run before the next phase.",
        "", markdown_table(rows)]))
