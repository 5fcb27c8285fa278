"""`ss` (iproute2) output, read once for every use: the sockets a host listens on (``ss -tlnp``: the security
checks) and the connections it holds (``ss -tan``: the health checks). One parser, ``parse_sockets``, for
both: the columns are [Netid] State Recv-Q Send-Q Local-Address:Port Peer-Address:Port [Process]."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from liftoff.errors import StepFailed
from liftoff.systems.remote import Remote

_LOCAL = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^\[\]%]+?))(?:%(?P<iface>[^:\s]+))?:(?P<port>\d+|\*)$")


@dataclass(frozen=True)
class Socket:
    state: str  # LISTEN, ESTAB, TIME-WAIT ...
    address: str  # the local address as ss prints it, without brackets: 127.0.0.1, 0.0.0.0, ::, ::1, *
    port: int
    interface: str | None  # bound to one device (SO_BINDTODEVICE): 0.0.0.0%lo
    processes: tuple[str, ...]  # empty when ss could not see the owner (not root, or no -p)

    @property
    def shown(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}{'%' + self.interface if self.interface else ''}:{self.port}"


Listener = Socket  # a socket in state LISTEN


def parse_sockets(text: str) -> list[Socket]:
    """Every TCP socket of ``ss -t...`` output (with or without the header, the Netid column or -p)."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("tcp", "tcp6"):  # `ss -lnp` without -t prints the Netid column first
            words = words[1:]
        if len(words) < 5 or words[0] == "State":
            continue
        m = _LOCAL.match(words[3])
        if m is None or m["port"] == "*":
            continue
        processes = tuple(dict.fromkeys(re.findall(r'\("([^"]+)",pid=\d+', " ".join(words[5:]))))
        found.append(Socket(words[0], m["v6"] or m["v4"], int(m["port"]), m["iface"], processes))
    return found


def parse_listeners(text: str) -> list[Socket]:
    """The listening sockets of ``ss -tlnp`` (or ``-Htlnp``) output."""
    return [s for s in parse_sockets(text) if s.state == "LISTEN"]


def is_internal(listener: Socket, networks: list[str]) -> bool:
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


@dataclass(frozen=True)
class Connections:
    port: int
    established_to_port: int  # established TCP connections whose local port is ``port`` (clients of the server)
    established_total: int


def parse_ss(text: str, port: int) -> Connections:
    """Counts of established connections in ``ss -tan`` output, to ``port`` and in all."""
    established = [s for s in parse_sockets(text) if s.state == "ESTAB"]
    return Connections(port, sum(1 for s in established if s.port == port), len(established))


def connection_counts(remote: Remote, port: int) -> Connections:
    result = remote.run("ss -tan", check=False, timeout=60)
    if result.rc != 0:
        why = (result.stderr.strip().splitlines() or [f"exited {result.rc}"])[-1]
        raise StepFailed(f"ssh {remote.where}: ss -tan failed ({why}); install iproute2 on the VPS")
    if not any(line.split()[:1] == ["State"] for line in result.stdout.splitlines()[:1]):
        raise StepFailed(f"ssh {remote.where}: ss -tan printed no socket table (first line "
                         f"{result.stdout.strip().splitlines()[:1]!r}); install iproute2's ss on the VPS")
    return parse_ss(result.stdout, port)
