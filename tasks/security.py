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

import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from liftoff.errors import LiftoffError, RunbookInvalid, SecretUnavailable
from liftoff.logs import get_logger
from liftoff.redaction import is_weak_secret, redact
from liftoff.reports import check_rows, check_table, md_cell
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook, SecretRef
from liftoff.checks import FAILED, NOT_CHECKED, PASSED, CheckLine, CheckReport
from liftoff.systems.remote import Remote, command_head

log = get_logger(phase="security")

# Fields holding identifiers kept as references, not credentials: a key id alone in a file is no leak.
_NOT_CREDENTIALS = {"access_key_id"}
# A key naming a credential (POSTGRES_PASSWORD, REDIS_PASS, API_TOKEN, db.secret): where a weak secret counts.
_CREDENTIAL_KEY = r"\b[\w.-]*(?:password|passwd|pass|pwd|secret|token|key)[\w.-]*"


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
        return "\n".join(["# Security checks", "", f"**{'Passed' if self.ok else 'Failed'}**: {md_cell(self.summary())}.",
                          "", check_table(self.lines)])


# ---------------------------------------------------------------------------------------------------------
# The firewall: `ufw status verbose`

_RULE = re.compile(r"^(?P<to>.+?)\s+(?P<action>ALLOW|DENY|REJECT|LIMIT)(?: (?P<direction>IN|OUT|FWD))?\s+"
                   r"(?P<source>.+?)(?:\s+#\s?(?P<comment>.*?))?\s*$")
_PORTS = re.compile(r"^(?P<ports>\d+(?::\d+)?(?:,\d+(?::\d+)?)*)(?:/(?P<proto>\w+))?$")
_ANYWHERE = {"Anywhere", "0.0.0.0/0", "::/0"}


@dataclass(frozen=True)
class FirewallRule:
    """One line of ufw's rule table, as printed (``to``, ``action``, ``source``) and as understood."""

    to: str
    action: str  # ALLOW, DENY, REJECT or LIMIT
    direction: str  # IN, OUT or FWD (ufw's non-verbose table prints incoming rules without it)
    source: str
    comment: str
    v6: bool
    ports: tuple[tuple[int, int], ...] | None  # (first, last) ranges; None: every port
    app: str | None  # an application profile ("OpenSSH"); its ports are shown only by `status verbose`
    destination: str | None  # an address the rule is limited to
    interface: str | None

    @property
    def lets_in(self) -> bool:
        return self.direction == "IN" and self.action in ("ALLOW", "LIMIT")

    @property
    def shown(self) -> str:
        return f"{self.to} {self.action} {self.direction} from {self.source}"


@dataclass(frozen=True)
class FirewallStatus:
    active: bool
    default_incoming: str | None  # deny, reject or allow; None when the output has no "Default:" line
    rules: tuple[FirewallRule, ...] = ()


def parse_ufw_status(text: str) -> FirewallStatus:
    """Reads ``ufw status`` / ``ufw status verbose`` output; raises ValueError when it is not ufw's."""
    status = re.search(r"^Status: (active|inactive)\s*$", text, re.MULTILINE)
    if status is None:
        raise ValueError("no 'Status: active' or 'Status: inactive' line")
    default = re.search(r"^Default: (\w+) \(incoming\)", text, re.MULTILINE)
    rules: list[FirewallRule] = []
    lines = text.splitlines()
    table = next((i for i, line in enumerate(lines) if re.match(r"^\s*--\s+------\s+----", line)), None)
    for line in lines[table + 1:] if table is not None else []:
        line = re.sub(r"^\[\s*\d+\]\s", "", line)  # `ufw status numbered`
        m = _RULE.match(line)
        if m:
            rules.append(_rule(m))
    return FirewallStatus(status.group(1) == "active", default.group(1) if default else None, tuple(rules))


