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
):
    """Run one flow of a phase under Prefect, against the runbook's servers (`liftoff status` shows where
    each phase stands).

    Exit 0 on success, 3 when a verification gate finds a difference, 2 for bad input (runbook,
    environment, a server that refused), 4 when an approval was rejected, left unconfirmed or not given in
    time (nothing changed), 1 for anything unexpected."""
    keys = all_flows()[flow.value].summaries
    try:
        run_flow(flow, runbook, dry_run)
    except Exception as exc:  # every error ends as one line and an exit code
        _print_summaries(keys)
        raise _fail(exc) from None
    _print_summaries(keys)
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


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


@app.command()
def status(runbook: Path = typer.Option(..., "--runbook", "-r", help="the runbook file (YAML)")):
    """Print, per phase, each step's state from the runbook's ledger (status, when, how long, which flow
    run) and the latest verification gate with its age. Reads the ledger only; exit 0."""
    import time

    from rich.table import Table

    from liftoff.ledger import Ledger
    from liftoff.phases import PHASES
    from runbooks.model import load_runbook

    try:
        rb = load_runbook(runbook)
    except errors.LiftoffError as exc:
        raise _fail(exc) from None
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
        if phase.gate is None:
            continue
        gate = ledger.latest_gate(phase.gate)
        if gate is None:
            out.print(f"latest {phase.gate} gate: never run")
        else:
            verdict = "[green]passed[/green]" if gate.passed else "[red]FAILED[/red]"
            out.print(f"latest {phase.gate} gate: {verdict} {_age(gate.age_seconds)} (flow run "
                      f"{gate.flow_run_id or 'local'}): {redact(gate.summary)}")


