"""The ``liftoff`` command: run a phase flow, validate a runbook, run the local demo.

Exit codes: 0 success; 2 bad input (runbook, environment, a server refused); 3 a verification gate found
a difference; 4 an approval rejected, unconfirmed or not given in time (nothing changed); 1 anything
unexpected. Errors are printed as one line each, never as a stack trace.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from liftoff import errors
from liftoff.redaction import redact

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Liftoff: a migration runbook as Prefect flows that verify themselves and can be resumed.")
out = Console(soft_wrap=True)
if not out.is_terminal:  # logs and CI: wide enough that report tables are not cut
    out = Console(soft_wrap=True, width=160)
err = Console(stderr=True, soft_wrap=True)


from liftoff.phases import all_flows  # noqa: E402  (the registry imports no flow)


def _load_commands() -> None:
    """Commands other distributions (or packages) add, by the entry point group ``liftoff.commands``: each
    is ``register(app)``. The demo is one (``liftoff_sandbox.demo``): the product imports no sandbox."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="liftoff.commands"):
        entry.load()(app)

# `liftoff run NAME`: every flow of every phase in the registry.
FlowName = Enum("FlowName", {name: name for name in all_flows()}, type=str)


def _flow(name):
    return all_flows()[FlowName(name).value].load()


def _quiet_prefect_console() -> None:
    """Prefect's console handler prints tracebacks of failed runs; the CLI prints one line instead. The run
    logs still reach the Prefect API (and UI) in full."""
    for logger in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)] + [logging.root]:
        if isinstance(logger, logging.Logger):
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    logger.removeHandler(h)


@contextmanager
def _progress_display():
    from liftoff import reports

    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TextColumn("{task.fields[note]}"), console=err, transient=False,
                  disable=not err.is_terminal) as progress:
        def listener(step: str, percent: float, message: str) -> None:
            if step not in bars:
                bars[step] = progress.add_task(step, total=100, note="")
            progress.update(bars[step], completed=percent, note=message[:60])

        unsubscribe = reports.subscribe(listener)
        try:
            yield
        finally:
            unsubscribe()


def fail(exc: BaseException) -> "typer.Exit":
    if isinstance(exc, errors.LiftoffError):
        for line in str(exc).splitlines():
            err.print(f"[red]error:[/red] {redact(line)}", highlight=False, markup=True)
        return typer.Exit(exc.exit_code)
    first = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    err.print(f"[red]unexpected error:[/red] {type(exc).__name__}: {first} (full detail in the Prefect run logs)",
              highlight=False)
    return typer.Exit(errors.EXIT_UNEXPECTED)


def results_dir(state_dir: Path) -> Path:
    """Where Prefect keeps the results it persists for this runbook's runs: ``STATE_DIR/prefect-results``,
    mode 0700. Prefect writes a failed flow run's exception (pickled; it names tables, keys, hosts) to its
    local result storage whatever the persistence settings, by default into ``~/.prefect/storage`` with mode
    0644, outside the runbook's state dir. Liftoff persists nothing else: its tasks use no cache. A state dir
    that cannot be created: ``~/.liftoff/prefect-results`` (0700), and the flow says what is wrong with it."""
    try:
        return _private(state_dir / "prefect-results")
    except OSError:  # the flow's own checks name an unusable state_dir, in one line (exit 2)
        return _private(Path.home() / ".liftoff" / "prefect-results")


def _private(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


# `liftoff run`'s options that fill in a field of one flow's form (``--backup`` -> RecoverOptions.backup)
FORM_FLAGS = {"backup": "--backup", "target_time": "--target-time", "tier": "--tier", "backup_type": "--backup-type",
              "force_reason": "--force-reason"}


def flow_options(name: str, options_type, runbook: Path, dry_run: bool, fields: dict):
    """The flow's own options (a form with more fields than RunOptions: recover, backup, pitr) from the
    command line; a flag the flow's form lacks, or a value its field refuses, is one line naming the flag."""
    from pydantic import ValidationError

    given = {k: v for k, v in fields.items() if v is not None}
    for key in given:
        if key not in options_type.model_fields:
            takers = sorted(f.name for f in all_flows().values() if key in _options_type(f.load()).model_fields)
            raise errors.LiftoffError(f"{FORM_FLAGS[key]} does not apply to {name}; it is for: {', '.join(takers)}")
    try:
        return options_type(runbook=str(runbook.resolve()), dry_run=dry_run, **given)
    except ValidationError as exc:
        problem = exc.errors()[0]
        flag = FORM_FLAGS.get(str(problem["loc"][0]), str(problem["loc"][0])) if problem["loc"] else name
        raise errors.LiftoffError(f"{flag} {given.get(problem['loc'][0], '')!s}: {problem['msg']}"
                                  + (" (ISO 8601 with the time zone, e.g. 2026-12-07T10:15:00+01:00)"
                                     if flag == "--target-time" else "")) from None


def _options_type(flow):
    from typing import get_type_hints

    from liftoff.flows.options import RunOptions

    return get_type_hints(flow.fn).get("options", RunOptions)  # a flow with more parameters (recover) takes its own


def run_flow(name: FlowName, runbook: Path, dry_run: bool, **fields) -> dict:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from liftoff.logs import configure
    from liftoff.runbooks.model import load_runbook

    configure()
    rb = load_runbook(runbook)  # bad input fails here, before any run starts
    flow = _flow(name)
    options = flow_options(name.value, _options_type(flow), runbook, dry_run, fields)
    _quiet_prefect_console()
    with _progress_display(), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results_dir(rb.state_dir)}):
        return flow(options)


