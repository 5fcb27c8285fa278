"""S3: buckets, streaming copies and what verification reads, against any S3-compatible server (MinIO,
SeaweedFS, Garage, RustFS, Supabase Storage's S3 endpoint) through plain S3 calls: boto3's, and for the
requests made per object (GET, PUT, HEAD, UploadPart) the same requests signed and sent without boto3's
per-call machinery (see "The data path"), which costs more CPU than the bytes.

This module knows one system and nothing of runbooks, Prefect or the ledger: it takes boto3 clients (made by
``client`` from an ``S3Endpoint``) and returns small dataclasses. The storage flow composes it.

How a copy is proven without reading anything twice (as rclone does): the MD5 of each object is computed
while its bytes stream from source to target and stored on the target as user metadata ``md5chksum``
(base64 of the digest, rclone's own key, so ``rclone check`` reads it too). A multipart ETag is no MD5, so
``head`` reads that metadata back and verification compares it with the source's without a download;
``deep_md5`` re-reads and hashes when a check must not trust metadata.

Where the MD5 comes from before the first byte is sent (metadata travels in the request headers): the
source's own claim (its ``md5chksum``/``md5`` metadata, or its ETag when that is a plain MD5), checked
against the bytes: a single PUT carries it as ``Content-MD5`` so the server refuses a body that does not
match, and the stored object is proven by the target's ETag (the MD5 the server computed of what it stored;
on a target whose ETags are no MD5s, by hashing the bytes as they stream); a multipart upload is completed
only if the streamed MD5 equals it. A source with no MD5 to claim (a multipart upload of its own) is hashed
first by streaming it once; so is one whose claim proved false. ``copy_object_from`` does the same from a
stream that cannot be read by range (Supabase Storage's REST download).

Retries are ours (botocore's are off): per object with tenacity, exponential backoff with jitter, bounded
by attempts and time, on throttling (SlowDown, 503, 429), other 5xx, dropped connections and timeouts. A
retry restarts that object cleanly from a fresh GET; one part of a multipart upload is retried on its own
(re-read by range, pinned to the source ETag with If-Match). An upload that fails is aborted, and so is any
unfinished upload of the same key an earlier attempt or a killed run left behind. A refused login (InvalidAccessKeyId,
SignatureDoesNotMatch, AccessDenied, any 401/403) fails at once with one line naming the endpoint, the
bucket and the access key id, never the secret.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import email.utils
import functools
import hashlib
import hmac
import http.client
import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote_plus, urlsplit
from xml.etree import ElementTree

import boto3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import (
    ClientError, ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError, HTTPClientError,
    IncompleteReadError, ReadTimeoutError, ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import SSLError as BotoSSLError
from botocore.httpsession import get_cert_path
from botocore.response import StreamingBody
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from liftoff.errors import ConnectionRefused, LiftoffError, StepFailed
from liftoff.logs import get_logger
from liftoff.redaction import redact, register_secret

log = get_logger(system="s3")

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on parts per upload
MD5_METADATA_KEY = "md5chksum"  # rclone's key: base64 of the MD5 digest

# Headers that describe the object (as S3 returns them from HEAD/GET and takes them on PUT): all kept.
_KEPT_HEADERS = ("ContentType", "CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage")
_AUTH_CODES = {
    "InvalidAccessKeyId": "the server does not know this access key id; check the access key",
    "SignatureDoesNotMatch": "the secret key does not match this access key id; check the secret",
    "AccessDenied": "this key may not do that on this bucket; check its permissions",
    "InvalidToken": "the session token is not valid; check the credentials",
    "ExpiredToken": "the session token expired; renew the credentials",
    "RequestTimeTooSkewed": "this machine's clock is too far from the server's; fix the clock (NTP)",
}
_THROTTLING_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestThrottled", "RequestTimeout", "InternalError", "ServiceUnavailable",
}
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")


# ---------------------------------------------------------------------------------------------------------
# Endpoints and clients


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3 server answers and the key pair to sign with. The secret is never in ``repr``."""

    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str = field(repr=False)

    def __post_init__(self):
        register_secret(self.secret_access_key)


def client(endpoint: S3Endpoint, max_pool_connections: int = 10, *, connect_timeout: float = 10,
           read_timeout: float = 60):
    """A boto3 S3 client: path-style, SigV4, botocore's retries off (ours are explicit and per object).

    boto3 clients are thread-safe: make one per endpoint and share it between the threads of a batch, with
    ``max_pool_connections`` at least the batch's concurrency. Bodies stream through unsigned
    (``UNSIGNED-PAYLOAD``) and without botocore's own checksums, which would read each body twice; the
    integrity of every write is checked against the MD5 streamed from the source instead.
    """
    register_secret(endpoint.secret_access_key)
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        retries={"mode": "standard", "max_attempts": 0},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return boto3.client(
        "s3", endpoint_url=endpoint.endpoint_url, region_name=endpoint.region,
        aws_access_key_id=endpoint.access_key_id, aws_secret_access_key=endpoint.secret_access_key,
        config=config,
    )


def _endpoint_url(s3) -> str:
    return s3.meta.endpoint_url


def _access_key_id(s3) -> str:
    # botocore keeps the credentials on the request signer; only the key id is ever read from them.
    credentials = getattr(getattr(s3, "_request_signer", None), "_credentials", None)
    return getattr(credentials, "access_key", None) or "(none)"


