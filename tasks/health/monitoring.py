"""The health phase: every service of the target and every app answers, and the VPS's disk and connections are
under the plan's thresholds; and the same services as an Uptime Kuma monitor list.

``check_platform_health`` is the gate, a plain function of the runbook returning a report with one line per
check: PostgreSQL (TCP connect, then ``SELECT 1``), PgBouncer (the same through ``target.pooled``), Redis (PING),
MinIO (``/minio/health/live``), each app's ``/api/health`` (the plan's JSON shape, judged by ``liftoff.systems.http_health``),
and over SSH each ``health.disk_paths`` filesystem (``df``) and the established connections to PostgreSQL
(``ss``). A line is ok, warn, critical or not configured (the runbook does not name that service); only a
critical line fails the gate. A check that raises is its own critical line; it never stops the others.

``uptime_kuma_monitors`` lists the same services as Uptime Kuma monitors. The plan's YAML for them is not in
this repository, so each monitor is written with Uptime Kuma's own monitor fields (as its API and backup
export name them): ``name``, ``type`` (``http`` for URLs, ``port`` for TCP services), ``url`` or ``hostname``
+ ``port``, ``interval``, ``retryInterval``, ``maxretries``, ``accepted_statuscodes``, ``description``. An app
is an ``http`` monitor: its /api/health answers 503 when unhealthy (a ``keyword`` monitor on "healthy" would
also match "unhealthy"). Redis is a ``port`` monitor: Uptime Kuma's ``redis`` type wants a connection
string holding the password, which an export file must not.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.checks import GateReport, blocker_line
from liftoff.errors import LiftoffError, needs_operator
from liftoff.logs import get_logger
from liftoff.redaction import error_line, one_line, redact
from liftoff.reports import check_rows, check_table, publish_markdown, publish_table
from liftoff.runbooks.model import Endpoint, Runbook
from liftoff.steps import recorded
from liftoff.systems import http_health as app_health
from liftoff.systems import postgres, ss, vps
from liftoff.systems.redis_server import ping as redis_ping
from liftoff.systems.s3 import minio_live

log = get_logger(phase="health")

OK, WARN, CRITICAL, NOT_CONFIGURED = "ok", "warn", "critical", "not configured"
Status = Literal["ok", "warn", "critical", "not configured"]
_TIMEOUT_S = 5


@dataclass(frozen=True)
class HealthLine:
    service: str
    status: Status
    detail: str
    fix: str = ""
    blocked: bool = False  # could not be checked: an input, a credential or a host to fix (exit 2)

    @property
    def name(self) -> str:
        return self.service


@dataclass(frozen=True)
class HealthReport(GateReport):
    lines: list[HealthLine] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No critical line (warnings and services not configured do not fail it)."""
        return not any(line.status == CRITICAL for line in self.lines)

    def failures(self) -> list[str]:
        return [f"{line.service}: {line.detail}" for line in self.lines if line.status == CRITICAL]

    def blockers(self) -> list[str]:
        return [blocker_line(line.service, line.detail, line.fix) for line in self.lines
                if line.status == CRITICAL and line.blocked]

    def differences_found(self) -> list[str]:
        return [f"{line.service}: {line.detail}" for line in self.lines if line.status == CRITICAL and not line.blocked]

    def warnings(self) -> list[str]:
        return [f"{line.service}: {line.detail}" for line in self.lines if line.status == WARN]

    def line(self, service: str) -> HealthLine:
        return next(line for line in self.lines if line.service == service)

    def summary(self) -> str:
        counts = {s: sum(1 for line in self.lines if line.status == s) for s in (OK, WARN, CRITICAL, NOT_CONFIGURED)}

        def named(status: str) -> str:
            return ", ".join(line.service for line in self.lines if line.status == status)

        head = (f"health passed: {counts[OK]} of {len(self.lines)} checks ok" if self.ok else
                f"health failed: {counts[CRITICAL]} critical ({named(CRITICAL)})")
        if counts[WARN]:
            head += f"; {counts[WARN]} warn ({named(WARN)})"
        if counts[NOT_CONFIGURED]:
            head += f"; not configured: {named(NOT_CONFIGURED)}"
        return head

    def rows(self) -> list[dict]:
        return check_rows(self.lines, "service")

    def markdown(self) -> str:
        return check_table(self.lines, "service")



