"""A tiny authoritative DNS server on a free loopback UDP port, for the tests: it answers for the records it
is given, with the TTLs it is given, as the zone's own server would (the AA flag set), through dnspython's
message API.

    with DnsServer({"app.example.test": ("A", 60, ["203.0.113.10"])}) as dns:
        record_ttl("app.example.test", dns.resolver)  # -> (60, ["203.0.113.10"])

A name it does not hold is NXDOMAIN; a name it holds as a CNAME answers with the CNAME and the target's records
when it holds them; a name it holds asked for another type is an empty NOERROR answer.
``records`` may be changed while it runs (``set``), so a test can shorten a TTL as an operator would.
``silent=True`` reads queries and never answers: a resolver that times out.
"""

from __future__ import annotations

import socket
import threading

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Record = tuple[str, int, list[str]]  # (type, ttl, values as zone-file text)


class DnsServer:
    def __init__(self, records: dict[str, Record] | None = None, host: str = "127.0.0.1", silent: bool = False):
        self.host = host
        self.silent = silent
        self._records: dict[tuple[dns.name.Name, int], tuple[int, list[str]]] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.queries = 0
        for name, record in (records or {}).items():
            self.set(name, *record)

    def set(self, name: str, rtype: str, ttl: int, values: list[str]) -> None:
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rtype))
        with self._lock:
            self._records[key] = (ttl, list(values))

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("DnsServer is not started")
        return self._sock.getsockname()[1]

    @property
    def resolver(self) -> str:
        """``ip:port``, as a runbook's ``cutover.checklist.dns.resolver`` names it."""
        return f"{self.host}:{self.port}"

    def start(self) -> "DnsServer":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((self.host, 0))
        self._sock.settimeout(0.2)  # how soon the serving thread sees stop()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"sandbox-dns-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._sock is None:
            return
        self._stopping.set()
        self._thread.join(5)
        self._sock.close()
        self._sock = None

    def _serve(self) -> None:
        sock = self._sock
        while not self._stopping.is_set():
            try:
                wire, client = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            if self.silent:
                continue
            try:
                reply = self._answer(wire)
            except dns.exception.DNSException:
                continue  # not a DNS query: a real server would drop it too
            try:
                sock.sendto(reply, client)
            except OSError:
                return

    def _answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        with self._lock:
            held = {name for name, _ in self._records}
            found = self._records.get((question.name, question.rdtype))
        if question.name not in held:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif found is not None:
            ttl, values = found
            response.answer.append(dns.rrset.from_text_list(question.name, ttl, dns.rdataclass.IN,
                                                            question.rdtype, values))
        else:
            self._follow_cname(response, question.name, question.rdtype)
        return response.to_wire()

    def _follow_cname(self, response: dns.message.Message, name: dns.name.Name, rdtype: int) -> None:
        """As a zone's server answers a name that is a CNAME: the CNAME, then what it holds for the target
        (a name outside what it holds is left to the asker's resolver to chase)."""
        for _ in range(8):
            with self._lock:
                alias = self._records.get((name, dns.rdatatype.CNAME))
            if alias is None:
                return
            ttl, values = alias
            response.answer.append(dns.rrset.from_text_list(name, ttl, dns.rdataclass.IN, dns.rdatatype.CNAME,
                                                            values))
            name = dns.name.from_text(values[0])
            with self._lock:
                found = self._records.get((name, rdtype))
            if found is not None:
                response.answer.append(dns.rrset.from_text_list(name, found[0], dns.rdataclass.IN, rdtype, found[1]))
                return

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
