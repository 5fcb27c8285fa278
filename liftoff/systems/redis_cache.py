"""Redis on the target as the plan configures it: persistence (``appendonly yes``), a memory limit
(``maxmemory 512mb``) and what is evicted at the limit (``maxmemory-policy allkeys-lru``).

``read_cache_settings`` reads what the server runs with (CONFIG GET) and sets it beside the runbook's ``cache``
settings; ``apply_cache_settings`` sets what differs (CONFIG SET, then CONFIG REWRITE so a restart keeps it,
and waits for the first AOF to be written when persistence was just turned on); ``check_cache`` is the gate: a
plain function of the runbook returning a report of lines (PING, one line per setting, a write/read round trip
on a key of Liftoff's own that is deleted after), each red line with the command that fixes it.

Knows Redis only (redis-py); which Redis is ``target.redis``. Details and fixes pass the redaction module.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field


from liftoff.errors import ConnectionRefused, RunbookInvalid, StepFailed
from liftoff.logs import get_logger
from liftoff.redaction import one_line, redact
from liftoff.reports import check_rows, check_table
from liftoff.runbooks.model import Cache, RedisEndpoint, Runbook, redis_memory_bytes
from liftoff.checks import FAILED, NOT_CHECKED, PASSED, CheckLine, GateReport
from liftoff.systems.redis_server import ping as redis_ping

log = get_logger(phase="cache")

FIELD = "target.redis"
ROUND_TRIP_PREFIX = "liftoff:cache-check:"  # keys Liftoff writes for the round trip, deleted right after
_TIMEOUT_S = 5
_AOF_WAIT_S = 60


def cache_settings(rb: Runbook) -> Cache:
    """The runbook's cache section, or the plan's defaults when it has none (check only, apply false)."""
    return rb.cache or Cache()


def redis_endpoint(rb: Runbook) -> RedisEndpoint:
    if rb.target.redis is None:
        raise RunbookInvalid(f"{FIELD}: missing; the cache phase checks the target's Redis: add target.redis "
                             "(host, port, password) to the runbook")
    return rb.target.redis


def connect(endpoint: RedisEndpoint, field_name: str = FIELD):
    """A redis-py client (strings, one try per command); nothing is sent until it is used."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    password = endpoint.password.resolve(f"{field_name}.password") if endpoint.password else None
    return redis.Redis(host=endpoint.host, port=endpoint.port, db=endpoint.db, password=password,
                       socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S, decode_responses=True,
                       retry=Retry(NoBackoff(), 0))



# ---------------------------------------------------------------------------------------------------------
# What the server runs with, beside what the runbook wants


def same_setting(name: str, wanted: str, current: str | None) -> bool:
    """CONFIG GET answers maxmemory in bytes; the runbook writes it in redis.conf units."""
    if current is None:
        return False
    if name == "maxmemory":
        try:
            return redis_memory_bytes(current) == redis_memory_bytes(wanted)
        except ValueError:
            return False
    return current.strip().lower() == wanted.strip().lower()


def _shown(name: str, value: str | None) -> str:
    if value is None:
        return "(not readable)"
    if name == "maxmemory":
        try:
            size = redis_memory_bytes(value)
        except ValueError:
            return value
        return "0 (no limit)" if size == 0 else f"{value} ({size / 1024 ** 2:g} MiB)" if value.isdigit() else value
    return value


@dataclass(frozen=True)
class Setting:
    name: str
    wanted: str
    current: str | None  # as CONFIG GET answered; None when it could not be read

    @property
    def matches(self) -> bool:
        return same_setting(self.name, self.wanted, self.current)


@dataclass
class CacheSettings:
    where: str  # host:port
    settings: list[Setting] = field(default_factory=list)
    config_file: str | None = None  # the redis.conf the server was started with (INFO server), if any
    unreadable: str = ""  # why CONFIG GET failed (a managed Redis that renamed CONFIG)

    def differences(self) -> list[Setting]:
        return [s for s in self.settings if not s.matches]