def print_summaries(keys=("preflight-summary", "export-plan", "restore-plan", "verify-summary")) -> None:
    """The markdown reports the last run published (the flow's keys in the registry)."""
    from liftoff.reports import last_markdown

    for key in keys:
        md = last_markdown(key)
        if md:
            from rich.markdown import Markdown

            out.print(Markdown(md))


@app.command()
def run(
    flow: FlowName = typer.Argument(..., help="a flow of a phase: " + ", ".join(all_flows())),
    runbook: Path = typer.Option(..., "--runbook", "-r", help="the runbook file (YAML)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="plan and report; write nothing"),
    backup: str = typer.Option(None, "--backup", help="recover: the backup to restore, its object name in the "
                               "bucket (a dry run lists them); default the newest whose restore test did not fail"),
    target_time: str = typer.Option(None, "--target-time", help="recover: point-in-time recovery (backups.pitr) "
                                    "to this moment, ISO 8601 with its time zone, e.g. 2026-12-07T10:15:00+01:00"),
    tier: str = typer.Option(None, "--tier", help="backup: back up one tier of backups.tiers only"),
    backup_type: str = typer.Option(None, "--backup-type", help="pitr: full, diff or none"),
    force_reason: str = typer.Option(None, "--force-reason", help="decommission: run without a passing watch, "
                                     "for this reason (recorded in the ledger and the manifest)"),
):
    """Run one flow of a phase under Prefect, against the runbook's servers (`liftoff status` shows where
    each phase stands). The form fields of the UI are options here: `--backup`, `--target-time` (recover),
    `--tier` (backup), `--backup-type` (pitr), `--force-reason` (decommission).

    Exit 0 on success, 3 when a verification gate finds a difference, 2 for bad input (runbook,
    environment, a server that refused), 4 when an approval was rejected, left unconfirmed or not given in
    time (nothing changed), 1 for anything unexpected."""
    keys = all_flows()[flow.value].summaries
    try:
        run_flow(flow, runbook, dry_run, backup=backup, target_time=target_time, tier=tier, backup_type=backup_type,
                 force_reason=force_reason)
    except Exception as exc:  # every error ends as one line and an exit code
        print_summaries(keys)
        raise fail(exc) from None
    print_summaries(keys)
    out.print(f"[green]{flow.value}: done{' (dry run: nothing written)' if dry_run else ''}[/green]")


@app.command()
def validate(runbook: Path = typer.Argument(..., help="the runbook file (YAML)")):
    """Check a runbook file: one line per problem, naming the file, the key path and what is expected.
    Exit 0 when valid, 2 otherwise."""
    from liftoff.runbooks.model import load_runbook

    try:
        rb = load_runbook(runbook)
    except errors.LiftoffError as exc:
        raise fail(exc) from None
    out.print(f"{runbook}: valid runbook '{rb.name}' (source {rb.source.where}, target {rb.target.direct.where})")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


@app.command()
def status(runbook: Path = typer.Option(..., "--runbook", "-r", help="the runbook file (YAML)")):
    """Print, per phase, each step's state from the runbook's ledger (status, when, how long, which flow
    run) and the latest verification gate with its age. Reads the ledger only (with ``final_sync: replicate``,
    also Liftoff's slots and publications on the source, with the WAL each slot keeps); exit 0."""
    import time

    from rich.table import Table

    from liftoff.ledger import Ledger
    from liftoff.phases import PHASES
    from liftoff.runbooks.model import load_runbook

    try:
        rb = load_runbook(runbook)
    except errors.LiftoffError as exc:
        raise fail(exc) from None
    if not (rb.state_dir / "ledger.sqlite").exists():
        out.print(f"{rb.name}: nothing has run yet (no ledger in {rb.state_dir})")
        return
    ledger = Ledger(rb.state_dir)
    steps = ledger.steps()
    for phase in PHASES:
        table = Table(title=f"{phase.name}: {phase.title}", title_justify="left")
        for column in ("step", "status", "started", "seconds", "flow run", "detail"):
            table.add_column(column)
        for name in phase.steps:
            r = steps.get(name)
            if r is None:
                table.add_row(name, "not run", "", "", "", "")
                continue
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at)) if r.started_at else ""
            detail = r.detail.get("reason") or r.detail.get("summary") or ""
            table.add_row(name, r.status, started, f"{r.seconds:.1f}" if r.seconds is not None else "",
                          r.flow_run_id or "", redact(str(detail))[:80])
        if phase.steps:
            out.print(table)
        for name in (phase.gate, *phase.other_gates) if phase.gate else ():
            gate = ledger.latest_gate(name)
            if gate is None:
                out.print(f"latest {name} gate: never run")
            else:
                verdict = "[green]passed[/green]" if gate.passed else "[red]FAILED[/red]"
                out.print(f"latest {name} gate: {verdict} {_age(gate.age_seconds)} (flow run "
                          f"{gate.flow_run_id or 'local'}): {redact(gate.summary)}")
    if rb.cutover.final_sync == "replicate":  # a slot left on the source keeps WAL until its disk is full
        from liftoff.flows.replication import list_on_source

        try:
            found = list_on_source(rb)
        except errors.LiftoffError as exc:
            out.print(f"Liftoff's replication slots on the source: not read ({redact(str(exc))})")
        else:
            slots = ", ".join(f"{s['slot']} ({'active' if s['active'] else 'inactive'}, keeps "
                              f"{s['retained WAL bytes']} bytes of WAL)" for s in found["slots"]) or "none"
            out.print(f"Liftoff's replication slots on the source: {slots}; publications: "
                      f"{', '.join(found['publications']) or 'none'} (`liftoff run cleanup` drops them)")


