"""Coolify's REST API: change applications' environment variables, redeploy them, undo the change, and stop
and start the applications (the recovery replaces their database while they are stopped).

``CoolifySwitch`` is the cutover's switch driver for apps deployed by Coolify (``liftoff.systems.switch.SwitchDriver``);
``CoolifyClient`` is the few API calls it needs (``/api/v1``, bearer token): an application's variables,
the bulk update, deleting one variable, a deploy, an application's start and stop, and a deployment's
status. Shapes and messages are
Coolify 4.3's (``sandbox/coolify_fake.py`` names the files they come from).

What Coolify does that shapes the driver:

- An update that omits ``is_literal``, ``is_multiline`` or ``is_shown_once`` resets them, so every update
  sends the variable's current flags; a variable the switch creates is literal (a password's ``$`` is not
  interpolated).
- Values are only readable with a token that has ``root`` or ``read:sensitive`` (of a team admin), and never
  for an ``is_shown_once`` variable. The previous values are what the rollback restores, so the switch
  refuses, before changing anything, when it cannot read them.
- Creating a variable also creates its preview-deployment copy when there is none; the undo record lists
  those copies (``preview_copies``) so the restore removes them too.
- A deploy while one of the same application is queued or in progress queues nothing ("Deployment already
  queued for this commit.") and answers a deployment UUID that names no deployment; that deployment may have
  read the old variables, so the driver asks again with ``force`` (a rebuild without cache). ``start`` is
  such a deployment too.
- ``stop`` answers as soon as the stop job is queued; the application's ``status`` turns ``exited`` once its
  containers are gone, so the driver polls it before the database is touched.

The previous values go to the undo record (the ledger, a local file) and are registered for redaction; they
are never logged.
"""

from __future__ import annotations

import copy
import re
import time

import httpx
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from liftoff.errors import ConnectionRefused, RunbookInvalid, StepFailed
from liftoff.logs import get_logger
from liftoff.redaction import redact, register_secret
from liftoff.runbooks.model import CoolifySwitch as CoolifySettings
from liftoff.systems.switch import SwitchDriver

TOKEN_FIELD = "cutover.switch.coolify.token"
# app/Support/ValidationPatterns.php ENVIRONMENT_VARIABLE_KEY_PATTERN
_ENV_KEY = re.compile(r"\A[A-Za-z_][A-Za-z0-9_.]*\Z")
DEPLOY_ALREADY_QUEUED = "Deployment already queued for this commit."
_RUNNING = ("queued", "in_progress")
_FLAGS = ("is_literal", "is_multiline", "is_shown_once")

log = get_logger(system="coolify")


class _Retryable(Exception):
    """A 5xx or 429 answer: worth asking again."""

    def __init__(self, response: httpx.Response):
        super().__init__(response.status_code)
        self.response = response


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    text = body.get("message") if isinstance(body, dict) else None
    errors = body.get("errors") if isinstance(body, dict) else None
    if errors:
        text = f"{text} {errors}"
    return redact(str(text or f"HTTP {response.status_code}"))[:300]


