"""ufw's firewall as ``ufw status verbose`` prints it: parsed into rules, and judged against the ports the
runbook allows in (``check_firewall``: active, incoming denied by default, no opening beyond them)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass


from liftoff.checks import FAILED, NOT_CHECKED, PASSED, CheckLine



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