def _rule(m: re.Match) -> FirewallRule:
    to, source = m["to"].strip(), m["source"].strip()
    v6 = "(v6)" in to or "(v6)" in source
    spec = to.replace(" (v6)", "")
    interface = None
    if on := re.search(r" on (\S+)$", spec):
        interface, spec = on.group(1), spec[:on.start()]
    app = None
    if named := re.search(r" \((.+)\)$", spec):  # verbose: "22/tcp (OpenSSH)"
        app, spec = named.group(1), spec[:named.start()]
    words = spec.split()
    destination, ports = None, None
    if words and (pm := _PORTS.match(words[-1])):
        ports = tuple((int(a), int(b or a)) for a, _, b in (p.partition(":") for p in pm["ports"].split(",")))
        destination = " ".join(words[:-1]) or None
    elif spec not in _ANYWHERE and not _is_address(spec):
        app = spec  # non-verbose output names an application profile without its ports
    else:
        destination = None if spec in _ANYWHERE else spec
    if destination and ":" in destination:
        v6 = True
    if ":" in source.split()[0] and source.split()[0] not in _ANYWHERE:
        v6 = True
    return FirewallRule(to=to, action=m["action"], direction=m["direction"] or "IN", source=source,
                        comment=m["comment"] or "", v6=v6, ports=ports, app=app, destination=destination,
                        interface=interface)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False


def check_firewall(status: FirewallStatus, allowed_ports: list[int]) -> list[CheckLine]:
    """Three lines: active, incoming denied by default, nothing let in beyond ``allowed_ports``."""
    allowed = sorted(set(allowed_ports))
    ports_name = f"firewall allows in only {', '.join(map(str, allowed))}"
    allow_cmds = " && ".join(f"sudo ufw allow {p}/tcp" for p in allowed)
    if not status.active:
        return [CheckLine("firewall active", FAILED, "ufw says Status: inactive: every port is open to anything "
                          "that listens", f"{allow_cmds} && sudo ufw default deny incoming && sudo ufw enable"),
                CheckLine("firewall denies incoming by default", NOT_CHECKED, "the firewall is inactive",
                          "enable it first (the line above)"),
                CheckLine(ports_name, NOT_CHECKED, "the firewall is inactive", "enable it first (the line above)")]
    lines = [CheckLine("firewall active", PASSED, "ufw says Status: active")]
    if status.default_incoming is None:
        lines.append(CheckLine("firewall denies incoming by default", FAILED,
                               "the output has no 'Default: ... (incoming)' line: it is not `ufw status verbose`",
                               "set security.firewall_command to `ufw status verbose` (or `sudo ufw status verbose`)"))
    elif status.default_incoming in ("deny", "reject"):
        lines.append(CheckLine("firewall denies incoming by default", PASSED,
                               f"Default: {status.default_incoming} (incoming)"))
    else:
        lines.append(CheckLine("firewall denies incoming by default", FAILED,
                               f"Default: {status.default_incoming} (incoming): a port no rule names is open",
                               "sudo ufw default deny incoming"))
    openings = [r for r in status.rules if r.lets_in and not _within(r, allowed)]
    if not openings:
        rules = sum(1 for r in status.rules if r.lets_in)
        lines.append(CheckLine(ports_name, PASSED, f"{rules} incoming ALLOW/LIMIT rules (v4 and v6), all within "
                               f"{', '.join(map(str, allowed))}"))
        return lines
    lines.append(CheckLine(ports_name, FAILED, "also lets in: " + "; ".join(_openings(openings)),
                           _removal(openings) + " (or add the port to security.allowed_ports if the plan allows it)"))
    return lines


def _within(rule: FirewallRule, allowed: list[int]) -> bool:
    if rule.ports is None:
        return False
    return all(first <= last and last - first < len(allowed) and all(p in allowed for p in range(first, last + 1))
               for first, last in rule.ports)


def _bare(text: str) -> str:
    return text.replace(" (v6)", "")