def checked_health(service: str, fix: str, check: Callable[[], HealthLine | list[HealthLine]]) -> list[HealthLine]:
    """Runs one check; whatever it raises becomes its critical line (one line, no secret)."""
    try:
        result = check()
    except LiftoffError as exc:  # a secret, a credential or a host to fix: the check could not run (exit 2)
        result = HealthLine(service, CRITICAL, one_line(exc), fix, blocked=needs_operator(exc))
    except Exception as exc:  # noqa: BLE001 - a check's failure is its line, never the report's
        result = HealthLine(service, CRITICAL, error_line(exc), fix)
    lines = result if isinstance(result, list) else [result]
    return [HealthLine(x.service, x.status, redact(x.detail), redact(x.fix), x.blocked) for x in lines]


def check_platform_health(rb: Runbook) -> HealthReport:
    """Checks every service, app and VPS threshold the runbook names. Reads only."""
    target = rb.target
    lines: list[HealthLine] = []
    lines += checked_health("PostgreSQL", "start PostgreSQL on the target, or correct target.direct (host, port, user, "
                      "password)", lambda: _postgres("PostgreSQL", target.direct, "target.direct", pooled=False))
    lines += checked_health("PgBouncer", "start PgBouncer on the target, or correct target.pooled; liftoff run pooler "
                      "checks its config", lambda: _postgres("PgBouncer", target.pooled, "target.pooled", pooled=True))
    lines += checked_health("Redis", "start Redis on the target (docker compose up -d redis), or correct target.redis",
                      lambda: _redis(rb))
    lines += checked_health("MinIO", "start MinIO on the target, or correct storage.target.endpoint_url",
                      lambda: _minio(rb))
    if rb.cutover.apps:
        for app in rb.cutover.apps:
            lines += checked_health(f"app {app.name}", f"make {app.name} healthy, or correct its cutover.apps health_url",
                              lambda app=app: _app(app))
    else:
        lines.append(HealthLine("apps", NOT_CONFIGURED, "the runbook lists no apps (cutover.apps)",
                                "add each app's name and health_url under cutover.apps"))
    lines += _vps_lines(rb)
    report = HealthReport(lines)
    log.info("health checked", ok=report.ok, critical=len(report.failures()), warn=len(report.warnings()))
    return report


# ---------------------------------------------------------------------------------------------------------
# The services