# ---------------------------------------------------------------------------------------------------------
# Retries and errors


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one object (or one part, or one listing page) is tried before it is reported failed."""

    attempts: int = 8
    max_seconds: float = 300.0
    initial_wait: float = 0.2
    max_wait: float = 10.0

    def retrying(self, retry_on: Callable[[BaseException], bool], *, give_up: Callable[[], bool] | None = None,
                 **context) -> Retrying:
        """``give_up()``: true when what was seen so far says another attempt would not help (stops early)."""
        stop = stop_after_attempt(self.attempts) | stop_after_delay(self.max_seconds)
        def before_sleep(state):
            exc = state.outcome.exception()
            where = dict(context)
            at = getattr(exc, "liftoff_s3_at", None)  # the server that failed, when it is not the call's own
            if at is not None:
                where.update(endpoint=_endpoint_url(at[0]), bucket=at[1])
            log.warning("s3 retry", attempt=state.attempt_number, error=_reason(exc), **where)

        return Retrying(
            retry=retry_if_exception(retry_on),
            stop=stop if give_up is None else (lambda state: stop(state) or give_up()),
            wait=wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait),
            before_sleep=before_sleep,
            reraise=True,
        )


class _SourceCutShort(OSError):
    """The source stream ended before the length it announced."""


class _Mismatch(Exception):
    """The bytes did not hash to what the source claimed (or the target stored something else)."""


class _GaveUp(Exception):
    """An inner retry (one part) ran out of attempts: the object is not retried around it."""

    def __init__(self, what: str, attempts: int, last: BaseException):
        super().__init__(what)
        self.what, self.attempts, self.last = what, attempts, last


def http_status(exc: ClientError) -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def error_code(exc: ClientError) -> str:
    # Supabase Storage leaves Error.Code empty and puts it at the top of the response.
    return exc.response.get("Error", {}).get("Code") or exc.response.get("Code") or str(http_status(exc))


def _is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and (error_code(exc) in _AUTH_CODES or http_status(exc) in (401, 403))


def _is_transient(exc: BaseException) -> bool:
    """Worth the same request again: throttling, a server error, a dropped or timed-out connection."""
    if isinstance(exc, ClientError):
        status = http_status(exc)
        return status >= 500 or status == 429 or error_code(exc) in _THROTTLING_CODES
    return isinstance(exc, (HTTPClientError, BotoConnectionError, IncompleteReadError, _SourceCutShort))


def _restarts_object(exc: BaseException) -> bool:
    """Worth a fresh start of the whole object: transient, the bytes disagreed, or the source changed."""
    return _is_transient(exc) or isinstance(exc, _Mismatch) or (
        isinstance(exc, ClientError) and error_code(exc) in ("PreconditionFailed", "BadDigest")
    )


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown"
    if isinstance(exc, ClientError):
        message = exc.response.get("Error", {}).get("Message") or ""
        text = f"{error_code(exc)} (HTTP {http_status(exc)})" + (f": {message}" if message else "")
    elif isinstance(exc, _GaveUp):
        return f"{exc.what} failed after {exc.attempts} attempts: {_reason(exc.last)}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(redact(text).split())  # one line


@contextlib.contextmanager
def tagged_with(s3, bucket: str):
    """Tags an exception with the server and bucket it came from, for the one-line error."""
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, "liftoff_s3_at"):
            exc.liftoff_s3_at = (s3, bucket)
        raise


def _refused(exc: ClientError, s3, bucket: str) -> ConnectionRefused:
    code = error_code(exc)
    hint = _AUTH_CODES.get(code, "check the key pair and its permissions on this bucket")
    # A refused HEAD has no body, so no code: only the status says what happened.
    said = "refused" if code.isdigit() else code
    return ConnectionRefused(
        f"S3 {_endpoint_url(s3)}: {said} (HTTP {http_status(exc)}) for access key id '{_access_key_id(s3)}' "
        f"on bucket '{bucket}'; {hint}",
        endpoint=_endpoint_url(s3), bucket=bucket, access_key_id=_access_key_id(s3), code=code,
    )


def call(policy: RetryPolicy, what: str, fn: Callable, s3, bucket: str, key: str | None = None, *,
         retry_on: Callable[[BaseException], bool] = _is_transient, give_up: Callable[[], bool] | None = None):
    """Runs ``fn`` under the policy; any failure leaves as one LiftoffError line naming where and why."""
    retrying = policy.retrying(retry_on, give_up=give_up, op=what, endpoint=_endpoint_url(s3), bucket=bucket,
                               key=key)
    try:
        return retrying(fn)
    except LiftoffError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one operator line
        tagged = exc.last if isinstance(exc, _GaveUp) else exc
        at_s3, at_bucket = getattr(tagged, "liftoff_s3_at", (s3, bucket))
        if _is_refusal(exc):
            raise _refused(exc, at_s3, at_bucket) from None
        attempts = retrying.statistics.get("attempt_number", 1)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        where = f"S3 {_endpoint_url(at_s3)} bucket '{at_bucket}'" + (f" key {key!r}" if key is not None else "")
        raise StepFailed(f"{where}: {what} failed{tries}: {_reason(exc)}", bucket=at_bucket, key=key) from None


# ---------------------------------------------------------------------------------------------------------
# The data path: GET, PUT, HEAD and UploadPart as plain signed HTTP requests
#
# A boto3 call costs 1.5-2 ms of CPU (event hooks, parameter validation, endpoint rules, response parsing, and
# urllib3 under it), under the GIL: with small objects that, not the bytes, bounds a copy and a verification.
# The requests made once or more per object go out here instead, about 0.25 ms each: SigV4 (UNSIGNED-PAYLOAD,
# as the client is configured) with the client's own credentials and region, over keep-alive HTTP/1.1
# connections of the standard library, with the client's timeouts and pool size. When a proxy applies to the
# endpoint, or it is HTTPS, they go through the client's own botocore HTTP session instead. Failures look
# as boto3's do (ClientError with the S3 error code, botocore's connection errors), so the retry and refusal
# rules above apply unchanged. The rest (listings, multipart bookkeeping, buckets) stays on boto3.

_PIECE = 256 * 1024  # what one read of a body, or one send, moves
_IDLE_SECONDS = 10.0  # a keep-alive connection idle longer is not reused (the server may have closed it)
_ANSWER_HEADERS = {"content-type": "ContentType", "cache-control": "CacheControl",
                   "content-disposition": "ContentDisposition", "content-encoding": "ContentEncoding",
                   "content-language": "ContentLanguage", "etag": "ETag", "date": "Date"}
_META_PREFIX = "x-amz-meta-"
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass
class _Response:
    """An answer: its status, headers, and body (``read(n)``, ``iter_chunks(n)``, ``close()``); the connection
    goes back to its pool once the body is read to its end, or is closed with it."""

    status: int
    headers: list[tuple[str, str]]
    body: Any


class _Body:
    """A response body from a pooled connection: checks the length the server announced, raises botocore's
    connection errors, hands the connection back when the body is done."""

    def __init__(self, response: http.client.HTTPResponse, conn, pool: _Wire):
        self._response, self._conn, self._pool = response, conn, pool
        self._expected, self._read = response.length, 0  # None: chunked, read to its end
        if response.isclosed():
            self._release()

    def read(self, amt: int | None = -1) -> bytes:
        if self._conn is None:
            return b""
        try:
            data = self._response.read(None if amt is None or amt < 0 else amt)
        except TimeoutError as exc:
            self.close()
            raise ReadTimeoutError(endpoint_url=self._pool.url, error=exc) from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ResponseStreamingError(error=exc) from None
        self._read += len(data)
        if not data and amt != 0 and self._expected is not None and self._read < self._expected:
            self.close()
            raise IncompleteReadError(actual_bytes=self._read, expected_bytes=self._expected)
        if self._response.isclosed():
            self._release()
        return data

    def iter_chunks(self, chunk_size: int = _PIECE) -> Iterator[bytes]:
        while piece := self.read(chunk_size):
            yield piece

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.give(conn, reusable=not self._response.will_close)

    def close(self) -> None:
        """Done with it: a body not read to its end closes its connection (the rest is never read)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self._response.close()
            conn.close()