def read_cache_settings(rb: Runbook, client=None) -> CacheSettings:
    """PINGs target.redis (one line on failure, naming the field) and reads the settings the cache section
    names. Reads only."""
    endpoint = redis_endpoint(rb)
    redis_ping(endpoint, FIELD, timeout=_TIMEOUT_S)
    own = client is None
    client = client or connect(endpoint)
    found = CacheSettings(f"{endpoint.host}:{endpoint.port}")
    try:
        import redis

        try:
            found.config_file = client.info("server").get("config_file") or None
        except redis.exceptions.ResponseError:
            pass  # INFO renamed as well: the fix then names redis.conf without its path
        for name, wanted in cache_settings(rb).wanted().items():
            try:
                current = client.config_get(name).get(name)
            except redis.exceptions.ResponseError as exc:
                found.unreadable = one_line(exc, 'no message')
                current = None
            found.settings.append(Setting(name, wanted, None if current is None else str(current)))
    finally:
        if own:
            client.close()
    return found


def fix_for(endpoint: RedisEndpoint, setting: Setting, config_file: str | None) -> str:
    """The exact commands that put one setting right, and the redis.conf line that keeps it."""
    cli = f"redis-cli -h {endpoint.host} -p {endpoint.port}"
    auth = " (with REDISCLI_AUTH set to the password)" if endpoint.password else ""
    conf = config_file or "redis.conf"
    return (f"run `{cli} CONFIG SET {setting.name} {setting.wanted} && {cli} CONFIG REWRITE`{auth}, or write "
            f"`{setting.name} {setting.wanted}` in {conf} and restart Redis; or set cache.apply: true and re-run "
            "liftoff run cache")


# ---------------------------------------------------------------------------------------------------------
# Setting what differs


def apply_cache_settings(rb: Runbook) -> dict:
    """Sets each setting that differs (CONFIG SET), then CONFIG REWRITE so the server's redis.conf keeps them
    through a restart. Turning persistence on starts Redis writing its first AOF: this waits for it, because a
    Redis asked to stop before it is written refuses ("Writing initial AOF, can't exit")."""
    import redis

    endpoint = redis_endpoint(rb)
    client = connect(endpoint)
    try:
        found = read_cache_settings(rb, client)
        if found.unreadable:
            raise StepFailed(f"{FIELD} ({found.where}): cannot read the settings ({found.unreadable}); CONFIG may "
                             "be disabled on this server: set them in its redis.conf by hand")
        changed = found.differences()
        for setting in changed:
            try:
                client.config_set(setting.name, setting.wanted)
            except redis.exceptions.ResponseError as exc:
                raise StepFailed(f"{FIELD} ({found.where}): CONFIG SET {setting.name} {setting.wanted} refused "
                                 f"({one_line(exc, 'no message')}); check cache.{setting.name.replace('-', '_')}") from None
        if changed:
            try:
                client.execute_command("CONFIG", "REWRITE")
            except redis.exceptions.ResponseError as exc:
                lines = ", ".join(f"{s.name} {s.wanted}" for s in changed)
                raise StepFailed(f"{FIELD} ({found.where}): the settings are set but CONFIG REWRITE failed "
                                 f"({one_line(exc, 'no message')}), so a restart would lose them: start Redis from a redis.conf "
                                 f"holding `{lines}` (docker: redis-server /usr/local/etc/redis/redis.conf, or "
                                 f"the same as --options on its command line)") from None
            if any(s.name == "appendonly" for s in changed):
                _wait_first_aof(client, found.where)
        log.info("redis settings applied", where=found.where, changed=[s.name for s in changed])
        return {"where": found.where, "changed": {s.name: {"from": s.current, "to": s.wanted} for s in changed},
                "config_file": found.config_file}
    finally:
        client.close()


def _wait_first_aof(client, where: str) -> None:
    deadline = time.monotonic() + _AOF_WAIT_S
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if (int(info.get("aof_enabled", 0)) == 1 and not int(info.get("aof_rewrite_in_progress", 0))
                and not int(info.get("aof_rewrite_scheduled", 0))):
            return
        time.sleep(0.1)
    raise StepFailed(f"{FIELD} ({where}): appendonly is on, but Redis has not finished writing its first AOF "
                     f"within {_AOF_WAIT_S} s; check its log and free disk space, then re-run")


