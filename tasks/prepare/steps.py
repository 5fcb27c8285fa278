"""The prepare phase's steps: every access checked (``prepare.access``), and the apps' environment as it is
today kept with the runbook's state (``prepare.environment``), owner-only, shown as names only."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import ClassVar

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.checks import FAILED, CheckReport
from liftoff.errors import PreflightFailed
from liftoff.logs import get_logger
from liftoff.reports import check_table, markdown_table, md_cell, publish_markdown, publish_table
from liftoff.runbooks.model import Runbook
from liftoff.steps import recorded
from liftoff.tasks.prepare.access import check_access

PHASE = "prepare"
ENVIRONMENT_DIR = "environment"  # in state_dir: one snapshot per prepare run, <UTC time>.json, mode 0600

log = get_logger(phase=PHASE)


@dataclass(frozen=True)
class AccessReport(CheckReport):
    label: ClassVar[str] = "access checks"

    def error(self, gate: str) -> PreflightFailed:
        """What the operator must fix before anything starts (exit 2): a summary line, then one line per
        failed access with its fix."""
        failed = [line for line in self.lines if line.status == FAILED]
        return PreflightFailed("\n".join([
            f"prepare: {len(failed)} of {len(self.lines)} accesses failed ({', '.join(f.name for f in failed)})",
            *[f"{line.name}: {line.detail}" + (f"; fix: {line.fix}" if line.fix else "") for line in failed]]))

    def markdown(self) -> str:
        return "\n".join([f"# Access: {md_cell(self.summary())}", "", check_table(self.lines)])


def publish_access(report: AccessReport) -> None:
    publish_table("prepare-access", report.rows(), "Prepare: every access the runbook needs, one line each")
    publish_markdown("prepare-access", report.markdown())


@task(name="check every access", cache_policy=NO_CACHE)
@recorded("prepare.access", read_only=True)
def check_every_access(rb: Runbook, dry_run: bool = False) -> AccessReport:
    """One cheap request per system the runbook names; nothing changed (a probe object in the backup
    destination is written, read back and deleted; a dry run only lists it). Raises ``PreflightFailed``
    (exit 2), never a failed gate: a missing access is input to fix, not a difference found."""
    report = AccessReport(check_access(rb, write_probe=not dry_run))
    publish_access(report)
    log.info("access checks", ok=report.ok, failed=len(report.failures()), not_checked=len(report.not_checked()))
    if not report.ok:
        raise report.error(PHASE)
    return report


@task(name="keep the apps' environment", cache_policy=NO_CACHE)
@recorded("prepare.environment", read_only=True)
def keep_environment(rb: Runbook, dry_run: bool = False) -> dict:
    """Reads every app's whole environment through the runbook's switch driver (the env file over SSH, or
    Coolify's variables) and, unless ``dry_run``, writes it to ``state_dir/environment/<UTC time>.json``
    (directory 0700, file 0600, as the ledger). Returns and publishes names only, never a value."""
    if rb.cutover.switch is None:
        result = {"kept": None, "why": "the runbook switches no apps (cutover.switch): nothing to keep"}
        _publish_environment(result)
        return result
    from liftoff.tasks.cutover.switch import switch_driver

    with switch_driver(rb) as driver:
        env, where = driver.read_env(), driver.where
    names = {app: sorted(values) for app, values in env.items()}
    unreadable = {app: sorted(k for k, v in values.items() if v is None) for app, values in env.items()}
    result = {"where": where, "apps": names, "unreadable": {a: k for a, k in unreadable.items() if k}, "kept": None}
    if not dry_run:
        folder = rb.state_dir / ENVIRONMENT_DIR
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        path = folder / time.strftime("%Y%m%dT%H%M%SZ.json", time.gmtime())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"taken_at": time.time(), "where": where, "environment": env}, out, indent=2, sort_keys=True)
        result["kept"] = str(path)
    _publish_environment(result)
    log.info("apps' environment kept", where=result.get("where"), file=result["kept"],
             variables=sum(len(v) for v in names.values()))
    return result


def _publish_environment(result: dict) -> None:
    if result.get("apps") is None:
        publish_markdown("prepare-environment", f"# The apps' environment\n\n{result['why']}.")
        return
    rows = [{"app": app, "variables": len(keys), "names": ", ".join(keys),
             "not readable": ", ".join(result["unreadable"].get(app, [])) or "-"}
            for app, keys in result["apps"].items()]
    kept = (f"Kept in `{result['kept']}` (owner-only): the rollback and you have the environment from before "
            "the migration, whenever the cutover happens." if result["kept"] else "Dry run: read, not kept.")
    publish_markdown("prepare-environment", "\n".join([
        f"# The apps' environment ({result['where']})", "", kept, "", "Names only; no value is shown.", "",
        markdown_table(rows)]))
