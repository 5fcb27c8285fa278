"""A fake of Coolify's REST API, at the HTTP boundary: the endpoints the Coolify switch driver
(``liftoff.systems.coolify``) calls to change applications' environment variables and redeploy them, served on a free
loopback port for the tests and the demo.

``CoolifyFake(token, applications={uuid: {"name": ..., "envs": {KEY: value}}}, on_deploy=None)`` serves
``url`` as a Coolify instance's base URL (the API is under ``/api/v1``). An env's value may also be a dict
``{"value": ..., "is_literal": ..., "is_multiline": ..., "is_shown_once": ...}``; ``preview_envs`` (same shape)
seeds the application's preview-deployment variables. A deploy creates a deployment that goes ``queued`` ->
``in_progress`` -> ``finished`` (``failed`` for an application in ``fail_deploys``, or when ``on_deploy``
raises; it stays ``in_progress`` for one in ``stuck_deploys``), one at a time per application; while in
progress it calls ``on_deploy(app_uuid, envs)`` in a background thread with the application's (non-preview)
variables as they were when the deployment started, as Coolify's deployment job reads them then.
``stop`` (``POST .../stop``) is a queued job: after ``queue_s`` it calls ``on_stop(app_uuid)`` (the container
stopped: the app no longer answers) and sets the application's ``status`` to ``exited``; ``start`` queues a
deployment as ``/deploy`` does, and a finished deployment sets ``status`` to ``running:healthy``.
``requests`` counts the requests served per route (``"PATCH /api/v1/applications/{uuid}/envs/bulk"``);
``inject(route, 503, ...)`` makes the next requests to a route answer those statuses (Laravel's
``{"message": "Server Error"}``), for retry tests.

Where each shape comes from (github:coollabsio/coolify at commit 379abb252621f34b318190bd49b614aed9818716,
2026-08-22, ``config/constants.php`` version 4.3.11; ``openapi.yaml`` of that commit for the documented shapes):

- Routes (``routes/api.php``): ``GET /api/v1/applications``, ``GET /api/v1/applications/{uuid}``,
  ``GET|POST|PATCH /api/v1/applications/{uuid}/envs``, ``PATCH /api/v1/applications/{uuid}/envs/bulk``,
  ``DELETE /api/v1/applications/{uuid}/envs/{env_uuid}``, ``POST /api/v1/deploy``, ``GET /api/v1/deploy``
  (405 ``{"message": "This endpoint has changed to a POST request."}`` with ``Allow: POST``:
  ``OtherController::post_required``, since commit 0633b543ee of 2026-07-19; before it the route took GET and
  POST, so clients POST), ``GET /api/v1/deployments/{uuid}``. Any other path or method under ``/api`` is the
  catch-all ``Route::any('/{any}')``: 404 ``{"message": "Not found.", "docs": "https://coolify.io/docs"}``,
  before authentication.
- Auth (``auth:sanctum``, ``app/Exceptions/Handler.php::unauthenticated``, ``app/Http/Middleware/ApiAbility.php``):
  a missing or unknown bearer token is 401 ``{"message": "Unauthenticated."}``; a token without the route's
  ability (``read`` for GETs, ``write`` for env changes, ``deploy`` for deploys; ``root`` passes every check)
  is 403 ``{"message": "Missing required permissions: write"}``. Env ``value`` and ``real_value`` are only in
  answers for a token with ``root`` or ``read:sensitive`` (``app/Http/Middleware/ApiSensitiveData.php``, the
  model's ``$hidden``, ``ApplicationsController::removeSensitiveData``; the token's user is taken to be the
  team's admin), and never for an ``is_shown_once`` variable.
- Applications (``app/Http/Controllers/Api/ApplicationsController.php``): ``application_by_uuid`` answers 404
  ``{"message": "Application not found."}``; ``envs``, ``update_env_by_uuid``, ``create_bulk_envs`` and
  ``create_env`` answer 404 ``{"message": "Application not found"}`` (no full stop), ``delete_env_by_uuid``
  with one. The application's fields here are a subset of the ``Application`` schema (uuid, name, fqdn,
  status, build_pack, git_repository, git_branch, timestamps).
- Envs: ``envs`` lists the non-preview variables, then the preview ones, each by id; each is serialized by
  ``serializeApiResponse`` (keys sorted, ``uuid`` first, ``created_at``/``updated_at`` last; ``id`` and
  ``resourceable*`` hidden) with the ``EnvironmentVariable`` model's columns and appends (``real_value``,
  ``is_shared``, ``is_really_required``, ``is_buildpack_control``, ``is_coolify``). ``PATCH .../envs``
  (``update_env_by_uuid``) updates one existing variable (``is_preview`` picks which list): 201 with the
  variable, 404 ``{"message": "Environment variable not found."}``; fields other than ``key, value,
  is_preview, is_literal, is_multiline, is_shown_once, is_runtime, is_buildtime, comment`` are 422 ``This
  field is not allowed.``. ``PATCH .../envs/bulk`` (``create_bulk_envs``) takes ``{"data": [...]}`` (400
  ``{"message": "Bulk data is required."}`` without it), upserts each item in order (an invalid item stops
  the loop with a 422, the earlier items stay saved; unknown fields are dropped) and answers 201 with the
  saved variables. Both set ``is_literal`` to the request's value or false, and ``is_multiline`` and
  ``is_shown_once`` to the request's value or null: a client that omits them resets them. ``POST .../envs``
  (``create_env``) answers 201 ``{"uuid": ...}`` or 409 ``{"message": "Environment variable already
  exists. Use PATCH request to update it."}``. Creating a non-preview variable also creates its preview copy
  when the application has none of that key (``app/Models/EnvironmentVariable.php::booted``). ``DELETE
  .../envs/{env_uuid}`` answers ``{"message": "Environment variable deleted."}`` or 404 ``{"message":
  "Environment variable not found."}``. A request body must be JSON (``validateIncomingRequest``, for PATCH):
  400 ``{"message": "Invalid request.", "error": "Content-Type must be application/json."}`` (or ``Invalid
  JSON.``, ``Empty JSON.``). Keys match ``/\\A[A-Za-z_][A-Za-z0-9_.]*\\z/`` (``app/Support/ValidationPatterns.php``),
  else 422 ``{"message": "Validation failed.", "errors": {"key": ["The key field format is invalid."]}}``.
- Deploy (``app/Http/Controllers/Api/DeployController.php::deploy, by_uuids, deploy_resource``,
  ``bootstrap/helpers/applications.php::queue_application_deployment``): ``uuid`` (comma-separated) and
  ``force`` from the query or a JSON body; 200 ``{"deployments": [{"message": "Application NAME deployment
  queued.", "resource_uuid", "deployment_uuid"}]}``; unknown UUIDs are skipped, none found is 404 ``{"message":
  "No resources found."}``; no uuid is 400 ``{"message": "You must provide uuid or tag."}``. When a deployment
  of the application is already queued or in progress and ``force`` is false, nothing is queued and the item's
  message is ``Deployment already queued for this commit.`` with a fresh ``deployment_uuid`` that names no
  deployment (``deploy_resource`` returns the UUID it generated, not the existing one's). Deployment UUIDs are
  ``new_public_id()``: 24 lowercase alphanumerics.
- Start, stop (``routes/api.php``; ``ApplicationsController::action_deploy, action_stop``;
  ``app/Actions/Application/StopApplication.php``; ``openapi.yaml`` ``start-application-by-uuid``,
  ``stop-application-by-uuid``): ``POST /api/v1/applications/{uuid}/start`` (``force``, ``instant_deploy``)
  queues a deployment and answers 200 ``{"message": "Deployment request queued.", "deployment_uuid"}``, or, when
  one of the application is queued or in progress and neither flag is set, 200 ``{"message": "Deployment
  already queued for this commit."}`` without a UUID. ``POST /api/v1/applications/{uuid}/stop`` dispatches
  ``StopApplication`` and answers 200 ``{"message": "Application stopping request queued."}`` at once; the job
  stops and removes the containers, then sets the application's ``status`` to ``exited``. Both need the
  ``deploy`` ability; an unknown UUID is 404 ``{"message": "Application not found."}``; a GET on either (or on
  ``restart``) is the 405 of ``post_required``.
- Deployment (``DeployController::deployment_by_uuid``, ``app/Models/ApplicationDeploymentQueue.php``,
  ``app/Enums/ApplicationDeploymentStatus.php``): the queue row with ``status`` one of ``queued``,
  ``in_progress``, ``finished``, ``failed``, ``cancelled-by-user``; ``logs`` only for a sensitive-reading
  token; 404 ``{"message": "Deployment not found."}``.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import parse_qs, unquote, urlsplit

from liftoff_sandbox.http_service import LoopbackHTTPService, TrackedHandler

API = "/api/v1"
_KEY = re.compile(r"\A[A-Za-z_][A-Za-z0-9_.]*\Z")
_ENV_FIELDS = ("key", "value", "is_preview", "is_literal", "is_multiline", "is_shown_once", "is_runtime",
               "is_buildtime", "comment")
_TRUE = {"1", "true", "on", "yes"}
DEPLOY_QUEUED = "Deployment already queued for this commit."

OnDeploy = Callable[[str, dict[str, str]], None]
OnStop = Callable[[str], None]


def public_id(length: int = 24) -> str:
    """Coolify's ``new_public_id()``: ``Str::lower(Str::random(24))``."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(length))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CoolifyReply(Exception):
    """An answer other than success: status, JSON body, extra headers."""

    def __init__(self, status: int, body: dict, headers: dict[str, str] | None = None):
        super().__init__(body.get("message"))
        self.status, self.body, self.headers = status, body, headers or {}


