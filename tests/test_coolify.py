"""The Coolify switch driver against the Coolify API fake, over real HTTP on loopback: the environment it
changes and puts back, the deployments it waits for, and the errors an operator reads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from liftoff.errors import ConnectionRefused, StepFailed
from liftoff.redaction import redact
from liftoff_sandbox.coolify_fake import CoolifyFake
from liftoff.runbooks.model import CoolifySwitch as CoolifySettings
from liftoff.runbooks.model import forget_resolved_secrets
from liftoff.systems.coolify import TOKEN_FIELD, CoolifySwitch

TOKEN = "7|coolify-test-token-Zq8Lw2"
TOKEN_ENV = "LIFTOFF_TEST_COOLIFY_TOKEN"
CRM, WORKER = "crm0app0uuid0000000000a1", "worker0app0uuid000000a2"
OLD_DB = "postgresql://postgres.abcd:Old-Supabase-Pw-991@aws-0-eu.pooler.supabase.com:6543/postgres"
NEW = {"DATABASE_URL": "postgresql://crm_app:New-Target-Pw-314@10.0.0.5:6432/crm",
       "REDIS_URL": "redis://:Redis-Pw-2718@10.0.0.5:6379/0"}
BULK = "PATCH /api/v1/applications/{uuid}/envs/bulk"


def applications() -> dict:
    return {
        CRM: {"name": "booking-crm", "envs": {
            "DATABASE_URL": {"value": OLD_DB, "is_literal": True},
            "S3_ENDPOINT": "https://abcd.supabase.co/storage/v1/s3",
            "NEXT_PUBLIC_SITE": "https://book.example.com"},
            "preview_envs": {"DATABASE_URL": OLD_DB}},
        WORKER: {"name": "mailer-worker", "envs": {"DATABASE_URL": OLD_DB, "QUEUE": "mail"}},
    }


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    forget_resolved_secrets()
    yield TOKEN
    forget_resolved_secrets()


@pytest.fixture
def deployed():
    """What each application was last deployed with, as on_deploy saw it."""
    return {}


@pytest.fixture
def fake(token, deployed):
    def on_deploy(app_uuid: str, envs: dict[str, str]) -> None:
        time.sleep(0.2)  # a container restarting: redeploy must wait for it
        deployed[app_uuid] = envs

    with CoolifyFake(TOKEN, applications(), on_deploy) as service:
        yield service


def settings(fake: CoolifyFake, apps=(CRM, WORKER), timeout_s: int = 30) -> CoolifySettings:
    return CoolifySettings(url=fake.url, token={"env": TOKEN_ENV}, applications=list(apps),
                           deploy_timeout_s=timeout_s)


def driver(fake: CoolifyFake, **kwargs) -> CoolifySwitch:
    return CoolifySwitch(settings(fake, **kwargs), poll_interval_s=0.05, retry_wait_max_s=0.05)


def environment(fake: CoolifyFake, app: str) -> dict:
    """Every variable of the application with the flags Coolify keeps, production and preview."""
    return {(e["key"], e["is_preview"]): (e["value"], e["is_literal"], bool(e["is_multiline"]), bool(e["is_shown_once"]))
            for e in fake.applications[app]["envs"]}


def test_apply_then_restore_puts_back_the_exact_previous_environment(fake):
    before = {app: environment(fake, app) for app in (CRM, WORKER)}
    with driver(fake) as switch:
        undo = switch.apply_env(NEW)
        assert fake.envs(CRM)["DATABASE_URL"] == NEW["DATABASE_URL"]
        assert fake.envs(WORKER)["REDIS_URL"] == NEW["REDIS_URL"]
        assert fake.envs(CRM)["NEXT_PUBLIC_SITE"] == "https://book.example.com"  # others kept
        assert environment(fake, CRM)[("DATABASE_URL", False)][1] is True  # its is_literal flag kept
        assert undo == {"applications": {CRM: {"DATABASE_URL": OLD_DB, "REDIS_URL": None},
                                         WORKER: {"DATABASE_URL": OLD_DB, "REDIS_URL": None}},
                        "preview_copies": {CRM: ["REDIS_URL"], WORKER: ["REDIS_URL"]}}
        json.dumps(undo)  # it goes to the ledger as it is

        switch.restore_env(json.loads(json.dumps(undo)))
        assert {app: environment(fake, app) for app in (CRM, WORKER)} == before
        writes = fake.requests[BULK], fake.requests["DELETE /api/v1/applications/{uuid}/envs/{env_uuid}"]
        switch.restore_env(undo)  # a second restore finds nothing to do
        assert (fake.requests[BULK], fake.requests["DELETE /api/v1/applications/{uuid}/envs/{env_uuid}"]) == writes
        assert {app: environment(fake, app) for app in (CRM, WORKER)} == before


def test_second_apply_writes_nothing_and_keeps_the_first_previous_values(fake):
    with driver(fake) as switch:
        first = switch.apply_env(NEW)
        writes = fake.requests[BULK]
        again = switch.apply_env(NEW)
        assert fake.requests[BULK] == writes
        # Computed against the current values it would name the new ones; given the first record it keeps it.
        assert again["applications"][CRM]["DATABASE_URL"] == NEW["DATABASE_URL"]
        assert switch.apply_env(NEW, previous=first) == first
        more = switch.apply_env({**NEW, "S3_ENDPOINT": "https://s3.example.com"}, previous=first)
        assert more["applications"][CRM] == {**first["applications"][CRM],
                                             "S3_ENDPOINT": "https://abcd.supabase.co/storage/v1/s3"}
        switch.restore_env(more)
    assert fake.envs(CRM)["DATABASE_URL"] == OLD_DB and "REDIS_URL" not in fake.envs(CRM)
    assert fake.envs(CRM)["S3_ENDPOINT"] == "https://abcd.supabase.co/storage/v1/s3"


def test_previous_values_are_redacted_from_every_message(fake):
    with driver(fake) as switch:
        switch.apply_env(NEW)
    assert "Old-Supabase-Pw-991" not in redact(f"found {OLD_DB} in the app")


APP = textwrap.dedent("""
    import http.server, json, os, sys
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "healthy", "database": os.environ.get("DATABASE_URL")}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a): pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    print(server.server_address[1], flush=True)
    server.serve_forever()
