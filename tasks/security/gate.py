"""The plan's security checks, over SSH against the VPS: the firewall, what listens where, and files that must
hold no secret. A gate: ``check_security`` returns a report with a line per check (passed, failed or not
checked), each red line with its fix; ``security_gate`` runs it against the runbook's VPS and records it.

- Firewall (``security.firewall_command``, ``ufw status verbose``): active, incoming denied (or rejected) by
  default, and no rule letting anything in beyond ``security.allowed_ports`` (v4 and v6 rules alike; outgoing,
  routed, DENY and REJECT rules are not openings).
- Listeners (``security.listeners_command``, ``ss -tlnp``): PostgreSQL, PgBouncer and Redis (the ports of
  ``target.direct``, ``target.pooled``, ``target.redis``) and ``security.internal_ports`` listen only on
  ``security.bind_networks`` (loopback and the Docker networks). A wildcard (``0.0.0.0``, ``[::]``, ``*``) is
  public even behind ufw: Docker publishes container ports around ufw's rules.
- Secrets: no value behind any secret reference of the runbook is in ``security.secret_files`` (on the VPS, read
  over SFTP) or ``security.local_secret_files``. A hit names the file and the secret's field and reference,
  never the value nor any part of it. A weak secret (``liftoff.redaction.is_weak_secret``: ``postgres``, or
  under 8 characters) counts only where it stands as a value (``KEY=VALUE``, ``user:VALUE@``), so a file naming
  the user ``postgres`` is not a hit.

Reads only: nothing on the VPS is changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import LiftoffError, RunbookInvalid
from liftoff.logs import get_logger
from liftoff.redaction import redact
from liftoff.reports import publish_markdown, publish_table
from liftoff.reports import check_rows, check_table, md_cell, sentence
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.checks import FAILED, PASSED, CheckLine, CheckReport, failed_line
from liftoff.systems.remote import Remote, command_head
from liftoff.systems.ss import Listener, is_internal, parse_listeners
from liftoff.systems.ufw import check_firewall, parse_ufw_status
from liftoff.tasks.security.secrets import check_files, runbook_secrets

log = get_logger(phase="security")


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class SecurityReport(CheckReport):
    """The checklist's kind of report (a line per check; "not checked" lines do not fail it), in its own words."""

    def summary(self) -> str:
        failed = [line.name for line in self.lines if line.status == FAILED]
        unchecked = self.not_checked()
        head = (f"security checks passed: {len(self.lines) - len(unchecked)} of {len(self.lines)} lines" if self.ok
                else f"security checks failed: {len(failed)} of {len(self.lines)} lines ({', '.join(failed)})")
        return head + (f"; not checked: {', '.join(unchecked)}" if unchecked else "")

    def rows(self) -> list[dict]:
        return check_rows(self.lines)

    def markdown(self) -> str:
        return "\n".join(["# Security checks", "", f"**{md_cell(sentence(self.summary()))}.**",
                          "", check_table(self.lines)])


_BIND_FIXES = {
    "PostgreSQL": "set listen_addresses = 'localhost' in postgresql.conf (add the Docker network's gateway if "
                  "containers connect directly), then restart PostgreSQL",
    "PgBouncer": "set listen_addr = 127.0.0.1 in pgbouncer.ini, then restart PgBouncer",
    "Redis": "set bind 127.0.0.1 -::1 in redis.conf (with protected-mode yes), then restart Redis",
}


def internal_services(rb: Runbook) -> dict[str, int]:
    """The services that must not be public, by name: the target's PostgreSQL, PgBouncer and Redis at the
    runbook's ports, then ``security.internal_ports`` (the same name overrides the port)."""
    services = {"PostgreSQL": rb.target.direct.port}
    if rb.target.pooled is not None:
        services["PgBouncer"] = rb.target.pooled.port
    if rb.target.redis is not None:
        services["Redis"] = rb.target.redis.port
    return {**services, **rb.security.internal_ports}


def check_listeners(listeners: list[Listener], services: dict[str, int], networks: list[str]) -> list[CheckLine]:
    """One line per service: every socket on its port listens on loopback or ``networks`` only."""
    lines = []
    for name, port in services.items():
        title = f"{name} (port {port}) not public"
        on_port = [s for s in listeners if s.port == port]
        public = [s for s in on_port if not is_internal(s, networks)]
        if not on_port:
            lines.append(CheckLine(title, PASSED, f"nothing listens on port {port}"))
        elif not public:
            lines.append(CheckLine(title, PASSED, "listens on " + ", ".join(_listener(s) for s in on_port)))
        else:
            fix = _BIND_FIXES.get(name, f"bind {name} to 127.0.0.1 (or the Docker network) only")
            if any("docker-proxy" in s.processes for s in public):
                fix = (f"publish the container's port as 127.0.0.1:{port}:{port} in docker-compose.yml (Docker's "
                       "published ports bypass ufw), or do not publish it")
            lines.append(CheckLine(title, FAILED, "listens on " + ", ".join(_listener(s) for s in public)
                                   + f", outside {', '.join(networks)}", fix))
    return lines


