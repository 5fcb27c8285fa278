"""A local migration to rehearse on: a Supabase-shaped source, an empty target, and a runbook for them.

Passwords are random per stack and reach the runbook only as environment-variable references.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from liftoff import runbooks

from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir, pg16_bin_dir
from liftoff_sandbox.supabase_source import SUPABASE_PROJECT_URL, generate_crm, prepare_supabase_source

APP_ROLE = "crm_app"  # the app role runbooks/local.yaml grants to
LOCAL_RUNBOOK = Path(runbooks.__file__).resolve().parent / "local.yaml"


@dataclass
class LocalStack:
    """Source (PostgreSQL 15, Supabase-shaped) and target (15 or 16) with a runbook in ``workdir``."""

    bookings: int = 500
    target_major: int = 15
    contrib: bool = True
    apps: bool = True  # the Supabase example-app patterns (supabase_apps.sql): auth hooks, triggers on auth.users
    files: bool = False  # also Supabase Storage's S3 endpoint (seeded with the objects' bytes) and a target S3 server
    storage_protocol: str = "s3"  # with files: "rest" also serves the REST API's fake, and the runbook reads through it
    seed: int = 7
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="liftoff-stack-")))
    env_prefix: str = "LIFTOFF_LOCAL"

    def __post_init__(self):
        self.passwords = {
            "admin": secrets.token_urlsafe(12), "source": secrets.token_urlsafe(12),
            "target": secrets.token_urlsafe(12), "app": secrets.token_urlsafe(12),
        }
        self.source: PostgresServer | None = None
        self.target: PostgresServer | None = None
        self.supabase_s3 = self.target_s3 = self.storage_api = None
        self._extra: list = []

    @property
    def env(self) -> dict[str, str]:
        env = {f"{self.env_prefix}_SOURCE_PASSWORD": self.passwords["source"],
               f"{self.env_prefix}_TARGET_PASSWORD": self.passwords["target"]}
        if self.supabase_s3:
            env.update({f"{self.env_prefix}_SUPABASE_S3_KEY": self.supabase_s3.access_key,
                        f"{self.env_prefix}_SUPABASE_S3_SECRET": self.supabase_s3.secret_key,
                        f"{self.env_prefix}_TARGET_S3_KEY": self.target_s3.access_key,
                        f"{self.env_prefix}_TARGET_S3_SECRET": self.target_s3.secret_key})
        if self.storage_api:
            env[f"{self.env_prefix}_SUPABASE_SERVICE_KEY"] = self.storage_api.service_role_key
        return env

    @property
    def secrets(self) -> list[str]:
        return list(self.passwords.values())

    def start(self) -> "LocalStack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.source = PostgresServer(pg15_bin_dir(), superuser="supabase_admin", password=self.passwords["admin"]).start()
        target_bin = pg16_bin_dir() if self.target_major == 16 else pg15_bin_dir()
        self.target = PostgresServer(target_bin, superuser="postgres", password=self.passwords["target"]).start()
        prepare_supabase_source(self.source, postgres_password=self.passwords["source"], contrib=self.contrib,
                                apps=self.apps)
        self.counts = generate_crm(self.source.conninfo(), bookings=self.bookings, seed=self.seed)
        self.target.execute(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{self.passwords['app']}'")
        if self.files:
            from liftoff_sandbox.s3 import S3Server
            from liftoff_sandbox.storage_api import seed_objects

            self.supabase_s3, self.target_s3 = S3Server().start(), S3Server().start()
            self.objects = seed_objects(self.supabase_s3.client(), self.source.conninfo())
            if self.storage_protocol == "rest":
                from liftoff_sandbox.storage_api import StorageApiFake

                self.storage_api = StorageApiFake(self.source.conninfo(), self.supabase_s3.client()).start()
        os.environ.update(self.env)
        self.runbook_path = self.write_runbook()
        return self

    def runbook_data(self, state_dir: str = "state", target_database: str = "postgres", **database) -> dict:
        """runbooks/local.yaml, pointed at this stack's ports, state dir, target database and secrets."""
        data = yaml.safe_load(LOCAL_RUNBOOK.read_text())
        data["state_dir"] = state_dir
        data["source"].update(host=self.source.host, port=self.source.port,
                              password={"env": f"{self.env_prefix}_SOURCE_PASSWORD"})
        data["target"]["direct"].update(host=self.target.host, port=self.target.port, database=target_database,
                                        password={"env": f"{self.env_prefix}_TARGET_PASSWORD"})
        data["database"].update(database)
        if self.supabase_s3:
            p = self.env_prefix
            source = {"project_url": SUPABASE_PROJECT_URL,
                      "s3": {"endpoint_url": self.supabase_s3.endpoint_url, "access_key_id": {"env": f"{p}_SUPABASE_S3_KEY"},
                             "secret_access_key": {"env": f"{p}_SUPABASE_S3_SECRET"}}}
            if self.storage_api:  # the REST API's fake stands at the project's URL; its key is a service_role JWT
                source.update(protocol="rest", rest_url=self.storage_api.url,
                              service_key={"env": f"{p}_SUPABASE_SERVICE_KEY"})
            data["storage"].update(
                source=source,
                target={"endpoint_url": self.target_s3.endpoint_url, "access_key_id": {"env": f"{p}_TARGET_S3_KEY"},
                        "secret_access_key": {"env": f"{p}_TARGET_S3_SECRET"},
                        "public_url": "http://files.localhost"})
        return data

    def write_runbook(self, name: str = "local.yaml", **options) -> Path:
        """Writes a runbook for this stack; ``options``: state_dir, target_database, database-phase keys."""
        path = self.workdir / name
        path.write_text(yaml.safe_dump(self.runbook_data(**options), sort_keys=False))
        return path

    def new_target_database(self, name: str, template: str | None = None) -> str:
        """An empty database on the target server (or a copy of ``template``), for one more rehearsal."""
        clause = f" TEMPLATE {template}" if template else ""
        self.target.execute(f"CREATE DATABASE {name}{clause}")
        return name

    def cutover_sections(self, vps, app, database: str, login_role: str, *, env_prefix: str,
                         manual: list[str] | None = None, health_timeout_s: int = 30,
                         approval_timeout_s: int = 120) -> dict:
        """The runbook's ``ssh`` and ``cutover`` sections for a cutover of ``app`` (a ``CrmApp`` on the 'VPS'
        ``vps``, an ``SshServer``) from the source, where it logs in as ``login_role``, to ``database`` on the
        target as the app role: the API roles revoked and ``login_role`` frozen with ``role``, the switch
        through the env file over SSH. Their secrets go to ``{env_prefix}_SSH_KEY`` and
        ``{env_prefix}_APP_PASSWORD`` in this process's environment."""
        os.environ.update({f"{env_prefix}_SSH_KEY": vps.client_key_text,
                           f"{env_prefix}_APP_PASSWORD": self.passwords["app"]})
        cutover = {
            "freeze": [{"method": "revoke", "roles": ["anon", "authenticated", "service_role"]},
                       {"method": "role", "roles": [login_role]}],
            "switch": {"driver": "ssh", "ssh": {"env_file": str(app.env_file), "restart": app.restart_command},
                       "env": {"DATABASE_URL": {
                           "template": f"postgresql://{APP_ROLE}:${{password}}@{self.target.host}:"
                                       f"{self.target.port}/{database}",
                           "secrets": {"password": {"env": f"{env_prefix}_APP_PASSWORD"}}}}},
            "apps": [{"name": "crm", "health_url": app.health_url}],
            "health_timeout_s": health_timeout_s,
            "smoke_queries": ["SELECT count(*) FROM public.bookings"],
            "approval_timeout_s": approval_timeout_s,
        }
        if manual is not None:
            cutover["checklist"] = {"manual": manual}
        return {"ssh": {"host": vps.host, "port": vps.port, "user": vps.user,
                        "private_key": {"env": f"{env_prefix}_SSH_KEY"}, "known_hosts": str(vps.known_hosts_path)},
                "cutover": cutover}

    def stop_later(self, service) -> None:
        """Stops ``service`` (anything with ``stop()``: an sshd, an app) with the stack, before its servers."""
        self._extra.append(service)

    def stop(self) -> None:
        for service in reversed(self._extra):
            service.stop()
        self._extra.clear()
        for server in (self.storage_api, self.source, self.target, self.supabase_s3, self.target_s3):
            if server:
                server.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
