"""The ``liftoff`` command: run a phase flow, validate a runbook, run the local demo.

Exit codes: 0 success; 2 bad input (runbook, environment, a server refused); 3 a verification gate found
a difference; 1 anything unexpected. Errors are printed as one line each, never as a stack trace.
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


class FlowName(str, Enum):
    preflight = "preflight"
    export = "export"
    restore = "restore"
    verify = "verify"
    database = "database"


def _flow(name: FlowName):
    if name is FlowName.preflight:
        from flows.preflight import preflight as f
    elif name is FlowName.export:
        from flows.export import export_database as f
    elif name is FlowName.restore:
        from flows.restore import restore_database as f
    elif name is FlowName.verify:
        from flows.verify import verify_database as f
    else:
        from flows.database import migrate_database as f
    return f


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


def _fail(exc: BaseException) -> "typer.Exit":
    if isinstance(exc, errors.LiftoffError):
        for line in str(exc).splitlines():
            err.print(f"[red]error:[/red] {redact(line)}", highlight=False, markup=True)
        return typer.Exit(exc.exit_code)
    first = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    err.print(f"[red]unexpected error:[/red] {type(exc).__name__}: {first} (full detail in the Prefect run logs)",
              highlight=False)
    return typer.Exit(errors.EXIT_UNEXPECTED)


def run_flow(name: FlowName, runbook: Path, dry_run: bool) -> dict:
    from flows.options import RunOptions
    from liftoff.logs import configure
    from runbooks.model import load_runbook

    configure()
    load_runbook(runbook)  # bad input fails here, before any run starts
    flow = _flow(name)
    _quiet_prefect_console()
    with _progress_display():
        return flow(RunOptions(runbook=str(runbook.resolve()), dry_run=dry_run))


def _print_summaries(keys=("preflight-summary", "export-plan", "restore-plan", "verify-summary")) -> None:
    from liftoff.reports import last_markdown

    for key in keys:
        md = last_markdown(key)
        if md:
            from rich.markdown import Markdown

            out.print(Markdown(md))


@app.command()
def run(
    flow: FlowName = typer.Argument(..., help="preflight, export, restore, verify, or database (all four)"),
    runbook: Path = typer.Option(..., "--runbook", "-r", help="the runbook file (YAML)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="plan and report; write nothing"),
):
    """Run one flow of the database phase under Prefect, against the runbook's servers.

    Exit 0 on success, 3 when a verification gate finds a difference, 2 for bad input (runbook,
    environment, a server that refused), 1 for anything unexpected."""
    try:
        run_flow(flow, runbook, dry_run)
    except Exception as exc:  # every error ends as one line and an exit code
        _print_summaries()
        raise _fail(exc) from None
    _print_summaries()
    out.print(f"[green]{flow.value}: done{' (dry run: nothing written)' if dry_run else ''}[/green]")


@app.command()
def validate(runbook: Path = typer.Argument(..., help="the runbook file (YAML)")):
    """Check a runbook file: one line per problem, naming the file, the key path and what is expected.
    Exit 0 when valid, 2 otherwise."""
    from runbooks.model import load_runbook

    try:
        rb = load_runbook(runbook)
    except errors.LiftoffError as exc:
        raise _fail(exc) from None
    out.print(f"{runbook}: valid runbook '{rb.name}' (source {rb.source.where}, target {rb.target.direct.where})")


@app.command()
def demo(
    bookings: int = typer.Option(2000, help="scale of the generated CRM dataset"),
    keep: bool = typer.Option(False, help="leave the servers running afterwards (prints how to stop them)"),
):
    """Run a local demo migration end to end: start a Supabase-shaped PostgreSQL 15 source and an empty
    target on loopback, fill the source with a CRM dataset, run migrate-database under Prefect, print the
    verification table, and stop what it started. Exit 0 only if the gate passed."""
    from liftoff.sandbox.prefect_server import PrefectServer
    from liftoff.sandbox.stack import LocalStack

    server = None
    stack = LocalStack(bookings=bookings)
    try:
        if not os.environ.get("PREFECT_API_URL"):
            err.print("starting a local Prefect server ...")
            server = PrefectServer().start()
            os.environ.update(server.env())
        err.print(f"starting source and target, generating {bookings} bookings ...")
        stack.start()
        err.print(f"runbook: {stack.runbook_path}")
        try:
            run_flow(FlowName.database, stack.runbook_path, dry_run=False)
        except Exception as exc:
            _print_summaries()
            raise _fail(exc) from None
        _print_summaries(("verify-summary",))
        ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
        stops = server is not None and not keep
        out.print(f"[green]demo: the database gate passed.[/green] Runs, logs and artifacts in the Prefect UI: "
                  f"{ui}/runs (flow 'migrate-database')" +
                  ("; this demo's Prefect server stops now: run with --keep to browse it, or start "
                   "`prefect server start` and export PREFECT_API_URL first" if stops else ""))
        if keep:
            out.print(f"kept: source {stack.source.root}, target {stack.target.root}, Prefect {server.home if server else ui}"
                      "; stop them with: pkill -f liftoff-pg- ; pkill -f 'prefect server'")
    finally:
        if not keep:
            stack.stop()
            if server:
                server.stop()


if __name__ == "__main__":
    sys.exit(app())
