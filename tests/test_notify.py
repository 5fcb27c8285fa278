"""Failure notifications to a webhook, over real HTTP to a local receiver, and from a real Prefect run's hook."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import time
import uuid

import pytest
import structlog
import yaml
from prefect import flow

from liftoff.flows.options import RunOptions
from liftoff import logs
from liftoff_sandbox.postgres import free_port
from liftoff_sandbox.webhook import WebhookReceiver
from liftoff.runbooks.model import load_runbook
from liftoff.systems.webhook import notify
from liftoff.flows.hooks import notify_on_failure


@pytest.fixture
def receiver():
    with WebhookReceiver() as r:
        yield r


@pytest.fixture
def write_runbook(stack, tmp_path, monkeypatch):
    """A runbook for the stack whose webhook is ``url`` (in an environment variable of its own: a resolved
    secret is kept for the run, and each test is a run)."""

    def write(url: str | None, style: str = "slack") -> str:
        data = stack.runbook_data(state_dir=str(tmp_path / "state"))
        data["name"] = "notify-check"
        if url is not None:
            var = f"LIFTOFF_TEST_WEBHOOK_{uuid.uuid4().hex[:8].upper()}"
            monkeypatch.setenv(var, url)
            data["notifications"] = {"webhook": {"env": var}, "style": style}
        path = tmp_path / "runbook.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return str(path)

    return write


@pytest.fixture
def log_output():
    """Liftoff's log lines, rendered as they would be (redaction included), collected from here on."""
    saved = structlog.get_config()
    out = io.StringIO()
    logs.configure(json=True, level=logging.DEBUG, stream=out)
    yield out
    structlog.configure(**saved)


def test_slack_post_has_the_text_escaped_and_the_run_link(receiver, write_runbook):
    rb = load_runbook(write_runbook(receiver.url))

    assert notify(rb, "gate failed: <!channel> a & b", flow_run_url="http://ui.test/runs/flow-run/42") is True

    assert receiver.delivered == [
        {"text": "gate failed: &lt;!channel&gt; a &amp; b\n<http://ui.test/runs/flow-run/42|flow run>"}
    ]


def test_discord_style_posts_content_with_a_masked_link(write_runbook):
    with WebhookReceiver(success_status=204) as discord:
        rb = load_runbook(write_runbook(discord.url, style="discord"))

        assert notify(rb, "storage gate failed: @everyone 3 objects missing",
                      flow_run_url="http://ui.test/runs/flow-run/7") is True

        assert discord.delivered == [{
            "content": "storage gate failed: @everyone 3 objects missing\n[flow run](<http://ui.test/runs/flow-run/7>)",
            "allowed_mentions": {"parse": []},
        }]


def test_long_text_is_cut_to_fit_a_discord_message(write_runbook):
    with WebhookReceiver(success_status=204) as discord:
        rb = load_runbook(write_runbook(discord.url, style="discord"))

        assert notify(rb, "x" * 5000, flow_run_url="http://ui.test/runs/flow-run/7") is True

        content = discord.delivered[0]["content"]
        assert len(content) < 2000 and content.endswith("[flow run](<http://ui.test/runs/flow-run/7>)")


def test_server_error_is_retried_and_delivered_once(receiver, write_runbook):
    rb = load_runbook(write_runbook(receiver.url))
    receiver.fail_next(1)

    assert notify(rb, "export failed") is True

    assert len(receiver.received) == 2
    assert receiver.delivered == [{"text": "export failed"}]


def test_webhook_that_keeps_failing_gives_up_within_seconds(receiver, write_runbook, log_output):
    rb = load_runbook(write_runbook(receiver.url))
    receiver.fail_next(100)

    started = time.monotonic()
    assert notify(rb, "export failed") is False
    assert time.monotonic() - started < 8

    assert receiver.delivered == [] and 2 <= len(receiver.received) <= 4
    assert "kept answering 500" in log_output.getvalue()


def test_unreachable_webhook_does_not_raise_and_logs_without_the_url(write_runbook, log_output, caplog):
    token = secrets.token_urlsafe(16)
    url = f"http://127.0.0.1:{free_port()}/hooks/{token}"
    rb = load_runbook(write_runbook(url))

    with caplog.at_level(logging.DEBUG):
        assert notify(rb, "restore failed") is False

    written = log_output.getvalue()
    lines = [json.loads(line) for line in written.splitlines()]
    warning = [line for line in lines if line["event"] == "notification not delivered"]
    assert len(warning) == 1 and warning[0]["level"] == "warning"
    assert warning[0]["webhook"] == f"env:{rb.notifications.webhook.env}"
    assert "could not be reached" in warning[0]["reason"]
    everything = written + "\n".join(record.getMessage() for record in caplog.records)
    assert token not in everything and url not in everything


def test_runbook_without_webhook_posts_nothing(receiver, write_runbook):
    rb = load_runbook(write_runbook(None))

    assert notify(rb, "verify failed") is False
    assert receiver.received == []


