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