class _Wire:
    """One endpoint's keep-alive connections and signing key (one per boto3 client, shared by its threads)."""

    def __init__(self, s3):
        parts = urlsplit(_endpoint_url(s3))
        default_port = 443 if parts.scheme == "https" else 80
        self.url = _endpoint_url(s3)
        self.https, self.hostname, self.port = parts.scheme == "https", parts.hostname, parts.port or default_port
        self.host = parts.hostname if self.port == default_port else f"{parts.hostname}:{self.port}"
        if ":" in parts.hostname:  # IPv6
            self.host = f"[{parts.hostname}]" + ("" if self.port == default_port else f":{self.port}")
        self.base_path = parts.path.rstrip("/")
        self.region = s3.meta.region_name or "us-east-1"
        self.credentials = getattr(s3._request_signer, "_credentials", None)  # the client's own
        config = s3.meta.config
        self.connect_timeout, self.read_timeout = config.connect_timeout, config.read_timeout
        self.size = config.max_pool_connections
        self.context = None
        if self.https:
            verify = s3._endpoint.http_session._verify  # True, False or a CA bundle, as the client verifies
            self.context = ssl.create_default_context(
                cafile=get_cert_path(True) if verify is True else verify if isinstance(verify, str) else None)
            if verify is False:
                self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE
        self.etag_is_md5: bool | None = None  # learnt from this target's answers (see _put)
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str], bytes] = {}

    # -- connections

    def take(self) -> tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn, since = self._idle.pop()
                if now - since < _IDLE_SECONDS:
                    return conn, True
                conn.close()
        if self.https:
            conn = http.client.HTTPSConnection(self.hostname, self.port, timeout=self.connect_timeout,
                                               context=self.context)
        else:
            conn = http.client.HTTPConnection(self.hostname, self.port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except TimeoutError as exc:
            raise ConnectTimeoutError(endpoint_url=self.url, error=exc) from None
        except ssl.SSLError as exc:
            raise BotoSSLError(endpoint_url=self.url, error=exc) from None
        except OSError as exc:
            raise EndpointConnectionError(endpoint_url=self.url, error=exc) from None
        conn.sock.settimeout(self.read_timeout)
        return conn, False

    def give(self, conn, reusable: bool = True) -> None:
        with self._lock:
            if reusable and len(self._idle) < self.size:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    # -- requests

    def _signing_key(self, secret: str, day: str) -> bytes:
        key = self._keys.get((secret, day))
        if key is None:
            key = hmac.new(f"AWS4{secret}".encode(), day.encode(), hashlib.sha256).digest()
            for part in (self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {(secret, day): key}  # one day's key at a time
        return key

    def _signed(self, method: str, path: str, query: str, headers: dict[str, str]) -> dict[str, str]:
        """SigV4 of the request, UNSIGNED-PAYLOAD (the body's integrity is its Content-MD5's business)."""
        now = time.gmtime()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", now)
        headers = {**headers, "Host": self.host, "X-Amz-Date": stamp, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
        if self.credentials is None:  # an unsigned client
            return headers
        frozen = self.credentials.get_frozen_credentials()
        if frozen.token:
            headers["X-Amz-Security-Token"] = frozen.token
        canonical = sorted((name.lower(), " ".join(str(value).split())) for name, value in headers.items())
        signed = ";".join(name for name, _ in canonical)
        request = "\n".join([method, path, query, *(f"{n}:{v}" for n, v in canonical), "", signed,
                             "UNSIGNED-PAYLOAD"])
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(frozen.secret_key, stamp[:8]), to_sign.encode(),
                             hashlib.sha256).hexdigest()
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={frozen.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        return headers

    def send(self, method: str, bucket: str, key: str | None, headers: dict[str, str], body,
             query: dict[str, str] | None) -> _Response:
        path = _path(self.base_path, bucket, key)
        query_string = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                                for k, v in sorted((query or {}).items()))
        target = path + (f"?{query_string}" if query_string else "")
        replayable = body is None or isinstance(body, bytes)
        while True:
            conn, reused = self.take()
            signed = self._signed(method, path, query_string, headers)
            sent_error: BaseException | None = None
            try:
                try:
                    conn.request(method, target, body=body, headers=signed)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    sent_error = exc  # the server may have answered early (a refusal) and closed: read it
                response = conn.getresponse()
            except _STALE as exc:
                conn.close()
                if reused and replayable:
                    continue  # a keep-alive connection the server had closed: once more on a new one
                raise ConnectionClosedError(endpoint_url=self.url, error=sent_error or exc) from None
            except TimeoutError as exc:
                conn.close()
                raise ReadTimeoutError(endpoint_url=self.url, error=exc) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise ConnectionClosedError(endpoint_url=self.url, error=exc) from None
            except BaseException:
                conn.close()  # the body's own source failed (see _sending), or an interrupt
                raise
            return _Response(response.status, response.getheaders(), _Body(response, conn, self))


class _SessionWire:
    """The same requests through the client's botocore HTTP session (its proxy settings): used when a proxy
    applies to the endpoint."""

    def __init__(self, s3):
        self.s3 = s3
        self.etag_is_md5: bool | None = None

    def send(self, method: str, bucket: str, key: str | None, headers: dict[str, str], body,
             query: dict[str, str] | None) -> _Response:
        s3 = self.s3
        url = _endpoint_url(s3).rstrip("/") + _path("", bucket, key)
        if query:
            url += "?" + "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
        request = AWSRequest(method=method, url=url, data=body, headers=headers, stream_output=True)
        request.context["client_config"] = s3.meta.config  # payload_signing_enabled False: UNSIGNED-PAYLOAD
        credentials = getattr(s3._request_signer, "_credentials", None)
        if credentials is not None:
            S3SigV4Auth(credentials.get_frozen_credentials(), "s3", s3.meta.region_name).add_auth(request)
        response = s3._endpoint.http_session.send(request.prepare())
        length = response.headers.get("Content-Length")
        body = StreamingBody(response.raw, int(length) if length and method != "HEAD" else 0)
        if method == "HEAD" or length == "0":
            response.raw.release_conn()
        return _Response(response.status_code, list(response.headers.items()), body)


def _path(base: str, bucket: str, key: str | None) -> str:
    """Path-style: ``/bucket/key`` (the key percent-encoded as botocore does, ``/`` kept), ``/bucket`` alone
    for a bucket's own requests."""
    return f"{base}/{quote(bucket, safe='')}" + ("" if key is None else f"/{quote(key, safe='/~')}")


_WIRES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WIRES_LOCK = threading.Lock()


def _wire(s3) -> _Wire | _SessionWire:
    with _WIRES_LOCK:
        wire = _WIRES.get(s3)
        if wire is None:
            proxied = s3._endpoint.http_session._proxy_config.proxy_url_for(_endpoint_url(s3))
            # TLS stays with botocore's own session (urllib3): the sandbox has no TLS server to prove our
            # connections against, and Supabase's S3 endpoint is HTTPS. The fast wire serves plain-HTTP
            # endpoints (a MinIO on the VPS's private network), which the tests and the benchmark prove.
            tls = _endpoint_url(s3).lower().startswith("https://")
            wire = _WIRES[s3] = _SessionWire(s3) if proxied or tls else _Wire(s3)
        return wire


def _send(s3, method: str, bucket: str, key: str | None, operation: str, *, headers: dict[str, str] | None = None,
          body=None, query: dict[str, str] | None = None) -> _Response:
    """One signed request for an object; raises ClientError for an answer of 300 or more, as boto3 would.
    Read the answer's body to its end or close it (``_answer`` does)."""
    response = _wire(s3).send(method, bucket, key, headers or {}, body, query)
    if response.status >= 300:
        raise _client_error(response, operation)
    return response


def _client_error(response: _Response, operation: str) -> ClientError:
    status, error = response.status, {}
    try:
        content = response.body.read()  # an error body is a few hundred bytes of XML, or nothing (HEAD)
    except Exception:  # noqa: BLE001 - the status is the error; a body we could not read adds nothing
        content = b""
    finally:
        response.body.close()
    if content:
        with contextlib.suppress(ElementTree.ParseError):
            root = ElementTree.fromstring(content)
            for name in ("Code", "Message"):
                found = root.find(name) if root.tag == "Error" else root.find(f".//{name}")
                if found is not None and found.text:
                    error[name] = found.text
    error.setdefault("Code", str(status))  # as botocore says it for a bodiless answer
    error.setdefault("Message", http.client.responses.get(status, ""))
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status,
                                                             "HTTPHeaders": dict(response.headers)}}, operation)


def _answer(response: _Response, *, body: bool = False) -> dict:
    """The response's headers as boto3 names them (ContentLength, ETag, ContentType, ..., Metadata), and with
    ``body`` the unread body (else it is read to its end: a PUT's or HEAD's is empty)."""
    answer: dict = {"Metadata": {}}
    for name, value in response.headers:
        lowered = name.lower()
        if lowered.startswith(_META_PREFIX):
            answer["Metadata"][name[len(_META_PREFIX):]] = value
        elif lowered in _ANSWER_HEADERS:
            answer[_ANSWER_HEADERS[lowered]] = value
        elif lowered == "content-length":
            answer["ContentLength"] = int(value)
    if body:
        answer["Body"] = response.body
    else:
        with contextlib.closing(response.body):
            response.body.read()
    return answer


def _wire_headers(kwargs: dict) -> dict[str, str]:
    """boto3's header arguments (``_target_headers``) as HTTP headers."""
    names = {boto: http for http, boto in _ANSWER_HEADERS.items()}
    headers = {names[name]: value for name, value in kwargs.items() if name in names}
    headers.update({f"{_META_PREFIX}{name}": value for name, value in kwargs.get("Metadata", {}).items()})
    return headers


# ---------------------------------------------------------------------------------------------------------
# Listing and reading


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    etag: str
    last_modified: float | None = None  # seconds since the epoch; S3 lists it to the second


def _epoch(iso: str | None) -> float | None:
    """A listing's LastModified (ISO 8601, ``Z`` or an offset) as seconds since the epoch; None if absent."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def http_date(value: str | None) -> float | None:
    """An HTTP ``Date`` header (RFC 7231) as seconds since the epoch; None if absent or unreadable."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def list_objects(s3, bucket: str, prefix: str = "", *, page_size: int = 1000,
                 retry: RetryPolicy = RetryPolicy()) -> Iterator[ListedObject]:
    """Every object under ``prefix``, page by page (one page in memory at a time), each page retried.
    ListObjectsV2 as a plain signed request (``_send``): boto3's parsing of a page (a date parsed per
    object) costs more than the request."""
    token = None
    while True:
        query = {"list-type": "2", "prefix": prefix, "max-keys": str(page_size), "encoding-type": "url"}
        if token:
            query["continuation-token"] = token

        def page(query=query):
            with tagged_with(s3, bucket):
                return _listed_page(_send(s3, "GET", bucket, None, "ListObjectsV2", query=query))

        listed, token = call(retry, "list", page, s3, bucket)
        yield from listed
        if not token:
            return