def _openings(rules: list[FirewallRule]) -> list[str]:
    """Each opening once, its v4 and v6 rules together: "6379/tcp from Anywhere (v4 and v6)"."""
    families: dict[str, list[str]] = {}
    for rule in rules:
        if rule.ports is None and rule.app:
            what = f"application profile {rule.app} (its ports are not shown: use `ufw status verbose`)"
        else:
            what = "every port" if rule.ports is None else _bare(rule.to)
        action = "" if rule.action == "ALLOW" else f", {rule.action}"
        families.setdefault(f"{what} from {_bare(rule.source)}{action}", []).append("v6" if rule.v6 else "v4")
    return [f"{what} ({' and '.join(dict.fromkeys(fams))})" for what, fams in families.items()]


def _removal(rules: list[FirewallRule]) -> str:
    """`sudo ufw delete allow 6379/tcp` for a plain rule (it removes the v4 and the v6 rule); the others by number."""
    plain, other = [], []
    for rule in rules:
        if rule.ports is not None and _bare(rule.source) in _ANYWHERE and not (rule.app or rule.destination
                                                                             or rule.interface):
            plain.append(f"sudo ufw delete {rule.action.lower()} {_bare(rule.to)}")
        else:
            other.append(f"'{_bare(rule.to)}' from {_bare(rule.source)}")
    fixes = list(dict.fromkeys(plain))
    if other:
        fixes.append("remove " + ", ".join(dict.fromkeys(other)) + " by number: `sudo ufw status numbered`, then "
                     "`sudo ufw delete NUMBER` for each")
    return "; ".join(fixes)


# ---------------------------------------------------------------------------------------------------------
# What listens where: `ss -tlnp`

_LOCAL = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^\[\]%]+?))(?:%(?P<iface>[^:\s]+))?:(?P<port>\d+|\*)$")


@dataclass(frozen=True)
class Listener:
    address: str  # as ss prints it, without brackets: 127.0.0.1, 0.0.0.0, ::, ::1, *
    port: int
    interface: str | None  # bound to one device (SO_BINDTODEVICE): 0.0.0.0%lo
    processes: tuple[str, ...]  # empty when ss could not see the owner (not root)

    @property
    def shown(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}{'%' + self.interface if self.interface else ''}:{self.port}"


