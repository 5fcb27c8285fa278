"""A stand-in for an app's ``/api/health``, for the tests of the checks that read it (the cutover's checklist,
the health phase): it answers whatever ``answer`` holds, (HTTP status, body as JSON or raw bytes), and counts
the requests it served; ``delay_s`` makes it answer that much later."""

from __future__ import annotations

import json
import time

from liftoff_sandbox.http_service import LoopbackHTTPService, TrackedHandler

HEALTHY = {"status": "healthy", "timestamp": "2026-11-27T10:00:00Z",
           "checks": {"database": {"status": "up", "latency_ms": 2}, "redis": {"status": "up"},
                      "storage": {"status": "up"}}}


class HealthEndpoint(LoopbackHTTPService):
    class handler(TrackedHandler):
        def do_GET(self):
            if self.service.delay_s:
                time.sleep(self.service.delay_s)  # a slow app: the watch's response-time thresholds
            code, body = self.service.answer
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            self.service.hits += 1

    def __init__(self):
        super().__init__()
        self.answer = (200, HEALTHY)
        self.hits = 0
        self.delay_s = 0.0

    @property
    def health_url(self) -> str:
        return f"{self.url}/api/health"
