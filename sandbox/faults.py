"""A fault-injecting HTTP reverse proxy, put in front of an S3 server so tests can prove that a copy survives
throttling and dropped connections, and count the PUTs that really reached the server.

``FaultProxy(upstream_url, slowdown=0.3, drop=0.1, seed=7)`` listens on a free loopback port (``url``) and
forwards every request to ``upstream_url``, streaming bodies both ways in 64 KiB pieces (an object is never
held whole). The Host header, the path and every end-to-end header go upstream exactly as the client sent
them, so SigV4 signatures made for the proxy's address stay valid. Per request, by method:

- ``slowdown``: answered ``503 SlowDown`` with S3's XML error body, without reaching upstream;
- ``drop``: forwarded, then the connection is closed mid-response: after the headers and half the body,
  or, when the response has no body (PUT, HEAD, DELETE), before any byte of it. The upstream did the work,
  the client cannot know: a retried PUT must be harmless.

Each fraction is a float for every method or a dict by method (``{"PUT": 0.3, "*": 0.1}``, ``*`` for the
others); ``drop`` applies to the requests not answered SlowDown. Faults are drawn from one seeded
``random.Random`` per method, in the order that method's requests arrive: the n-th POST meets the same fault
in every run, however concurrent GETs interleave with it (with one generator for all methods, a thread
switch changed which method drew the faults, and tests expecting faults of two methods failed now and then).
Counters (``requests``, ``forwarded``, ``slowdowns``, ``drops``: ``collections.Counter`` by method) tell a test
what happened; ``puts_forwarded`` counts PUTs that reached upstream (single PUTs and multipart parts).
"""

from __future__ import annotations

import http.client
import http.server
import random
import secrets
import socket
from collections import Counter
from urllib.parse import urlsplit

from liftoff_sandbox.http_service import LoopbackHTTPService, TrackedHandler

_PIECE = 64 * 1024
# Per RFC 9110 these describe one connection, not the message: never forwarded.
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "expect",
}
_SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
)

Fractions = float | dict[str, float]


class FaultProxy(LoopbackHTTPService):
    """Reverse proxy to ``upstream_url`` with seeded 503 SlowDown answers and mid-response drops."""

    thread_name = "fault-proxy"

    def __init__(self, upstream_url: str, *, slowdown: Fractions = 0.0, drop: Fractions = 0.0, seed: int = 0,
                 host: str = "127.0.0.1"):
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FaultProxy upstream must be an http://host:port URL, got {upstream_url!r}")
        super().__init__(host)
        self.upstream = (parts.hostname, parts.port or 80)
        self._seed = seed
        self._randoms: dict[str, random.Random] = {}
        self.set_faults(slowdown=slowdown, drop=drop)
        self.reset_counters()

    # -- configuration and counters ------------------------------------------------------------------

    def set_faults(self, *, slowdown: Fractions | None = None, drop: Fractions | None = None) -> None:
        """Changes the fractions while running (say, faults off for a clean second pass)."""
        with self._lock:
            if slowdown is not None:
                self._slowdown = _fractions("slowdown", slowdown)
            if drop is not None:
                self._drop = _fractions("drop", drop)

    def reset_counters(self) -> None:
        with self._lock:
            self.requests: Counter[str] = Counter()
            self.forwarded: Counter[str] = Counter()
            self.slowdowns: Counter[str] = Counter()
            self.drops: Counter[str] = Counter()

    @property
    def puts_forwarded(self) -> int:
        return self.forwarded["PUT"]

    def _decide(self, method: str) -> str:
        """'slowdown', 'drop' or 'forward' for one request; counts it."""
        with self._lock:
            self.requests[method] += 1
            rng = self._randoms.setdefault(method, random.Random(f"{self._seed}/{method}"))
            draw = rng.random()
            slowdown = self._slowdown.get(method, self._slowdown.get("*", 0.0))
            drop = self._drop.get(method, self._drop.get("*", 0.0))
            if draw < slowdown:
                self.slowdowns[method] += 1
                return "slowdown"
            self.forwarded[method] += 1
            # A second draw keeps the two fractions independent of each other.
            if rng.random() < drop:
                self.drops[method] += 1
                return "drop"
            return "forward"

    # -- lifecycle ------------------------------------------------------------------------------------

def _fractions(name: str, value: Fractions) -> dict[str, float]:
    table = {"*": float(value)} if isinstance(value, (int, float)) else {k.upper(): float(v) for k, v in value.items()}
    for method, fraction in table.items():
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"FaultProxy {name} fraction for {method} must be within 0..1, got {fraction}")
    return table


