"""Liftoff's flows as Prefect deployments, served by this process: an operator starts a run from the UI with
a form rendered from ``RunOptions`` (runbook path, dry run), and this process runs it.

    liftoff serve [--runbook R]      # starts a local Prefect server too; see liftoff/cli.py
    liftoff-serve [--runbook R]      # against $PREFECT_API_URL (or: python -m liftoff.deployments.serve)

One deployment per flow of every phase in the registry (named as in ``liftoff run NAME``; ``database`` keeps
its deployment's old name, ``migrate-database``), plus ``migrate`` (every phase in order), ``rehearsal`` (on
the runbook's cron) and ``rollback`` marked for emergencies.
``prefect.serve`` runs them in this process: no work pool, no separate worker (README, "Run it from the
Prefect UI", says why).
"""

from __future__ import annotations

import argparse
import inspect
import socket
import sys
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from liftoff.errors import LiftoffError, RunbookInvalid
from liftoff.phases import PHASES, PhaseFlow, all_flows

MIGRATE = all_flows()["migrate"]
REHEARSAL = all_flows()["rehearsal"]
BACKUP = all_flows()["backup"]
RESTORE_TEST = all_flows()["restore-test"]
PITR = all_flows()["pitr"]
EMERGENCY = "rollback"
EMERGENCY_NOTE = ("EMERGENCY: press this one when the cutover went wrong. It puts the apps back on the source "
                  "and makes the source writable again, from the ledger's record of what the cutover changed. ")

# Deployment name -> (flow, phase): every flow of every phase in the registry; the composed database flow
# keeps the name its deployment has always had.
FLOWS = {("migrate-database" if f.name == "database" else f.name): (f, phase.name)
         for phase in PHASES for f in phase.flows}
# Deployment name -> (flow, tags): the phase flows, and the runs that span phases.
DEPLOYMENTS: dict[str, tuple[PhaseFlow, list[str]]] = {
    **{name: (f, ["liftoff", phase]) for name, (f, phase) in FLOWS.items()},
    MIGRATE.name: (MIGRATE, ["liftoff", "migrate"]),  # spans every phase: tagged by what it is
    REHEARSAL.name: (REHEARSAL, ["liftoff", "rehearsal"]),
}
DEPLOYMENTS[EMERGENCY] = (DEPLOYMENTS[EMERGENCY][0], ["liftoff", "cutover", "emergency"])
# Deployments that write nothing; every other one runs once at a time: a second start while one runs is
# cancelled by Prefect (CANCEL_NEW), not queued behind it, besides the runbook's file lock (liftoff.ledger.exclusive)
READ_ONLY = {"preflight", "verify", "verify-storage", "health", "security", "replication-lag"}
RECOVER = "recover"
RECOVER_NOTE = ("EMERGENCY: press this one when the database must come back from a backup. It shows what will "
                "be lost and asks before it stops the apps. ")
DEPLOYMENTS[RECOVER] = (DEPLOYMENTS[RECOVER][0], ["liftoff", "backup", "emergency"])
DECOMMISSION = "decommission"
DECOMMISSION_NOTE = ("AFTER THE WATCH: archives Supabase into the backup bucket, proves it, then asks you to type "
                     "the source's host before it drops Liftoff's slots and publications there. ")