def _not_found() -> CoolifyReply:
    return CoolifyReply(404, {"message": "Not found.", "docs": "https://coolify.io/docs"})


class _CoolifyHandler(TrackedHandler):
    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        headers: dict[str, str] = {}
        try:
            status, payload = self.service.handle(self.command, parts.path, parse_qs(parts.query), self.headers, body)
        except CoolifyReply as reply:
            status, payload, headers = reply.status, reply.body, reply.headers
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve


class CoolifyFake(LoopbackHTTPService):
    handler = _CoolifyHandler
    thread_name = "coolify-fake"

    def __init__(self, token: str, applications: dict[str, dict], on_deploy: OnDeploy | None = None, *,
                 on_stop: OnStop | None = None, abilities: tuple[str, ...] = ("root",), queue_s: float = 0.05,
                 build_s: float = 0.2, host: str = "127.0.0.1"):
        super().__init__(host)
        self.token = token
        self.abilities = set(abilities)
        self.on_deploy = on_deploy
        self.on_stop = on_stop
        self.queue_s, self.build_s = queue_s, build_s
        self.requests: Counter[str] = Counter()
        self.fail_deploys: set[str] = set()  # application UUIDs whose next deployments fail
        self.stuck_deploys: set[str] = set()  # application UUIDs whose deployments never finish
        self.deployments: dict[str, dict] = {}
        self._faults: dict[str, list[int]] = {}
        self._state = threading.RLock()
        self._app_locks: dict[str, threading.Lock] = {}
        self._stopping = threading.Event()
        self._next_id = 0
        self.applications: dict[str, dict] = {}
        for uuid, app in applications.items():
            record = {"id": self._id(), "uuid": uuid, "name": app["name"], "fqdn": app.get("fqdn"),
                      "status": "running:healthy", "build_pack": "nixpacks",
                      "git_repository": app.get("git_repository", "example/app"), "git_branch": "main",
                      "created_at": _now(), "updated_at": _now(), "envs": []}
            for preview, seed in ((False, app.get("envs", {})), (True, app.get("preview_envs", {}))):
                for key, value in seed.items():
                    record["envs"].append(self._new_env(key, value if isinstance(value, dict) else {"value": value},
                                                        preview))
            self.applications[uuid] = record
            self._app_locks[uuid] = threading.Lock()

    # ---- what tests read and set -------------------------------------------------------------------------

    def envs(self, app_uuid: str, *, preview: bool = False) -> dict[str, str | None]:
        """The application's variables as Coolify stores them: {KEY: value}."""
        with self._state:
            return {e["key"]: e["value"] for e in self.applications[app_uuid]["envs"] if e["is_preview"] == preview}

    def inject(self, route: str, *statuses: int) -> None:
        """The next requests to ``route`` (as counted in ``requests``) answer these statuses, in order."""
        with self._state:
            self._faults.setdefault(route, []).extend(statuses)

    def wait_idle(self, timeout: float = 10) -> None:
        """Returns once no deployment is queued or in progress (stuck ones excepted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._state:
                if not any(d["status"] in ("queued", "in_progress") and d["_app"] not in self.stuck_deploys
                           for d in self.deployments.values()):
                    return
            time.sleep(0.02)
        raise TimeoutError("deployments still running")

    def stop(self) -> None:
        self._stopping.set()
        super().stop()

    # ---- the model -------------------------------------------------------------------------------------------

    def _id(self) -> int:
        with self._state:
            self._next_id += 1
            return self._next_id

    def _new_env(self, key: str, fields: dict, preview: bool) -> dict:
        now = _now()
        return {"id": self._id(), "uuid": public_id(), "key": key, "value": fields.get("value"),
                "is_preview": preview, "is_literal": bool(fields.get("is_literal", False)),
                "is_multiline": fields.get("is_multiline", False), "is_shown_once": fields.get("is_shown_once", False),
                "is_runtime": fields.get("is_runtime", True), "is_buildtime": fields.get("is_buildtime", True),
                "is_required": False, "comment": fields.get("comment"), "order": None, "version": "4.3.11",
                "created_at": now, "updated_at": now}

    def _create_env(self, app: dict, fields: dict, preview: bool) -> dict:
        env = self._new_env(fields["key"], fields, preview)
        app["envs"].append(env)
        if not preview and not any(e["key"] == env["key"] and e["is_preview"] for e in app["envs"]):
            copy = dict(fields, is_runtime=fields.get("is_runtime", False), is_buildtime=fields.get("is_buildtime", False))
            app["envs"].append(self._new_env(env["key"], copy, True))
        return env

    def _update_env(self, env: dict, item: dict) -> None:
        # As update_env_by_uuid / create_bulk_envs do: absent flags reset is_literal to false and
        # is_multiline / is_shown_once to null.
        env["value"] = item.get("value")
        env["is_literal"] = bool(item.get("is_literal") or False)
        env["is_multiline"] = item.get("is_multiline")
        env["is_shown_once"] = item.get("is_shown_once")
        for flag in ("is_runtime", "is_buildtime", "comment"):
            if flag in item:
                env[flag] = item[flag]
        env["updated_at"] = _now()

    def _sensitive(self) -> bool:
        return bool(self.abilities & {"root", "read:sensitive"})

    def _env_json(self, env: dict) -> dict:
        shown = {k: v for k, v in env.items() if k not in ("id", "uuid", "created_at", "updated_at")}
        shown.update(real_value=env["value"], is_shared=False, is_really_required=False,
                     is_buildpack_control=env["key"].startswith(("NIXPACKS_", "RAILPACK_")),
                     is_coolify=env["key"].startswith("COOLIFY_"))
        if not self._sensitive() or env.get("is_shown_once"):
            shown.pop("value"), shown.pop("real_value")
        return {"uuid": env["uuid"], **dict(sorted(shown.items())), "created_at": env["created_at"],
                "updated_at": env["updated_at"]}

    def _app_json(self, app: dict) -> dict:
        body = {k: v for k, v in app.items() if k not in ("id", "envs", "uuid", "name", "created_at", "updated_at")}
        return {"id": app["id"], "uuid": app["uuid"], "name": app["name"], **dict(sorted(body.items())),
                "created_at": app["created_at"], "updated_at": app["updated_at"]}

    def _deployment_json(self, d: dict) -> dict:
        body = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("id", "created_at", "updated_at")}
        if not self._sensitive():
            body.pop("logs")
        return {"id": d["id"], **dict(sorted(body.items())), "created_at": d["created_at"],
                "updated_at": d["updated_at"]}

    # ---- deployments -----------------------------------------------------------------------------------------

    def _queue_deployment(self, app: dict, force: bool) -> tuple[str, str]:
        deployment_uuid = public_id()
        with self._state:
            running = any(d["_app"] == app["uuid"] and d["status"] in ("queued", "in_progress")
                          for d in self.deployments.values())
            if running and not force:
                return DEPLOY_QUEUED, deployment_uuid  # the UUID names no deployment, as in Coolify
            now = _now()
            self.deployments[deployment_uuid] = {
                "id": self._id(), "_app": app["uuid"], "application_id": str(app["id"]),
                "application_name": app["name"], "deployment_uuid": deployment_uuid,
                "deployment_url": f"/project/demo/environment/production/application/{app['uuid']}"
                                  f"/deployment/{deployment_uuid}",
                "status": "queued", "force_rebuild": force, "commit": "HEAD", "commit_message": None,
                "pull_request_id": 0, "docker_registry_image_tag": None, "is_webhook": False, "is_api": True,
                "restart_only": False, "rollback": False, "only_this_server": False, "git_type": None,
                "server_id": 0, "server_name": "localhost", "destination_id": "0", "current_process_id": None,
                "logs": "[]", "created_at": now, "updated_at": now}
        threading.Thread(target=self._run_deployment, args=(deployment_uuid,), daemon=True,
                         name=f"coolify-deploy-{deployment_uuid[:6]}").start()
        return f"Application {app['name']} deployment queued.", deployment_uuid

    def _set_status(self, deployment_uuid: str, status: str, log: str | None = None) -> None:
        with self._state:
            d = self.deployments[deployment_uuid]
            d["status"], d["updated_at"] = status, _now()
            if log:
                entries = json.loads(d["logs"])
                entries.append({"command": None, "output": log, "type": "stdout", "timestamp": d["updated_at"],
                                "hidden": False, "batch": len(entries) + 1, "order": len(entries) + 1})
                d["logs"] = json.dumps(entries)

    def _run_deployment(self, deployment_uuid: str) -> None:
        app_uuid = self.deployments[deployment_uuid]["_app"]
        if self._stopping.wait(self.queue_s):
            return
        with self._app_locks[app_uuid]:  # next_queuable: one deployment of an application at a time
            if self._stopping.is_set():
                return
            envs = self.envs(app_uuid)
            self._set_status(deployment_uuid, "in_progress", "Starting deployment.")
            if self._stopping.wait(self.build_s):
                return
            if app_uuid in self.stuck_deploys:
                self._stopping.wait()
                return
            try:
                if self.on_deploy is not None:
                    self.on_deploy(app_uuid, envs)
            except Exception as exc:  # noqa: BLE001 - a deployment whose container did not start fails
                self._set_status(deployment_uuid, "failed", f"Deployment failed: {type(exc).__name__}.")
                return
            if app_uuid in self.fail_deploys:
                self._set_status(deployment_uuid, "failed", "Oops something is not okay, are you okay? 😢")
            else:
                self._set_status(deployment_uuid, "finished", "New container started.")
                self._set_app_status(app_uuid, "running:healthy")

    def _set_app_status(self, app_uuid: str, status: str) -> None:
        with self._state:
            app = self.applications[app_uuid]
            app["status"], app["updated_at"] = status, _now()

    def _run_stop(self, app_uuid: str) -> None:
        """``StopApplication``: the containers stopped and removed, then the status ``exited``."""
        if self._stopping.wait(self.queue_s):
            return
        with self._app_locks[app_uuid]:
            if self.on_stop is not None:
                self.on_stop(app_uuid)
            self._set_app_status(app_uuid, "exited")

    # ---- HTTP ------------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers, body: bytes) -> tuple[int, dict | list]:
        if not path.startswith("/api/"):
            raise CoolifyReply(404, {"message": "Not found."})
        route, action, params, ability = self._route(method, path)
        self.requests[route] += 1
        with self._state:
            faults = self._faults.get(route)
            if faults:
                raise CoolifyReply(faults.pop(0), {"message": "Server Error"})
        auth = headers.get("Authorization", "")
        if not auth.lower().startswith("bearer ") or not secrets.compare_digest(auth[7:].strip(), self.token):
            raise CoolifyReply(401, {"message": "Unauthenticated."})
        if "root" not in self.abilities and ability not in self.abilities:
            raise CoolifyReply(403, {"message": f"Missing required permissions: {ability}"})
        with self._state:
            return getattr(self, action)(params, query, headers, body)

    _ROUTES = (  # (method, path under /api/v1, the token ability it needs, the method serving it)
        ("GET", "/applications", "read", "_list_applications"),
        ("GET", "/applications/{uuid}", "read", "_get_application"),
        ("GET", "/applications/{uuid}/envs", "read", "_list_envs"),
        ("POST", "/applications/{uuid}/envs", "write", "_create_env_route"),
        ("PATCH", "/applications/{uuid}/envs/bulk", "write", "_update_envs_bulk"),
        ("PATCH", "/applications/{uuid}/envs", "write", "_update_env_route"),
        ("DELETE", "/applications/{uuid}/envs/{env_uuid}", "write", "_delete_env"),
        ("GET", "/applications/{uuid}/start", "deploy", "_deploy_needs_post"),
        ("GET", "/applications/{uuid}/restart", "deploy", "_deploy_needs_post"),
        ("GET", "/applications/{uuid}/stop", "deploy", "_deploy_needs_post"),
        ("POST", "/applications/{uuid}/start", "deploy", "_start_application"),
        ("POST", "/applications/{uuid}/stop", "deploy", "_stop_application"),
        ("GET", "/deploy", "deploy", "_deploy_needs_post"),
        ("POST", "/deploy", "deploy", "_deploy"),
        ("GET", "/deployments/{uuid}", "read", "_get_deployment"),
    )

    def _route(self, method: str, path: str) -> tuple[str, str, dict[str, str], str]:
        for verb, template, ability, action in self._ROUTES:
            m = re.match("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", API + template) + "/?$", path)
            if verb == method and m:
                return f"{verb} {API}{template}", action, {k: unquote(v) for k, v in m.groupdict().items()}, ability
        raise _not_found()

    def _app(self, uuid: str, message: str = "Application not found") -> dict:
        app = self.applications.get(uuid)
        if app is None:
            raise CoolifyReply(404, {"message": message})
        return app

    @staticmethod
    def _json_body(headers, body: bytes) -> dict:
        """``validateIncomingRequest``."""
        if "json" not in (headers.get("Content-Type") or "").lower():
            raise CoolifyReply(400, {"message": "Invalid request.", "error": "Content-Type must be application/json."})
        try:
            data = json.loads(body or b"null")
        except ValueError:
            data = None
        if not data:
            raise CoolifyReply(400, {"message": "Invalid request.", "error": "Invalid JSON." if data is None else "Empty JSON."})
        if not isinstance(data, dict):
            raise CoolifyReply(400, {"message": "Invalid request.", "error": "Invalid JSON."})
        return data

    @staticmethod
    def _validate_env(item: dict) -> dict:
        errors: dict[str, list[str]] = {}
        key = item.get("key")
        if isinstance(key, str):
            key = item["key"] = key.strip()
        if not key:
            errors["key"] = ["This field is required."]
        elif not isinstance(key, str) or len(key) > 255 or not _KEY.match(key):
            errors["key"] = ["The key field format is invalid."]
        if item.get("value") is not None and not isinstance(item["value"], str):
            errors["value"] = ["The value field must be a string."]
        for flag in ("is_preview", "is_literal", "is_multiline", "is_shown_once", "is_runtime", "is_buildtime"):
            if item.get(flag) is not None and not isinstance(item[flag], bool) and item[flag] not in (0, 1, "0", "1"):
                errors[flag] = [f"The {flag.replace('_', ' ')} field must be true or false."]
        if errors:
            raise CoolifyReply(422, {"message": "Validation failed.", "errors": errors})
        return item

    def _list_applications(self, params, query, headers, body):
        return 200, [self._app_json(a) for a in self.applications.values()]

    def _get_application(self, params, query, headers, body):
        return 200, self._app_json(self._app(params["uuid"], "Application not found."))

    def _list_envs(self, params, query, headers, body):
        app = self._app(params["uuid"])
        ordered = sorted((e for e in app["envs"] if not e["is_preview"]), key=lambda e: e["id"]) + \
            sorted((e for e in app["envs"] if e["is_preview"]), key=lambda e: e["id"])
        return 200, [self._env_json(e) for e in ordered]

    def _create_env_route(self, params, query, headers, body):
        app = self._app(params["uuid"])
        item = json.loads(body or b"{}")
        extra = [k for k in item if k not in _ENV_FIELDS]
        if extra:
            raise CoolifyReply(422, {"message": "Validation failed.", "errors": {k: ["This field is not allowed."] for k in extra}})
        item = self._validate_env(item)
        preview = bool(item.get("is_preview") or False)
        if any(e["key"] == item["key"] and e["is_preview"] == preview for e in app["envs"]):
            raise CoolifyReply(409, {"message": "Environment variable already exists. Use PATCH request to update it."})
        return 201, {"uuid": self._create_env(app, item, preview)["uuid"]}

    def _update_env_route(self, params, query, headers, body):
        data = self._json_body(headers, body)
        app = self._app(params["uuid"])
        extra = [k for k in data if k not in _ENV_FIELDS]
        if extra:
            raise CoolifyReply(422, {"message": "Validation failed.", "errors": {k: ["This field is not allowed."] for k in extra}})
        item = self._validate_env(data)
        preview = bool(item.get("is_preview") or False)
        env = next((e for e in app["envs"] if e["key"] == item["key"] and e["is_preview"] == preview), None)
        if env is None:
            raise CoolifyReply(404, {"message": "Environment variable not found."})
        self._update_env(env, item)
        return 201, self._env_json(env)

    def _update_envs_bulk(self, params, query, headers, body):
        data = self._json_body(headers, body)
        app = self._app(params["uuid"])
        items = data.get("data")
        if not items:
            raise CoolifyReply(400, {"message": "Bulk data is required."})
        saved = []
        for raw in items:
            item = self._validate_env({k: v for k, v in dict(raw).items() if k in _ENV_FIELDS})
            preview = bool(item.get("is_preview") or False)
            env = next((e for e in app["envs"] if e["key"] == item["key"] and e["is_preview"] == preview), None)
            if env is None:
                env = self._create_env(app, item, preview)
            else:
                self._update_env(env, item)
            saved.append(self._env_json(env))
        return 201, saved

    def _delete_env(self, params, query, headers, body):
        app = self._app(params["uuid"], "Application not found.")
        env = next((e for e in app["envs"] if e["uuid"] == params["env_uuid"]), None)
        if env is None:
            raise CoolifyReply(404, {"message": "Environment variable not found."})
        app["envs"].remove(env)
        return 200, {"message": "Environment variable deleted."}

    def _deploy_needs_post(self, params, query, headers, body):
        raise CoolifyReply(405, {"message": "This endpoint has changed to a POST request."}, {"Allow": "POST"})

    def _deploy(self, params, query, headers, body):
        inputs = {k: v[-1] for k, v in query.items()}
        if body and "json" in (headers.get("Content-Type") or "").lower():
            try:
                inputs.update(json.loads(body) or {})
            except ValueError:
                pass
        uuids, tags = inputs.get("uuid"), inputs.get("tag")
        force = str(inputs.get("force", "")).lower() in _TRUE
        if uuids and tags:
            raise CoolifyReply(400, {"message": "You can only use uuid or tag, not both."})
        if tags:
            raise CoolifyReply(404, {"message": "No resources found with this tag."})  # tags are not modelled
        if not uuids:
            raise CoolifyReply(400, {"message": "You must provide uuid or tag."})
        wanted = [u for u in str(uuids).split(",") if u]
        if not wanted:
            raise CoolifyReply(400, {"message": "No UUIDs provided."})
        deployments = []
        for uuid in wanted:
            app = self.applications.get(uuid)
            if app is None:
                continue
            message, deployment_uuid = self._queue_deployment(app, force)
            deployments.append({"message": message, "resource_uuid": uuid, "deployment_uuid": deployment_uuid})
        if not deployments:
            raise CoolifyReply(404, {"message": "No resources found."})
        return 200, {"deployments": deployments}

    def _start_application(self, params, query, headers, body):
        app = self._app(params["uuid"], "Application not found.")
        flags = {k: str(v[-1]).lower() in _TRUE for k, v in query.items() if k in ("force", "instant_deploy")}
        message, deployment_uuid = self._queue_deployment(app, flags.get("force", False) or
                                                          flags.get("instant_deploy", False))
        if message == DEPLOY_QUEUED:
            return 200, {"message": message}
        return 200, {"message": "Deployment request queued.", "deployment_uuid": deployment_uuid}

    def _stop_application(self, params, query, headers, body):
        app = self._app(params["uuid"], "Application not found.")
        threading.Thread(target=self._run_stop, args=(app["uuid"],), daemon=True,
                         name=f"coolify-stop-{app['uuid'][:6]}").start()
        return 200, {"message": "Application stopping request queued."}

    def _get_deployment(self, params, query, headers, body):
        d = self.deployments.get(params["uuid"])
        if d is None:
            raise CoolifyReply(404, {"message": "Deployment not found."})
        return 200, self._deployment_json(d)



