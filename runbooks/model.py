"""The runbook file an operator edits, and the model that validates it.

A runbook names the systems of one migration (the Supabase source, the self-hosted target, buckets,
backups) and the options of each phase. It never holds a secret: passwords are references to an
environment variable (``{env: NAME}``) or a Prefect Secret block (``{prefect_secret: NAME}``), resolved
only when a connection is opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from liftoff.errors import RunbookInvalid, SecretUnavailable
from liftoff.redaction import register_secret

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_IDENT = re.compile(r"^[a-z_][a-z0-9_$]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Secret references that hold identifiers, resolved with ``sensitive=False``: errors name them, nothing masks them.
IDENTIFIER_FIELDS = frozenset({"access_key_id"})


def scratch_database_name(v: str) -> str:
    """A scratch database Liftoff creates and drops: a plain name of its own, never one the server needs."""
    if not re.match(r"^[a-z_][a-z0-9_]*$", v) or v in ("postgres", "template0", "template1"):
        raise ValueError("expected a plain lower-case database name of its own (not postgres or a template)")
    return v


class SecretRef(_Strict):
    """Where a secret lives: exactly one of ``env`` or ``prefect_secret``."""

    env: str | None = Field(None, description="name of an environment variable holding the secret")
    prefect_secret: str | None = Field(None, description="name of a Prefect Secret block")

    @model_validator(mode="after")
    def _exactly_one(self) -> "SecretRef":
        if (self.env is None) == (self.prefect_secret is None):
            raise ValueError("give exactly one of 'env' or 'prefect_secret'")
        return self

    @property
    def label(self) -> str:
        return f"env:{self.env}" if self.env else f"prefect_secret:{self.prefect_secret}"

    def resolve(self, field: str, *, sensitive: bool = True) -> str:
        """Returns the secret's value and registers it for redaction everywhere. Resolved once per run
        (``forget_resolved_secrets`` starts a new one): a connection does not ask the Prefect API again.
        ``sensitive=False`` for an identifier kept as a reference (an S3 access key id): errors name it."""
        cached = _resolved.get(self.label)
        if cached is not None:
            return cached
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise SecretUnavailable(
                    f"{field}: environment variable {self.env} is not set; export it before running"
                )
        else:
            try:
                from prefect.blocks.system import Secret

                value = Secret.load(self.prefect_secret).get()
            except Exception as exc:  # the block API raises ValueError or HTTP errors
                raise SecretUnavailable(
                    f"{field}: Prefect Secret block '{self.prefect_secret}' could not be loaded "
                    f"({type(exc).__name__}); create it in the Prefect UI under Blocks"
                ) from None
        if sensitive:
            register_secret(value)
        _resolved[self.label] = value
        return value


_resolved: dict[str, str] = {}


def forget_resolved_secrets() -> None:
    """A new run resolves each secret afresh (a rotated password, a changed environment)."""
    _resolved.clear()


def _reject_inline_secret(value: object) -> object:
    if isinstance(value, str):
        raise ValueError(
            "a secret given inline; write {env: VARIABLE} or {prefect_secret: BLOCK} instead"
        )
    return value


Secret = Annotated[SecretRef, Field(description="a reference to a secret, never its value")]


class Endpoint(_Strict):
    """One PostgreSQL server and database, reached as one user."""

    host: str
    port: int = Field(5432, ge=1, le=65535)
    database: str = "postgres"
    user: str
    password: Secret
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"

    @field_validator("database", "user")
    @classmethod
    def _name(cls, v: str) -> str:
        # A name, not a connection string: pg_restore would follow "host=..." or "postgresql://...".
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.$-]*$", v):
            raise ValueError("expected a plain name (letters, digits, _ . $ -)")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if "://" in v or "@" in v or not _HOSTNAME.match(v):
            raise ValueError("expected a host name or IP address (no scheme, user or password)")
        return v

    @field_validator("password", mode="before")
    @classmethod
    def _no_inline(cls, v: object) -> object:
        return _reject_inline_secret(v)

    @property
    def where(self) -> str:
        """host:port/database as user: how errors name this endpoint (no secret)."""
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


class RedisEndpoint(_Strict):
    host: str
    port: int = Field(6379, ge=1, le=65535)
    password: Secret | None = None
    db: int = Field(0, ge=0)

    @field_validator("password", mode="before")
    @classmethod
    def _no_inline(cls, v: object) -> object:
        return _reject_inline_secret(v)


class Target(_Strict):
    direct: Endpoint = Field(description="the target reached directly: migrations, restore, verify")
    pooled: Endpoint | None = Field(None, description="the target through PgBouncer: what apps use")
    redis: RedisEndpoint | None = Field(None, description="the target's Redis (the cutover checks it answers)")


class SshAccess(_Strict):
    """The VPS over SSH (paramiko). Host keys are verified against ``known_hosts``; an unknown key is an error."""

    host: str
    port: int = Field(22, ge=1, le=65535)
    user: str = "root"
    private_key: Secret = Field(description="the private key's text (OpenSSH or PEM), as a secret reference")
    known_hosts: Path = Field(description="known_hosts file holding the VPS's host key; relative to the runbook")

    @field_validator("private_key", mode="before")
    @classmethod
    def _no_inline(cls, v: object) -> object:
        return _reject_inline_secret(v)


class EnvValue(_Strict):
    """An app environment variable's value: ``value`` (plain text, no secret), ``secret`` (the whole value is
    one), or ``template`` whose ``${NAME}`` parts are the ``secrets`` of that name."""

    value: str | None = None
    secret: Secret | None = None
    template: str | None = None
    secrets: dict[str, Secret] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_form(self) -> "EnvValue":
        if sum(x is not None for x in (self.value, self.secret, self.template)) != 1:
            raise ValueError("give exactly one of value, secret or template")
        if self.template is not None:
            named = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", self.template))
            if named != set(self.secrets):
                raise ValueError(f"template names {sorted(named)} but secrets gives {sorted(self.secrets)}")
        return self


class SshSwitch(_Strict):
    env_file: str = Field(description="the apps' env file on the VPS, rewritten atomically (a backup is kept)")
    restart: str = Field(description="the command that restarts the apps with the new env file")
    stop: str | None = Field(None, description="the command that stops the apps and returns once they wrote "
                             "their last row (the recovery stops them before it replaces the database), e.g. "
                             "'docker compose -f /srv/crm/compose.yaml stop'")
    start: str | None = Field(None, description="the command that starts the apps again after a recovery "
                              "(default: restart)")


class CoolifySwitch(_Strict):
    url: str = Field(description="Coolify's base URL, e.g. https://coolify.example.com")
    token: Secret = Field(description="a Coolify API token of a team admin with root, or read + read:sensitive + "
                          "write + deploy (the switch must read the previous values to undo them)")
    applications: list[str] = Field(min_length=1, description="UUIDs of the applications to switch")
    deploy_timeout_s: int = Field(600, ge=10)

    _url = field_validator("url")(classmethod(lambda cls, v: _http_url(v)))

    @field_validator("token", mode="before")
    @classmethod
    def _no_inline(cls, v: object) -> object:
        return _reject_inline_secret(v)


class Switch(_Strict):
    """How the apps move to the target: their environment changed through one driver, then redeployed."""

    driver: Literal["ssh", "coolify"]
    ssh: SshSwitch | None = None
    coolify: CoolifySwitch | None = None
    env: dict[str, EnvValue | str] = Field(description="the apps' new environment (DATABASE_URL, DIRECT_URL, "
                                           "REDIS_URL, S3_ENDPOINT, S3_PUBLIC_URL ...)")

    @model_validator(mode="after")
    def _driver_settings(self) -> "Switch":
        if getattr(self, self.driver) is None:
            raise ValueError(f"driver {self.driver} needs its settings under {self.driver}:")
        return self


class App(_Strict):
    name: str
    health_url: str = Field(description="the app's /api/health (the plan's JSON: status, per-service checks)")

    _url = field_validator("health_url")(classmethod(lambda cls, v: _http_url(v)))


class Freeze(_Strict):
    """One way the source stops taking the apps' writes (undone by the rollback); ``cutover.freeze`` lists
    them, applied in order. See liftoff/systems/pg_freeze.py for what each does not stop."""

    method: Literal["role", "database", "revoke"] = Field(
        "revoke", description="revoke: revoke INSERT/UPDATE/DELETE/TRUNCATE on the migrated schemas from the "
        "roles (Supabase's API roles: stops PostgREST/supabase-js); role: ALTER ROLE r SET "
        "default_transaction_read_only and end their sessions (LOGIN roles an app connects as directly); "
        "database: ALTER DATABASE ... SET default_transaction_read_only (needs the database's owner)")
    roles: list[str] = Field(default_factory=lambda: ["anon", "authenticated", "service_role"],
                             description="the roles the apps write as")


class DnsCheck(_Strict):
    name: str = Field(description="the public record the apps are reached by")
    resolver: str | None = Field(None, description="ip or ip:port of the resolver to ask (default: the system's)")
    max_ttl: int = Field(300, ge=0)


class Checklist(_Strict):
    max_gate_age_hours: float = Field(24, gt=0, description="each phase's latest gate must be this fresh")
    dns: DnsCheck | None = None
    manual: list[str] = Field(
        default_factory=lambda: ["Team notified of the maintenance window",
                                 "Rollback plan read and agreed by the person approving"],
        description="lines no machine can check: confirmed one by one in the approval form")


class Replication(_Strict):
    """Settings of the ``replicate`` final sync (logical replication from the source to the target)."""

    max_lag_s: float = Field(5, gt=0, description="the checklist's line: the target at most this many seconds "
                             "behind the source (the WAL sender's replay lag)")
    max_lag_bytes: int = Field(16 * 1024 * 1024, gt=0, description="the checklist's line: at most this much of the "
                               "source's WAL not yet applied by the target")
    apply_timeout_s: float = Field(60, gt=0, description="at the freeze: how long to wait for the target to apply "
                                   "the source's last changes before the cutover stops (and rolls back)")


class Maintenance(_Strict):
    """The site's maintenance mode (optional), through the switch driver like every other env change: ``on``
    is applied and the apps redeployed before the write freeze; ``off`` after the smoke test, and by the
    rollback (the apps go back to the source out of maintenance)."""

    on: dict[str, str] = Field(min_length=1, description="the variables that put the apps in maintenance, e.g. "
                               "MAINTENANCE_MODE: '1'")
    off: dict[str, str] = Field(description="the same variables' values out of maintenance, e.g. MAINTENANCE_MODE: '0'")

    @model_validator(mode="after")
    def _same_keys(self) -> "Maintenance":
        if set(self.on) != set(self.off):
            raise ValueError(f"on and off must name the same variables (on: {', '.join(sorted(self.on))}; off: "
                             f"{', '.join(sorted(self.off)) or 'none'}): an env file cannot drop a variable, so "
                             "off says each one's value out of maintenance")
        return self


class Cutover(_Strict):
    checklist: Checklist = Field(default_factory=Checklist)
    final_sync: Literal["full", "replicate"] = Field(
        "full", description="full: in the freeze, a new export and every table reloaded (downtime grows with the "
        "data); replicate: logical replication keeps the target current before the cutover (`liftoff run "
        "replicate`), the freeze only waits for the last changes and re-checks what changed since a full gate")
    replication: Replication = Field(default_factory=Replication)
    maintenance: Maintenance | None = Field(None, description="optional: the apps in maintenance mode from before "
                                            "the freeze until after the smoke test")
    freeze: list[Freeze] = Field(default_factory=lambda: [Freeze()], min_length=1,
                                 description="how the source stops taking writes: the API roles revoked by default; "
                                 "add {method: role, roles: [...]} for apps that log in directly")
    switch: Switch | None = None
    apps: list[App] = Field(default_factory=list)
    health_timeout_s: int = Field(300, ge=1)
    smoke_queries: list[str] = Field(default_factory=list, description="read-only SQL run through target.pooled "
                                     "after the switch; each must succeed")
    approval_timeout_s: int = Field(3600, ge=1)
    unfrozen_tables: list[str] = Field(
        default_factory=list,
        description="schema.table of migrated tables that something the freeze cannot stop writes on the source "
        "(a trigger on auth.users, a cron job, an Edge Function with the service key): not compared by the final "
        "sync's gate, carried by the catch-up after the switch (auth.users, with the shim, always is)")

    @field_validator("unfrozen_tables")
    @classmethod
    def _qualified(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(r"^[^.\s]+\.[^.\s]+$", name):
                raise ValueError(f"expected schema.table, got {name!r}")
        return v

    @model_validator(mode="after")
    def _maintenance_apart_from_switch(self) -> "Cutover":
        if self.maintenance is not None and self.switch is not None:
            both = sorted(set(self.maintenance.on) & set(self.switch.env))
            if both:
                raise ValueError(f"maintenance and switch.env both set {', '.join(both)}: the switch would undo the "
                                 "maintenance mode (or the reverse); name it in one of them")
        return self


class AppRole(_Strict):
    """A role of the target the runbook grants to, beyond what the source granted (reported as an extra)."""

    name: str
    privileges: Literal["read_write", "read_only"] = "read_write"
    widen: bool = Field(
        False,
        description="a role that also exists on the source keeps exactly the source's grants unless this is "
        "true; then the blanket grant is added on top (access widens, and the report says so)",
    )

    @field_validator("name")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError("expected a lower-case PostgreSQL role name")
        return v


class MapRole(_Strict):
    map_to: str = Field(description="the target role that takes this source role's grants and policies")

    @field_validator("map_to")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_$]*$", v):
            raise ValueError("expected a PostgreSQL role name")
        return v


RoleDecision = Annotated[
    Literal["create", "drop_references"] | MapRole,
    Field(description="create: a NOLOGIN role of the same name with the source's BYPASSRLS and INHERIT; "
                      "drop_references: its grants are not restored and it is removed from policies' TO lists "
                      "(a policy for it alone is left out); {map_to: ROLE}: an existing target role takes them"),
]


class DatabasePhase(_Strict):
    schemas: list[str] = Field(default_factory=lambda: ["public"], min_length=1)
    jobs: int = Field(2, ge=1, le=32, description="parallel pg_dump / pg_restore jobs")
    strategy: Literal["dump", "stream"] = Field(
        "dump",
        description="dump: pg_dump -Fd archive (schema and data) on disk, then pg_restore; the archive is kept as "
        "evidence and fallback. stream: the archive holds the schema only; table data is copied server to "
        "server (COPY relayed, all tables from one snapshot) during restore, as pgcopydb does",
    )
    compression: int = Field(1, ge=0, le=9, description="gzip level of the dump archive (0: none, 9: smallest)")
    supabase_leftovers: Literal["shim", "drop"] = Field(
        "shim",
        description="policies and foreign keys that use Supabase's auth schema: keep them with shims, "
        "or drop them",
    )
    app_roles: list[AppRole] = Field(default_factory=list)
    roles: dict[str, RoleDecision] = Field(
        default_factory=dict,
        description="what each source role named by the migrated objects (policy TO, grants) becomes on the "
        "target; Supabase's own roles have defaults (liftoff/systems/supabase.py DEFAULT_ROLES), any other role must be "
        "listed here or preflight stops",
    )
    auth_triggers: Literal["recreate", "drop"] = Field(
        "recreate",
        description="triggers on auth.users that call the app's functions (e.g. a profile created on sign-up): "
        "recreate them on the shim's auth.users (supabase_leftovers: shim), or leave them out (listed)",
    )
    min_free_disk_mb: int = Field(
        1024, ge=0, description="free space to keep on the state disk beyond the dump's estimated size"
    )
    pg_bin_dirs: list[Path] | None = Field(
        None,
        description="where to look for pg_dump/pg_restore; default: /usr/lib/postgresql/*/bin and PATH",
    )
    collation_mismatch: Literal["warn", "fail"] = Field(
        "warn",
        description="when the target database's encoding, collation, ctype or locale provider differs from the "
        "source's (ORDER BY on text, comparisons and text indexes follow the target's rules): warn in preflight, "
        "or fail it",
    )

    @field_validator("schemas")
    @classmethod
    def _schemas(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _IDENT.match(name):
                raise ValueError(f"'{name}' is not a schema name")
        return v


class Bucket(_Strict):
    name: str
    public: bool = False


def _http_url(v: str) -> str:
    if not re.match(r"^https?://[^/@\s]+(/.*)?$", v):
        raise ValueError("expected an http(s) URL without credentials, e.g. https://s3.example.com")
    return v.rstrip("/")


class S3Access(_Strict):
    """An S3-compatible endpoint and the key pair to sign with (both references to secrets)."""

    endpoint_url: str
    region: str = "us-east-1"
    access_key_id: Secret
    secret_access_key: Secret

    _url = field_validator("endpoint_url")(classmethod(lambda cls, v: _http_url(v)))

    @field_validator("access_key_id", "secret_access_key", mode="before")
    @classmethod
    def _no_inline(cls, v: object) -> object:
        return _reject_inline_secret(v)


class StorageSource(_Strict):
    """Supabase Storage: its S3 endpoint (``https://<ref>.supabase.co/storage/v1/s3``, the fast path) or its
    REST API; either way ``storage.objects`` in the source database is the inventory."""

    project_url: str = Field(description="the Supabase project's URL, e.g. https://abcd.supabase.co: its "
                             "storage URLs in the app's columns are rewritten to target.public_url")
    protocol: Literal["s3", "rest"] = Field(
        "s3", description="s3: Supabase Storage's S3-compatible endpoint (storage.source.s3, the fast path); "
        "rest: its REST API with the project's service_role key (storage.source.service_key)")
    s3: S3Access | None = None
    service_key: Secret | None = Field(None, description="rest: the project's service_role key (a secret reference)")
    rest_url: str | None = Field(None, description="rest: the API's base URL when it is not project_url "
                                 "(a gateway in between); requests go to <rest_url>/storage/v1")

    _url = field_validator("project_url", "rest_url")(classmethod(lambda cls, v: v if v is None else _http_url(v)))

    @field_validator("service_key", mode="before")
    @classmethod
    def _no_inline(cls, v: object) -> object:
        return _reject_inline_secret(v)

    @model_validator(mode="after")
    def _access_for_protocol(self) -> "StorageSource":
        if self.protocol == "s3" and self.s3 is None:
            raise ValueError("protocol s3 needs s3 (endpoint_url, access_key_id, secret_access_key); "
                             "or set protocol: rest with service_key")
        if self.protocol == "rest" and self.service_key is None:
            raise ValueError("protocol rest needs service_key (the project's service_role key, e.g. "
                             "{prefect_secret: supabase-service-key})")
        return self


class StorageTarget(S3Access):
    public_url: str = Field(description="the public base the files are served from, e.g. https://files.example.com "
                            "(a public bucket's object is <public_url>/<bucket>/<key>)")

    _public = field_validator("public_url")(classmethod(lambda cls, v: _http_url(v)))


class UrlColumn(_Strict):
    """An app column holding Supabase Storage URLs (kind url) or bare object keys of one bucket (kind key)."""

    table: str = Field(description="schema.table")
    column: str
    kind: Literal["url", "key"] = "url"
    bucket: str | None = Field(None, description="for kind key: the bucket its keys are in")

    @model_validator(mode="after")
    def _bucket_for_keys(self) -> "UrlColumn":
        if self.kind == "key" and not self.bucket:
            raise ValueError("a column of kind key needs the bucket its keys are in")
        if "." not in self.table:
            raise ValueError("table: expected schema.table")
        return self


class Storage(_Strict):
    buckets: list[Bucket] = Field(default_factory=list)
    source: StorageSource | None = None
    target: StorageTarget | None = None
    bucket_prefix: str = Field("", description="prepended to every target bucket's name (a rehearsal's scratch buckets)")
    part_size_mb: int = Field(8, ge=5, le=512, description="objects above this go multipart, in parts this big")
    concurrency: int = Field(8, ge=1, le=64, description="objects in flight at once")
    batch_size: int = Field(500, ge=1, le=10000, description="objects per Prefect task (one ledger write each)")
    deep_verify: bool = Field(False, description="the gate re-reads and hashes every target object")
    sampled_heads: int = Field(100, ge=0, description="objects per bucket the gate HEADs although the target's "
                               "listing and the copy's record of its write prove them (the first this many)")
    sampled_fraction: float = Field(0.01, ge=0, le=1, description="share of the other such objects the gate "
                                    "HEADs, picked at random: checks the server keeps the Content-Type it was sent")
    rewrite: list[UrlColumn] = Field(default_factory=list, description="app columns whose storage URLs move")
    missing_source_bytes: Literal["fail", "skip"] = Field(
        "fail", description="storage.objects rows whose bytes are gone on the source (a download answers not "
        "found or 500): fail (the plan stops and names them) or skip (not copied; the gate lists them as not "
        "migrated and passes; the URL rewrite leaves their URLs as they are)")

    # The one place that says whether the storage phase is in this runbook (every flow and step asks here).
    @property
    def wanted(self) -> bool:
        """The runbook asks for the storage phase: a source or a target is set (buckets alone are a list waiting
        for its endpoints, as in runbooks/local.yaml). A half-configured one is wanted all the same, so its flow
        stops naming what is missing instead of being skipped in silence."""
        return self.source is not None or self.target is not None

    @property
    def configured(self) -> bool:
        """Everything the storage phase needs is set: buckets, source and target."""
        return bool(self.buckets) and self.source is not None and self.target is not None


class S3Target(_Strict):
    endpoint_url: str
    bucket: str
    region: str = "us-east-1"
    access_key_id: Secret
    secret_access_key: Secret

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/@\s]+(/.*)?$", v):
            raise ValueError("expected an http(s) URL without credentials, e.g. https://s3.example.com")
        return v

    @field_validator("access_key_id", "secret_access_key", mode="before")
    @classmethod
    def _no_inline(cls, v: object) -> object:
        return _reject_inline_secret(v)


_CRON = re.compile(r"^\S+(\s+\S+){4}$")
_KEEP = re.compile(r"^(\d+)([hd])$")


class BackupTier(_Strict):
    """One line of the plan's backup table: what is backed up, when, where to, and how long it is kept."""

    name: str = Field(description="the tier's name: in its objects' names and the schedule's parameters")
    what: list[Literal["database", "files", "redis"]] = Field(
        min_length=1, description="database: pg_dump of target.direct; files: the storage.target buckets "
        "(backups.files), new or changed objects; redis: an RDB snapshot of target.redis")
    schedule: str = Field(description="cron, in backups.timezone")
    where: str = Field("destination", description="destination: backups.destination (B2); or ssh:/ABSOLUTE/PATH, "
                       "a folder on the VPS (the runbook's ssh)")
    keep: str = Field(description="how long each backup of this tier is kept: Nd (days) or Nh (hours); the "
                      "newest backups.keep_newest are always kept")

    @field_validator("name")
    @classmethod
    def _tier_name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9-]*$", v):
            raise ValueError("expected lower-case letters, digits and -, e.g. daily")
        return v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not _CRON.match(v.strip()):
            raise ValueError(f"'{v}' is not a cron line of five fields, e.g. '0 3 * * *'")
        return v

    @field_validator("where")
    @classmethod
    def _where(cls, v: str) -> str:
        if v != "destination" and not re.match(r"^ssh:/[^\s]*$", v):
            raise ValueError("expected destination, or ssh:/absolute/path (a folder on the VPS)")
        return v

    @field_validator("keep")
    @classmethod
    def _keep(cls, v: str) -> str:
        m = _KEEP.match(v)
        if not m or int(m.group(1)) < 1:
            raise ValueError("expected a number of days or hours, e.g. 30d or 24h")
        return v

    @model_validator(mode="after")
    def _files_to_bucket(self) -> "BackupTier":
        if "files" in self.what and self.where != "destination":
            raise ValueError("files are backed up to backups.destination only (where: destination)")
        return self

    @property
    def keep_s(self) -> int:
        n, unit = _KEEP.match(self.keep).groups()
        return int(n) * (86400 if unit == "d" else 3600)

    @property
    def ssh_path(self) -> str | None:
        return self.where[len("ssh:"):].rstrip("/") or "/" if self.where.startswith("ssh:") else None