def deployments(runbook: str | None = None, only: list[str] | None = None) -> list:
    """The RunnerDeployments to serve. With ``runbook`` every form starts filled with that runbook and the
    rehearsal runs on its ``rehearsal.schedule`` in ``rehearsal.timezone``; without it the rehearsal has no
    schedule (a scheduled run needs a runbook)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    from liftoff.runbooks.model import resolve_runbook_path

    path = str(resolve_runbook_path(runbook)) if runbook else None
    wanted = configured_phases(path)
    result = []
    for name, (entry, tags) in DEPLOYMENTS.items():
        if only and name not in only:
            continue
        if wanted is not None and name in FLOWS and FLOWS[name][1] not in wanted:
            continue  # a phase this runbook does not configure: no deployment to press by mistake
        if wanted is not None and entry is PITR and not _pitr_configured(path):
            continue  # the backup phase without backups.pitr: no point-in-time recovery to set up
        try:
            flow = entry.load()
        except ImportError as exc:
            if entry is not REHEARSAL:
                raise
            warn(f"rehearsal: not deployed: {entry.target} does not import ({type(exc).__name__}: {exc})")
            continue
        defaults = {"options": {"runbook": path}} if path and "options" in inspect.signature(flow.fn).parameters else None
        schedules = None
        if entry is REHEARSAL:
            schedules = rehearsal_schedules(path)
        elif entry is BACKUP:
            schedules = backup_schedules(path)
        elif entry is RESTORE_TEST:
            schedules = restore_test_schedules(path)
        elif entry is PITR:
            schedules = pitr_schedules(path)
        limit = None if name in READ_ONLY else ConcurrencyLimitConfig(limit=1, collision_strategy="CANCEL_NEW")
        result.append(flow.to_deployment(name=name, description=describe(name, flow), tags=tags,
                                         parameters=defaults, schedules=schedules, concurrency_limit=limit))
    return result


def _pitr_configured(runbook_path: str) -> bool:
    from liftoff.runbooks.model import load_runbook

    rb = load_runbook(runbook_path)
    return rb.backups is not None and rb.backups.pitr is not None


def configured_phases(runbook_path: str | None) -> set[str] | None:
    """The phases ``runbook_path`` configures (None without a runbook: every phase is deployed): the database,
    health, prepare and migration phases always; storage with ``storage.source``/``target``; the cutover (and its
    rollback) with ``cutover.switch``; the pooler with ``pooler``; the cache with ``cache`` or ``target.redis``;
    backups with ``backups``; security with ``ssh``; the tuning gate with ``tuning``; the watch with
    ``cutover.switch`` (it watches a kept cutover); the decommission with ``cutover.switch`` and ``backups`` (the
    archive goes to backups.destination)."""
    if runbook_path is None:
        return None
    from liftoff.runbooks.model import load_runbook

    rb = load_runbook(runbook_path)
    phases = {"prepare", "database", "health", "migration"}
    phases |= {name for name, on in (("storage", rb.storage.wanted), ("cutover", rb.cutover.switch is not None),
                                     ("pooler", rb.pooler is not None),
                                     ("cache", rb.cache is not None or rb.target.redis is not None),
                                     ("backup", rb.backups is not None), ("security", rb.ssh is not None),
                                     ("tuning", rb.tuning is not None),
                                     ("watch", rb.cutover.switch is not None),
                                     ("decommission", rb.cutover.switch is not None and rb.backups is not None))
                  if on}
    return phases


def describe(name: str, flow) -> str:
    """The flow's docstring as one paragraph (what a run guarantees when it succeeds)."""
    text = " ".join(inspect.cleandoc(flow.__doc__ or "").split())
    return {EMERGENCY: EMERGENCY_NOTE, RECOVER: RECOVER_NOTE, DECOMMISSION: DECOMMISSION_NOTE}.get(name, "") + text


