"""DNS: the TTL of the public record the apps are reached by, asked of a chosen resolver (dnspython).

Before a cutover the record's TTL should be short (the plan: 300 s or less), so that when the record changes,
or when it must change back, caches let go of the old answer within minutes. The TTL read is the one a cache
would hold the whole answer for: the smallest along a CNAME chain. An authoritative server answers with the
record's own TTL; a recursive resolver answers from its cache with what is left of it (never more than the
record's own), so ``lookup`` says which of the two it got.

Knows nothing of runbooks or Prefect; errors are one line naming the name and the resolver.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from liftoff.errors import ConnectionRefused, StepFailed

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class DnsAnswer:
    name: str
    rtype: str
    ttl: int  # the smallest TTL along the answer's chain: how long a cache may keep it
    answers: list[str]  # the final records' values, as text (addresses for A/AAAA)
    authoritative: bool  # the server that answered holds the zone (else the TTL is a cache's remainder)
    resolver: str  # who was asked, for messages
    cnames: tuple[str, ...] = ()  # the CNAME chain followed from name to the answer, in order (no final dot)


def parse_resolver(resolver: str) -> tuple[str, int]:
    """``"ip"``, ``"ip:port"`` or ``"[ipv6]:port"`` -> (ip, port); port 53 when not given."""
    text = resolver.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise StepFailed(f"DNS resolver '{resolver}': expected an IP address, optionally with a port "
                         "(1.1.1.1, 127.0.0.1:5353 or [::1]:53)") from None
    return host, number


def _resolver(resolver: str | None, timeout: float) -> tuple[dns.resolver.Resolver, str]:
    if resolver is None:
        try:
            r = dns.resolver.Resolver()  # /etc/resolv.conf
        except dns.resolver.NoResolverConfiguration:
            raise StepFailed("DNS: this machine has no resolver configured (/etc/resolv.conf); name one "
                             "as ip or ip:port") from None
        where = f"the system resolver ({', '.join(str(ns) for ns in r.nameservers) or 'none'})"
    else:
        host, port = parse_resolver(resolver)
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [host]
        r.port = port
        where = f"resolver {host}:{port}"
    r.timeout = r.lifetime = timeout
    return r, where


def lookup(name: str, resolver: str | None = None, rtype: str = "A", *,
           timeout: float = DEFAULT_TIMEOUT_S) -> DnsAnswer:
    """Asks ``resolver`` (None: the system's) for ``name``'s ``rtype`` records. Raises StepFailed (no such
    name, no such record) or ConnectionRefused (no answer in time, or the server refused), one line each."""
    r, where = _resolver(resolver, timeout)
    try:
        qname = dns.name.from_text(name)
        answer = r.resolve(qname, rtype, search=False, raise_on_no_answer=True)
    except dns.resolver.NXDOMAIN:
        raise StepFailed(f"DNS {name}: no such name (NXDOMAIN) at {where}; check the record's name") from None
    except dns.resolver.NoAnswer:
        raise StepFailed(f"DNS {name}: the name exists but has no {rtype} record at {where}") from None
    except dns.exception.Timeout:
        raise ConnectionRefused(f"DNS {where} did not answer for {name} {rtype} within {timeout:g} s; "
                                "check the resolver's address and that it is reachable") from None
    except dns.resolver.NoNameservers as exc:
        # SERVFAIL, REFUSED, or nothing listening (each server's error is in the message, one per server)
        errors = exc.kwargs.get("errors") or []  # (server, tcp, port, error, response) per server tried
        why = " ".join(str(errors[0][3] if isinstance(errors[0], tuple) else errors[0]).split()) if errors else ""
        raise ConnectionRefused(f"DNS {where} gave no answer for {name} {rtype} ({why or 'no usable answer'}); "
                                "check the resolver") from None
    except (dns.exception.DNSException, ValueError) as exc:
        raise StepFailed(f"DNS {name} {rtype} at {where}: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
    return DnsAnswer(
        name=name, rtype=dns.rdatatype.to_text(answer.rdtype), ttl=int(answer.chaining_result.minimum_ttl),
        answers=sorted(rdata.to_text() for rdata in answer.rrset),
        authoritative=bool(answer.response.flags & dns.flags.AA), resolver=where,
        cnames=tuple(rrset[0].target.to_text(omit_final_dot=True) for rrset in answer.chaining_result.cnames),
    )


def record_ttl(name: str, resolver: str | None = None, rtype: str = "A", *,
               timeout: float = DEFAULT_TIMEOUT_S) -> tuple[int, list[str]]:
    """The TTL a cache may keep ``name``'s ``rtype`` answer for, and the answer's values (see ``lookup``)."""
    found = lookup(name, resolver, rtype, timeout=timeout)
    return found.ttl, found.answers