def _tcp_connect(host: str, port: int) -> float:
    """Milliseconds a TCP connect took; raises OSError when nothing listens."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=_TIMEOUT_S):
        return (time.perf_counter() - started) * 1000


def _postgres(service: str, ep: Endpoint | None, field_name: str, *, pooled: bool) -> HealthLine:
    if ep is None:
        return HealthLine(service, NOT_CONFIGURED, f"no {service} in the runbook ({field_name})",
                          f"add {field_name} to check it")
    fix = (f"start {service} on the target, or correct {field_name} (host, port)" if not pooled else
           f"start PgBouncer on the target, or correct {field_name}; liftoff run pooler checks its config")
    try:
        ms = _tcp_connect(ep.host, ep.port)
    except OSError as exc:
        return HealthLine(service, CRITICAL, f"{field_name} ({ep.host}:{ep.port}): TCP connect failed "
                                             f"({exc.strerror or type(exc).__name__})", fix, blocked=True)
    with postgres.session(ep, field_name, pooled=pooled, text_settings=False, attempts=1) as conn:
        answer = conn.execute("SELECT 1").fetchone()[0]
        in_use = None
        if not pooled:
            in_use = conn.execute("SELECT count(*), current_setting('max_connections')::int "
                                  "FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()
    if answer != 1:
        return HealthLine(service, CRITICAL, f"{ep.where}: SELECT 1 answered {answer!r}", fix)
    detail = f"{ep.where}: TCP connect in {ms:.1f} ms, SELECT 1 answered"
    if in_use:
        detail += f"; {in_use[0]} client connections of max_connections {in_use[1]}"
    return HealthLine(service, OK, detail)


def _redis(rb: Runbook) -> HealthLine:
    endpoint = rb.target.redis
    if endpoint is None:
        return HealthLine("Redis", NOT_CONFIGURED, "no Redis in the runbook (target.redis)", "add target.redis")
    redis_ping(endpoint, "target.redis", timeout=_TIMEOUT_S)
    return HealthLine("Redis", OK, f"target.redis ({endpoint.host}:{endpoint.port}): PING answered PONG")


def _minio(rb: Runbook) -> HealthLine:
    target = rb.storage.target
    if target is None:
        return HealthLine("MinIO", NOT_CONFIGURED, "no S3 server in the runbook (storage.target)",
                          "add storage.target")
    url = f"{target.endpoint_url}/minio/health/live"
    if minio_live(target.endpoint_url) == 200:
        return HealthLine("MinIO", OK, f"{url} answered 200")
    parts = urlsplit(target.endpoint_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _tcp_connect(parts.hostname, port)
    except OSError as exc:
        return HealthLine("MinIO", CRITICAL, f"storage.target ({parts.hostname}:{port}): nothing answers "
                                             f"({exc.strerror or type(exc).__name__})",
                          "start MinIO on the target (docker compose up -d minio), or correct "
                          "storage.target.endpoint_url", blocked=True)
    return HealthLine("MinIO", WARN, f"{parts.hostname}:{port} accepts connections, but {url} did not answer 200: "
                                     "not MinIO (SeaweedFS, Garage... have no such probe), or MinIO not live",
                      "if it is MinIO, read its log; otherwise check the S3 server with its own health probe")


def _app(app) -> HealthLine:
    result = app_health.check_health(app.health_url, timeout=_TIMEOUT_S)
    if result.healthy:
        return HealthLine(f"app {app.name}", OK, f"{app.health_url}: {result.detail}")
    return HealthLine(f"app {app.name}", CRITICAL, f"{app.health_url}: {result.detail}",
                      f"make {app.name} healthy (its /api/health lists what is down), or correct its cutover.apps "
                      "health_url")


# ---------------------------------------------------------------------------------------------------------
# The VPS, over SSH


def _vps_lines(rb: Runbook) -> list[HealthLine]:
    settings = rb.health
    disk_names = [f"disk {path}" for path in settings.disk_paths]
    if rb.ssh is None:
        return [HealthLine(name, NOT_CONFIGURED, "no VPS in the runbook (ssh)", "add ssh (host, user, private_key, "
                           "known_hosts) to check the VPS's disk and connections")
                for name in [*disk_names, "PostgreSQL connections"]]
    from liftoff.systems.remote import Remote

    with Remote(rb.ssh) as remote:
        try:
            remote.run("true", timeout=30)
        except LiftoffError as exc:  # one line per check: each says the VPS could not be reached
            return [HealthLine(name, CRITICAL, one_line(exc), "check ssh (host, port, user, private_key, "
                               "known_hosts) and that sshd runs on the VPS", blocked=needs_operator(exc))
                    for name in [*disk_names, "PostgreSQL connections"]]
        lines: list[HealthLine] = []
        for path in settings.disk_paths:
            lines += checked_health(f"disk {path}", "check health.disk_paths", lambda path=path: _disk(remote, rb, path))
        lines += checked_health("PostgreSQL connections", "install iproute2 (ss) on the VPS",
                          lambda: _connections(remote, rb))
    return lines


def _disk(remote, rb: Runbook, path: str) -> HealthLine:
    h = rb.health
    usage = vps.disk_usage(remote, path)
    level = vps.judge(usage.percent, h.disk_warn_percent, h.disk_critical_percent)
    usable_mib = (usage.used_bytes + usage.available_bytes) / 1024 ** 2
    detail = (f"{remote.where}: {path} ({usage.filesystem} on {usage.mount}) {usage.percent:.1f}% used, "
              f"{usage.used_bytes / 1024 ** 2:,.1f} MiB of {usable_mib:,.1f} MiB; warn at {h.disk_warn_percent:g}%, "
              f"critical at {h.disk_critical_percent:g}%")
    fix = "" if level == OK else (
        f"free space on {usage.mount} (old dumps and backups, docker system prune, journalctl --vacuum-size) or "
        "grow the disk")
    return HealthLine(f"disk {path}", level, detail, fix)


def _connections(remote, rb: Runbook) -> HealthLine:
    h = rb.health
    port = h.postgres_port or rb.target.direct.port
    counts = ss.connection_counts(remote, port)
    level = vps.judge(counts.established_to_port, h.connections_warn, h.connections_critical)
    detail = (f"{remote.where}: {counts.established_to_port} established connections to port {port} "
              f"({counts.established_total} established in all); warn at {h.connections_warn}, critical at "
              f"{h.connections_critical}")
    fix = "" if level == OK else (
        "route the apps through PgBouncer (target.pooled) and lower their pool sizes; find the clients with "
        f"ss -tn state established '( sport = :{port} )'")
    return HealthLine("PostgreSQL connections", level, detail, fix)


# ---------------------------------------------------------------------------------------------------------
# Uptime Kuma


def uptime_kuma_monitors(rb: Runbook) -> list[dict]:
    """One Uptime Kuma monitor per service and app the runbook names, in Uptime Kuma's own field names."""
    kuma = rb.health.uptime_kuma
    common = {"interval": kuma.interval, "retryInterval": kuma.retry_interval, "maxretries": kuma.maxretries}

    def port_monitor(name: str, host: str, port: int, what: str) -> dict:
        return {"name": name, "type": "port", "hostname": host, "port": port, **common,
                "description": f"{what} accepts TCP connections"}

    def http_monitor(name: str, url: str, what: str) -> dict:
        return {"name": name, "type": "http", "url": url, "method": "GET", **common,
                "accepted_statuscodes": list(kuma.accepted_statuscodes), "description": what}

    prefix = rb.name
    monitors = [port_monitor(f"{prefix} PostgreSQL", rb.target.direct.host, rb.target.direct.port, "PostgreSQL")]
    if rb.target.pooled:
        monitors.append(port_monitor(f"{prefix} PgBouncer", rb.target.pooled.host, rb.target.pooled.port,
                                     "PgBouncer"))
    if rb.target.redis:
        monitors.append(port_monitor(f"{prefix} Redis", rb.target.redis.host, rb.target.redis.port, "Redis"))
    if rb.storage.target:
        monitors.append(http_monitor(f"{prefix} MinIO", f"{rb.storage.target.endpoint_url}/minio/health/live",
                                     "MinIO's liveness probe answers 200"))
    for app in rb.cutover.apps:
        monitors.append(http_monitor(f"{prefix} app {app.name}", app.health_url,
                                     "the app's /api/health: 200 when healthy, 503 when a check is down"))
    return monitors