class Pitr(_Strict):
    """Point-in-time recovery with pgBackRest on the VPS: the target cluster's WAL archived into the backup
    bucket (backups.destination, over HTTPS: pgBackRest speaks S3 only over TLS), full and differential
    backups on their schedules, ``pgbackrest check`` as the gate. pgBackRest runs on the VPS (the runbook's
    ssh) as ``os_user``, which must reach the cluster over its socket without a password (Debian's peer)."""

    stanza: str = Field(description="pgBackRest's name for the cluster, e.g. tour-crm")
    pg_path: str = Field(description="the target cluster's data directory on the VPS, e.g. /var/lib/postgresql/16/main")
    pg_port: int = Field(5432, ge=1, le=65535)
    pg_socket_path: str | None = Field(None, description="the cluster's unix socket folder (default: pgBackRest's)")
    os_user: str = Field("postgres", description="the operating system user the cluster runs as")
    config: str = Field("/etc/pgbackrest/liftoff.conf", description="pgbackrest.conf Liftoff writes on the VPS "
                        "(mode 0600, owned by os_user: it holds the bucket's key)")
    work_dir: str = Field("/var/lib/pgbackrest", description="pgBackRest's log, lock and spool folder on the VPS")
    repo_path: str = Field("/pgbackrest", description="key prefix of the repository in the bucket")
    ca_file: str | None = Field(None, description="CA certificate file on the VPS the bucket's TLS certificate is "
                                "checked against (default: the system's)")
    retention_days: int = Field(30, ge=1, description="full backups (and the WAL they need) are kept this many days")
    full_schedule: str = Field("0 1 * * 0", description="cron (in backups.timezone) of the full backups")
    diff_schedule: str = Field("0 1 * * 1-6", description="cron of the differential backups")
    restart_command: str = Field(description="restarts the cluster (archive_mode takes effect only then), e.g. "
                                 "'systemctl restart postgresql@16-main'; it must return once the cluster is up "
                                 "and leave no process holding its output (pg_ctl: give -l LOGFILE)")
    stop_command: str = Field(description="stops the cluster (a point-in-time restore replaces its files)")
    start_command: str = Field(description="starts the cluster (as restart_command: pg_ctl with -l LOGFILE)")
    timeout_s: int = Field(600, ge=10, description="how long a pgBackRest command or the cluster's recovery may take")

    @field_validator("full_schedule", "diff_schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not _CRON.match(v.strip()):
            raise ValueError(f"'{v}' is not a cron line of five fields, e.g. '0 1 * * 0'")
        return v

    @field_validator("stanza")
    @classmethod
    def _stanza(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", v):
            raise ValueError("expected letters, digits, _ . -")
        return v


class Backups(_Strict):
    """Backups of the migrated database (pg_dump of target.direct) and of the target S3 server's buckets to an
    S3-compatible bucket (Backblaze B2), each database backup proven by restoring it (the backup phase)."""

    destination: S3Target
    name_prefix: str | None = Field(None, description="dumps are named <name_prefix>_YYYY-MM-DD_HH-MM-SS.dump "
                                    "(UTC); default: the runbook's name with - as _ (tour-crm: tour_crm)")
    schedules: list[str] = Field(
        default_factory=lambda: ["0 3 * * *", "0 9-18 * * 1-5"],
        description="cron lines the backup deployment runs on, in `timezone` (the plan: daily at 03:00, and "
        "hourly 09:00-18:00 on weekdays)")
    timezone: str = Field("UTC", description="IANA time zone of the schedules, e.g. Europe/Berlin")
    retention_days: int = Field(30, ge=1, description="dumps whose object is older than this are deleted "
                                "(judged by the object's LastModified, never by its name)")
    keep_newest: int = Field(7, ge=1, description="the newest N dumps are always kept, whatever their age or "
                             "the clock says; so is the newest one whose restore test passed")
    compression: int = Field(6, ge=0, le=9, description="gzip level of pg_dump -Fc")
    part_size_mb: int = Field(16, ge=5, le=512, description="the dump streams up in parts this big (the memory "
                              "one backup holds)")
    files: list[str] | None = Field(None, description="the storage.buckets whose objects on storage.target are "
                                    "backed up (incremental: new or changed objects only); default: all of them")
    files_prefix: str = Field("files/", description="key prefix of the file backups in the destination bucket: "
                              "<files_prefix><bucket>/<key>")
    restore_test_database: str = Field("liftoff_restore_test", description="scratch database on the target "
                                       "server each backup is restored into, then dropped (also on failure)")
    tiers: list[BackupTier] | None = Field(
        None, description="the plan's backup table, one line per tier (what, schedule, where, keep); each runs "
        "on its own schedule and keeps its own backups. Without it, every run of `schedules` backs up the "
        "database and the files to the destination, restore-tests it and keeps retention_days (as before tiers)")
    pitr: Pitr | None = Field(None, description="point-in-time recovery with pgBackRest (WAL archiving into "
                              "the destination bucket); liftoff run pitr")
    restore_test_schedule: str = Field("30 4 * * *", description="cron (in timezone) of the restore-test "
                                       "deployment when tiers are given: the newest backup proven by a restore "
                                       "(daily by default)")

    @field_validator("restore_test_schedule")
    @classmethod
    def _restore_cron(cls, v: str) -> str:
        if not _CRON.match(v.strip()):
            raise ValueError(f"'{v}' is not a cron line of five fields, e.g. '30 4 * * *'")
        return v

    @field_validator("tiers")
    @classmethod
    def _unique_tiers(cls, v: list[BackupTier] | None) -> list[BackupTier] | None:
        names = [t.name for t in v or []]
        if len(names) != len(set(names)):
            raise ValueError(f"tier names must be unique, got {names}")
        if v is not None and not any("database" in t.what and t.where == "destination" for t in v):
            raise ValueError("at least one tier must back up the database to the destination (restore tests and "
                             "recover read it there)")
        return v

    def tier(self, name: str) -> BackupTier:
        for t in self.tiers or []:
            if t.name == name:
                return t
        raise KeyError(name)

    @field_validator("schedules")
    @classmethod
    def _crons(cls, v: list[str]) -> list[str]:
        for line in v:
            if not _CRON.match(line.strip()):
                raise ValueError(f"'{line}' is not a cron line of five fields, e.g. '0 3 * * *'")
        return v

    @field_validator("name_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", v):
            raise ValueError("expected letters, digits, _ . - (it starts every dump's object name)")
        return v

    @field_validator("files_prefix")
    @classmethod
    def _files_prefix(cls, v: str) -> str:
        if v and not v.endswith("/"):
            raise ValueError("expected a folder, ending in /, e.g. files/")
        return v

    @field_validator("restore_test_database")
    @classmethod
    def _scratch(cls, v: str) -> str:
        return scratch_database_name(v)


class Rehearsal(_Strict):
    """The scheduled dry run of the whole migration, against scratch resources only."""

    schedule: str = Field("0 3 * * 0", description="cron, in the runbook's time zone (default: Sundays 03:00)")
    timezone: str = Field("UTC", description="IANA time zone of the schedule, e.g. Europe/Berlin")
    scratch_database: str = Field("liftoff_rehearsal", description="created on the target server for the "
                                  "rehearsal and dropped after it, also when a phase fails")
    bucket_prefix: str = Field("rehearsal-", min_length=1, description="prepended to every scratch bucket's name")
    max_downtime_s: float | None = Field(None, gt=0, description="notify when the estimated cutover downtime "
                                         "grows past this")

    @field_validator("scratch_database")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z_][a-z0-9_]*$", v):
            raise ValueError("expected a plain lower-case database name (letters, digits, _)")
        return v


SEVERITIES = ("warning", "error", "critical")


class NotificationUrl(_Strict):
    """One place alerts go, as an Apprise URL (mailtos://, slack://, discord://, twilio:// for SMS, ...: the
    URL holds its credentials, so it is a secret reference), and the least severe alert it takes."""

    url: Secret = Field(description="the Apprise URL, as a secret reference (e.g. {env: LIFTOFF_ALERT_EMAIL_URL})")
    severity: Literal["warning", "error", "critical"] = Field(
        "error", description="the least severe alert sent here: warning (a rehearsal's downtime over the plan's), "
        "error (a run failed) or critical (the cutover, the rollback or a backup failed): SMS for critical only")

    @field_validator("url", mode="before")
    @classmethod
    def _no_inline(cls, v: object) -> object:
        return _reject_inline_secret(v)


class Notifications(_Strict):
    """Where alerts go: Apprise URLs (``urls``: email, SMS, Slack, Discord, ..., each with its least severity),
    and an incoming webhook (Slack- and Discord-compatible JSON), which takes every alert."""

    webhook: Secret | None = Field(None, description="the webhook URL, as a secret reference (the URL is the "
                                   "credential)")
    style: Literal["slack", "discord"] = "slack"
    urls: list[NotificationUrl] = Field(default_factory=list, description="Apprise URLs, each with a severity")

    @field_validator("webhook", mode="before")
    @classmethod
    def _no_inline(cls, v: object) -> object:
        return _reject_inline_secret(v)


class PoolerGate(_Strict):
    """The pooler's gate: concurrent clients doing short transactions through PgBouncer."""

    clients: int = Field(100, ge=1, le=1000, description="clients connected at once (threads), each doing "
                         "transactions_per_client short transactions")
    transactions_per_client: int = Field(20, ge=1, le=10000)
    transaction_ms: float = Field(5, ge=0, le=10000, description="how long each transaction holds its server "
                                  "connection (pg_sleep), so the clients contend for the pool as an app's would")
    timeout_s: float = Field(60, gt=0, description="a client still waiting after this fails the gate")


class Pooler(_Strict):
    """PgBouncer in front of the target (the pooler phase): its config, rendered from these settings, and where
    it goes. PgBouncer listens on ``target.pooled``'s port and pools ``databases`` of the PostgreSQL server at
    ``server_host:server_port`` (default ``target.direct``'s) for ``users`` (default ``target.pooled.user``)."""

    pool_mode: Literal["transaction", "session", "statement"] = Field(
        "transaction", description="transaction: a server connection per transaction (apps must not prepare "
        "statements or keep session state)")
    max_client_conn: int = Field(100, ge=1, description="client connections PgBouncer accepts, admin console "
                                 "included")
    default_pool_size: int = Field(20, ge=1, description="server connections per database and user")
    min_pool_size: int = Field(5, ge=0)
    reserve_pool_size: int = Field(5, ge=0, description="extra server connections for clients waiting longer "
                                   "than reserve_pool_timeout")
    reserve_pool_timeout: int = Field(3, ge=0, description="seconds")
    server_lifetime: int = Field(3600, ge=0, description="seconds")
    server_idle_timeout: int = Field(600, ge=0, description="seconds")
    auth: Literal["userlist"] = Field(
        "userlist", description="userlist: each user's SCRAM secret copied verbatim from pg_authid (read through "
        "target.direct, a superuser) into the auth_file, so PgBouncer logs in to PostgreSQL with SCRAM and no "
        "plaintext password is stored; re-run the flow after a password change")
    databases: list[str] = Field(default_factory=list, description="databases to pool (default: "
                                 "[target.pooled.database])")
    users: list[str] = Field(default_factory=list, description="roles allowed through PgBouncer (default: "
                             "[target.pooled.user])")
    admin_user: str | None = Field(None, description="the admin console's user (SHOW POOLS, RELOAD), also put in "
                                   "the userlist; default target.direct.user, whose password the flow logs in with")
    server_host: str | None = Field(None, description="how PgBouncer reaches PostgreSQL (default "
                                    "target.direct.host; 127.0.0.1 when both run on the VPS)")
    server_port: int | None = Field(None, ge=1, le=65535, description="default target.direct.port")
    listen_addr: str = Field("127.0.0.1", description="where PgBouncer listens (listen_port is target.pooled.port): loopback, or the VPS's private or Docker address; never * on a public host (the security phase fails it)")
    write_via: Literal["local", "ssh"] = Field("local", description="where config_dir is: this machine, or the VPS "
                                               "over ssh (the runbook's ssh section)")
    config_dir: str = Field("/etc/pgbouncer", description="the directory of pgbouncer.ini and userlist.txt, as "
                            "PgBouncer reads them")
    reload: Literal["admin", "command"] = Field("admin", description="admin: RELOAD on the admin console after a "
                                                "change; command: run reload_command (where write_via says)")
    reload_command: str | None = Field(None, description="e.g. 'systemctl reload pgbouncer'")
    settings: dict[str, str] = Field(default_factory=dict, description="more [pgbouncer] lines, written as given "
                                     "(logfile, pidfile, unix_socket_dir, client_tls_*); never a secret")
    gate: PoolerGate = Field(default_factory=PoolerGate)

    @field_validator("databases", "users")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.$-]*$", name):
                raise ValueError(f"'{name}' is not a plain name (letters, digits, _ . $ -)")
        return v

    @field_validator("config_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("expected an absolute path, e.g. /etc/pgbouncer")
        return v.rstrip("/") or "/"

    @model_validator(mode="after")
    def _reload_command(self) -> "Pooler":
        if self.reload == "command" and not self.reload_command:
            raise ValueError("reload: command needs reload_command (e.g. 'systemctl reload pgbouncer')")
        if self.min_pool_size > self.default_pool_size:
            raise ValueError("min_pool_size is above default_pool_size")
        reserved = {"listen_port", "auth_type", "auth_file", "pool_mode", "admin_users"}
        clash = sorted(reserved & set(self.settings))
        if clash:
            raise ValueError(f"settings: {', '.join(clash)} are set by the flow (listen_port is target.pooled.port)")
        for key, value in self.settings.items():
            if not re.match(r"^[a-z_]+$", key) or "\n" in value:
                raise ValueError(f"settings.{key}: expected a PgBouncer setting name and a one-line value")
        return self


_REDIS_MEMORY = re.compile(r"^(\d+)(b|k|kb|m|mb|g|gb)?$", re.IGNORECASE)
_REDIS_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000 ** 2, "mb": 1024 ** 2, "g": 1000 ** 3,
                "gb": 1024 ** 3}