@app.command()
def demo(
    bookings: int = typer.Option(2000, help="scale of the generated CRM dataset"),
    keep: bool = typer.Option(False, help="leave the servers running afterwards (prints how to stop them)"),
    storage_protocol: str = typer.Option("rest", help="how the files are read from Supabase Storage: rest (its "
                                         "REST API, served by the sandbox's fake) or s3 (its S3 endpoint)"),
    cutover: bool = typer.Option(True, help="then cut over (an app on a local 'VPS' over SSH switched to the "
                                 "target, approved as an operator would in the UI) and roll back"),
):
    """Run a local demo migration end to end: start a Supabase-shaped PostgreSQL 15 source and an empty
    target on loopback, fill the source with a CRM dataset, Supabase Storage (a SeaweedFS server holding the
    CRM's files, behind the fake of Storage's REST API, or as its S3 endpoint) and a target S3 server; run
    migrate-database, then migrate-storage (files, gate, URL rewrite), under Prefect; print both gates'
    tables; then (unless --no-cutover) cut a small app over to the target and roll it back, printing the
    measured downtime; and stop what it started. Exit 0 only if every step passed."""
    from liftoff.sandbox.prefect_server import PrefectServer
    from liftoff.sandbox.stack import LocalStack

    server = None
    if storage_protocol not in ("rest", "s3"):
        raise _fail(errors.RunbookInvalid(f"--storage-protocol: expected rest or s3, got {storage_protocol!r}"))
    stack = LocalStack(bookings=bookings, files=True, storage_protocol=storage_protocol)
    try:
        if not os.environ.get("PREFECT_API_URL"):
            err.print("starting a local Prefect server ...")
            server = PrefectServer().start()
            os.environ.update(server.env())
        err.print(f"starting source and target (PostgreSQL, S3), generating {bookings} bookings and their files ...")
        stack.start()
        err.print(f"runbook: {stack.runbook_path}")
        for phase in ("database", "storage"):
            try:
                run_flow(FlowName(phase), stack.runbook_path, dry_run=False)
            except Exception as exc:
                _print_summaries(all_flows()[phase].summaries)
                raise _fail(exc) from None
        _print_summaries(("verify-summary", "verify-storage-summary", "storage-urls-preview"))
        if cutover:
            _demo_cutover(stack)
        ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
        stops = server is not None and not keep
        did = "the database and storage gates passed" + (", the cutover and its rollback worked" if cutover else "")
        flows = "'migrate-database', 'migrate-storage'" + (", 'cutover', 'rollback'" if cutover else "")
        out.print(f"[green]demo: {did}.[/green] Runs, logs and artifacts in the "
                  f"Prefect UI: {ui}/runs (flows {flows}); `liftoff status --runbook "
                  f"{stack.runbook_path}` shows every step" +
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


def _demo_cutover(stack) -> None:
    """The demo's cutover: a stand-in app on a local 'VPS' (a real sshd on loopback) reads its env file and
    connects to the source; the cutover's SSH driver points it at the target. The approval is given through
    the Prefect API as the UI's form would (the demo's operator is this process); then the rollback."""
    import secrets as _secrets

    import yaml

    from liftoff.reports import last_markdown
    from liftoff.sandbox.crm_app import CrmApp
    from liftoff.sandbox.operator import answer_when_paused
    from liftoff.sandbox.ssh import SshServer

    err.print("cutover: starting a local 'VPS' (sshd on loopback) and the app on the source ...")
    vps = SshServer().start()
    stack.stop_later(vps)
    writer_password = _secrets.token_urlsafe(12)
    stack.source.execute(f"CREATE ROLE crm_writer LOGIN PASSWORD '{writer_password}'")
    app = CrmApp(stack.workdir, f"postgresql://crm_writer:{writer_password}@{stack.source.host}:"
                                f"{stack.source.port}/postgres").start()
    stack.stop_later(app)
    data = yaml.safe_load(stack.runbook_path.read_text())
    database = data["target"]["direct"]["database"]
    data.update(stack.cutover_sections(vps, app, database, "crm_writer", env_prefix="LIFTOFF_LOCAL",
                                       health_timeout_s=60, approval_timeout_s=300))
    stack.runbook_path.write_text(yaml.safe_dump(data, sort_keys=False))
    confirmations = {f"confirm_{i}": True for i in range(1, len(_manual_lines(stack.runbook_path)) + 1)}
    operator = answer_when_paused("cutover", {"approver": "liftoff demo (as the operator)", "approve": True,
                                              "reason": "demo", **confirmations}, under=stack.workdir)
    # What the freeze cannot stop keeps going through the cutover, as on a live project: Supabase Auth signs
    # users up (its trigger writes their profiles) and Supabase Storage stores uploads. The catch-up carries them.
    supabase_writers = _supabase_writers(stack)
    def where() -> str:
        port = app.server_port()
        side = {stack.source.port: "the source", stack.target.port: "the target"}.get(port, "neither server")
        return f"database {app.database()!r} on port {port} ({side})"

    err.print(f"cutover: the app is connected to {where()}; cutting over (approved through the Prefect API, as "
              "the UI's form does) ...")
    try:
        run_flow(FlowName("cutover"), stack.runbook_path, dry_run=False)
    except Exception as exc:
        _print_summaries(all_flows()["cutover"].summaries)
        raise _fail(exc) from None
    finally:
        for writer in supabase_writers:
            writer.stop()
    operator.join(5)
    out.print(_markdown(last_markdown("cutover-downtime")))
    out.print(_markdown(last_markdown("cutover-catch-up")))
    signed_up = sum(len(w.acked()) for w in supabase_writers)
    out.print(f"cutover: the app is now connected to {where()}; {signed_up} sign-ups and uploads were "
              "acknowledged on Supabase meanwhile. The app writes on the target (2 notes, 1 changed, 1 deleted); "
              "rolling back, carrying them to the source ...")
    _demo_app_writes(stack, database)
    rollback = answer_when_paused("rollback", {"approver": "liftoff demo (as the operator)", "approve": True,
                                               "reason": "demo", "carry": "apply"}, under=stack.workdir)
    try:
        run_flow(FlowName("rollback"), stack.runbook_path, dry_run=False)
    except Exception as exc:
        _print_summaries(all_flows()["rollback"].summaries)
        raise _fail(exc) from None
    rollback.join(5)
    out.print(_markdown(last_markdown("rollback-changes")))
    out.print(f"[green]rollback: the app is connected to {where()} again, which takes writes again.[/green]")


def _supabase_writers(stack) -> list:
    """Supabase Auth's sign-ups and Supabase Storage's uploads on the source, as their admin roles, running
    until stopped."""
    from liftoff.sandbox.writers import SignupWriter, Uploader

    writers = [SignupWriter(stack.source.conninfo("postgres"), role="supabase_auth_admin", interval_s=0.05)]
    if stack.supabase_s3 is not None:
        writers.append(Uploader(stack.supabase_s3.client(), stack.source.conninfo("postgres"), "waivers",
                                role="supabase_storage_admin", interval_s=0.05))
    for writer in writers:
        writer.start()
    return writers


def _demo_app_writes(stack, database: str) -> None:
    """What the app does on the target after the switch: two notes added, one changed, one deleted."""
    stack.target.execute(
        "INSERT INTO public.notes (owner_id, body) SELECT owner_id, 'written on the target after the switch' "
        "FROM public.notes LIMIT 2; "
        "UPDATE public.notes SET body = 'changed on the target' WHERE id = (SELECT min(id) FROM public.notes); "
        "DELETE FROM public.notes WHERE id = (SELECT max(id) FROM public.notes WHERE body NOT LIKE '%target%')",
        dbname=database)


def _manual_lines(path: Path) -> list[str]:
    from runbooks.model import load_runbook

    return load_runbook(path).cutover.checklist.manual


def _markdown(text: str | None):
    from rich.markdown import Markdown

    return Markdown(text or "")


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

    from deployments.serve import serve_deployments, start_local_server

    def interrupted(*_):
        raise KeyboardInterrupt  # until Prefect's runner takes SIGTERM over, so the server is still stopped

    server = None
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        if runbook is not None:
            from runbooks.model import load_runbook

            load_runbook(runbook)  # a bad runbook fails here, before a server starts
        if not os.environ.get("PREFECT_API_URL"):
            home = Path.home() / ".liftoff" / "prefect"
            err.print(f"starting a local Prefect server on 127.0.0.1:{port} (data in {home}) ...")
            server = start_local_server(port, home)
            os.environ.update(server.env())  # before Prefect is imported: it reads its settings once
        ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
        out.print(f"Prefect UI: {ui}/deployments (Ctrl-C stops the server and the runs it started)", highlight=False)
        serve_deployments(str(runbook.resolve()) if runbook else None)
    except errors.LiftoffError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            err.print("stopping the local Prefect server ...")
            server.stop()


if __name__ == "__main__":
    sys.exit(app())