@app.command()
def adopt(runbook: Path = typer.Option(..., "--runbook", "-r", help="the runbook file (YAML)")):
    """Hand the ledger in the runbook's state_dir over to this runbook, when it continues the migration another
    runbook started there (renamed, or a server moved). Prints the previous owner; exit 0. Each runbook
    otherwise refuses a ledger another one wrote (exit 2, naming both)."""
    from liftoff.ledger import Ledger, setup_of
    from liftoff.runbooks.model import load_runbook

    try:
        rb = load_runbook(runbook)
    except errors.LiftoffError as exc:
        raise fail(exc) from None
    if not (rb.state_dir / "ledger.sqlite").exists():
        out.print(f"{rb.name}: no ledger in {rb.state_dir}: nothing to adopt")
        return
    new = setup_of(rb)
    before = Ledger(rb.state_dir).adopt(new)
    out.print(f"{rb.state_dir}: the ledger of {before.describe() if before else 'no recorded runbook'} now belongs "
              f"to {new.describe()}", highlight=False)


@app.command()
def serve(
    runbook: Path = typer.Option(None, "--runbook", "-r", help="fill every form with this runbook and run its "
                                 "rehearsal on rehearsal.schedule"),
    port: int = typer.Option(4200, help="port of the local Prefect server and its UI"),
):
    """Run Liftoff from the Prefect UI: start a local Prefect server (embedded SQLite in ~/.liftoff/prefect,
    analytics off) unless PREFECT_API_URL is set, register a deployment per phase flow plus `migrate`,
    `rehearsal` and `rollback` (the emergency one), print the UI address, and run what is started there.
    Ctrl-C or SIGTERM stops the runs in progress, then the server it started."""
    import signal

    from liftoff.deployments.serve import serve_deployments, start_local_server

    def interrupted(*_):
        raise KeyboardInterrupt  # until Prefect's runner takes SIGTERM over, so the server is still stopped

    server = None
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        results = Path.home() / ".liftoff"  # forms may name any runbook: one private place for all
        if runbook is not None:
            from liftoff.runbooks.model import load_runbook

            results = load_runbook(runbook).state_dir  # a bad runbook fails here, before a server starts
        # the runs start in processes of their own, which read it from the environment
        os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(results_dir(results))
        if not os.environ.get("PREFECT_API_URL"):
            home = Path.home() / ".liftoff" / "prefect"
            err.print(f"starting a local Prefect server on 127.0.0.1:{port} (data in {home}) ...")
            server = start_local_server(port, home)
            os.environ.update(server.env())  # before Prefect is imported: it reads its settings once
        ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
        out.print(f"Prefect UI: {ui}/deployments (Ctrl-C stops the server and the runs it started)", highlight=False)
        serve_deployments(str(runbook.resolve()) if runbook else None)
    except errors.LiftoffError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            err.print("stopping the local Prefect server ...")
            server.stop()


_load_commands()

if __name__ == "__main__":
    sys.exit(app())