def redis_memory_bytes(value: str) -> int:
    """Bytes of a Redis memory setting as redis.conf writes it (``512mb``: 1024-based; ``512m``: 1000-based)."""
    m = _REDIS_MEMORY.match(value.strip())
    if not m:
        raise ValueError(f"'{value}' is not a Redis memory size (e.g. 512mb, 1gb, 0)")
    return int(m.group(1)) * _REDIS_UNITS[(m.group(2) or "").lower()]


class Cache(_Strict):
    """Redis on the target as the plan configures it (the cache phase). Which Redis: ``target.redis``."""

    appendonly: bool = Field(True, description="persistence: every write appended to the AOF, so a restart "
                             "keeps the data (redis.conf `appendonly yes`)")
    maxmemory: str = Field("512mb", description="the memory Redis may use before it evicts (redis.conf units: "
                           "512mb, 1gb; 0 means no limit)")
    maxmemory_policy: Literal["noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru",
                              "volatile-lfu", "volatile-random", "volatile-ttl"] = Field(
        "allkeys-lru", description="what Redis evicts at maxmemory (redis.conf `maxmemory-policy`)")
    apply: bool = Field(False, description="let Liftoff set what differs (CONFIG SET, then CONFIG REWRITE so a "
                        "restart keeps it); false: only check, and say the command that fixes each difference")

    @field_validator("maxmemory")
    @classmethod
    def _memory(cls, v: str) -> str:
        redis_memory_bytes(v)
        return v.strip().lower()

    def wanted(self) -> dict[str, str]:
        """The settings as redis.conf and CONFIG SET spell them."""
        return {"appendonly": "yes" if self.appendonly else "no", "maxmemory": self.maxmemory,
                "maxmemory-policy": self.maxmemory_policy}


