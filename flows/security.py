"""The plan's security checks: the VPS's firewall, what listens where, and no secret in the files the runbook
names; checked over SSH before the cutover."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.reports import publish_markdown
from liftoff.flows.hooks import notify_on_failure
from liftoff.tasks.security.gate import internal_services, require_ssh, security_gate


@flow(name="check-security", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def check_security(options: RunOptions) -> dict:
    """Succeeds when ufw on the VPS is active, denies incoming by default and lets in nothing beyond
    security.allowed_ports (22, 80, 443); PostgreSQL, PgBouncer, Redis and security.internal_ports listen only
    on loopback or the Docker network (security.bind_networks); and no secret of the runbook is in the files
    it names. Reads only; the result is the ledger's "security" gate."""
    runbook = open_runbook(options, "security")
    if options.dry_run:
        require_ssh(runbook)
        sec = runbook.security
        services = ", ".join(f"{name} :{port}" for name, port in internal_services(runbook).items())
        files = [*sec.secret_files, *(f"local {p}" for p in sec.local_secret_files)]
        publish_markdown("security-summary", "\n".join([
            "# Security checks (dry run)", "",
            f"Would connect to {runbook.ssh.user}@{runbook.ssh.host}:{runbook.ssh.port} and check:",
            f"- `{sec.firewall_command}`: active, default deny incoming, only {sec.allowed_ports} let in",
            f"- `{sec.listeners_command}`: {services} only on {', '.join(sec.bind_networks)}",
            f"- no secret of the runbook in: {', '.join(files) or '(no files named)'}"]))
        return {"dry_run": True}
    report = security_gate(runbook)
    return {"lines": len(report.lines), "passed": sum(1 for line in report.lines if line.status == "passed")}