def rehearsal_schedules(runbook_path: str | None) -> list:
    from prefect.schedules import Cron

    from liftoff.runbooks.model import load_runbook

    if runbook_path is None:
        warn("rehearsal: not scheduled: start with --runbook R to run it on R's rehearsal.schedule")
        return []
    rehearsal = load_runbook(runbook_path).rehearsal
    try:
        ZoneInfo(rehearsal.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise RunbookInvalid(f"{runbook_path}: rehearsal.timezone: expected an IANA time zone such as "
                             f"Europe/Berlin, got {rehearsal.timezone!r}") from None
    try:
        return [Cron(rehearsal.schedule, timezone=rehearsal.timezone)]
    except ValueError:
        raise RunbookInvalid(f"{runbook_path}: rehearsal.schedule: expected a cron expression such as "
                             f"'0 3 * * 0' (Sundays 03:00), got {rehearsal.schedule!r}") from None


def backup_schedules(runbook_path: str | None) -> list:
    """The backup deployment's schedules: each cron line of the runbook's ``backups.schedules`` in
    ``backups.timezone`` (the plan: daily 03:00, hourly 09:00-18:00 on weekdays); none without a runbook or
    without a ``backups`` section."""
    from prefect.schedules import Cron

    from liftoff.runbooks.model import load_runbook

    if runbook_path is None:
        return []
    backups = load_runbook(runbook_path).backups
    if backups is None:
        return []
    try:
        ZoneInfo(backups.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise RunbookInvalid(f"{runbook_path}: backups.timezone: expected an IANA time zone such as "
                             f"Europe/Berlin, got {backups.timezone!r}") from None
    if backups.tiers:  # one schedule per tier, which names its tier
        return [Cron(t.schedule, timezone=backups.timezone, slug=f"tier-{t.name}",
                     parameters={"options": {"runbook": runbook_path, "tier": t.name}}) for t in backups.tiers]
    schedules = []
    for i, line in enumerate(backups.schedules):
        try:
            schedules.append(Cron(line, timezone=backups.timezone))
        except ValueError:
            raise RunbookInvalid(f"{runbook_path}: backups.schedules[{i}]: expected a cron expression such as "
                                 f"'0 3 * * *' (daily 03:00), got {line!r}") from None
    return schedules


def restore_test_schedules(runbook_path: str | None) -> list:
    """With backups.tiers the restore test has its own schedule (``backups.restore_test_schedule``, daily by
    default); without tiers every backup run restore-tests its backup and this deployment runs on demand."""
    from prefect.schedules import Cron

    from liftoff.runbooks.model import load_runbook

    if runbook_path is None:
        return []
    backups = load_runbook(runbook_path).backups
    if backups is None or not backups.tiers:
        return []
    return [Cron(backups.restore_test_schedule, timezone=backups.timezone)]


def pitr_schedules(runbook_path: str | None) -> list:
    """pgBackRest's full and differential backups on ``backups.pitr``'s crons (the backup type a parameter)."""
    from prefect.schedules import Cron

    from liftoff.runbooks.model import load_runbook

    if runbook_path is None:
        return []
    backups = load_runbook(runbook_path).backups
    if backups is None or backups.pitr is None:
        return []
    return [Cron(cron, timezone=backups.timezone, slug=f"pitr-{kind}",
                 parameters={"options": {"runbook": runbook_path, "backup_type": kind}})
            for kind, cron in (("full", backups.pitr.full_schedule), ("diff", backups.pitr.diff_schedule))]


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def start_local_server(port: int, home: Path):
    """A ``prefect server start`` on 127.0.0.1:``port`` with its embedded SQLite in ``home`` (kept between
    starts: the UI's run history), or the database $PREFECT_API_DATABASE_CONNECTION_URL names (the server
    inherits the environment), analytics off, the UI pointed at this port's API."""
    from liftoff.prefect_server import PrefectServer

    class KeptHome(PrefectServer):
        def stop(self, remove: bool = False) -> None:  # the sandbox's default removes its temp home
            super().stop(remove=False)

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise LiftoffError(f"127.0.0.1:{port} is in use (another Prefect server?): pick a free port with "
                               "--port, or export PREFECT_API_URL to use the server already there") from None
    home.mkdir(parents=True, exist_ok=True)
    try:
        return KeptHome(home=home, port=port).start()
    except RuntimeError as exc:
        raise LiftoffError(str(exc)) from None


def serve_deployments(runbook: str | None = None, only: list[str] | None = None) -> None:
    """Registers the deployments on $PREFECT_API_URL and runs what is started from them until SIGTERM or
    Ctrl-C; on the way out Prefect pauses their schedules (nothing would run them), and registering again
    resumes them."""
    from prefect import serve

    from liftoff.logs import configure

    configure()
    serve(*deployments(runbook, only))


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve Liftoff's flows as Prefect deployments.")
    parser.add_argument("--runbook", help="fill every form with this runbook; schedule its rehearsal")
    parser.add_argument("--only", nargs="*", choices=sorted(DEPLOYMENTS), help="serve only these")
    args = parser.parse_args()
    try:
        serve_deployments(args.runbook, args.only)
    except LiftoffError as exc:
        from liftoff.redaction import redact

        for line in str(exc).splitlines():
            print(f"error: {redact(line)}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