_PG_MEMORY = re.compile(r"^(\d+)\s*(B|kB|MB|GB|TB)$")
_PG_UNITS = {"B": 1, "kB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


def pg_memory_bytes(value: str) -> int:
    """Bytes of a PostgreSQL memory setting as postgresql.conf writes it (``1GB``, ``256MB``, ``8kB``: 1024-based,
    unit names case-sensitive as PostgreSQL reads them)."""
    m = _PG_MEMORY.match(str(value).strip())
    if not m:
        raise ValueError(f"'{value}' is not a PostgreSQL memory size with its unit (e.g. 1GB, 256MB, 64kB)")
    return int(m.group(1)) * _PG_UNITS[m.group(2)]


class Tuning(_Strict):
    """PostgreSQL on the target as the plan tunes it for the 16 GB VPS (``liftoff run tune``); which server:
    ``target.direct``. The defaults are the plan's."""

    shared_buffers: str = Field("1GB", description="PostgreSQL's own page cache (restart needed)")
    effective_cache_size: str = Field("3GB", description="what the planner assumes the OS caches")
    work_mem: str = Field("32MB", description="per sort or hash, per query node")
    maintenance_work_mem: str = Field("256MB", description="VACUUM, CREATE INDEX")
    max_connections: int = Field(100, ge=1, le=10000, description="restart needed; PgBouncer's pools fit under it")
    wal_buffers: str = Field("32MB", description="WAL not yet written to disk (restart needed)")
    apply: bool = Field(False, description="let Liftoff set what differs (ALTER SYSTEM, then pg_reload_conf(); "
                        "the settings that need a restart are named); false: only check and name the fix. "
                        "target.direct.user must be a superuser or hold ALTER SYSTEM on these parameters")

    @field_validator("shared_buffers", "effective_cache_size", "work_mem", "maintenance_work_mem", "wal_buffers")
    @classmethod
    def _memory(cls, v: str) -> str:
        pg_memory_bytes(v)
        return str(v).strip()

    def wanted(self) -> dict[str, str]:
        """The settings as postgresql.conf and ALTER SYSTEM spell them."""
        return {"shared_buffers": self.shared_buffers, "effective_cache_size": self.effective_cache_size,
                "work_mem": self.work_mem, "maintenance_work_mem": self.maintenance_work_mem,
                "max_connections": str(self.max_connections), "wal_buffers": self.wal_buffers}


class Cdn(_Strict):
    """The CDN in front of the public files (the plan: Cloudflare, a proxied CNAME to the VPS, images cached a
    month). The files host and the URL fetched are ``storage.target.public_url``'s; the object, one of a public
    bucket on ``storage.target``."""

    cname: str | None = Field(None, description="the name the files host must be a CNAME to, or end with "
                              "(e.g. cdn.cloudflare.net)")
    addresses: list[str] = Field(default_factory=list, description="the CDN's address ranges (CIDR): a proxied "
                                 "record answers with the CDN's addresses, not the VPS's")
    resolver: str | None = Field(None, description="ip or ip:port of the resolver to ask (default: the system's)")
    bucket: str | None = Field(None, description="the public bucket whose object is fetched (default: the first "
                               "public one of storage.buckets)")
    key: str | None = Field(None, description="the object fetched (default: the first the target lists)")
    min_max_age_s: int = Field(2592000, ge=0, description="Cache-Control max-age must be at least this "
                               "(the plan: images cached a month)")
    cache_status_header: str | None = Field("cf-cache-status", description="the header the CDN says HIT in on "
                                            "a second fetch (none: not checked)")

    @field_validator("addresses")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"'{cidr}' is not an address range (e.g. 104.16.0.0/13)") from None
        return v

    @model_validator(mode="after")
    def _how_to_tell(self) -> "Cdn":
        if not self.cname and not self.addresses:
            raise ValueError("name how to tell the CDN answers: cname (the name the files host points to) or "
                             "addresses (the CDN's ranges)")
        return self


