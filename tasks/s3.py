"""S3: buckets, streaming copies and what verification reads, against any S3-compatible server (MinIO,
SeaweedFS, Garage, RustFS, Supabase Storage's S3 endpoint) through plain boto3 calls.

This module knows one system and nothing of runbooks, Prefect or the ledger: it takes boto3 clients (made by
``client`` from an ``S3Endpoint``) and returns small dataclasses. The storage flow composes it.

How a copy is proven without reading anything twice (as rclone does): the MD5 of each object is computed
while its bytes stream from source to target and stored on the target as user metadata ``md5chksum``
(base64 of the digest, rclone's own key, so ``rclone check`` reads it too). A multipart ETag is no MD5, so
``head`` reads that metadata back and verification compares it with the source's without a download;
``deep_md5`` re-reads and hashes when a check must not trust metadata.

Where the MD5 comes from before the first byte is sent (metadata travels in the request headers): the
source's own claim (its ``md5chksum``/``md5`` metadata, or its ETag when that is a plain MD5), checked
against the bytes as they stream: a single PUT carries it as ``Content-MD5`` so the server refuses a body
that does not match; a multipart upload is completed only if the streamed MD5 equals it. A source with no
MD5 to claim (a multipart upload of its own) is hashed first by streaming it once; so is one whose claim
proved false.

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
import hashlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

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

    def retrying(self, retry_on: Callable[[BaseException], bool], **context) -> Retrying:
        def before_sleep(state):
            log.warning("s3 retry", attempt=state.attempt_number, error=_reason(state.outcome.exception()),
                        **context)

        return Retrying(
            retry=retry_if_exception(retry_on),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.max_seconds),
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


def _status(exc: ClientError) -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _code(exc: ClientError) -> str:
    # Supabase Storage leaves Error.Code empty and puts it at the top of the response.
    return exc.response.get("Error", {}).get("Code") or exc.response.get("Code") or str(_status(exc))


def _is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and (_code(exc) in _AUTH_CODES or _status(exc) in (401, 403))


def _is_transient(exc: BaseException) -> bool:
    """Worth the same request again: throttling, a server error, a dropped or timed-out connection."""
    if isinstance(exc, ClientError):
        status = _status(exc)
        return status >= 500 or status == 429 or _code(exc) in _THROTTLING_CODES
    return isinstance(exc, (HTTPClientError, BotoConnectionError, IncompleteReadError, _SourceCutShort))


def _restarts_object(exc: BaseException) -> bool:
    """Worth a fresh start of the whole object: transient, the bytes disagreed, or the source changed."""
    return _is_transient(exc) or isinstance(exc, _Mismatch) or (
        isinstance(exc, ClientError) and _code(exc) in ("PreconditionFailed", "BadDigest")
    )


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown"
    if isinstance(exc, ClientError):
        message = exc.response.get("Error", {}).get("Message") or ""
        text = f"{_code(exc)} (HTTP {_status(exc)})" + (f": {message}" if message else "")
    elif isinstance(exc, _GaveUp):
        return f"{exc.what} failed after {exc.attempts} attempts: {_reason(exc.last)}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(redact(text).split())  # one line


@contextlib.contextmanager
def _at(s3, bucket: str):
    """Tags an exception with the server and bucket it came from, for the one-line error."""
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, "liftoff_s3_at"):
            exc.liftoff_s3_at = (s3, bucket)
        raise


def _refused(exc: ClientError, s3, bucket: str) -> ConnectionRefused:
    code = _code(exc)
    hint = _AUTH_CODES.get(code, "check the key pair and its permissions on this bucket")
    # A refused HEAD has no body, so no code: only the status says what happened.
    said = "refused" if code.isdigit() else code
    return ConnectionRefused(
        f"S3 {_endpoint_url(s3)}: {said} (HTTP {_status(exc)}) for access key id '{_access_key_id(s3)}' "
        f"on bucket '{bucket}'; {hint}",
        endpoint=_endpoint_url(s3), bucket=bucket, access_key_id=_access_key_id(s3), code=code,
    )


def _run(policy: RetryPolicy, what: str, fn: Callable, s3, bucket: str, key: str | None = None, *,
         retry_on: Callable[[BaseException], bool] = _is_transient):
    """Runs ``fn`` under the policy; any failure leaves as one LiftoffError line naming where and why."""
    retrying = policy.retrying(retry_on, op=what, endpoint=_endpoint_url(s3), bucket=bucket, key=key)
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
# Listing and reading


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    etag: str


def list_objects(s3, bucket: str, prefix: str = "", *, page_size: int = 1000,
                 retry: RetryPolicy = RetryPolicy()) -> Iterator[ListedObject]:
    """Every object under ``prefix``, page by page (one page in memory at a time), each page retried."""
    token = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if token:
            kwargs["ContinuationToken"] = token

        def page():
            with _at(s3, bucket):
                return s3.list_objects_v2(**kwargs)

        answer = _run(retry, "list", page, s3, bucket)
        for item in answer.get("Contents", []):
            yield ListedObject(key=item["Key"], size=item["Size"], etag=item.get("ETag", "").strip('"'))
        token = answer.get("NextContinuationToken")
        if not answer.get("IsTruncated") or not token:
            return


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
        with _at(s3, bucket):
            answer = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _status(exc) == 404:
            return None
        raise
    return _info(key, answer), answer


def head(s3, bucket: str, key: str, *, retry: RetryPolicy = RetryPolicy()) -> ObjectInfo | None:
    """The object's size, MD5, ETag, headers and user metadata; None when there is no such object."""
    found = _run(retry, "head", lambda: _head(s3, bucket, key), s3, bucket, key)
    return found[0] if found else None


