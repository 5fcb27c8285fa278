"""A stand-in for the CDN in front of the public files (Cloudflare, proxied), for the tests of the CDN check: a
caching reverse proxy on a free loopback port. A GET for ``/<bucket>/<key>`` is fetched from the origin (the
target's S3 server, anonymously, as a CDN fetches a public bucket) on the first request (``cf-cache-status:
MISS``) and answered from its cache after (``HIT``) until ``purge``; every answer carries the Cache-Control the
edge rule sets (``max_age``; the plan: images cached a month). The ``Host`` header is not checked, as a CDN
routes by it but a test has one site.

Like a real CDN it goes on serving what it cached when the origin's object changes: a stale edge is one of the
differences the check must catch.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from liftoff_sandbox.http_service import LoopbackHTTPService, TrackedHandler

MONTH_S = 30 * 24 * 3600


class CdnStandIn(LoopbackHTTPService):
    thread_name = "sandbox-cdn"

    class handler(TrackedHandler):
        def do_GET(self):
            service = self.service
            with service._lock:
                cached = service.cache.get(self.path)
            status = "HIT"
            if cached is None:
                status = "MISS"
                try:
                    with urllib.request.urlopen(service.origin + self.path, timeout=10) as response:
                        cached = (response.status, response.headers.get("Content-Type", "application/octet-stream"),
                                  response.read())
                except urllib.error.HTTPError as exc:
                    cached = (exc.code, "application/xml", exc.read())
                if cached[0] == 200:
                    with service._lock:
                        service.cache[self.path] = cached
            code, content_type, body = cached
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if code == 200:
                self.send_header("Cache-Control", f"public, max-age={service.max_age}")
                self.send_header("cf-cache-status", status)
            self.end_headers()
            self.wfile.write(body)
            service.requests.append((self.headers.get("Host"), self.path, status))

    def __init__(self, origin: str, max_age: int = MONTH_S):
        super().__init__()
        self.origin = origin.rstrip("/")
        self.max_age = max_age
        self.cache: dict[str, tuple[int, str, bytes]] = {}
        self.requests: list[tuple[str | None, str, str]] = []  # (Host header, path, MISS or HIT)

    def purge(self) -> None:
        with self._lock:
            self.cache.clear()