def parse_listeners(text: str) -> list[Listener]:
    """Reads ``ss -tlnp`` (or ``-Htlnp``) output: one Listener per listening socket."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("tcp", "tcp6"):  # `ss -lnp` without -t prints the Netid column first
            words = words[1:]
        if len(words) < 5 or words[0] != "LISTEN":
            continue
        m = _LOCAL.match(words[3])
        if m is None or m["port"] == "*":
            continue
        processes = tuple(dict.fromkeys(re.findall(r'\("([^"]+)",pid=\d+', " ".join(words[5:]))))
        found.append(Listener(m["v6"] or m["v4"], int(m["port"]), m["iface"], processes))
    return found


def is_internal(listener: Listener, networks: list[str]) -> bool:
    """Whether only loopback or ``networks`` can reach the socket (a wildcard address is public)."""
    if listener.interface == "lo":
        return True
    if listener.address in ("*", "0.0.0.0", "::"):
        return False
    try:
        ip = ipaddress.ip_address(listener.address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in map(ipaddress.ip_network, networks) if net.version == ip.version)


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
# Secrets in files


@dataclass(frozen=True)
class KnownSecret:
    field: str  # where the runbook holds the reference: target.direct.password
    label: str  # the reference: env:TARGET_PASSWORD
    value: str  # never shown

    @property
    def named(self) -> str:
        return f"{self.field} ({self.label})"


def secret_references(value, path: str = "") -> Iterator[tuple[str, SecretRef]]:
    """Every secret reference in a runbook (or any part of it), with its key path."""
    if isinstance(value, SecretRef):
        yield path, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            if name not in _NOT_CREDENTIALS:
                yield from secret_references(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from secret_references(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from secret_references(item, f"{path}[{i}]")


def runbook_secrets(rb: Runbook) -> tuple[list[KnownSecret], list[str]]:
    """The values behind the runbook's secret references (one per reference), and the one-line reasons of
    those that could not be resolved."""
    known: dict[str, KnownSecret] = {}
    unresolved: list[str] = []
    for path, ref in secret_references(rb):
        if ref.label in known:
            continue
        try:
            known[ref.label] = KnownSecret(path, ref.label, ref.resolve(path))
        except SecretUnavailable as exc:
            unresolved.append(str(exc))
    return list(known.values()), unresolved


def secret_in(data: bytes, secret: str) -> bool:
    """Whether ``data`` holds ``secret``: as is, URL-encoded (a password in a DATABASE_URL), or, for a key
    spread over lines, with line breaks ignored. A weak secret only where it stands as a value."""
    text = data.decode("utf-8", errors="replace")
    forms = {secret.strip(), urllib.parse.quote(secret.strip(), safe="")}
    if is_weak_secret(secret):
        alternatives = "|".join(re.escape(f) for f in forms)
        value = rf"['\"]?(?:{alternatives})['\"]?(?=$|[\s;&,])"
        return re.search(rf"{_CREDENTIAL_KEY}['\"]?[ \t]*[=:][ \t]*{value}|[^\s:/@'\"]+:(?:{alternatives})@",
                         text, re.MULTILINE | re.IGNORECASE) is not None
    if "\n" in secret.strip():
        flat = re.sub(r"\s+", "", text)
        return re.sub(r"\s+", "", secret) in flat
    return any(f in text for f in forms)


def check_files(files: list[tuple[str, Callable[[], bytes | None]]], secrets: list[KnownSecret],
                unresolved: list[str]) -> list[CheckLine]:
    """One line per file (``(name, read)``; ``read()`` returns None when the file does not exist), and a line
    for secrets that could not be resolved, so nobody reads a pass for a secret that was never compared."""
    lines = []
    if unresolved:
        lines.append(CheckLine("every secret of the runbook resolved", FAILED,
                               f"{len(unresolved)} could not be compared with the files: " + "; ".join(unresolved),
                               "make each secret available as for a migration run (export the variable, create "
                               "the Prefect Secret block), then re-run"))
    if not files:
        lines.append(CheckLine("no secret in the named files", NOT_CHECKED,
                               "the runbook names no files (security.secret_files, security.local_secret_files)",
                               "name the files that must hold no secret: a repository's .env, docker-compose.yml"))
        return lines
    for name, read in files:
        title = f"no secret in {name}"
        try:
            data = read()
        except LiftoffError as exc:
            lines.append(CheckLine(title, FAILED, redact(str(exc)), "make the file readable, or correct its path"))
            continue
        except OSError as exc:
            lines.append(CheckLine(title, FAILED, f"cannot read it ({exc.strerror or type(exc).__name__})",
                                   "make the file readable, or correct its path"))
            continue
        if data is None:
            lines.append(CheckLine(title, FAILED, "no such file",
                                   "correct the path in security.secret_files / local_secret_files, or remove it"))
            continue
        hits = [s for s in secrets if secret_in(data, s.value)]
        if not hits:
            lines.append(CheckLine(title, PASSED, f"{len(data):,} bytes, none of the runbook's {len(secrets)} "
                                   "secrets in it"))
        else:
            lines.append(CheckLine(title, FAILED, "holds the value of " + ", ".join(s.named for s in hits),
                                   "; ".join(f"rotate {s.field} ({s.label}), then remove it from {name}"
                                             for s in hits) + " (and from git history if the file is committed)"))
    return lines


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
    report = SecurityReport([CheckLine(line.name, line.status, redact(line.detail), redact(line.fix))
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
    except LiftoffError as exc:
        return [CheckLine(name, FAILED, " ".join(redact(str(exc)).split()),
                          "check the ssh section of the runbook and that the VPS answers")]


def require_ssh(rb: Runbook) -> None:
    if rb.ssh is None:
        raise RunbookInvalid(f"runbook {rb.name}: the security checks run on the VPS over SSH: add ssh (host, "
                             "user, private_key, known_hosts); see runbooks/tour-crm.yaml")


@task(name="check the VPS's exposure (gate)", cache_policy=NO_CACHE)
@recorded("security", gate="security")
def security_gate(rb: Runbook) -> SecurityReport:
    require_ssh(rb)
    with Remote(rb.ssh) as remote:
        return check_security(rb, remote)