def deep_md5(s3, bucket: str, key: str, *, if_match: str | None = None,
             retry: RetryPolicy = RetryPolicy()) -> str:
    """Reads the object through and returns its MD5 in hex (a retry starts the hash over)."""

    return _run(retry, "read", lambda: _hash_object(s3, bucket, key, if_match), s3, bucket, key)


def _hash_object(s3, bucket: str, key: str, if_match: str | None) -> str:
    digest = hashlib.md5()
    kwargs = {"Bucket": bucket, "Key": key}
    if if_match:
        kwargs["IfMatch"] = f'"{if_match}"'
    with _at(s3, bucket):
        answer = s3.get_object(**kwargs)
        with contextlib.closing(answer["Body"]) as body:
            for piece in body.iter_chunks(256 * 1024):
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


@dataclass(frozen=True)
class ObjectFailure:
    key: str
    error: str


class _HashingReader:
    """A file-like view of exactly ``length`` bytes of a source stream, hashing what passes through.

    No ``seek``/``tell``: botocore then sends it as it comes, never reading it twice or whole."""

    def __init__(self, source, length: int, *digests):
        self._source, self._remaining, self._digests = source, length, digests

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        want = self._remaining if size is None or size < 0 else min(size, self._remaining)
        piece = self._source.read(want)
        if not piece:
            raise _SourceCutShort(f"source stream ended {self._remaining} bytes early")
        for digest in self._digests:
            digest.update(piece)
        self._remaining -= len(piece)
        return piece


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
                retry: RetryPolicy = RetryPolicy()) -> CopiedObject:
    """Copies one object by streaming, keeping its headers and user metadata and adding its MD5.

    A single PUT up to ``part_size``, a multipart upload above it (each part read by range and streamed);
    never the whole object in memory. Succeeds when the target holds the source's bytes, checked by MD5 as
    they streamed. A multipart upload that fails is aborted on the server. Raises ConnectionRefused for a
    refused key, StepFailed (one line, naming endpoint, bucket and key) once the retries are spent.
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
            headers = _target_headers(answer, md5_hex)
            if info.size <= part_size:
                etag = _single_put(src_client, src_bucket, key, dst_client, dst_bucket, info, md5_hex, headers,
                                   source)
            else:
                etag = _multipart_put(src_client, src_bucket, key, dst_client, dst_bucket, info, md5_hex,
                                      headers, _part_size_for(info.size, part_size), retry)
        except (_Mismatch, ClientError) as exc:
            if isinstance(exc, _Mismatch) or _code(exc) == "BadDigest":
                state["trust_claim"] = False  # the source's claim was false: the next attempt hashes first
            raise
        finally:
            if source is not None:
                source.close()
        return CopiedObject(key, info.size, md5_hex, info.content_type, etag=etag)

    return _run(retry, "copy", attempt, dst_client, dst_bucket, key, retry_on=_restarts_object)


def _no_source(src_client, src_bucket: str, key: str) -> StepFailed:
    return StepFailed(f"S3 {_endpoint_url(src_client)} bucket '{src_bucket}' key {key!r}: no such object on "
                      f"the source", bucket=src_bucket, key=key)


def _open_source(src_client, src_bucket: str, key: str) -> tuple[ObjectInfo, dict]:
    try:
        with _at(src_client, src_bucket):
            answer = src_client.get_object(Bucket=src_bucket, Key=key)
    except ClientError as exc:
        if _status(exc) == 404:
            raise _no_source(src_client, src_bucket, key) from None
        raise
    return _info(key, answer), answer


def _source_body(src_client, src_bucket: str, key: str, etag: str, first: int | None = None,
                 last: int | None = None):
    kwargs = {"Bucket": src_bucket, "Key": key, "IfMatch": f'"{etag}"'}
    if first is not None:
        kwargs["Range"] = f"bytes={first}-{last}"
    with _at(src_client, src_bucket):
        return src_client.get_object(**kwargs)["Body"]


def _single_put(src_client, src_bucket, key, dst_client, dst_bucket, info: ObjectInfo, md5_hex: str,
                headers: dict, source=None) -> str:
    """One PUT streamed from ``source`` (an open GET body of the object; opened here when None)."""
    digest = hashlib.md5()
    content_md5 = base64.b64encode(bytes.fromhex(md5_hex)).decode()
    if info.size == 0:
        body = b""
    else:
        if source is None:
            source = _source_body(src_client, src_bucket, key, info.etag)
        body = _HashingReader(source, info.size, digest)
    try:
        with _at(dst_client, dst_bucket):
            # Content-MD5: the server itself refuses (BadDigest) a body that is not what the source claimed.
            answer = dst_client.put_object(Bucket=dst_bucket, Key=key, Body=body, ContentLength=info.size,
                                           ContentMD5=content_md5, **headers)
    finally:
        if source is not None:
            source.close()
    if digest.hexdigest() != md5_hex:
        # A server that ignores Content-MD5 stored bytes that contradict the MD5 beside them: take them back.
        with _at(dst_client, dst_bucket):
            dst_client.delete_object(Bucket=dst_bucket, Key=key)
        raise _Mismatch(f"source bytes hash to {digest.hexdigest()}, the source claimed {md5_hex}")
    return answer.get("ETag", "").strip('"')


def _multipart_put(src_client, src_bucket, key, dst_client, dst_bucket, info: ObjectInfo, md5_hex: str,
                   headers: dict, part_size: int, retry: RetryPolicy) -> str:
    _abort_leftovers(dst_client, dst_bucket, key, retry)
    try:
        with _at(dst_client, dst_bucket):
            upload_id = dst_client.create_multipart_upload(Bucket=dst_bucket, Key=key, **headers)["UploadId"]
    except BaseException:
        # A create whose answer was lost may still have started an upload: find it by its key.
        _abort_leftovers(dst_client, dst_bucket, key, retry)
        raise
    try:
        whole = hashlib.md5()
        parts = []
        for number, first in enumerate(range(0, info.size, part_size), start=1):
            length = min(part_size, info.size - first)
            etag, whole = _upload_part(src_client, src_bucket, key, dst_client, dst_bucket, info, upload_id,
                                       number, first, length, whole, retry)
            parts.append({"PartNumber": number, "ETag": etag})
        if whole.hexdigest() != md5_hex:
            raise _Mismatch(f"source bytes hash to {whole.hexdigest()}, the source claimed {md5_hex}")
        with _at(dst_client, dst_bucket):
            answer = dst_client.complete_multipart_upload(
                Bucket=dst_bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        _abort(dst_client, dst_bucket, key, upload_id, retry)
        raise
    return answer.get("ETag", "").strip('"')


def _upload_part(src_client, src_bucket, key, dst_client, dst_bucket, info: ObjectInfo, upload_id: str,
                 number: int, first: int, length: int, whole, retry: RetryPolicy):
    """One part, retried on its own: the whole-object hash restarts from its state before this part."""

    def attempt():
        running, part = whole.copy(), hashlib.md5()
        source = _source_body(src_client, src_bucket, key, info.etag, first, first + length - 1)
        try:
            with _at(dst_client, dst_bucket):
                answer = dst_client.upload_part(
                    Bucket=dst_bucket, Key=key, UploadId=upload_id, PartNumber=number,
                    Body=_HashingReader(source, length, running, part), ContentLength=length)
        finally:
            source.close()
        etag = answer["ETag"].strip('"').lower()
        if _PLAIN_MD5.fullmatch(etag) and etag != part.hexdigest():
            raise _Mismatch(f"part {number}: the target stored ETag {etag}, the bytes sent hash to "
                            f"{part.hexdigest()}")
        return answer["ETag"], running

    return _inner_retry(retry, f"part {number}", attempt, lambda e: _is_transient(e) or isinstance(e, _Mismatch),
                        bucket=dst_bucket, key=key)


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
            with _at(dst_client, dst_bucket):
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
            if _code(exc) != "NoSuchUpload":  # completed or already aborted: nothing left on the server
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
               retry: RetryPolicy = RetryPolicy(),
               on_done: Callable[[CopiedObject | ObjectFailure], None] | None = None) -> BatchResult:
    """Copies ``keys`` with at most ``concurrency`` objects in flight, on the two shared clients.

    One object's failure is recorded (``failed``) and the others go on. ``on_done`` is called once per
    object, in the calling thread (so it may write to a SQLite ledger), as each finishes. A refused key
    (ConnectionRefused) stops the batch: what is in flight finishes and is reported, then it is raised.
    """
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
            future = pool.submit(contextvars.copy_context().run, copy_object, src_client, src_bucket, key,
                                 dst_client, dst_bucket, part_size=part_size, dry_run=dry_run, retry=retry)
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
        with _at(s3, bucket):
            return json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    except ClientError as exc:
        if _code(exc) == "NoSuchBucketPolicy" or _status(exc) == 404:
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
            with _at(s3, name):
                s3.head_bucket(Bucket=name)
            return True
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise

    def create() -> None:
        kwargs = {"Bucket": name}
        region = s3.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            with _at(s3, name):
                s3.create_bucket(**kwargs)
        except ClientError as exc:
            # A create whose answer was lost is retried and meets the bucket it made: some servers say
            # BucketAlreadyOwnedByYou, others (SeaweedFS) a bare 409; if we can reach it, it is ours.
            if _code(exc) != "BucketAlreadyOwnedByYou" and not (_status(exc) == 409 and exists()):
                raise

    done = []
    found = _run(retry, "head bucket", exists, s3, name)
    if not found:
        if not dry_run:
            _run(retry, "create bucket", create, s3, name)
        done.append(f"{would}create")
    else:
        done.append("exists")

    policy = _run(retry, "read bucket policy", lambda: _bucket_policy(s3, name), s3, name) if found else None
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
            _run(retry, "set bucket policy",
                 lambda: _at_call(s3, name, s3.put_bucket_policy, Bucket=name, Policy=json.dumps(wanted)), s3, name)
        done.append(f"{would}set anonymous download")
    elif anonymous:
        if not dry_run:
            if others:
                kept = json.dumps({"Version": (policy or {}).get("Version", "2012-10-17"), "Statement": others})
                _run(retry, "set bucket policy",
                     lambda: _at_call(s3, name, s3.put_bucket_policy, Bucket=name, Policy=kept), s3, name)
            else:
                _run(retry, "delete bucket policy",
                     lambda: _at_call(s3, name, s3.delete_bucket_policy, Bucket=name), s3, name)
        done.append(f"{would}remove anonymous access")
    else:
        done.append("private")
    return "; ".join(done)


def _at_call(s3, bucket: str, fn: Callable, **kwargs):
    with _at(s3, bucket):
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


def _anonymous_status(url: str, timeout: float) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no environment proxies
    request = urllib.request.Request(url, method="GET")
    try:
        with opener.open(request, timeout=timeout) as answer:
            answer.read(1)
            return answer.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def prove_bucket_access(endpoint_url: str, bucket: str, key: str, public: bool, *,
                        timeout: float = 10) -> AccessProof:
    """Proves a bucket's access rule with plain HTTP and no credentials: an anonymous GET of ``key`` (an
    object that exists) answers 200 in a public bucket and 401/403 in a private one; anonymous listing is
    refused in both. Raises ConnectionRefused if the endpoint cannot be reached."""
    base = f"{endpoint_url.rstrip('/')}/{quote(bucket, safe='')}"
    try:
        got = _anonymous_status(f"{base}/{quote(key, safe='/')}", timeout)
        listed = _anonymous_status(f"{base}?list-type=2", timeout)
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