class CoolifyClient:
    """The Coolify API calls the switch needs. Connection errors, 5xx and 429 answers are retried with
    backoff (a deploy only when the request cannot have been served: connection refused, 429); 401 and 403
    are ``ConnectionRefused`` naming the URL and the token's runbook field; other answers are returned."""

    def __init__(self, url: str, token: str, *, attempts: int = 4, retry_wait_max_s: float = 8.0,
                 timeout_s: float = 30.0):
        self.url = re.sub(r"(/api(/v1)?)?/*$", "", url)
        self.attempts = attempts
        self.retry_wait_max_s = retry_wait_max_s
        self._http = httpx.Client(base_url=f"{self.url}/api/v1", timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, replayable: bool = True, **kwargs) -> httpx.Response:
        def worth_retrying(exc: BaseException) -> bool:
            if isinstance(exc, _Retryable):
                return replayable or exc.response.status_code == 429
            if isinstance(exc, httpx.TransportError):
                return replayable or isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            return False

        try:
            for attempt in Retrying(retry=retry_if_exception(worth_retrying), reraise=True,
                                    stop=stop_after_attempt(self.attempts),
                                    wait=wait_random_exponential(multiplier=0.25, max=self.retry_wait_max_s)):
                with attempt:
                    response = self._http.request(method, path, **kwargs)
                    if response.status_code >= 500 or response.status_code == 429:
                        raise _Retryable(response)
        except _Retryable as exc:
            raise StepFailed(f"Coolify at {self.url}: {method} /api/v1{path} answered "
                             f"{exc.response.status_code} ({_message(exc.response)}) after {self.attempts} "
                             "attempts; check Coolify's logs and re-run") from None
        except httpx.TransportError as exc:
            raise ConnectionRefused(f"Coolify at {self.url} could not be reached ({type(exc).__name__}: "
                                    f"{redact(str(exc))[:200]}); check cutover.switch.coolify.url") from None
        if response.status_code == 401 or (response.status_code == 400 and _message(response) == "Invalid token."):
            raise ConnectionRefused(f"Coolify at {self.url} refused the API token ({response.status_code} "
                                    f"{_message(response)}); check {TOKEN_FIELD}: a token from Keys & Tokens / "
                                    "API tokens of the applications' team")
        if response.status_code == 403:
            raise ConnectionRefused(f"Coolify at {self.url} refused {method} /api/v1{path} to the token in "
                                    f"{TOKEN_FIELD}: {_message(response)}; the switch needs a token with the "
                                    "root permission, or read, read:sensitive, write and deploy, of a team admin")
        return response

    def application(self, uuid: str) -> dict | None:
        """The application, or None when Coolify has none by that UUID (for the token's team)."""
        response = self._request("GET", f"/applications/{uuid}")
        if response.status_code == 404:
            return None
        self._expect(response, 200, f"reading application {uuid}")
        return response.json()

    def envs(self, uuid: str) -> list[dict] | None:
        """The application's variables (production and preview), or None when there is no such application."""
        response = self._request("GET", f"/applications/{uuid}/envs")
        if response.status_code == 404:
            return None
        self._expect(response, 200, f"reading the environment of application {uuid}")
        return response.json()

    def update_envs(self, uuid: str, items: list[dict]) -> list[dict]:
        """Creates or updates these variables (``PATCH .../envs/bulk``: each item ``key``, ``value`` and flags)."""
        response = self._request("PATCH", f"/applications/{uuid}/envs/bulk", json={"data": items})
        self._expect(response, 201, f"updating the environment of application {uuid} "
                                    f"(keys {', '.join(i['key'] for i in items)})")
        return response.json()

    def delete_env(self, uuid: str, env_uuid: str) -> bool:
        """Deletes one variable; False when it was already gone."""
        response = self._request("DELETE", f"/applications/{uuid}/envs/{env_uuid}")
        if response.status_code == 404 and _message(response) == "Environment variable not found.":
            return False
        self._expect(response, 200, f"deleting variable {env_uuid} of application {uuid}")
        return True

    def deploy(self, uuid: str, *, force: bool = False) -> dict:
        """Queues a deployment: ``{"message", "resource_uuid", "deployment_uuid"}`` (no ``deployment_uuid``
        when Coolify queued none)."""
        response = self._request("POST", "/deploy", params={"uuid": uuid, "force": str(force).lower()},
                                 replayable=False)
        self._expect(response, 200, f"deploying application {uuid}")
        for item in response.json().get("deployments", []):
            if item.get("resource_uuid") == uuid:
                return item
        raise StepFailed(f"Coolify at {self.url} answered the deploy of application {uuid} without it: "
                         f"{_message(response)}")

    def start(self, uuid: str, *, force: bool = False) -> dict:
        """Starts an application (``POST /applications/{uuid}/start``: a deployment with its current
        environment): ``{"message", "deployment_uuid"}``, no ``deployment_uuid`` when one is already queued."""
        response = self._request("POST", f"/applications/{uuid}/start", params={"force": str(force).lower()},
                                 replayable=False)
        self._expect(response, 200, f"starting application {uuid}")
        return response.json()

    def stop(self, uuid: str) -> None:
        """Asks Coolify to stop an application (``POST /applications/{uuid}/stop``); the stop is a queued job:
        the application's ``status`` is ``exited`` once it ran. Stopping twice is harmless, so it is retried."""
        response = self._request("POST", f"/applications/{uuid}/stop")
        self._expect(response, 200, f"stopping application {uuid}")

    def deployment(self, deployment_uuid: str) -> dict | None:
        response = self._request("GET", f"/deployments/{deployment_uuid}")
        if response.status_code == 404:
            return None
        self._expect(response, 200, f"reading deployment {deployment_uuid}")
        return response.json()

    def _expect(self, response: httpx.Response, status: int, doing: str) -> None:
        if response.status_code != status:
            raise StepFailed(f"Coolify at {self.url}: {doing} failed: {response.status_code} {_message(response)}")