class Decommission(_Strict):
    """The final archive of the Supabase project and the clean-up of what Liftoff left on it (liftoff run
    decommission, after a passing watch). The archive goes to backups.destination."""

    archive_prefix: str = Field("supabase-archive/", description="key prefix of the archives in the backup bucket: "
                                "<archive_prefix><UTC time>/database.dump, .../files/<bucket>/<key>, .../manifest.json")
    restore_test_database: str = Field("liftoff_archive_test", description="scratch database on the target server "
                                       "the archived dump is restored into, then dropped (also on failure)")

    @field_validator("restore_test_database")
    @classmethod
    def _scratch(cls, v: str) -> str:
        return scratch_database_name(v)

    @field_validator("archive_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or v.startswith("/") or not v.endswith("/"):
            raise ValueError("expected a key prefix ending in / (e.g. supabase-archive/)")
        return v


class Soak(_Strict):
    """The plan's watch after the switch ("monitor for 24 hours"): every service and app checked every few
    minutes against the plan's thresholds (``liftoff run watch``). Disk and PostgreSQL connections use the
    health section's thresholds; CPU and RAM are read over ssh."""

    hours: float = Field(24, gt=0, description="how long the watch runs before it reports")
    interval_s: float = Field(300, gt=0, description="seconds between two rounds of checks")
    cpu_window_s: float = Field(300, gt=0, description="CPU use is averaged over this window (the plan: 5 minutes)")
    cpu_warn_percent: float = Field(70, gt=0, le=100)
    cpu_critical_percent: float = Field(90, gt=0, le=100)
    ram_warn_percent: float = Field(80, gt=0, le=100)
    ram_critical_percent: float = Field(90, gt=0, le=100)
    response_warn_ms: float = Field(500, gt=0, description="an app's /api/health answering slower than this warns")
    response_critical_ms: float = Field(2000, gt=0)
    error_rate_warn_percent: float = Field(1, ge=0, le=100, description="where the health endpoint reports an "
                                           "error rate (error_rate_percent, or error_rate as a fraction)")
    error_rate_critical_percent: float = Field(5, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> "Soak":
        for name in ("cpu", "ram", "response", "error_rate"):
            unit = "ms" if name == "response" else "percent"
            if getattr(self, f"{name}_warn_{unit}") > getattr(self, f"{name}_critical_{unit}"):
                raise ValueError(f"{name}_warn_{unit} must not be above {name}_critical_{unit}")
        return self


class UptimeKuma(_Strict):
    """The Uptime Kuma monitor list the health phase exports (each field is Uptime Kuma's own monitor field)."""

    file: str = Field("uptime-kuma-monitors.yaml", description="the export's file name, written in state_dir")
    interval: int = Field(60, ge=20, description="seconds between checks (Uptime Kuma's `interval`)")
    retry_interval: int = Field(60, ge=20, description="seconds between retries of a failing check "
                                "(`retryInterval`)")
    maxretries: int = Field(3, ge=0, description="failed retries before a monitor is down (`maxretries`)")
    accepted_statuscodes: list[str] = Field(default_factory=lambda: ["200-299"],
                                            description="HTTP codes that count as up (`accepted_statuscodes`)")

    @field_validator("file")
    @classmethod
    def _file(cls, v: str) -> str:
        if "/" in v or v in ("", ".", ".."):
            raise ValueError("expected a file name (it is written in state_dir)")
        return v


class Health(_Strict):
    """Health monitoring: what is checked, against which thresholds (the health phase). The services are the
    runbook's (target.direct, target.pooled, target.redis, storage.target), the apps ``cutover.apps``, the VPS
    ``ssh``."""

    disk_warn_percent: float = Field(70, gt=0, le=100, description="disk use at or above this warns")
    disk_critical_percent: float = Field(85, gt=0, le=100, description="disk use at or above this is critical")
    disk_paths: list[str] = Field(default_factory=lambda: ["/"], min_length=1,
                                  description="paths on the VPS whose filesystem's use is checked (df)")
    connections_warn: int = Field(80, ge=1, description="established connections to PostgreSQL at or above this "
                                  "warn")
    connections_critical: int = Field(95, ge=1, description="established connections to PostgreSQL at or above "
                                      "this are critical")
    postgres_port: int | None = Field(None, ge=1, le=65535, description="the PostgreSQL port on the VPS whose "
                                      "established connections are counted (ss); default target.direct.port")
    uptime_kuma: UptimeKuma = Field(default_factory=UptimeKuma)

    @field_validator("disk_paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for path in v:
            if not path.startswith("/"):
                raise ValueError(f"'{path}' is not an absolute path")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> "Health":
        if self.disk_warn_percent > self.disk_critical_percent:
            raise ValueError("disk_warn_percent must not be above disk_critical_percent")
        if self.connections_warn > self.connections_critical:
            raise ValueError("connections_warn must not be above connections_critical")
        return self


class Security(_Strict):
    """The VPS's exposure, checked over SSH (the security phase): the firewall, what listens where, and files
    that must hold no secret of this runbook."""

    allowed_ports: list[int] = Field(
        default_factory=lambda: [22, 80, 443],
        description="the only ports the firewall may allow in (SSH, HTTP, HTTPS)")
    internal_ports: dict[str, int] = Field(
        default_factory=dict,
        description="internal services that must listen only on bind_networks, by name, e.g. {MinIO: 9000}. "
        "PostgreSQL, PgBouncer and Redis are checked on the ports of target.direct, target.pooled and "
        "target.redis; name them here with the VPS's port when Liftoff reaches them through a tunnel")
    bind_networks: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128", "172.16.0.0/12"],
        description="addresses an internal service may listen on: loopback and the Docker networks (CIDRs)")
    secret_files: list[str] = Field(
        default_factory=list,
        description="files on the VPS that must hold no secret of this runbook, read over SFTP: a repository's "
        "committed .env, docker-compose.yml, the web root's config (not the env file the apps read their "
        "secrets from, cutover.switch.ssh.env_file: it holds them by design)")
    local_secret_files: list[Path] = Field(
        default_factory=list,
        description="files on this machine that must hold no secret of this runbook, e.g. the app repository's "
        ".env; relative paths are from the runbook file's folder")
    firewall_command: str = Field(
        "ufw status verbose",
        description="prints the firewall's state as `ufw status verbose` does; `sudo ufw status verbose` when "
        "ssh.user is not root")
    listeners_command: str = Field(
        "ss -tlnp",
        description="prints the listening TCP sockets as `ss -tlnp` does; `sudo ss -tlnp` to see every process")

    @field_validator("allowed_ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        if any(not 1 <= p <= 65535 for p in v):
            raise ValueError("expected port numbers between 1 and 65535")
        return v

    @field_validator("internal_ports")
    @classmethod
    def _named_ports(cls, v: dict[str, int]) -> dict[str, int]:
        if any(not 1 <= p <= 65535 for p in v.values()):
            raise ValueError("expected {service name: port} with ports between 1 and 65535")
        return v

    @field_validator("bind_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        try:
            return [str(ipaddress.ip_network(n, strict=False)) for n in v]
        except ValueError as exc:
            raise ValueError(f"expected CIDRs such as 127.0.0.0/8 or ::1/128 ({exc})") from None


class Runbook(_Strict):
    """One migration: where from, where to, and how each phase runs."""

    name: str
    state_dir: Path = Field(description="dump archive and ledger; relative paths are from the runbook file")
    source: Endpoint
    target: Target
    database: DatabasePhase = Field(default_factory=DatabasePhase)
    storage: Storage = Field(default_factory=Storage)
    backups: Backups | None = None
    pooler: Pooler | None = Field(None, description="PgBouncer in front of the target (liftoff run pooler)")
    cache: Cache | None = Field(None, description="Redis settings the plan wants (liftoff run cache)")
    soak: Soak = Field(default_factory=Soak, description="the watch after the switch (liftoff run watch)")
    decommission: Decommission = Field(default_factory=Decommission, description="the final archive of the "
                                       "Supabase project (liftoff run decommission)")
    cdn: Cdn | None = Field(None, description="the CDN in front of storage.target.public_url (checked by the "
                            "cutover's checklist)")
    tuning: Tuning | None = Field(None, description="PostgreSQL settings the plan wants on the target "
                                  "(liftoff run tune; the plan's defaults when absent)")
    health: Health = Field(default_factory=Health, description="health checks and their thresholds")
    security: Security = Field(default_factory=Security, description="exposure checks over SSH")
    ssh: SshAccess | None = Field(None, description="the VPS, for what runs there (the ssh switch driver)")
    cutover: Cutover = Field(default_factory=Cutover)
    rehearsal: Rehearsal = Field(default_factory=Rehearsal)
    notifications: Notifications = Field(default_factory=Notifications)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9-]*$", v):
            raise ValueError("expected lower-case letters, digits and dashes")
        return v


def _key_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("function-after", "function-before") or str(item).startswith("function-"):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _explain(error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing field"
    msg = error["msg"]
    return msg.removeprefix("Value error, ")


# Each flow run and its subflows validate the runbook once: a parsed runbook is kept per file and content (the
# text is read every time, which is cheap; the YAML parse and the validation are not), so an edit is seen by
# the next read, however soon. A Runbook is frozen (immutable), so the one parsed model is shared safely.
_PARSED: dict[tuple[Path, str], Runbook] = {}


def load_runbook(path: str | Path) -> Runbook:
    """Reads and validates a runbook file; relative ``state_dir`` is resolved against the file's folder."""
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunbookInvalid(f"{path}: no such runbook file") from None
    except OSError as exc:
        raise RunbookInvalid(f"{path}: cannot read ({exc.strerror})") from None
    key = (path, text)
    if key not in _PARSED:
        if len(_PARSED) > 64:
            _PARSED.clear()
        _PARSED[key] = _parse_runbook(path, text)
    return _PARSED[key]


def _parse_runbook(path: Path, text: str) -> Runbook:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RunbookInvalid(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RunbookInvalid(f"{path}: expected a mapping of keys at the top level")
    try:
        runbook = Runbook.model_validate(data)
    except ValidationError as exc:
        problems = [f"{path}: {_key_path(e['loc'])}: {_explain(e)}" for e in exc.errors()]
        raise RunbookInvalid("\n".join(problems), problems=problems) from None
    if not runbook.state_dir.is_absolute():
        runbook = runbook.model_copy(update={"state_dir": (path.parent / runbook.state_dir).resolve()})
    if runbook.ssh is not None and not runbook.ssh.known_hosts.is_absolute():
        ssh = runbook.ssh.model_copy(update={"known_hosts": (path.parent / runbook.ssh.known_hosts).resolve()})
        runbook = runbook.model_copy(update={"ssh": ssh})
    if any(not f.is_absolute() for f in runbook.security.local_secret_files):
        files = [(path.parent / f).resolve() for f in runbook.security.local_secret_files]
        runbook = runbook.model_copy(update={"security": runbook.security.model_copy(update={"local_secret_files": files})})
    return runbook


RUNBOOKS_DIR = Path(__file__).resolve().parent


def resolve_runbook_path(path: str) -> Path:
    """A runbook path as given, else found under runbooks/ or the folder above it (the project root)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    for base in (RUNBOOKS_DIR, RUNBOOKS_DIR.parent):
        if (base / p).exists():
            return (base / p).resolve()
    return p.resolve()