def _listed_page(response: _Response) -> tuple[list[ListedObject], str | None]:
    """A ListObjectsV2 answer: its objects, and the token of the next page (None on the last)."""
    with contextlib.closing(response.body):
        root = ElementTree.fromstring(response.body.read())
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    encoded = root.findtext(f"{ns}EncodingType") == "url"  # keys percent-encoded, as asked (XML cannot hold every byte)
    listed = [ListedObject(key=unquote_plus(key) if encoded else key, size=int(item.findtext(f"{ns}Size")),
                           etag=(item.findtext(f"{ns}ETag") or "").strip('"'),
                           last_modified=_epoch(item.findtext(f"{ns}LastModified")))
              for item in root.iter(f"{ns}Contents") for key in [item.findtext(f"{ns}Key") or ""]]
    token = root.findtext(f"{ns}NextContinuationToken")
    return listed, token if root.findtext(f"{ns}IsTruncated") == "true" and token else None


@dataclass(frozen=True)
class ObjectInfo:
    """What HEAD says of an object; ``md5`` is None when neither our metadata nor the ETag gives it."""

    key: str
    size: int
    md5: str | None
    etag: str
    content_type: str | None
    cache_control: str | None
    content_disposition: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def md5_of(etag: str, metadata: dict[str, str]) -> str | None:
    """The object's MD5 in hex from its metadata (``md5chksum`` base64, or ``md5`` hex) or a plain ETag.
    A multipart ETag (``...-N``) or an encrypted object's is no MD5: then None."""
    claimed = metadata.get(MD5_METADATA_KEY)
    if claimed:
        try:
            digest = base64.b64decode(claimed, validate=True)
        except (binascii.Error, ValueError):
            digest = b""
        if len(digest) == 16:
            return digest.hex()
    hexed = (metadata.get("md5") or "").lower()
    if _PLAIN_MD5.fullmatch(hexed):
        return hexed
    etag = etag.strip('"').lower()
    return etag if _PLAIN_MD5.fullmatch(etag) else None


def _info(key: str, answer: dict) -> ObjectInfo:
    etag = answer.get("ETag", "").strip('"')
    metadata = answer.get("Metadata") or {}
    return ObjectInfo(
        key=key, size=answer["ContentLength"], md5=md5_of(etag, metadata), etag=etag,
        content_type=answer.get("ContentType"), cache_control=answer.get("CacheControl"),
        content_disposition=answer.get("ContentDisposition"), metadata=dict(metadata),
    )


def _head(s3, bucket: str, key: str) -> tuple[ObjectInfo, dict] | None:
    try:
        with tagged_with(s3, bucket):
            answer = _answer(_send(s3, "HEAD", bucket, key, "HeadObject"))
    except ClientError as exc:
        if http_status(exc) == 404:
            return None
        raise
    return _info(key, answer), answer


def head(s3, bucket: str, key: str, *, retry: RetryPolicy = RetryPolicy()) -> ObjectInfo | None:
    """The object's size, MD5, ETag, headers and user metadata; None when there is no such object."""
    found = call(retry, "head", lambda: _head(s3, bucket, key), s3, bucket, key)
    return found[0] if found else None


# A row whose bytes are gone answers HTTP 500 every time (Supabase Storage's file backend): this many in a row
# tell it from a passing fault, which throttling and dropped connections are retried as usual around.
GONE_AFTER_500S = 3


def gone_after_500s(statuses: list[int]) -> bool:
    """The statuses of a key's reads so far end with GONE_AFTER_500S answers of HTTP 500."""
    return len(statuses) >= GONE_AFTER_500S and set(statuses[-GONE_AFTER_500S:]) == {500}


@dataclass(frozen=True)
class BytesProbe:
    """What reading an object's first byte showed: its whole ``size`` (from Content-Range) and ``etag`` when
    the bytes are there; ``missing`` says why there are none."""

    key: str
    size: int | None = None
    etag: str | None = None
    missing: str | None = None


def total_size(headers: list[tuple[str, str]], status: int) -> int | None:
    """The whole object's size from a GET's headers: Content-Range's total for a 206, else Content-Length."""
    found = {name.lower(): value for name, value in headers}
    if status == 206 and "/" in found.get("content-range", ""):
        total = found["content-range"].rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = found.get("content-length", "")
    return int(length) if length.isdigit() else None


def _first_byte(s3, bucket: str, key: str, whole: bool) -> BytesProbe:
    try:
        with tagged_with(s3, bucket):
            response = _send(s3, "GET", bucket, key, "GetObject", headers=None if whole else {"Range": "bytes=0-0"})
    except ClientError as exc:
        if http_status(exc) == 404:
            return BytesProbe(key, missing=f"not found ({error_code(exc)})")
        raise
    size = total_size(response.headers, response.status)
    etag = next((v for n, v in response.headers if n.lower() == "etag"), "").strip('"') or None
    with contextlib.closing(response.body):
        if response.status == 206 or whole:
            response.body.read()  # one byte, or none: read to its end, the connection is reused
    return BytesProbe(key, size=size, etag=etag)


def probe_bytes(s3, bucket: str, key: str, *, size: int | None = None,
                retry: RetryPolicy = RetryPolicy()) -> BytesProbe:
    """Whether ``key`` has bytes behind it, by reading its first byte (a ranged GET; a whole GET when ``size``
    says it is empty, which a range cannot address). A HEAD would not do: Supabase Storage answers HEAD from
    its ``storage.objects`` row, and only a read reaches the bytes. Not found, or HTTP 500 on
    GONE_AFTER_500S reads in a row (Supabase Storage's file backend answers so for a row whose bytes are
    gone), is ``missing``; a refused key raises ConnectionRefused, anything else StepFailed once ``retry`` is
    spent, as ``call`` does."""
    errors: list[int] = []

    def attempt() -> BytesProbe:
        try:
            return _first_byte(s3, bucket, key, whole=size == 0)
        except ClientError as exc:
            errors.append(http_status(exc))
            raise

    try:
        return call(retry, "read the first byte", attempt, s3, bucket, key, give_up=lambda: gone_after_500s(errors))
    except StepFailed:
        if gone_after_500s(errors):
            return BytesProbe(key, missing=f"HTTP 500 on {GONE_AFTER_500S} reads in a row, as Supabase Storage "
                                           "answers for a row whose bytes are gone")
        raise


def deep_md5(s3, bucket: str, key: str, *, if_match: str | None = None,
             retry: RetryPolicy = RetryPolicy()) -> str:
    """Reads the object through and returns its MD5 in hex (a retry starts the hash over)."""

    return call(retry, "read", lambda: _hash_object(s3, bucket, key, if_match), s3, bucket, key)


def _hash_object(s3, bucket: str, key: str, if_match: str | None) -> str:
    digest = hashlib.md5()
    with tagged_with(s3, bucket):
        answer = _answer(_send(s3, "GET", bucket, key, "GetObject",
                               headers={"If-Match": f'"{if_match}"'} if if_match else None), body=True)
        with contextlib.closing(answer["Body"]) as body:
            for piece in body.iter_chunks(_PIECE):
                digest.update(piece)
    return digest.hexdigest()


def compare_object(src: ObjectInfo | None, dst: ObjectInfo | None) -> list[str]:
    """What differs between an object and its copy, one phrase per difference; empty when they match.

    An MD5 that neither side's metadata nor ETag gives is reported, not skipped: hash that side with
    ``deep_md5`` and compare again (``dataclasses.replace(info, md5=...)``).
    """
    if src is None and dst is None:
        return ["missing on both sides"]
    if src is None:
        return ["missing on source"]
    if dst is None:
        return ["missing on target"]
    differences = []
    if src.size != dst.size:
        differences.append(f"size {src.size} on source, {dst.size} on target")
    for side, info in (("source", src), ("target", dst)):
        if info.md5 is None:
            differences.append(f"md5 unknown on {side} (ETag {info.etag} is not an MD5 and no "
                               f"{MD5_METADATA_KEY} metadata): compare with a deep check")
    if src.md5 and dst.md5 and src.md5 != dst.md5:
        differences.append(f"md5 {src.md5} on source, {dst.md5} on target")
    for label, name in (("content type", "content_type"), ("cache control", "cache_control"),
                        ("content disposition", "content_disposition")):
        mine, theirs = getattr(src, name), getattr(dst, name)
        if mine != theirs:
            differences.append(f"{label} {mine!r} on source, {theirs!r} on target")
    return differences