def _listener(s: Listener) -> str:
    wildcard = " (every address)" if s.address in ("*", "0.0.0.0", "::") and s.interface != "lo" else ""
    return f"{s.shown}{wildcard}" + (f" ({', '.join(s.processes)})" if s.processes else "")


# ---------------------------------------------------------------------------------------------------------
# The gate


def check_security(rb: Runbook, remote: Remote) -> SecurityReport:
    """Every security check of the runbook against the VPS behind ``remote``. Reads only; each check stands on
    its own (a command that fails fails its lines, not the others)."""
    sec = rb.security
    lines: list[CheckLine] = []
    lines += _guarded("firewall active", lambda: _firewall(remote, sec.firewall_command, sec.allowed_ports))
    services = internal_services(rb)
    lines += _guarded("internal services not public",
                      lambda: check_listeners(parse_listeners(_output(remote, sec.listeners_command, "listeners")),
                                              services, sec.bind_networks))
    secrets, unresolved = runbook_secrets(rb)
    files = [(path, lambda path=path: remote.read_bytes(path)) for path in sec.secret_files]
    files += [(f"local {path}", lambda path=path: path.read_bytes() if path.exists() else None)
              for path in sec.local_secret_files]
    lines += check_files(files, secrets, unresolved)
    report = SecurityReport([CheckLine(line.name, line.status, redact(line.detail), redact(line.fix), line.blocked)
                             for line in lines])
    log.info("security checks", ok=report.ok, failed=len(report.failures()))
    return report


def _firewall(remote: Remote, command: str, allowed_ports: list[int]) -> list[CheckLine]:
    text = _output(remote, command, "firewall")
    try:
        status = parse_ufw_status(text)
    except ValueError:
        first = next((line.strip() for line in text.splitlines() if line.strip()), "no output")
        raise _CommandFailed(f"`{command_head(command)}` did not print ufw's status (its first line: "
                             f"{redact(first[:120])!r})", _COMMAND_FIXES["firewall"])
    return check_firewall(status, allowed_ports)


_COMMAND_FIXES = {
    "firewall": "install ufw and configure it (apt-get install ufw; the fixes of the lines below), or set "
                "security.firewall_command (`sudo ufw status verbose` when ssh.user is not root, with a sudoers "
                "rule for it)",
    "listeners": "install iproute2 (ss) on the VPS, or set security.listeners_command (`sudo ss -tlnp`)",
}


class _CommandFailed(Exception):
    def __init__(self, detail: str, fix: str):
        super().__init__(detail)
        self.fix = fix


def _output(remote: Remote, command: str, kind: str) -> str:
    result = remote.run(command, timeout=60, check=False)
    if result.rc != 0:
        last = next((line.strip() for line in reversed((result.stderr or result.stdout).splitlines())
                     if line.strip()), "no output")
        raise _CommandFailed(f"`{command_head(command)}` exited {result.rc} on {remote.where}: {redact(last[:200])}",
                             _COMMAND_FIXES[kind])
    return result.stdout


def _guarded(name: str, check: Callable[[], list[CheckLine]]) -> list[CheckLine]:
    """The check's lines or, when its command fails or the VPS cannot be reached, one failed line ``name``
    with the reason and the fix."""
    try:
        return check()
    except _CommandFailed as exc:
        return [CheckLine(name, FAILED, str(exc), exc.fix)]
    except LiftoffError as exc:  # ssh or a secret the operator must fix: the check could not run (exit 2)
        return [failed_line(name, exc, " ".join(redact(str(exc)).split()),
                            "check the ssh section of the runbook and that the VPS answers")]


def require_ssh(rb: Runbook) -> None:
    if rb.ssh is None:
        raise RunbookInvalid(f"runbook {rb.name}: the security checks run on the VPS over SSH: add ssh (host, "
                             "user, private_key, known_hosts); see runbooks/tour-crm.yaml")


def publish_security_report(report: SecurityReport, rb: Runbook) -> None:
    publish_table("security-checks", report.rows(), "Security checks: one line per check, with its fix")
    publish_markdown("security-summary", report.markdown())


@task(name="check the VPS's exposure (gate)", cache_policy=NO_CACHE)
@recorded("security", gate="security", publish=publish_security_report)
def security_gate(rb: Runbook) -> SecurityReport:
    require_ssh(rb)
    with Remote(rb.ssh) as remote:
        return check_security(rb, remote)