def uptime_kuma_yaml(rb: Runbook) -> str:
    head = (f"# Uptime Kuma monitors for runbook {rb.name}, written by `liftoff run health`.\n"
            "# Fields are Uptime Kuma's own monitor fields; add each in its UI (Add New Monitor) or through its API.\n"
            f"# Thresholds checked by Liftoff itself: disk warn {rb.health.disk_warn_percent:g}% / critical "
            f"{rb.health.disk_critical_percent:g}%, PostgreSQL connections warn {rb.health.connections_warn} / "
            f"critical {rb.health.connections_critical}.\n")
    return head + yaml.safe_dump({"monitors": uptime_kuma_monitors(rb)}, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------------
# The gate step


def monitors_markdown(runbook: Runbook, monitors: str, *, written: bool) -> str:
    where = f" (written to `{runbook.state_dir / runbook.health.uptime_kuma.file}`)" if written else ""
    return f"## Uptime Kuma monitors{where}\n\n```yaml\n{monitors}```\n"


def publish_health(report: HealthReport, runbook: Runbook, monitors: str) -> None:
    publish_table("health-status", report.rows(), "Health: one row per check (ok, warn, critical, not configured)")
    md = [f"# Health {'PASSED' if report.ok else 'FAILED'}", "", f"{report.summary()}.", ""]
    if report.failures():
        md += ["## Critical", *[f"- {line}" for line in report.failures()], ""]
    if report.warnings():
        md += ["## Warnings", *[f"- {line}" for line in report.warnings()], ""]
    md += ["## Checks", report.markdown(),
           (f"Uptime Kuma monitors: {len(uptime_kuma_monitors(runbook))}, written to "
            f"`{runbook.state_dir / runbook.health.uptime_kuma.file}` (artifact health-uptime-kuma).")]
    publish_markdown("health-summary", "\n".join(md))
    publish_markdown("health-uptime-kuma", monitors_markdown(runbook, monitors, written=True),
                     "Uptime Kuma monitors for this runbook's services (Uptime Kuma's own monitor fields)")


@task(name="check health (gate)", cache_policy=NO_CACHE)
@recorded("health", gate="health", publish=publish_health)
def run_health_gate(rb: Runbook, monitors: str) -> HealthReport:
    """The platform's health (``check_platform_health``), shown with the Uptime Kuma monitor list."""
    return check_platform_health(rb)