class CoolifySwitch(SwitchDriver):
    """Switches every application of ``settings.applications`` through Coolify's API.

    The undo record is ``{"applications": {uuid: {KEY: previous value, or None if the variable did not
    exist}}, "preview_copies": {uuid: [KEY, ...]}}`` (the preview copies Coolify created with new variables).
    """

    def __init__(self, settings: CoolifySettings, *, poll_interval_s: float = 2.0, attempts: int = 4,
                 retry_wait_max_s: float = 8.0):
        self.settings = settings
        self.client = CoolifyClient(settings.url, settings.token.resolve(TOKEN_FIELD), attempts=attempts,
                                    retry_wait_max_s=retry_wait_max_s)
        self.poll_interval_s = poll_interval_s
        self.where = f"Coolify {self.client.url} applications {', '.join(settings.applications)}"
        self._names: dict[str, str] = {}

    def close(self) -> None:
        self.client.close()

    # ---- environment -----------------------------------------------------------------------------------------

    def apply_env(self, changes: dict[str, str], previous: dict | None = None) -> dict:
        """Sets ``changes`` on every application (other variables are kept, flags too) and returns the undo
        record computed against the values found. With ``previous`` (the undo record of an earlier apply of
        this cutover) the values it recorded are kept and only keys it lacks are added, so the record still
        restores the environment from before the first apply. Nothing is written unless every application's
        current values could be read."""
        bad = [k for k in changes if not _ENV_KEY.match(k)]
        if bad:
            raise RunbookInvalid(f"cutover.switch.env: Coolify refuses the variable name(s) {', '.join(bad)}: "
                                 "a letter or _ first, then letters, digits, _ or .")
        plans = {uuid: self._plan(index, uuid, changes) for index, uuid in enumerate(self.settings.applications)}
        undo = copy.deepcopy(previous) if previous else {"applications": {}, "preview_copies": {}}
        undo.setdefault("applications", {})
        undo.setdefault("preview_copies", {})
        for uuid, (found, items, preview_copies) in plans.items():
            recorded = undo["applications"].setdefault(uuid, {})
            for key, value in found.items():
                recorded.setdefault(key, value)
            if preview_copies:
                copies = undo["preview_copies"].setdefault(uuid, [])
                copies.extend(k for k in preview_copies if k not in copies)
        for uuid, (found, items, _) in plans.items():
            if items:
                self.client.update_envs(uuid, items)
            log.info("coolify environment switched", application=uuid,
                     changed=sorted(i["key"] for i in items), unchanged=sorted(set(changes) - {i["key"] for i in items}))
        return undo

    def _plan(self, index: int, uuid: str, changes: dict[str, str]) -> tuple[dict, list[dict], list[str]]:
        """What applying ``changes`` to one application means: the values found (None: no such variable),
        the items to send, the keys whose preview copy Coolify will create."""
        envs = self._envs(index, uuid)
        production = {e["key"]: e for e in envs if not e.get("is_preview")}
        preview_keys = {e["key"] for e in envs if e.get("is_preview")}
        found: dict[str, str | None] = {}
        items: list[dict] = []
        for key, value in changes.items():
            env = production.get(key)
            if env is None:
                found[key] = None
                items.append({"key": key, "value": value, "is_literal": True, "is_multiline": "\n" in value,
                              "is_shown_once": False})
                continue
            found[key] = self._readable_value(uuid, env)
            register_secret(found[key])
            if found[key] != value:
                items.append({"key": key, "value": value, **{f: bool(env.get(f)) for f in _FLAGS}})
        creates = [k for k, v in found.items() if v is None and k not in preview_keys]
        return found, items, creates

    def restore_env(self, undo: dict) -> None:
        """Puts back every recorded value, deletes the variables the switch created (and their preview
        copies). Idempotent: what already matches is left alone."""
        for uuid, recorded in undo.get("applications", {}).items():
            index = self.settings.applications.index(uuid) if uuid in self.settings.applications else 0
            for value in recorded.values():
                register_secret(value)
            envs = self._envs(index, uuid)
            production = {e["key"]: e for e in envs if not e.get("is_preview")}
            items = [{"key": key, "value": value, **{f: bool(production[key].get(f)) for f in _FLAGS}}
                     if key in production else {"key": key, "value": value, "is_literal": True,
                                                "is_multiline": "\n" in value, "is_shown_once": False}
                     for key, value in recorded.items()
                     if value is not None and (key not in production or production[key].get("value") != value)]
            if items:
                self.client.update_envs(uuid, items)
            created = [production[key] for key, value in recorded.items() if value is None and key in production]
            copies = set(undo.get("preview_copies", {}).get(uuid, []))
            created += [e for e in envs if e.get("is_preview") and e["key"] in copies]
            for env in created:
                self.client.delete_env(uuid, env["uuid"])
            log.info("coolify environment restored", application=uuid,
                     restored=sorted(i["key"] for i in items), deleted=sorted({e["key"] for e in created}))

    def read_env(self) -> dict[str, dict[str, str | None]]:
        """Every application's variables (a 'shown once' value is None: Coolify does not give it back; a token
        that may not read values at all is refused, as the switch would be). Preview copies are not read."""
        found = {}
        for index, uuid in enumerate(self.settings.applications):
            values: dict[str, str | None] = {}
            for env in self._envs(index, uuid):
                if env.get("is_preview"):
                    continue
                try:
                    values[env["key"]] = self._readable_value(uuid, env)
                except StepFailed:  # 'shown once'
                    values[env["key"]] = None
            found[self._name(index, uuid)] = values
        return found

    def _envs(self, index: int, uuid: str) -> list[dict]:
        envs = self.client.envs(uuid)
        if envs is None:
            raise StepFailed(f"Coolify at {self.client.url} has no application {uuid} "
                             f"(cutover.switch.coolify.applications[{index}]) for this token's team; check the "
                             "UUID on the application's page in Coolify")
        return envs

    def _readable_value(self, uuid: str, env: dict) -> str:
        if "value" in env:
            return env["value"] if env["value"] is not None else ""
        if env.get("is_shown_once"):
            raise StepFailed(f"Coolify application {uuid}: variable {env['key']} is 'shown once', so its value "
                             "cannot be read back and the switch could not be undone; untick it in Coolify "
                             "(or set its value by hand and remove it from cutover.switch.env)")
        raise ConnectionRefused(f"Coolify at {self.client.url} hides variable values from the token in "
                                f"{TOKEN_FIELD}; the switch needs them to undo itself: use a token with the "
                                "root or read:sensitive permission, of a team admin")

    # ---- redeploy -------------------------------------------------------------------------------------------

    def redeploy(self) -> None:
        """Deploys every application, then waits for each deployment to finish. A failed, cancelled or
        unfinished deployment (after ``deploy_timeout_s``) is ``StepFailed`` naming the application and the
        deployment."""
        self._wait_for_deployments(self._queue(self.client.deploy))

    # ---- stop and start (the recovery) ----------------------------------------------------------------------

    def stop_apps(self) -> None:
        """Asks Coolify to stop every application, then waits until each one's status is ``exited`` (the stop
        is a queued job in Coolify: its answer comes before the containers are gone). StepFailed naming the
        application when one still runs after ``deploy_timeout_s``."""
        asked = time.monotonic()
        for uuid in self.settings.applications:
            self.client.stop(uuid)
            log.info("coolify stop queued", application=uuid)
        pending = list(enumerate(self.settings.applications))
        while pending:
            for index, uuid in list(pending):
                app = self.client.application(uuid)
                if app is None:
                    raise StepFailed(f"Coolify at {self.client.url} has no application {uuid} "
                                     f"(cutover.switch.coolify.applications[{index}]) for this token's team")
                status = str(app.get("status") or "")
                if status.startswith("exited"):
                    log.info("coolify application stopped", application=uuid,
                             seconds=round(time.monotonic() - asked, 1))
                    pending.remove((index, uuid))
                elif time.monotonic() - asked > self.settings.deploy_timeout_s:
                    raise StepFailed(f"Coolify application {self._name(index, uuid)} is still '{status}' "
                                     f"{self.settings.deploy_timeout_s} s after it was asked to stop "
                                     "(cutover.switch.coolify.deploy_timeout_s); stop it in Coolify, then re-run")
            if pending:
                time.sleep(self.poll_interval_s)

    def start_apps(self) -> None:
        """Starts every application (a Coolify deployment with its current environment) and waits for each
        deployment to finish, as ``redeploy`` does."""
        self._wait_for_deployments(self._queue(self.client.start))

    # ---- deployments ------------------------------------------------------------------------------------------

    def _queue(self, deploy) -> dict[str, tuple[str, float]]:
        """Queues a deployment of every application through ``deploy(uuid, force=...)``; {uuid: (deployment,
        queued at)}."""
        started: dict[str, tuple[str, float]] = {}
        for index, uuid in enumerate(self.settings.applications):
            item = deploy(uuid)
            if item.get("message") == DEPLOY_ALREADY_QUEUED:
                # The running deployment may have read the old variables: a forced one reads the new ones.
                item = deploy(uuid, force=True)
            if not item.get("deployment_uuid") or item.get("message") == DEPLOY_ALREADY_QUEUED:
                raise StepFailed(f"Coolify at {self.client.url} queued no deployment of application "
                                 f"{self._name(index, uuid)}: {redact(str(item.get('message')))}")
            started[uuid] = (item["deployment_uuid"], time.monotonic())
            log.info("coolify deployment queued", application=uuid, deployment=item["deployment_uuid"])
        return started

    def _wait_for_deployments(self, started: dict[str, tuple[str, float]]) -> None:
        pending = dict(started)
        while pending:
            for uuid, (deployment_uuid, at) in list(pending.items()):
                index = self.settings.applications.index(uuid)
                deployment = self.client.deployment(deployment_uuid)
                if deployment is None:
                    raise StepFailed(f"Coolify at {self.client.url} has no deployment {deployment_uuid} of "
                                     f"application {self._name(index, uuid)}")
                status = deployment.get("status")
                if status == "finished":
                    log.info("coolify deployment finished", application=uuid, deployment=deployment_uuid,
                             seconds=round(time.monotonic() - at, 1))
                    del pending[uuid]
                elif status not in _RUNNING:
                    raise StepFailed(f"Coolify deployment {deployment_uuid} of application "
                                     f"{self._name(index, uuid)} ended {status}; see its log at "
                                     f"{self.client.url}{deployment.get('deployment_url') or ''}")
                elif time.monotonic() - at > self.settings.deploy_timeout_s:
                    raise StepFailed(f"Coolify deployment {deployment_uuid} of application "
                                     f"{self._name(index, uuid)} is still {status} after "
                                     f"{self.settings.deploy_timeout_s} s (cutover.switch.coolify.deploy_timeout_s); "
                                     f"see {self.client.url}{deployment.get('deployment_url') or ''}")
            if pending:
                time.sleep(self.poll_interval_s)

    def _name(self, index: int, uuid: str) -> str:
        """``NAME (UUID)`` for messages; the name is read once."""
        if uuid not in self._names:
            app = self.client.application(uuid)
            if app is None:
                raise StepFailed(f"Coolify at {self.client.url} has no application {uuid} "
                                 f"(cutover.switch.coolify.applications[{index}]) for this token's team; check the "
                                 "UUID on the application's page in Coolify")
            self._names[uuid] = app.get("name") or uuid
        return f"{self._names[uuid]} ({uuid})"
