"""A small HTTP service on a free loopback port, served by a background thread: what the sandbox's fakes and
proxies are built on (``faults.FaultProxy``, ``storage_api.StorageApiFake``).

``stop`` shuts the server and also the kept-alive client connections, which would otherwise go on being
served by their handler threads after the server is gone.
"""

from __future__ import annotations

import http.server
import socket
import sys
import threading


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a client hanging up is not news


class TrackedHandler(http.server.BaseHTTPRequestHandler):
    """A keep-alive handler whose connection its service can close; ``service`` is set by ``start``."""

    service: "LoopbackHTTPService"
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 and HTTP API clients expect
    timeout = 60  # a stuck client must not pin a thread forever

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm meets the client's
        # delayed ACK and every kept-alive response waits ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.service._lock:
            self.service._connections.add(self.connection)

    def finish(self):
        with self.service._lock:
            self.service._connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # tests read counters, not access logs


class LoopbackHTTPService:
    """Subclasses set ``handler`` (a ``TrackedHandler`` subclass) and call ``super().__init__(host)``."""

    handler: type[TrackedHandler]
    thread_name = "loopback-http"

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self._port = port  # 0: any free port
        self._lock = threading.Lock()
        self._server: QuietServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self):
        handler = type(f"{type(self).__name__}Handler", (self.handler,), {"service": self})
        self._server = QuietServer((self.host, self._port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"{self.thread_name}-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
