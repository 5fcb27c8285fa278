"""A Redis server (the target's cache): reached with redis-py, one try per call, errors as one line naming the
runbook field and host:port. No Prefect, no runbook parsing (it takes the model's endpoint)."""

from __future__ import annotations

from liftoff.errors import ConnectionRefused
from liftoff.redaction import one_line
from liftoff.runbooks.model import RedisEndpoint


def ping(endpoint: RedisEndpoint, field: str = "target.redis", timeout: float = 5) -> None:
    """PINGs the Redis at ``endpoint`` (AUTH with its password when it has one); raises ConnectionRefused
    with one line naming ``field`` and host:port."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    where = f"{field} ({endpoint.host}:{endpoint.port})"
    password = endpoint.password.resolve(f"{field}.password") if endpoint.password else None
    client = redis.Redis(host=endpoint.host, port=endpoint.port, db=endpoint.db, password=password,
                         socket_timeout=timeout, socket_connect_timeout=timeout,
                         retry=Retry(NoBackoff(), 0))  # one try: redis-py's default retries take ~3.5 s to say no
    try:
        if not client.ping():
            raise redis.exceptions.ResponseError("PING was not answered with PONG")
    except redis.exceptions.AuthenticationError as exc:
        hint = (f"check the secret behind {field}.password ({endpoint.password.label})" if endpoint.password
                else f"the server wants a password: set {field}.password")
        raise ConnectionRefused(f"{where}: Redis refused the login ({one_line(str(exc))}); {hint}") from None
    except redis.exceptions.TimeoutError:
        raise ConnectionRefused(f"{where}: Redis did not answer within {timeout:g} s; check {field}.host, "
                                         f"{field}.port and the firewall") from None
    except redis.exceptions.ConnectionError as exc:
        raise ConnectionRefused(f"{where}: cannot reach Redis ({one_line(str(exc))}); check {field}.host, "
                                         f"{field}.port and that redis-server is running") from None
    except redis.exceptions.ResponseError as exc:
        raise ConnectionRefused(f"{where}: Redis answered an error ({one_line(str(exc))})") from None
    finally:
        client.close()


def save_rules(endpoint: RedisEndpoint, field: str = "target.redis", timeout: float = 5) -> list[tuple[int, int]]:
    """The server's RDB ``save`` rules as (seconds, changes) pairs; empty when RDB snapshots are off."""
    import redis

    password = endpoint.password.resolve(f"{field}.password") if endpoint.password else None
    client = redis.Redis(host=endpoint.host, port=endpoint.port, password=password, socket_timeout=timeout,
                         socket_connect_timeout=timeout)
    try:
        value = client.config_get("save").get("save", "")
    except redis.exceptions.RedisError as exc:
        raise ConnectionRefused(f"{field} ({endpoint.host}:{endpoint.port}): CONFIG GET save failed "
                                f"({one_line(str(exc))})") from None
    finally:
        client.close()
    numbers = [int(n) for n in value.split()]
    return list(zip(numbers[::2], numbers[1::2]))


def snapshot_rdb(endpoint: RedisEndpoint, path, field: str = "target.redis", timeout: float = 300) -> None:
    """A fresh RDB snapshot of the whole server written to ``path`` by ``redis-cli --rdb`` (Redis's own
    replication: the server forks and streams it; no access to its files needed). The password reaches
    redis-cli through its environment (REDISCLI_AUTH), never its argv."""
    import os
    import shutil
    import subprocess

    from liftoff.errors import StepFailed, ToolMissing

    cli = shutil.which("redis-cli")
    if cli is None:
        raise ToolMissing("redis-cli not found: install redis-tools (it takes the Redis snapshots)")
    env = dict(os.environ)
    if endpoint.password:
        env["REDISCLI_AUTH"] = endpoint.password.resolve(f"{field}.password")
    proc = subprocess.run([cli, "-h", endpoint.host, "-p", str(endpoint.port), "--rdb", str(path)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise StepFailed(f"{field} ({endpoint.host}:{endpoint.port}): redis-cli --rdb failed: "
                         f"{one_line(said[-1] if said else f'exit {proc.returncode}')}")
