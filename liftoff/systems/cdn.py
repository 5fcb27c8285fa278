"""A CDN in front of a host: whether the host's name leads to the CDN (a CNAME to it, or the CDN's addresses, as
a proxied Cloudflare record answers), and a GET sent to the address the name resolved to, with the host's name
in the Host header (and as the TLS server name), so what is read is what the CDN serves for that name.

Knows HTTP (urllib3) and DNS (``liftoff.systems.dns``) only; errors are one line naming the host and address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3

from liftoff.errors import ConnectionRefused
from liftoff.systems.dns import DnsAnswer

DEFAULT_TIMEOUT_S = 10.0


def through_cdn(found: DnsAnswer, cname: str | None, networks: list[str]) -> tuple[bool, str]:
    """Whether a lookup's answer goes through the CDN: one of its CNAMEs is ``cname`` or ends with it, or every
    address is inside one of the CDN's ``networks``. Returns the verdict and what was seen."""
    chain = " -> ".join([found.name, *found.cnames])
    seen = f"{chain} -> {', '.join(found.answers)}"
    if cname:
        wanted = cname.rstrip(".").lower()
        if any(c.lower() == wanted or c.lower().endswith("." + wanted) for c in found.cnames):
            return True, seen
    if networks:
        ranges = [ipaddress.ip_network(n, strict=False) for n in networks]
        if found.answers and all(any(ipaddress.ip_address(a) in r for r in ranges) for a in found.answers):
            return True, seen
    return False, seen


@dataclass(frozen=True)
class Fetched:
    url: str
    address: str  # the address the request was sent to
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def max_age(self) -> int | None:
        """Cache-Control's max-age (what a browser keeps it for), None when absent."""
        m = re.search(r"(?:^|[,\s])max-age\s*=\s*(\d+)", self.header("cache-control") or "", re.IGNORECASE)
        return int(m.group(1)) if m else None


def fetch_through(url: str, address: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> Fetched:
    """GET ``url`` from ``address`` (not from whatever this machine's resolver says), with the URL's host as the
    Host header and, over HTTPS, as the server name the certificate must carry. No redirect is followed."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    kw = {"timeout": urllib3.Timeout(connect=timeout, read=timeout), "retries": False, "maxsize": 1}
    pool = (urllib3.HTTPSConnectionPool(address, port, server_hostname=parts.hostname,
                                        assert_hostname=parts.hostname, **kw) if https
            else urllib3.HTTPConnectionPool(address, port, **kw))
    try:
        response = pool.request("GET", path, headers={"Host": parts.netloc}, redirect=False, preload_content=True)
    except urllib3.exceptions.HTTPError as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
        raise ConnectionRefused(f"CDN {parts.hostname} at {address}:{port}: no answer to GET {path} ({reason}); "
                                "check the record and that the CDN proxies it") from None
    finally:
        pool.close()
    return Fetched(url, address, response.status, {k.lower(): v for k, v in response.headers.items()},
                   response.data)