@flow(name="notify-check-restore", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def failing_phase(options: RunOptions, message: str = "table public.bookings: COPY stopped") -> dict:
    raise RuntimeError(message)


@flow(name="notify-check-migrate", on_failure=[notify_on_failure])
def composed_run(options: RunOptions) -> dict:
    return failing_phase(options)


def _flow_run(flow_run_id: str):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def test_failed_flow_posts_one_message_naming_flow_runbook_and_ui_link(receiver, write_runbook, prefect_api):
    options = RunOptions(runbook=write_runbook(receiver.url))

    state = failing_phase(options, return_state=True)

    assert state.is_failed()
    assert len(receiver.delivered) == 1
    text = receiver.delivered[0]["text"]
    first, link = text.split("\n")
    assert first == "notify-check-restore failed for runbook notify-check: RuntimeError: table public.bookings: COPY stopped"
    m = re.fullmatch(re.escape(f"<{prefect_api.ui_url}/runs/flow-run/") + r"([0-9a-f-]{36})\|flow run>", link)
    assert m, link
    run = _flow_run(m.group(1))
    assert run.name and run.state.is_failed() and run.parameters["options"]["runbook"] == options.runbook


def test_secret_in_the_failure_message_is_redacted_in_the_post(receiver, write_runbook, monkeypatch):
    # A secret the runbook names but the failing code never resolved: the hook still masks it.
    password = secrets.token_urlsafe(18)
    monkeypatch.setenv("LIFTOFF_TEST_NOTIFY_APP_PASSWORD", password)
    path = write_runbook(receiver.url)
    with open(path) as f:
        data = yaml.safe_load(f)
    data["target"]["direct"]["password"] = {"env": "LIFTOFF_TEST_NOTIFY_APP_PASSWORD"}
    with open(path, "w") as f:
        f.write(yaml.safe_dump(data, sort_keys=False))

    failing_phase(RunOptions(runbook=path), message=f"login to target refused with {password} as crm",
                  return_state=True)

    assert len(receiver.delivered) == 1
    text = receiver.delivered[0]["text"]
    assert password not in text
    assert "login to target refused with *** as crm" in text


def test_failed_subflow_notifies_once_through_the_run_it_belongs_to(receiver, write_runbook):
    state = composed_run(RunOptions(runbook=write_runbook(receiver.url)), return_state=True)

    assert state.is_failed()
    assert len(receiver.delivered) == 1
    assert receiver.delivered[0]["text"].startswith("notify-check-migrate failed for runbook notify-check: ")
    assert "COPY stopped" in receiver.delivered[0]["text"]



# ---------------------------------------------------------------------------------------------------------
# Apprise URLs (notifications.urls), each from its severity up: a real SMTP server on loopback (aiosmtpd) stands
# in for the mail relay and for an email-to-SMS gateway; the webhook keeps taking every alert.


@pytest.fixture(scope="module")
def smtp():
    from aiosmtpd.controller import Controller

    class Inbox:
        def __init__(self):
            self.messages: list[tuple[list[str], str]] = []

        async def handle_DATA(self, server, session, envelope):
            import email

            message = email.message_from_bytes(envelope.content)
            text = " ".join(part.get_payload(decode=True).decode(errors="replace") for part in message.walk()
                            if part.get_content_maintype() == "text")  # quoted-printable decoded
            self.messages.append((list(envelope.rcpt_tos), f"{message['Subject']}\n{text}"))
            return "250 OK"

        def to(self, address: str) -> list[str]:
            return [body for rcpt, body in self.messages if address in rcpt]

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller.port, inbox
    finally:
        controller.stop()


@pytest.fixture
def alerting_runbook(stack, tmp_path, monkeypatch, receiver, smtp):
    """Email to the team for errors and above, 'SMS' (an email-to-SMS address) for critical only, the webhook."""
    port, inbox = smtp
    inbox.messages.clear()
    # variables of their own per test: a resolved secret is kept for the run, and each test is a run
    email, sms, hook = (f"LIFTOFF_TEST_ALERT_{kind}_{uuid.uuid4().hex[:8].upper()}" for kind in ("EMAIL", "SMS", "HOOK"))
    for var, to in ((email, "team@example.com"), (sms, "pager@sms.example.com")):
        monkeypatch.setenv(var, f"mailto://127.0.0.1:{port}?mode=insecure&from=liftoff@example.com&to={to}")
    monkeypatch.setenv(hook, receiver.url)
    data = stack.runbook_data(state_dir=str(tmp_path / "state"))
    data["name"] = "notify-check"
    data["notifications"] = {"webhook": {"env": hook}, "urls": [{"url": {"env": email}, "severity": "error"},
                                                                {"url": {"env": sms}, "severity": "critical"}]}
    path = tmp_path / "runbook.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path), inbox


def test_each_apprise_url_gets_the_alerts_from_its_severity_up_and_the_webhook_gets_all(alerting_runbook, receiver):
    path, inbox = alerting_runbook
    rb = load_runbook(path)
    password = rb.source.password.resolve("source.password")

    assert notify(rb, f"rehearsal downtime over the plan's (password {password})", severity="warning")
    assert inbox.messages == [] and len(receiver.delivered) == 1
    assert notify(rb, "verify-database failed for runbook notify-check", severity="error")
    assert len(inbox.to("team@example.com")) == 1 and inbox.to("pager@sms.example.com") == []
    assert notify(rb, "cutover failed for runbook notify-check", flow_run_url="http://ui/runs/1", severity="critical")
    assert len(inbox.to("team@example.com")) == 2 and len(inbox.to("pager@sms.example.com")) == 1
    assert "cutover failed for runbook notify-check" in inbox.to("pager@sms.example.com")[0]
    assert "http://ui/runs/1" in inbox.to("pager@sms.example.com")[0]
    assert len(receiver.delivered) == 3
    assert password not in json.dumps(receiver.delivered) + json.dumps(inbox.messages)


def test_a_failed_cutover_is_critical_and_pages_as_well(alerting_runbook, receiver):
    path, inbox = alerting_runbook

    @flow(name="cutover", on_failure=[notify_on_failure])
    def cutover_that_fails(options: RunOptions):
        raise RuntimeError("switch: the app did not come up on the target")

    assert cutover_that_fails(RunOptions(runbook=path), return_state=True).is_failed()
    paged = inbox.to("pager@sms.example.com")
    assert len(paged) == 1 and "cutover failed for runbook notify-check" in paged[0]
    assert len(inbox.to("team@example.com")) == 1 and len(receiver.delivered) == 1