""")


def test_redeploy_waits_for_each_deployment_and_the_app_restarts_with_the_new_environment(token):
    """on_deploy restarts a local app process with the deployment's environment, as Coolify restarts the
    container; once redeploy returns, the app answers with the new DATABASE_URL."""
    running: dict[str, tuple[subprocess.Popen, int]] = {}

    def restart(app_uuid: str, envs: dict[str, str]) -> None:
        if app_uuid in running:
            running[app_uuid][0].terminate()
            running[app_uuid][0].wait(5)
        proc = subprocess.Popen([sys.executable, "-c", APP], env=envs, stdout=subprocess.PIPE, text=True)
        running[app_uuid] = proc, int(proc.stdout.readline())

    with CoolifyFake(TOKEN, applications(), restart) as fake:
        try:
            with driver(fake) as switch:
                switch.apply_env(NEW)
                switch.redeploy()
            for app in (CRM, WORKER):
                assert [d["status"] for d in fake.deployments.values() if d["_app"] == app] == ["finished"]
                health = httpx.get(f"http://127.0.0.1:{running[app][1]}/api/health").json()
                assert health == {"status": "healthy", "database": NEW["DATABASE_URL"]}
        finally:
            for proc, _ in running.values():
                proc.terminate()
                proc.wait(5)


def test_stop_apps_returns_once_every_app_exited_and_start_apps_once_each_started(token):
    """Coolify's stop is a queued job (its answer comes first): stop_apps returns only after the container
    is gone (the app's health port refuses), start_apps after the start's deployment brought it back."""
    running: dict[str, tuple[subprocess.Popen, int]] = {}
    ports: dict[str, int] = {}

    def start(app_uuid: str, envs: dict[str, str]) -> None:
        proc = subprocess.Popen([sys.executable, "-c", APP], env=envs, stdout=subprocess.PIPE, text=True)
        running[app_uuid] = proc, int(proc.stdout.readline())
        ports[app_uuid] = running[app_uuid][1]

    def stop(app_uuid: str) -> None:
        time.sleep(0.3)  # docker stop's grace period: the status must not be read before it ended
        proc, _ = running.pop(app_uuid)
        proc.terminate()
        proc.wait(5)

    def answers(app_uuid: str) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{ports[app_uuid]}/api/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    with CoolifyFake(TOKEN, applications(), start, on_stop=stop) as fake:
        try:
            for app in (CRM, WORKER):
                start(app, {})
            with driver(fake) as switch:
                switch.stop_apps()
                assert not any(answers(app) for app in (CRM, WORKER))
                assert {fake.applications[app]["status"] for app in (CRM, WORKER)} == {"exited"}
                switch.start_apps()
            assert all(answers(app) for app in (CRM, WORKER))
            assert fake.requests["POST /api/v1/applications/{uuid}/stop"] == 2
            assert [d["status"] for d in fake.deployments.values()] == ["finished", "finished"]
            assert {fake.applications[app]["status"] for app in (CRM, WORKER)} == {"running:healthy"}
        finally:
            for proc, _ in running.values():
                proc.terminate()
                proc.wait(5)


def test_an_app_that_does_not_stop_is_named_at_the_deploy_timeout(fake):
    fake.on_stop = lambda app_uuid: time.sleep(30)  # a container that ignores SIGTERM
    quick = settings(fake, apps=[CRM]).model_copy(update={"deploy_timeout_s": 0.3})  # below the field's minimum
    with CoolifySwitch(quick, poll_interval_s=0.05, retry_wait_max_s=0.05) as switch:
        with pytest.raises(StepFailed) as caught:
            switch.stop_apps()
    assert f"booking-crm ({CRM}) is still 'running:healthy'" in str(caught.value)
    assert "cutover.switch.coolify.deploy_timeout_s" in str(caught.value)


def test_redeploy_forces_a_new_deployment_when_one_is_already_queued(fake, deployed):
    """Coolify queues nothing while an application's deployment is running, and that one may have read
    the old environment: the driver asks again with force, and waits for the new one."""
    httpx.post(f"{fake.url}/api/v1/deploy", params={"uuid": CRM}, headers={"Authorization": f"Bearer {TOKEN}"})
    with driver(fake, apps=[CRM]) as switch:
        switch.apply_env(NEW)
        switch.redeploy()
    assert fake.requests["POST /api/v1/deploy"] == 3
    forced = [d for d in fake.deployments.values() if d["force_rebuild"]]
    assert len(forced) == 1 and forced[0]["status"] == "finished"
    assert deployed[CRM]["DATABASE_URL"] == NEW["DATABASE_URL"]


def test_failed_deployment_is_named_with_its_application_and_uuid(fake):
    fake.fail_deploys.add(WORKER)
    with driver(fake) as switch, pytest.raises(StepFailed) as failed:
        switch.redeploy()
    (deployment,) = [d for d in fake.deployments.values() if d["_app"] == WORKER]
    message = str(failed.value)
    assert deployment["deployment_uuid"] in message and "mailer-worker" in message and WORKER in message
    assert "ended failed" in message and "\n" not in message


def test_deployment_that_never_finishes_stops_at_the_deploy_timeout(fake):
    fake.stuck_deploys.add(CRM)
    started = time.monotonic()
    with driver(fake, apps=[CRM], timeout_s=10) as switch, pytest.raises(StepFailed) as failed:
        switch.redeploy()
    assert 10 <= time.monotonic() - started < 15
    (deployment,) = fake.deployments.values()
    assert deployment["deployment_uuid"] in str(failed.value)
    assert "cutover.switch.coolify.deploy_timeout_s" in str(failed.value)


def test_bad_token_is_one_line_naming_url_and_field_without_the_token(fake, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "7|a-revoked-token-Wq5Xe9")
    forget_resolved_secrets()
    with driver(fake) as switch, pytest.raises(ConnectionRefused) as refused:
        switch.apply_env(NEW)
    message = str(refused.value)
    assert fake.url in message and TOKEN_FIELD in message and "401" in message
    assert "a-revoked-token" not in message and "\n" not in message
    assert fake.requests[BULK] == 0


def test_unknown_application_is_named_and_nothing_is_changed(fake):
    with driver(fake, apps=[CRM, "no0such0app"]) as switch, pytest.raises(StepFailed) as missing:
        switch.apply_env(NEW)
    assert "no0such0app" in str(missing.value) and "cutover.switch.coolify.applications[1]" in str(missing.value)
    assert fake.requests[BULK] == 0 and fake.envs(CRM)["DATABASE_URL"] == OLD_DB


def test_token_that_cannot_read_values_is_refused_before_any_write(token):
    with CoolifyFake(TOKEN, applications(), abilities=("read", "write", "deploy")) as fake:
        with driver(fake) as switch, pytest.raises(ConnectionRefused) as refused:
            switch.apply_env(NEW)
        assert "read:sensitive" in str(refused.value) and TOKEN_FIELD in str(refused.value)
        assert fake.requests[BULK] == 0


def test_shown_once_variable_cannot_be_switched_because_it_cannot_be_undone(token):
    apps = applications()
    apps[WORKER]["envs"]["DATABASE_URL"] = {"value": OLD_DB, "is_shown_once": True}
    with CoolifyFake(TOKEN, apps) as fake:
        with driver(fake) as switch, pytest.raises(StepFailed) as refused:
            switch.apply_env(NEW)
        assert "DATABASE_URL" in str(refused.value) and WORKER in str(refused.value)
        assert fake.requests[BULK] == 0 and fake.envs(CRM)["DATABASE_URL"] == OLD_DB


def test_server_errors_are_retried_and_then_named(fake):
    fake.inject(BULK, 503, 502)
    with driver(fake, apps=[CRM]) as switch:
        switch.apply_env(NEW)
        assert fake.envs(CRM)["DATABASE_URL"] == NEW["DATABASE_URL"]
        assert fake.requests[BULK] == 3
        fake.inject("GET /api/v1/applications/{uuid}/envs", 500, 500, 500, 500)
        with pytest.raises(StepFailed) as failed:
            switch.restore_env({"applications": {CRM: {"DATABASE_URL": OLD_DB}}})
    assert "500" in str(failed.value) and fake.url in str(failed.value)


def test_fake_answers_errors_as_coolify_does(fake):
    api = httpx.Client(base_url=f"{fake.url}/api/v1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert api.get("/applications").status_code == 200
    assert httpx.get(f"{fake.url}/api/v1/applications").json() == {"message": "Unauthenticated."}
    get_deploy = api.get("/deploy", params={"uuid": CRM})
    assert (get_deploy.status_code, get_deploy.headers["Allow"]) == (405, "POST")
    assert api.get("/applications/nope").json() == {"message": "Application not found."}
    assert api.get("/applications/nope/envs").json() == {"message": "Application not found"}
    assert api.post("/deploy", params={"uuid": "nope"}).json() == {"message": "No resources found."}
    assert api.get("/deployments/nope").json() == {"message": "Deployment not found."}
    assert api.get(f"/applications/{CRM}/stop").status_code == 405
    assert api.post("/applications/nope/start").json() == {"message": "Application not found."}
    started = api.post(f"/applications/{CRM}/start").json()
    assert started["message"] == "Deployment request queued." and len(started["deployment_uuid"]) == 24
    assert api.post(f"/applications/{CRM}/start").json() == {"message": "Deployment already queued for this commit."}
    assert api.put(f"/applications/{CRM}/envs").json() == {"message": "Not found.", "docs": "https://coolify.io/docs"}
    bad_key = api.patch(f"/applications/{CRM}/envs/bulk", json={"data": [{"key": "1BAD", "value": "x"}]})
    assert bad_key.status_code == 422 and bad_key.json()["errors"] == {"key": ["The key field format is invalid."]}
    not_json = api.patch(f"/applications/{CRM}/envs", content=b"key=A", headers={"Content-Type": "text/plain"})
    assert not_json.json()["error"] == "Content-Type must be application/json."
    # An update that omits the flags resets them, as update_env_by_uuid does: why the driver sends them.
    api.patch(f"/applications/{CRM}/envs", json={"key": "DATABASE_URL", "value": OLD_DB})
    assert environment(fake, CRM)[("DATABASE_URL", False)][1] is False
    listed = api.get(f"/applications/{CRM}/envs").json()
    assert [(e["key"], e["is_preview"]) for e in listed][-1] == ("DATABASE_URL", True)
    api.close()