# ---------------------------------------------------------------------------------------------------------
# The gate


@dataclass(frozen=True)
class CacheReport(GateReport):
    where: str
    lines: list[CheckLine] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.lines) and all(line.status == PASSED for line in self.lines)

    def failures(self) -> list[str]:
        return [f"{line.name}: {line.detail}" for line in self.lines if line.status != PASSED]

    def line(self, name: str) -> CheckLine:
        return next(line for line in self.lines if line.name == name)

    def summary(self) -> str:
        if self.ok:
            return (f"cache gate passed: Redis {self.where} answers, "
                    + ", ".join(line.name for line in self.lines if line.name.startswith(("appendonly", "maxmemory")))
                    + ", write/read round trip")
        bad = [line.name for line in self.lines if line.status != PASSED]
        return f"cache gate failed: {len(bad)} of {len(self.lines)} lines ({', '.join(bad)})"

    def rows(self) -> list[dict]:
        return check_rows(self.lines)

    def markdown(self) -> str:
        return check_table(self.lines)


def check_cache(rb: Runbook) -> CacheReport:
    """PING, each setting against the runbook's cache section, a write/read round trip on a key of Liftoff's own
    (deleted after). Writes only that key."""
    endpoint = redis_endpoint(rb)
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        found = read_cache_settings(rb)
    except ConnectionRefused as exc:
        return CacheReport(where, [
            CheckLine("Redis answers", FAILED, one_line(exc, 'no message'),
                      "start Redis on the target, or correct target.redis (host, port, password)", blocked=True),
            *[CheckLine(f"{name} {wanted}", NOT_CHECKED, "Redis did not answer")
              for name, wanted in cache_settings(rb).wanted().items()],
            CheckLine("write/read round trip", NOT_CHECKED, "Redis did not answer")])
    lines = [CheckLine("Redis answers", PASSED, f"{FIELD} ({where}): PING answered PONG")]
    for setting in found.settings:
        name = f"{setting.name} {setting.wanted}"
        if setting.current is None:
            lines.append(CheckLine(name, FAILED, f"cannot read it ({found.unreadable or 'no value'}); CONFIG may be "
                                   "disabled on this server", fix_for(endpoint, setting, found.config_file)))
        elif setting.matches:
            lines.append(CheckLine(name, PASSED, f"CONFIG GET {setting.name}: {_shown(setting.name, setting.current)}"))
        else:
            lines.append(CheckLine(name, FAILED, f"CONFIG GET {setting.name}: {_shown(setting.name, setting.current)}, "
                                   f"the plan wants {setting.wanted}", fix_for(endpoint, setting, found.config_file)))
    lines.append(_round_trip(endpoint))
    report = CacheReport(where, [CheckLine(x.name, x.status, redact(x.detail), redact(x.fix)) for x in lines])
    log.info("cache gate", ok=report.ok, failed=len(report.failures()))
    return report


def _round_trip(endpoint: RedisEndpoint) -> CheckLine:
    import redis

    name = "write/read round trip"
    key, value = f"{ROUND_TRIP_PREFIX}{secrets.token_hex(8)}", secrets.token_hex(16)
    client = connect(endpoint)
    try:
        started = time.perf_counter()
        client.set(key, value, ex=60)  # expires by itself should the delete below never run
        read = client.get(key)
        client.delete(key)
        left = client.exists(key)
        ms = (time.perf_counter() - started) * 1000
    except redis.exceptions.RedisError as exc:
        return CheckLine(name, FAILED, f"{FIELD}: SET/GET/DEL of {key} failed ({one_line(exc, 'no message')})",
                         "a replica or a full Redis refuses writes: point target.redis at the primary, or free memory")
    finally:
        client.close()
    if read != value:
        return CheckLine(name, FAILED, f"{FIELD}: {key} read back {read!r}, not what was written",
                         "check maxmemory: a limit too small evicts a key as soon as it is written")
    if left:
        return CheckLine(name, FAILED, f"{FIELD}: {key} still exists after DEL", "check the Redis server's log")
    return CheckLine(name, PASSED, f"SET, GET and DEL of a key of Liftoff's own in {ms:.1f} ms; the key is gone")