# ---------------------------------------------------------------------------------------------------------
# Copying


@dataclass(frozen=True)
class CopiedObject:
    """One object copied (or, with ``dry_run``, that would be: then ``md5`` is the source's claim, if any)."""

    key: str
    size: int
    md5: str | None
    content_type: str | None
    etag: str | None = None  # the target's ETag (``...-N`` when multipart)
    dry_run: bool = False
    # What the copy's write told the target and what the target answered, for the gate to prove the object
    # unchanged since from a listing (tasks/storage/gate.py): the Content-Type sent, and the server's own
    # clock (its Date header) when it answered the PUT or the multipart completion.
    sent_type: str | None = None
    written_at: float | None = None


@dataclass(frozen=True)
class ObjectFailure:
    key: str
    error: str


class _HashingReader:
    """A view of exactly ``length`` bytes of a source stream, hashing what passes through; sent as it comes
    (``chunks()``, or ``read`` as a file), never read twice or whole.

    A source that fails or ends early raises, and ``failed`` keeps that error: the request carrying the body
    fails with some connection error of its own, while the cause was the source."""

    def __init__(self, source, length: int, *digests):
        self._source, self._remaining, self._digests = source, length, digests
        self.failed: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        want = self._remaining if size is None or size < 0 else min(size, self._remaining)
        try:
            piece = self._source.read(want)
        except Exception as exc:  # noqa: BLE001 - a stream of any kind (a botocore body, a REST download) broke
            # Worth a fresh start of the object, whatever its library calls the break.
            self.failed = exc if _is_transient(exc) else _SourceCutShort(f"reading the source failed: {_reason(exc)}")
            raise self.failed from None
        if not piece:
            self.failed = _SourceCutShort(f"source stream ended {self._remaining} bytes early")
            raise self.failed
        for digest in self._digests:
            digest.update(piece)
        self._remaining -= len(piece)
        return piece

    def chunks(self) -> Iterator[bytes]:
        """The bytes in pieces of up to 256 KiB (a file would be read in 16 KiB ones)."""
        while piece := self.read(_PIECE):
            yield piece


@contextlib.contextmanager
def _sending(reader: _HashingReader | None):
    """Raises the source's own error when a request failed because its body could not be read."""
    try:
        yield
    except Exception:
        if reader is not None and reader.failed is not None:
            raise reader.failed from None
        raise


def _target_headers(answer: dict, md5_hex: str) -> dict:
    headers = {name: answer[name] for name in _KEPT_HEADERS if answer.get(name)}
    metadata = dict(answer.get("Metadata") or {})
    metadata[MD5_METADATA_KEY] = base64.b64encode(bytes.fromhex(md5_hex)).decode()
    return {**headers, "Metadata": metadata}


