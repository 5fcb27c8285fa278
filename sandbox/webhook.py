"""A local incoming-webhook receiver, standing in for a Slack or Discord webhook in tests and the demo.

``WebhookReceiver()`` listens on a free loopback port; ``url`` is its webhook address, with a random token in
the path as real webhook URLs have (the URL is the credential: posts to any other path answer 404). Each JSON
body posted there is recorded in ``received``, in arrival order, whatever was answered; ``delivered`` holds the
bodies answered with success. ``fail_next(n)`` makes the next ``n`` posts answer 500 (retry tests).

Answers follow the services': Slack answers ``200 ok`` (text), Discord ``204 No Content``
(``success_status=204``); a body that is not a JSON object answers 400 ``invalid_payload``, as Slack does.
"""

from __future__ import annotations

import json
import secrets

from liftoff_sandbox.http_service import LoopbackHTTPService, TrackedHandler


class _WebhookHandler(TrackedHandler):
    service: WebhookReceiver

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, text = self.service._answer(self.path, raw)
        data = text.encode()
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if status != 204:
            self.wfile.write(data)


class WebhookReceiver(LoopbackHTTPService):
    """Records JSON posts to ``url``; ``fail_next(n)`` answers 500 to the next ``n`` posts."""

    handler = _WebhookHandler
    thread_name = "webhook"

    def __init__(self, *, success_status: int = 200, host: str = "127.0.0.1"):
        super().__init__(host)
        self.success_status = success_status
        self.path = f"/hooks/{secrets.token_urlsafe(16)}"
        self.received: list[dict] = []
        self.delivered: list[dict] = []
        self._failures_left = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def fail_next(self, n: int = 1) -> None:
        with self._lock:
            self._failures_left = n

    def _answer(self, path: str, raw: bytes) -> tuple[int, str]:
        if path != self.path:
            return 404, "no_service"
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, "invalid_payload"
        if not isinstance(body, dict):
            return 400, "invalid_payload"
        with self._lock:
            self.received.append(body)
            if self._failures_left > 0:
                self._failures_left -= 1
                return 500, "internal_error"
            self.delivered.append(body)
        return self.success_status, "ok"