class _ProxyHandler(TrackedHandler):
    service: FaultProxy

    def setup(self):
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self):
        if self._upstream is not None:
            self._upstream.close()
        super().finish()

    def handle_expect_100(self):
        # Decided per request below: a SlowDown answers before the body is sent, as S3 does.
        return True

    def do_any(self):
        method = self.command
        outcome = self.service._decide(method)
        expects_continue = self.headers.get("Expect", "").lower() == "100-continue"
        if outcome == "slowdown":
            self._answer_slowdown(expects_continue)
            return
        if expects_continue:
            self.send_response_only(100)
            self.end_headers()
        try:
            response = self._forward_request()
        except OSError as exc:
            with self.service._lock:
                self.service.forwarded[method] -= 1
            self._answer_bad_gateway(exc)
            return
        try:
            self._relay_response(response, drop=outcome == "drop")
        finally:
            response.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_OPTIONS = do_PATCH = do_any

    # -- request: client -> upstream --------------------------------------------------------------------

    def _forward_request(self) -> http.client.HTTPResponse:
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(*self.service.upstream, timeout=60)
        conn = self._upstream
        try:
            self._send_request(conn)
            return conn.getresponse()
        except (http.client.HTTPException, OSError):
            # A kept-alive upstream connection the server closed meanwhile: once more on a fresh one,
            # unless the body was already (partly) consumed from the client.
            conn.close()
            if self._body_started:
                raise
            self._send_request(conn)
            return conn.getresponse()

    def _send_request(self, conn: http.client.HTTPConnection) -> None:
        self._body_started = False
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                conn.putheader(name, value)  # Host included, unchanged: SigV4 signed it
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        if chunked:
            self._body_started = True
            self._relay_chunked_request(conn)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                self._body_started = True
                piece = self.rfile.read(min(_PIECE, remaining))
                if not piece:
                    raise ConnectionError(f"client closed the connection with {remaining} request bytes unsent")
                conn.send(piece)
                remaining -= len(piece)

    def _relay_chunked_request(self, conn: http.client.HTTPConnection) -> None:
        while True:
            size_line = self.rfile.readline(1024)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                conn.send(b"0\r\n")
                while True:  # trailers, then the empty line
                    line = self.rfile.readline(8192)
                    conn.send(line)
                    if line in (b"\r\n", b"\n", b""):
                        return
            conn.send(size_line)
            remaining = size
            while remaining > 0:
                piece = self.rfile.read(min(_PIECE, remaining))
                if not piece:
                    raise ConnectionError("client closed the connection inside a request chunk")
                conn.send(piece)
                remaining -= len(piece)
            conn.send(self.rfile.readline(8))  # the CRLF after the chunk

    # -- response: upstream -> client -------------------------------------------------------------------

    def _relay_response(self, response: http.client.HTTPResponse, *, drop: bool) -> None:
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        length = response.getheader("Content-Length")
        length = int(length) if length is not None else None
        if drop and (not has_body or length == 0):
            response.read()  # the upstream finished its work; the client never hears of it
            self._drop_connection()
            return
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        chunked_out = has_body and length is None
        if chunked_out:
            self.send_header("Transfer-Encoding", "chunked")
        if response.will_close and not chunked_out and length is None:
            self.close_connection = True
        self.end_headers()
        if not has_body:
            return
        budget = length // 2 if (drop and length is not None) else None
        sent = 0
        while True:
            want = _PIECE if budget is None else min(_PIECE, budget - sent)
            piece = response.read(want) if want > 0 else b""
            if not piece:
                break
            if chunked_out:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
            sent += len(piece)
            if drop and budget is None:  # chunked: the first piece, then cut
                break
        if drop:
            self.wfile.flush()
            self._drop_connection()
            return
        if chunked_out:
            self.wfile.write(b"0\r\n\r\n")

    def _drop_connection(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._upstream is not None:  # its response may be half read: never reuse it
            self._upstream.close()

    def _answer_slowdown(self, expects_continue: bool) -> None:
        body = _SLOWDOWN_BODY.format(
            resource=self.path.split("?")[0], request_id=secrets.token_hex(8).upper(),
        ).encode()
        if not expects_continue:
            self._discard_request_body()
        self.send_response_only(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if expects_continue:
            # The client holds its body back; the connection cannot be reused without it.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _discard_request_body(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True  # not worth parsing: the client reconnects
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            piece = self.rfile.read(min(_PIECE, remaining))
            if not piece:
                break
            remaining -= len(piece)

    def _answer_bad_gateway(self, exc: OSError) -> None:
        body = f"upstream {self.service.upstream[0]}:{self.service.upstream[1]} unreachable: {exc}".encode()
        self.close_connection = True
        try:
            self.send_response_only(502, "Bad Gateway")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass


FaultProxy.handler = _ProxyHandler
