"""``liftoff demo``: a local demo migration end to end on the sandbox's servers (a Supabase-shaped source, an
empty target, S3 servers, a Prefect server, a stand-in app on a 'VPS' over SSH). A command of the sandbox,
added to the CLI by the entry point ``liftoff.commands`` (``register``): the product imports no sandbox."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from liftoff import errors
from liftoff.cli import FlowName, err, fail, out, print_summaries, run_flow
from liftoff.phases import all_flows


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    bookings: int = typer.Option(2000, help="scale of the generated CRM dataset"),
    keep: bool = typer.Option(False, help="leave everything it started running afterwards, its secrets in an env "
                              "file (0600) to source; prints the runbook, that file and how to stop it all"),
    stop: Path = typer.Option(None, "--stop", metavar="DIR", help="stop exactly the processes a `--keep` demo "
                              "started (the directory it printed), by pid, and remove its env file"),
    storage_protocol: str = typer.Option("rest", help="how the files are read from Supabase Storage: rest (its "
                                         "REST API, served by the sandbox's fake) or s3 (its S3 endpoint)"),
    cutover: bool = typer.Option(True, help="then cut over (an app on a local 'VPS' over SSH switched to the "
                                 "target, approved as an operator would in the UI) and roll back"),
    final_sync: str = typer.Option("full", help="the cutover's final sync: full (re-export and reload every table "
                                   "in the freeze) or replicate (logical replication started before the cutover)"),
):
    """Run a local demo migration end to end: start a Supabase-shaped PostgreSQL 15 source and an empty
    target on loopback, fill the source with a CRM dataset, Supabase Storage (a SeaweedFS server holding the
    CRM's files, behind the fake of Storage's REST API, or as its S3 endpoint) and a target S3 server; run
    migrate-database, then migrate-storage (files, gate, URL rewrite), under Prefect; print both gates'
    tables; then (unless --no-cutover) cut a small app over to the target and roll it back, printing the
    measured downtime; and stop what it started. Exit 0 only if every step passed."""
    from liftoff.prefect_server import PrefectServer
    from liftoff_sandbox.stack import LocalStack

    if stop is not None:
        return _stop_kept(stop)
    server = None
    if storage_protocol not in ("rest", "s3"):
        raise fail(errors.RunbookInvalid(f"--storage-protocol: expected rest or s3, got {storage_protocol!r}"))
    if final_sync not in ("full", "replicate"):
        raise fail(errors.RunbookInvalid(f"--final-sync: expected full or replicate, got {final_sync!r}"))
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
                print_summaries(all_flows()[phase].summaries)
                raise fail(exc) from None
        print_summaries(("verify-summary", "verify-storage-summary", "storage-urls-preview"))
        if cutover:
            _demo_cutover(stack, final_sync)
        ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
        stops = server is not None and not keep
        did = "the database and storage gates passed" + (", the cutover and its rollback worked" if cutover else "")
        flows = "'migrate-database', 'migrate-storage'" + (", 'cutover', 'rollback'" if cutover else "")
        out.print(f"[green]demo: {did}.[/green] Runs, logs and artifacts in the "
                  f"Prefect UI: {ui}/runs (flows {flows}); `liftoff status --runbook "
                  f"{stack.runbook_path}` shows every step" +
                  ("; this demo's Prefect server stops now: run with --keep to browse it, or start "
                   "`prefect server start` and export PREFECT_API_URL first" if stops else ""))
    finally:
        _flush_prefect_logs()  # before the server stops: no "Error logging to API" after a run that passed
        if keep:
            _keep(stack, server)
        else:
            stack.stop()
            if server:
                server.stop()


def _flush_prefect_logs() -> None:
    """Sends the run logs still queued to the Prefect API while it is up (Prefect ships them in the background)."""
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=15)
    except Exception:  # noqa: BLE001 - nothing was queued, or no run started
        pass


def _keep(stack, server) -> None:
    """Leaves every process this demo started running, records each by pid, writes the runbook's secrets to an
    env file (0600), and prints how to use and stop it all."""
    from liftoff_sandbox import kept
    from liftoff_sandbox.crm_app import CrmApp
    from liftoff_sandbox.ssh import SshServer

    processes = []
    for name, pg in (("source PostgreSQL", stack.source), ("target PostgreSQL", stack.target)):
        if pg is not None and (pg.datadir / "postmaster.pid").exists():
            processes.append(kept.postgres(name, pg))
    for name, s3 in (("Supabase Storage's S3 server", stack.supabase_s3), ("target S3 server", stack.target_s3)):
        if s3 is not None and s3.proc is not None:
            processes.append(kept.process(name, s3.proc.pid, group=True))
    if stack.storage_api is not None and stack.supabase_s3 is not None:
        s3 = stack.supabase_s3
        processes.append(kept.serve_storage_api_detached(stack.workdir, stack.storage_api, s3.endpoint_url,
                                                         s3.access_key, s3.secret_key))
    for service in stack._extra:
        if isinstance(service, SshServer) and service._process is not None:
            processes.append(kept.process("the VPS's sshd", service._process.pid, group=True))
        elif isinstance(service, CrmApp) and service.pid_file.exists():
            processes.append(kept.process("the app", int(service.pid_file.read_text().strip()), group=True))
    extra = {}
    if server is not None and server.proc is not None:
        processes.append(kept.process("Prefect server", server.proc.pid, group=True))
    if os.environ.get("PREFECT_API_URL"):
        extra["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
    kept.detach(*[x for x in (stack.source, stack.target, stack.supabase_s3, stack.target_s3, *stack._extra) if x])
    kept.record(stack.workdir, processes)
    env_file = kept.write_env(stack.workdir, stack.runbook_path, extra)
    ui = extra.get("PREFECT_API_URL", "").removesuffix("/api")
    out.print("\n".join([
        f"kept running ({len(processes)} processes): " + ", ".join(f"{p.name} (pid {p.pid})" for p in processes),
        f"runbook:  {stack.runbook_path}",
        f"secrets:  {env_file} (mode 0600)",
        f"use it:   . {env_file} && liftoff status --runbook {stack.runbook_path}",
        *([f"Prefect UI: {ui}/runs"] if ui else []),
        f"stop it:  liftoff demo --stop {stack.workdir}"]), highlight=False, soft_wrap=True)


def _stop_kept(workdir: Path) -> None:
    from liftoff_sandbox import kept

    try:
        lines = kept.stop(workdir)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(errors.RunbookInvalid(f"--stop {workdir}: {exc}")) from None
    for line in lines:
        out.print(line, highlight=False)
    out.print(f"stopped what `liftoff demo --keep` started in {workdir}", highlight=False)


def _demo_cutover(stack, final_sync: str = "full") -> None:
    """The demo's cutover: a stand-in app on a local 'VPS' (a real sshd on loopback) reads its env file and
    connects to the source; the cutover's SSH driver points it at the target. The approval is given through
    the Prefect API as the UI's form would (the demo's operator is this process); then the rollback."""
    import secrets as _secrets

    import yaml

    from liftoff.reports import last_markdown
    from liftoff_sandbox.crm_app import CrmApp
    from liftoff_sandbox.operator import answer_when_paused
    from liftoff_sandbox.ssh import SshServer

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
    data["cutover"]["final_sync"] = final_sync
    stack.runbook_path.write_text(yaml.safe_dump(data, sort_keys=False))
    if final_sync == "replicate":
        err.print("cutover: starting logical replication (publication, slot, copy from its snapshot, subscription) ...")
        try:
            run_flow(FlowName("replicate"), stack.runbook_path, dry_run=False)
        except Exception as exc:
            print_summaries(all_flows()["replicate"].summaries)
            raise fail(exc) from None
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
        print_summaries(all_flows()["cutover"].summaries)
        raise fail(exc) from None
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
        print_summaries(all_flows()["rollback"].summaries)
        raise fail(exc) from None
    rollback.join(5)
    out.print(_markdown(last_markdown("rollback-changes")))
    out.print(f"[green]rollback: the app is connected to {where()} again, which takes writes again.[/green]")


def _supabase_writers(stack) -> list:
    """Supabase Auth's sign-ups and Supabase Storage's uploads on the source, as their admin roles, running
    until stopped."""
    from liftoff_sandbox.writers import SignupWriter, Uploader

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
    from liftoff.runbooks.model import load_runbook

    return load_runbook(path).cutover.checklist.manual


def _markdown(text: str | None):
    from rich.markdown import Markdown

    return Markdown(text or "")