def _part_size_for(size: int, part_size: int) -> int:
    if part_size < MIN_PART_SIZE:
        raise ValueError(f"part_size {part_size} is below S3's minimum of {MIN_PART_SIZE} bytes (5 MiB)")
    needed = -(-size // MAX_PARTS)
    return max(part_size, -(-needed // MiB) * MiB)


def copy_object(src_client, src_bucket: str, key: str, dst_client, dst_bucket: str, *,
                part_size: int = DEFAULT_PART_SIZE, dry_run: bool = False,
                retry: RetryPolicy = RetryPolicy(), stored: dict[str, str] | None = None) -> CopiedObject:
    """Copies one object by streaming, keeping its headers and user metadata and adding its MD5.

    A single PUT up to ``part_size``, a multipart upload above it (each part read by range and streamed);
    never the whole object in memory. Succeeds when the target holds the source's bytes, checked by MD5
    (``_put``: Content-MD5, then the target's ETag or the MD5 of the bytes as they streamed; a multipart
    upload: the MD5 of the parts as they streamed). A multipart upload that fails is aborted on the server.
    ``stored`` headers (ContentType, CacheControl ...) replace the source's answer's where given: how the source's own
    records say the object is stored. Raises ConnectionRefused for a refused key, StepFailed (one line,
    naming endpoint, bucket and key) once the retries are spent.
    """
    part_size = _part_size_for(0, part_size)
    state = {"trust_claim": True}

    def attempt() -> CopiedObject:
        if dry_run:  # a HEAD only: nothing is read or written
            found = _head(src_client, src_bucket, key)
            if found is None:
                raise _no_source(src_client, src_bucket, key)
            info = found[0]
            return CopiedObject(key, info.size, info.md5, info.content_type, dry_run=True)
        # One GET gives the headers and, for a single PUT, the body: no HEAD before it.
        info, answer = _open_source(src_client, src_bucket, key)
        source = answer["Body"]
        try:
            md5_hex = info.md5 if state["trust_claim"] else None
            if md5_hex is None or info.size > part_size:
                source.close()  # read by range, part by part, or hashed first
                source = None
            if md5_hex is None:  # nothing to claim up front: hash the source once, pinned to this version
                md5_hex = _inner_retry(retry, "hashing the source", lambda: _hash_object(
                    src_client, src_bucket, key, info.etag), _is_transient, bucket=src_bucket, key=key)
            headers = _target_headers({**answer, **(stored or {})}, md5_hex)
            if info.size <= part_size:
                etag, written_at = _single_put(src_client, src_bucket, key, dst_client, dst_bucket, info, md5_hex,
                                               headers, source)
            else:
                etag, written_at = _multipart_put(src_client, src_bucket, key, dst_client, dst_bucket, info,
                                                  md5_hex, headers, _part_size_for(info.size, part_size), retry)
        except (_Mismatch, ClientError) as exc:
            if isinstance(exc, _Mismatch) or error_code(exc) == "BadDigest":
                state["trust_claim"] = False  # the source's claim was false: the next attempt hashes first
            raise
        finally:
            if source is not None:
                source.close()
        return CopiedObject(key, info.size, md5_hex, info.content_type, etag=etag,
                            sent_type=headers.get("ContentType"), written_at=written_at)

    return call(retry, "copy", attempt, dst_client, dst_bucket, key, retry_on=_restarts_object)


def _no_source(src_client, src_bucket: str, key: str) -> StepFailed:
    return StepFailed(f"S3 {_endpoint_url(src_client)} bucket '{src_bucket}' key {key!r}: no such object on "
                      f"the source", bucket=src_bucket, key=key)


def _open_source(src_client, src_bucket: str, key: str) -> tuple[ObjectInfo, dict]:
    try:
        with tagged_with(src_client, src_bucket):
            answer = _answer(_send(src_client, "GET", src_bucket, key, "GetObject"), body=True)
    except ClientError as exc:
        if http_status(exc) == 404:
            raise _no_source(src_client, src_bucket, key) from None
        raise
    return _info(key, answer), answer


def _source_body(src_client, src_bucket: str, key: str, etag: str, first: int | None = None,
                 last: int | None = None):
    headers = {"If-Match": f'"{etag}"'}
    if first is not None:
        headers["Range"] = f"bytes={first}-{last}"
    with tagged_with(src_client, src_bucket):
        return _answer(_send(src_client, "GET", src_bucket, key, "GetObject", headers=headers),
                       body=True)["Body"]


def _single_put(src_client, src_bucket, key, dst_client, dst_bucket, info: ObjectInfo, md5_hex: str,
                headers: dict, source=None) -> tuple[str, float | None]:
    """One PUT streamed from ``source`` (an open GET body of the object; opened here when None)."""
    if source is None and info.size:
        source = _source_body(src_client, src_bucket, key, info.etag)
    try:
        return _put(dst_client, dst_bucket, key, source, info.size, md5_hex, headers)
    finally:
        if source is not None:
            source.close()


def _put(dst_client, dst_bucket: str, key: str, source, size: int, md5_hex: str,
         headers: dict) -> tuple[str, float | None]:
    """PUTs ``size`` bytes read from ``source`` (anything with ``read(n)``; bytes when already in memory)
    as they come, with Content-MD5 from ``md5_hex``: the server itself refuses (BadDigest) a body that is
    not what the source claimed. Then the stored object is proven to hash to ``md5_hex``, or deleted:

    - by the target's ETag, the MD5 the server computed of what it stored, once this target has shown that
      its single-PUT ETags are MD5s (an earlier PUT's ETag equalled the MD5 of the bytes hashed as they
      streamed); the bytes are then not hashed again here;
    - else by hashing the bytes as they stream (a target whose ETags are no MD5s, e.g. encrypted objects).

    An ETag that is not ``md5_hex`` on a target not hashed for is no proof either way: the object is deleted,
    the target is hashed for from then on, and the copy is tried again (``_Mismatch``). Returns the ETag and
    the server's Date of its answer."""
    wire = _wire(dst_client)
    digest = None if wire.etag_is_md5 else hashlib.md5()
    if isinstance(source, bytes):
        if digest is not None:
            digest.update(source)
        reader, body = None, source
    else:
        reader = (_HashingReader(source, size, digest) if digest else _HashingReader(source, size)) if size else None
        body = reader.chunks() if reader else b""
    headers = {**_wire_headers(headers), "Content-Length": str(size),
               "Content-MD5": base64.b64encode(bytes.fromhex(md5_hex)).decode()}
    with _sending(reader), tagged_with(dst_client, dst_bucket):
        answer = _answer(_send(dst_client, "PUT", dst_bucket, key, "PutObject", headers=headers, body=body))
    etag = answer.get("ETag", "").strip('"')
    written = etag, http_date(answer.get("Date"))
    if digest is not None and digest.hexdigest() == md5_hex:
        if wire.etag_is_md5 is None and etag.lower() == md5_hex:
            wire.etag_is_md5 = True  # this server's ETag is the MD5 of what it stored: proof enough from now on
        return written
    if digest is None and etag.lower() == md5_hex:
        return written
    if digest is None:
        wire.etag_is_md5 = False
        why = f"the target answered ETag {etag}, not the MD5 {md5_hex}: it is hashed for from now on"
    else:
        why = f"source bytes hash to {digest.hexdigest()}, the source claimed {md5_hex}"
    with tagged_with(dst_client, dst_bucket):
        dst_client.delete_object(Bucket=dst_bucket, Key=key)
    raise _Mismatch(why)


def _multipart_put(src_client, src_bucket, key, dst_client, dst_bucket, info: ObjectInfo, md5_hex: str,
                   headers: dict, part_size: int, retry: RetryPolicy) -> tuple[str, float | None]:
    """A multipart upload, each part read from the source by range (pinned to its ETag) and streamed."""

    def parts(upload_id: str) -> Iterator[tuple[int, str]]:
        whole = hashlib.md5()
        for number, first in enumerate(range(0, info.size, part_size), start=1):
            length = min(part_size, info.size - first)

            def attempt(number=number, first=first, length=length, whole=whole):
                running, part = whole.copy(), hashlib.md5()
                source = _source_body(src_client, src_bucket, key, info.etag, first, first + length - 1)
                try:
                    return _put_part(dst_client, dst_bucket, key, upload_id, number,
                                     _HashingReader(source, length, running, part), length, part), running
                finally:
                    source.close()

            etag, whole = _inner_retry(retry, f"part {number}", attempt, _part_retried, bucket=dst_bucket, key=key)
            yield number, etag
        if whole.hexdigest() != md5_hex:
            raise _Mismatch(f"source bytes hash to {whole.hexdigest()}, the source claimed {md5_hex}")

    return _multipart(dst_client, dst_bucket, key, headers, parts, retry)


def _part_retried(exc: BaseException) -> bool:
    return _is_transient(exc) or isinstance(exc, _Mismatch)


def _multipart(dst_client, dst_bucket: str, key: str, headers: dict,
               parts: Callable[[str], Iterator[tuple[int, str]]], retry: RetryPolicy) -> tuple[str, float | None]:
    """Creates an upload (after aborting any this key left behind), uploads what ``parts(upload_id)``
    yields ((number, ETag) as each part is stored), completes it; aborts it on any failure. Returns the
    target's ETag and the server's Date of the completion's answer."""
    _abort_leftovers(dst_client, dst_bucket, key, retry)
    try:
        with tagged_with(dst_client, dst_bucket):
            upload_id = dst_client.create_multipart_upload(Bucket=dst_bucket, Key=key, **headers)["UploadId"]
    except BaseException:
        # A create whose answer was lost may still have started an upload: find it by its key.
        _abort_leftovers(dst_client, dst_bucket, key, retry)
        raise
    try:
        done = [{"PartNumber": number, "ETag": etag} for number, etag in parts(upload_id)]
        with tagged_with(dst_client, dst_bucket):
            answer = dst_client.complete_multipart_upload(
                Bucket=dst_bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done})
    except BaseException:
        _abort(dst_client, dst_bucket, key, upload_id, retry)
        raise
    date = ((answer.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}).get("date")
    return answer.get("ETag", "").strip('"'), http_date(date)


def _put_part(dst_client, dst_bucket: str, key: str, upload_id: str, number: int, body, length: int,
              part_md5) -> str:
    """One part: ``body`` is bytes (then sent with Content-MD5) or a ``_HashingReader`` feeding ``part_md5``.
    The part's ETag, when a plain MD5, must be the MD5 of the bytes sent."""
    headers = {"Content-Length": str(length)}
    reader = body if isinstance(body, _HashingReader) else None
    if reader is None:
        headers["Content-MD5"] = base64.b64encode(part_md5.digest()).decode()
    with _sending(reader), tagged_with(dst_client, dst_bucket):
        answer = _answer(_send(dst_client, "PUT", dst_bucket, key, "UploadPart", headers=headers,
                               body=reader.chunks() if reader else body,
                               query={"partNumber": str(number), "uploadId": upload_id}))
    etag = answer.get("ETag", "")
    if _PLAIN_MD5.fullmatch(etag.strip('"').lower()) and etag.strip('"').lower() != part_md5.hexdigest():
        raise _Mismatch(f"part {number}: the target stored ETag {etag.strip(chr(34))}, the bytes sent hash to "
                        f"{part_md5.hexdigest()}")
    return etag


def copy_object_from(open_source: Callable[[str], Any], key: str, dst_client, dst_bucket: str, *,
                     part_size: int = DEFAULT_PART_SIZE, retry: RetryPolicy = RetryPolicy()) -> CopiedObject:
    """Copies one object from a stream: ``open_source(key)`` returns an open download with ``size``,
    ``etag``, ``md5`` (hex, or None when the source claims none), ``content_type``, ``cache_control``,
    ``read(n)`` and ``close()`` (``liftoff.systems.supabase_storage.SourceStream``), which cannot be read by range.

    Up to ``part_size``: one PUT, streamed with Content-MD5 when the source claims an MD5; when it claims
    none, the body (at most ``part_size``) is read and hashed first. Above: a multipart upload whose parts
    are read from the stream one after the other, one part in memory at a time, each sent with its
    Content-MD5 and retried on its own; a source with no MD5 to claim is read through once first to hash it
    (the MD5 goes in the upload's metadata, which is sent before the first part). Content-Type and
    Cache-Control are kept, ``md5chksum`` added. Succeeds when the target holds the bytes whose MD5 it
    stores; a false claim is caught (the server refuses the body, or the stored object is deleted, or the
    upload is aborted) and the object is copied again, hashed first. A stream that breaks or ends early
    restarts the object from a fresh ``open_source``; what ``open_source`` raises itself (it has its own
    retries) fails the object as it is. Raises ConnectionRefused for a refused key, StepFailed once the
    retries are spent, naming the endpoint, bucket and key.
    """
    part_size = _part_size_for(0, part_size)
    state: dict = {"trust_claim": True, "hashed": None}  # hashed: (source ETag, MD5) of a full read

    def hash_stream() -> str:
        with contextlib.closing(open_source(key)) as stream:
            digest = hashlib.md5()
            for _ in _HashingReader(stream, stream.size, digest).chunks():
                pass
            state["hashed"] = (stream.etag, digest.hexdigest())
            return digest.hexdigest()

    def attempt() -> CopiedObject:
        stream = open_source(key)
        try:
            size = stream.size
            md5_hex = stream.md5 if state["trust_claim"] else None
            if md5_hex is None and state["hashed"] and stream.etag and state["hashed"][0] == stream.etag:
                md5_hex = state["hashed"][1]  # hashed by an earlier attempt, and the source is unchanged
            kept = {"ContentType": stream.content_type, "CacheControl": stream.cache_control}
            if size <= part_size:
                body = stream
                if md5_hex is None:  # one part's worth at most: read it, hash it, then send it
                    body = b"".join(_HashingReader(stream, size).chunks())
                    md5_hex = hashlib.md5(body).hexdigest()
                etag, written_at = _put(dst_client, dst_bucket, key, body, size, md5_hex,
                                        _target_headers(kept, md5_hex))
            else:
                if md5_hex is None:
                    stream.close()
                    md5_hex = _inner_retry(retry, "hashing the source", hash_stream, _is_transient,
                                           bucket=dst_bucket, key=key)
                    stream = open_source(key)
                    if stream.size != size or (state["hashed"][0] and stream.etag != state["hashed"][0]):
                        raise _Mismatch("the source changed while it was read")
                etag, written_at = _multipart_from_stream(stream, key, dst_client, dst_bucket, md5_hex,
                                                          _target_headers(kept, md5_hex),
                                                          _part_size_for(size, part_size), retry)
        except (_Mismatch, ClientError) as exc:
            if isinstance(exc, _Mismatch) or error_code(exc) == "BadDigest":
                state["trust_claim"], state["hashed"] = False, None  # the next attempt hashes what it reads
            raise
        finally:
            stream.close()
        return CopiedObject(key, size, md5_hex, stream.content_type, etag=etag,
                            sent_type=kept.get("ContentType") or None, written_at=written_at)

    return call(retry, "copy", attempt, dst_client, dst_bucket, key, retry_on=_restarts_object)


def _multipart_from_stream(stream, key: str, dst_client, dst_bucket: str, md5_hex: str, headers: dict,
                           part_size: int, retry: RetryPolicy) -> tuple[str, float | None]:
    def parts(upload_id: str) -> Iterator[tuple[int, str]]:
        whole = hashlib.md5()
        for number, first in enumerate(range(0, stream.size, part_size), start=1):
            length = min(part_size, stream.size - first)
            data = b"".join(_HashingReader(stream, length, whole).chunks())  # the one part held in memory
            part = hashlib.md5(data)
            put = functools.partial(_put_part, dst_client, dst_bucket, key, upload_id, number, data, length, part)
            del data  # held by ``put`` until the part is stored, then freed before the next is read
            yield number, _inner_retry(retry, f"part {number}", put, _part_retried, bucket=dst_bucket, key=key)
            del put
        if whole.hexdigest() != md5_hex:
            raise _Mismatch(f"source bytes hash to {whole.hexdigest()}, the source claimed {md5_hex}")

    return _multipart(dst_client, dst_bucket, key, headers, parts, retry)


def _inner_retry(retry: RetryPolicy, what: str, fn: Callable, retry_on: Callable[[BaseException], bool],
                 **context):
    """Retries one piece of an object's copy; once its attempts are spent, the object is not retried
    around it (``_GaveUp``). Anything else (a refusal, a changed source) goes up as it is."""
    retrying = retry.retrying(retry_on, op=what, **context)
    try:
        return retrying(fn)
    except Exception as exc:
        if retry_on(exc):
            raise _GaveUp(what, retrying.statistics.get("attempt_number", 1), exc) from exc
        raise


def _abort_leftovers(dst_client, dst_bucket: str, key: str, retry: RetryPolicy) -> None:
    """Aborts the unfinished multipart uploads of exactly ``key``: an upload is never resumed (a retry
    restarts the object), so any left is an earlier attempt's or a killed run's, holding parts on disk.
    The runbook lock makes this process the target's only writer."""

    def leftovers() -> list[str]:
        found, kwargs = [], {"Bucket": dst_bucket, "Prefix": key}
        while True:
            with tagged_with(dst_client, dst_bucket):
                page = dst_client.list_multipart_uploads(**kwargs)
            found += [u["UploadId"] for u in page.get("Uploads", []) if u["Key"] == key]
            if not page.get("IsTruncated"):
                return found
            kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    try:
        upload_ids = retry.retrying(_is_transient, op="list uploads", bucket=dst_bucket, key=key)(leftovers)
    except Exception as exc:  # noqa: BLE001 - housekeeping: the copy's own outcome is what counts
        log.warning("s3 multipart leftovers not listed", endpoint=_endpoint_url(dst_client), bucket=dst_bucket,
                    key=key, error=_reason(exc))
        return
    for upload_id in upload_ids:
        _abort(dst_client, dst_bucket, key, upload_id, retry)


def _abort(dst_client, dst_bucket: str, key: str, upload_id: str, retry: RetryPolicy) -> None:
    def abort():
        try:
            dst_client.abort_multipart_upload(Bucket=dst_bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if error_code(exc) != "NoSuchUpload":  # completed or already aborted: nothing left on the server
                raise

    try:
        retry.retrying(_is_transient, op="abort", bucket=dst_bucket, key=key)(abort)
    except Exception as exc:  # noqa: BLE001 - the copy's own error is the one to raise
        log.warning("s3 multipart abort failed", endpoint=_endpoint_url(dst_client), bucket=dst_bucket,
                    key=key, upload_id=upload_id, error=_reason(exc))


@dataclass
class BatchResult:
    copied: list[CopiedObject] = field(default_factory=list)
    failed: list[ObjectFailure] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.copied)


def copy_batch(keys: Iterable[str], src_client, src_bucket: str, dst_client, dst_bucket: str, *,
               part_size: int = DEFAULT_PART_SIZE, concurrency: int = 8, dry_run: bool = False,
               retry: RetryPolicy = RetryPolicy(), stored: Callable[[str], dict[str, str]] | None = None,
               on_done: Callable[[CopiedObject | ObjectFailure], None] | None = None) -> BatchResult:
    """Copies ``keys`` with at most ``concurrency`` objects in flight, on the two shared clients;
    ``stored(key)``: the headers the source's own records give the object (``copy_object``'s ``stored``).

    One object's failure is recorded (``failed``) and the others go on. ``on_done`` is called once per
    object, in the calling thread (so it may write to a SQLite ledger), as each finishes. A refused key
    (ConnectionRefused) stops the batch: what is in flight finishes and is reported, then it is raised.
    """
    return _batch(keys, lambda key: copy_object(src_client, src_bucket, key, dst_client, dst_bucket,
                                                part_size=part_size, dry_run=dry_run, retry=retry,
                                                stored=stored(key) if stored else None),
                  concurrency, on_done)


def copy_batch_from(keys: Iterable[str], open_source: Callable[[str], Any], dst_client, dst_bucket: str, *,
                    part_size: int = DEFAULT_PART_SIZE, concurrency: int = 8, retry: RetryPolicy = RetryPolicy(),
                    on_done: Callable[[CopiedObject | ObjectFailure], None] | None = None) -> BatchResult:
    """``copy_batch`` from a source that is not an S3 server: ``open_source(key)`` opens one object as a
    stream (``copy_object_from``). Same contract: failures recorded, ``on_done`` in the calling thread, a
    refused key stops the batch, at most ``2 * concurrency`` keys held."""
    return _batch(keys, lambda key: copy_object_from(open_source, key, dst_client, dst_bucket, part_size=part_size,
                                                     retry=retry),
                  concurrency, on_done)


def _batch(keys: Iterable[str], copy_one: Callable[[str], CopiedObject], concurrency: int,
           on_done: Callable[[CopiedObject | ObjectFailure], None] | None) -> BatchResult:
    result = BatchResult()
    pending: dict[Future, str] = {}
    refused: ConnectionRefused | None = None

    def settle(done: Iterable[Future]) -> None:
        nonlocal refused
        for future in done:
            key = pending.pop(future)
            try:
                outcome: CopiedObject | ObjectFailure = future.result()
                result.copied.append(outcome)
            except ConnectionRefused as exc:
                refused = refused or exc
                outcome = ObjectFailure(key, str(exc))
                result.failed.append(outcome)
            except LiftoffError as exc:
                outcome = ObjectFailure(key, str(exc))
                result.failed.append(outcome)
            if on_done is not None:
                on_done(outcome)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-copy") as pool:
        for key in keys:
            if refused is not None:
                break
            # Each worker runs in a copy of this context: bound log fields and the Prefect run go along.
            future = pool.submit(contextvars.copy_context().run, copy_one, key)
            pending[future] = key
            if len(pending) >= 2 * concurrency:  # a bounded window: keys may be a streamed listing
                settle(wait(pending, return_when=FIRST_COMPLETED).done)
        while pending:
            settle(wait(pending, return_when=FIRST_COMPLETED).done)
    if refused is not None:
        raise refused
    return result


# ---------------------------------------------------------------------------------------------------------
# Buckets


def _anonymous(statement: dict) -> bool:
    principal = statement.get("Principal")
    if isinstance(principal, dict):
        principal = principal.get("AWS")
    if isinstance(principal, list):
        return "*" in principal
    return principal == "*"


def _as_set(value) -> set[str]:
    return set(value) if isinstance(value, list) else {value} if value else set()


def download_policy_statement(bucket: str) -> dict:
    """Anonymous read of every object, nothing else: what ``mc anonymous set download`` sets."""
    return {"Effect": "Allow", "Principal": {"AWS": ["*"]}, "Action": ["s3:GetObject"],
            "Resource": [f"arn:aws:s3:::{bucket}/*"]}


def _is_download_only(statement: dict, bucket: str) -> bool:
    return (statement.get("Effect") == "Allow" and _anonymous(statement)
            and _as_set(statement.get("Action")) == {"s3:GetObject"}
            and _as_set(statement.get("Resource")) == {f"arn:aws:s3:::{bucket}/*"})


def _bucket_policy(s3, bucket: str) -> dict | None:
    try:
        with tagged_with(s3, bucket):
            return json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    except ClientError as exc:
        if error_code(exc) == "NoSuchBucketPolicy" or http_status(exc) == 404:
            return None
        raise


def ensure_bucket(s3, name: str, public: bool, dry_run: bool = False, *,
                  retry: RetryPolicy = RetryPolicy()) -> str:
    """Makes ``name`` exist, readable anonymously (download only) if ``public``, with no anonymous access
    at all otherwise; idempotent. Other statements of an existing policy are kept. Returns what it did
    (or, with ``dry_run``, what it would do), e.g. ``created; anonymous download set``."""
    would = "would " if dry_run else ""

    def exists() -> bool:
        try:
            with tagged_with(s3, name):
                s3.head_bucket(Bucket=name)
            return True
        except ClientError as exc:
            if http_status(exc) == 404:
                return False
            raise

    def create() -> None:
        kwargs = {"Bucket": name}
        region = s3.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            with tagged_with(s3, name):
                s3.create_bucket(**kwargs)
        except ClientError as exc:
            # A create whose answer was lost is retried and meets the bucket it made: some servers say
            # BucketAlreadyOwnedByYou, others (SeaweedFS) a bare 409; if we can reach it, it is ours.
            if error_code(exc) != "BucketAlreadyOwnedByYou" and not (http_status(exc) == 409 and exists()):
                raise

    done = []
    found = call(retry, "head bucket", exists, s3, name)
    if not found:
        if not dry_run:
            call(retry, "create bucket", create, s3, name)
        done.append(f"{would}create")
    else:
        done.append("exists")

    policy = call(retry, "read bucket policy", lambda: _bucket_policy(s3, name), s3, name) if found else None
    statements = (policy or {}).get("Statement", [])
    statements = [statements] if isinstance(statements, dict) else list(statements)
    others = [s for s in statements if not _anonymous(s)]
    anonymous = [s for s in statements if _anonymous(s)]
    if public:
        if len(anonymous) == 1 and _is_download_only(anonymous[0], name):
            done.append("anonymous download already set")
            return "; ".join(done)
        wanted = {"Version": "2012-10-17", "Statement": [*others, download_policy_statement(name)]}
        if not dry_run:
            call(retry, "set bucket policy",
                 lambda: _at_call(s3, name, s3.put_bucket_policy, Bucket=name, Policy=json.dumps(wanted)), s3, name)
        done.append(f"{would}set anonymous download")
    elif anonymous:
        if not dry_run:
            if others:
                kept = json.dumps({"Version": (policy or {}).get("Version", "2012-10-17"), "Statement": others})
                call(retry, "set bucket policy",
                     lambda: _at_call(s3, name, s3.put_bucket_policy, Bucket=name, Policy=kept), s3, name)
            else:
                call(retry, "delete bucket policy",
                     lambda: _at_call(s3, name, s3.delete_bucket_policy, Bucket=name), s3, name)
        done.append(f"{would}remove anonymous access")
    else:
        done.append("private")
    return "; ".join(done)


def _at_call(s3, bucket: str, fn: Callable, **kwargs):
    with tagged_with(s3, bucket):
        return fn(**kwargs)


@dataclass(frozen=True)
class AccessProof:
    """What anonymous HTTP requests got from a bucket; ``problems`` empty when it is as the runbook says."""

    bucket: str
    public: bool
    anonymous_get_status: int
    anonymous_list_status: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class _Busy(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


def _anonymous_status(url: str, timeout: float, retry: RetryPolicy) -> int:
    """The status an anonymous GET of ``url`` gets; throttling, a 5xx or a dropped connection is tried again
    (a throttled answer says nothing of the access rule), and after the last attempt its status is returned."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no environment proxies

    def once() -> int:
        try:
            with opener.open(urllib.request.Request(url, method="GET"), timeout=timeout) as answer:
                answer.read(1)
                status = answer.status
        except urllib.error.HTTPError as exc:
            exc.close()
            status = exc.code
        if status == 429 or status >= 500:
            raise _Busy(status)
        return status

    def worth_again(exc: BaseException) -> bool:
        return isinstance(exc, (_Busy, ConnectionResetError, http.client.RemoteDisconnected))

    try:
        return retry.retrying(worth_again, op="anonymous GET", url=url)(once)
    except _Busy as exc:
        return exc.status


def prove_bucket_access(endpoint_url: str, bucket: str, key: str, public: bool, *,
                        timeout: float = 10, retry: RetryPolicy = RetryPolicy()) -> AccessProof:
    """Proves a bucket's access rule with plain HTTP and no credentials: an anonymous GET of ``key`` (an
    object that exists) answers 200 in a public bucket and 401/403 in a private one; anonymous listing is
    refused in both. Raises ConnectionRefused if the endpoint cannot be reached."""
    base = f"{endpoint_url.rstrip('/')}/{quote(bucket, safe='')}"
    try:
        got = _anonymous_status(f"{base}/{quote(key, safe='/')}", timeout, retry)
        listed = _anonymous_status(f"{base}?list-type=2", timeout, retry)
    except OSError as exc:
        raise ConnectionRefused(f"S3 {endpoint_url}: cannot reach the server for an anonymous request on "
                                f"bucket '{bucket}': {_reason(exc)}") from None
    problems = []
    if public and got != 200:
        problems.append(f"bucket '{bucket}' is public but an anonymous GET of {key!r} answered {got}, not 200"
                        + (" (no such key: prove with an object that exists)" if got == 404 else ""))
    if not public and got not in (401, 403):
        problems.append(f"bucket '{bucket}' is private but an anonymous GET of {key!r} answered {got}, "
                        f"not 403")
    if listed not in (401, 403):
        problems.append(f"bucket '{bucket}': an anonymous listing answered {listed}, not 403")
    return AccessProof(bucket, public, got, listed, problems)


def anonymous_get(endpoint_url: str, bucket: str, key: str, *, timeout: float = 10) -> bytes | None:
    """The object's bytes read with plain HTTP and no credentials, or None when the server refuses."""
    url = f"{endpoint_url.rstrip('/')}/{quote(bucket, safe='')}/{quote(key, safe='/')}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError:
        return None
    except OSError as exc:
        raise ConnectionRefused(f"S3 {endpoint_url}: cannot reach the server for an anonymous GET on bucket "
                                f"'{bucket}': {_reason(exc)}") from None


def minio_live(endpoint_url: str) -> int | None:
    """MinIO's liveness probe's HTTP status when it answers 200; None otherwise (SeaweedFS, Garage and others
    do not have it, so anything but 200 says nothing)."""
    try:
        with urllib.request.urlopen(f"{endpoint_url}/minio/health/live", timeout=3) as response:
            return response.status if response.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None
