"""Supabase Storage, the storage phase's source: its inventory in the source database, its access rules, and
its bytes through either of its two APIs.

This module knows one system and nothing of runbooks, Prefect or the ledger. It takes a psycopg connection to
the source database, a boto3 client (made by ``liftoff.systems.s3.client``) or a project URL and service key, and returns
small dataclasses.

- **The inventory is the source database.** ``storage.buckets`` (public flag, file size limit, allowed MIME
  types) and ``storage.objects`` (bucket, name, ``metadata`` size / mimetype / eTag / cacheControl) are read
  with a server-side cursor, in byte order of the key (``COLLATE "C"``, which is Python's ``str`` order), and
  with ``row_security`` off so row-level security can only make the read fail, never hide a row.
- **Two ways to the bytes, one interface** (``StorageSource``: ``list``, ``head``, ``open``):
  ``S3Source``, Supabase Storage's S3-compatible endpoint (``https://<ref>.supabase.co/storage/v1/s3``,
  path-style) through ``liftoff/systems/s3.py``; ``RestSource``, its REST API: listing through its cursor-based
  ``POST /object/list-v2`` (every key, in byte order), or where a server lacks it the limit/offset
  ``POST /object/list`` (one folder level per call, recursed here), downloads streamed with httpx
  from the same ``GET /storage/v1/object/{bucket}/{key}`` storage3's ``download`` calls (which returns the
  whole body as bytes). Both list in the inventory's order, so the two streams merge.
- **A listing is evidence, not truth.** The REST listing is answered from ``storage.objects`` itself, and its
  sizes are the rows' own claims; the limit/offset one also matches names case-insensitively and skips ahead
  by lowercased names (storage-api's ``storage.search``, see ``sandbox/storage_api.py``): folders
  differing only in case collapse into one, and a name just after a full batch's last can be passed over.
  Only reading shows that bytes exist: ``check_bytes`` replaces each listed entry's size and ETag with
  what reading its first byte says, or records why there are none.
- ``reconcile`` merges the inventory with a listing, both streamed in key order (a merge join: nothing but the
  current pair and a few examples in memory) and reports rows with no bytes, bytes with no row, sizes that
  differ, counts and bytes per bucket. Nothing is skipped silently; an out-of-order stream is an error.
- An ETag of Supabase Storage is an MD5 only when it is 32 hex digits: on an S3 backend (as hosted) a
  multipart upload's is ``md5-of-parts-N``. ``SourceObject.md5`` is None then.

Errors: a refused service key or S3 key fails at once (``ConnectionRefused``), one line naming the URL and what
to check, never the key. Throttling, 5xx answers and dropped connections are retried (tenacity, exponential
backoff with jitter, bounded by ``liftoff.systems.s3.RetryPolicy``); what still fails is one ``StepFailed`` line naming
the URL, bucket and key. A key with no bytes behind it is ``ObjectMissing``.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
from botocore.exceptions import ClientError

from liftoff.errors import ConnectionRefused, LiftoffError, StepFailed
from liftoff.logs import get_logger
from liftoff.redaction import error_line, register_secret
from liftoff.systems import s3

log = get_logger(system="supabase_storage")

DEFAULT_EXAMPLES = 10
_CHUNK = 256 * 1024
_cursor_numbers = itertools.count(1)


class ObjectMissing(StepFailed):
    """A key has no bytes behind it on the source (its row may still exist)."""


# ---------------------------------------------------------------------------------------------------------
# The inventory: storage.buckets and storage.objects in the source database


@dataclass(frozen=True)
class SourceBucket:
    name: str
    public: bool
    file_size_limit: int | None
    allowed_mime_types: list[str] | None


def read_buckets(conn: psycopg.Connection) -> list[SourceBucket]:
    """Every bucket of ``storage.buckets`` (by id, the name the APIs use), in byte order."""
    rows = conn.execute('select id, coalesce(public, false), file_size_limit, allowed_mime_types '
                        'from storage.buckets order by id collate "C"').fetchall()
    return [SourceBucket(name, public, limit, list(types) if types is not None else None)
            for name, public, limit, types in rows]


@dataclass(frozen=True)
class SourceObject:
    """One ``storage.objects`` row: what Supabase says is stored. ``etag`` is unquoted; ``size`` is None when
    the row's metadata has none (an upload that never finished, or a row written by hand)."""

    bucket: str
    key: str
    size: int | None
    mimetype: str | None
    etag: str | None
    cache_control: str | None
    updated_at: datetime | None

    @property
    def md5(self) -> str | None:
        """The MD5 the row claims, in hex; None when its ETag is not a plain MD5 (``md5-of-parts-N``)."""
        return s3.md5_of(self.etag or "", {})


def _size(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def inventory(conn: psycopg.Connection, bucket: str, prefix: str = "", *,
              batch: int = 1000) -> Iterator[SourceObject]:
    """The ``storage.objects`` rows of ``bucket`` (under ``prefix``), in byte order of the key, streamed.

    A server-side cursor ``WITH HOLD`` is declared in its own short transaction with ``row_security`` off
    (a role that RLS would filter gets an error, not fewer rows) and read ``batch`` rows at a time; it
    outlives that transaction, so it works on an autocommit connection, and several may be open at once on
    one connection. Closing the iterator closes the cursor.
    """
    cursor = conn.cursor(name=f"liftoff_storage_inventory_{next(_cursor_numbers)}", withhold=True)
    cursor.itersize = batch
    with cursor:
        with conn.transaction():
            conn.execute("select set_config('row_security', 'off', true)")
            cursor.execute(
                "select name, metadata -> 'size', metadata -> 'mimetype', metadata -> 'eTag', "
                "metadata -> 'cacheControl', updated_at from storage.objects "
                'where bucket_id = %s and starts_with(name, %s) order by name collate "C"', [bucket, prefix])
        for name, size, mimetype, etag, cache_control, updated_at in cursor:
            yield SourceObject(bucket, name, _size(size), _text(mimetype),
                               _text(etag).strip('"') if _text(etag) else None, _text(cache_control), updated_at)


# ---------------------------------------------------------------------------------------------------------
# Access rules: the RLS policies on storage.objects


_BUCKET_LITERAL = re.compile(r"bucket_id\s*\)?\s*=\s*'((?:[^']|'')*)'|'((?:[^']|'')*)'(?:::text)?\s*=\s*\(?bucket_id")
_BUCKET_ANY = re.compile(r"bucket_id\s*\)?\s*=\s*ANY\s*\(\s*(?:ARRAY\s*\[)?(?P<list>[^\]\)]*)")


@dataclass(frozen=True)
class StoragePolicy:
    """A row-level security policy on ``storage.objects`` and what stands in for it on an S3 target (which has
    no per-row rules). ``bucket`` names the buckets its expressions test (``bucket_id = '...'``), or says it
    applies to any bucket."""

    bucket: str
    name: str
    command: str  # SELECT, INSERT, UPDATE, DELETE, ALL
    roles: list[str]
    expression: str  # USING, or WITH CHECK for INSERT; both when both are set
    permissive: bool = True
    using: str | None = None
    with_check: str | None = None
    replacement: str = ""


def _buckets_named(expressions: Iterable[str | None]) -> list[str]:
    found: list[str] = []
    for text in expressions:
        if not text:
            continue
        for match in _BUCKET_LITERAL.finditer(text):
            found.append((match.group(1) if match.group(1) is not None else match.group(2)).replace("''", "'"))
        for match in _BUCKET_ANY.finditer(text):
            found += [m.replace("''", "'") for m in re.findall(r"'((?:[^']|'')*)'", match.group("list"))]
    return list(dict.fromkeys(found))


def _replacement(command: str, buckets: list[str], public: dict[str, bool]) -> str:
    if command in ("INSERT", "UPDATE", "DELETE"):
        return ("not migrated: the target accepts no anonymous writes; uploads go through the app (presigned PUT "
                "URLs), which must check this rule itself")
    if buckets and all(public.get(b) for b in buckets):
        return ("not migrated: the bucket is public on the target (anonymous download policy): anyone with a URL "
                "reads its files, as this policy allowed")
    return ("not migrated: the bucket stays private on the target; the app checks this rule and hands out "
            "presigned URLs")


def storage_policies(conn: psycopg.Connection) -> list[StoragePolicy]:
    """The RLS policies on ``storage.objects``, each with what replaces it on MinIO (or any S3 server)."""
    public = {b.name: b.public for b in read_buckets(conn)}
    rows = conn.execute(
        "select policyname, cmd, roles::text[], qual, with_check, permissive = 'PERMISSIVE' from pg_policies "
        "where schemaname = 'storage' and tablename = 'objects' order by policyname collate \"C\"").fetchall()
    policies = []
    for name, command, roles, using, with_check, permissive in rows:
        buckets = _buckets_named([using, with_check])
        if using and with_check:
            expression = f"USING {using} WITH CHECK {with_check}"
        elif with_check:
            expression = f"WITH CHECK {with_check}"
        else:
            expression = using or "true"
        policies.append(StoragePolicy(
            bucket=", ".join(buckets) if buckets else "(any bucket)", name=name, command=command,
            roles=list(roles), expression=expression, permissive=permissive, using=using, with_check=with_check,
            replacement=_replacement(command, buckets, public)))
    return policies


# ---------------------------------------------------------------------------------------------------------
# What a source lists and opens


@dataclass(frozen=True)
class ListedFile:
    """One entry of a source's listing. ``error`` says why its bytes could not be read (``check_bytes``)."""

    bucket: str
    key: str
    size: int | None
    etag: str | None
    error: str | None = None


class SourceStream:
    """An open download: the object's headers and its body, read piece by piece (never whole). A body that
    ends before ``size`` bytes raises StepFailed. Close it, or use it in a ``with``."""

    def __init__(self, where: str, bucket: str, key: str, size: int, etag: str | None, content_type: str | None,
                 cache_control: str | None, pieces: Iterator[bytes], close: Callable[[], None]):
        self.where, self.bucket, self.key = where, bucket, key
        self.size, self.etag, self.content_type, self.cache_control = size, etag, content_type, cache_control
        self._pieces, self._close = pieces, close
        self._buffer, self._offset = b"", 0
        self._read = 0
        self._done = False

    @property
    def md5(self) -> str | None:
        return s3.md5_of(self.etag or "", {})

    def _next_piece(self) -> bytes:
        if self._done:
            return b""
        for piece in self._pieces:
            if piece:
                self._read += len(piece)
                return piece
        self._done = True
        if self._read != self.size:
            raise StepFailed(f"{self.where} bucket '{self.bucket}' key {self.key!r}: the download ended after "
                             f"{self._read} of {self.size} bytes", bucket=self.bucket, key=self.key)
        return b""

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when negative); b"" at the end."""
        if size is None or size < 0:
            return b"".join([self._rest(), *iter(self._next_piece, b"")])
        parts, wanted = [], size
        while wanted > 0:
            if self._offset >= len(self._buffer):
                self._buffer, self._offset = self._next_piece(), 0
                if not self._buffer:
                    break
            part = self._buffer[self._offset:self._offset + wanted]
            self._offset += len(part)
            wanted -= len(part)
            parts.append(part)
        return b"".join(parts)

    def _rest(self) -> bytes:
        out = self._buffer[self._offset:]
        self._buffer, self._offset = b"", 0
        return out

    def iter_chunks(self) -> Iterator[bytes]:
        """The body as it arrives (pieces of up to 256 KiB)."""
        if rest := self._rest():
            yield rest
        yield from iter(self._next_piece, b"")

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "SourceStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StorageSource(ABC):
    """Supabase Storage's bytes, through one of its APIs."""

    #: where requests go, for messages
    endpoint: str
    #: True when a listed entry proves its bytes exist (S3); False when the listing is read from the rows (REST)
    listing_proves_bytes: bool

    @abstractmethod
    def list(self, bucket: str, prefix: str = "") -> Iterator[ListedFile]:
        """Every object under ``prefix``, in byte order of the key."""

    @abstractmethod
    def head(self, bucket: str, key: str) -> s3.ObjectInfo | None:
        """What the bytes' own headers say (size, ETag, MD5 when the ETag is one, types); None if no bytes."""

    @abstractmethod
    def open(self, bucket: str, key: str) -> SourceStream:
        """The object's bytes, streamed; raises ObjectMissing when there are none."""

    @abstractmethod
    def probe(self, bucket: str, key: str, size: int | None = None) -> ListedFile:
        """Whether the bytes of ``key`` are there, by reading its first byte (Supabase Storage answers HEAD
        and info from the row): the entry with the bytes' own size and ETag, or with ``error`` saying why
        there are none (not found; or HTTP 500 on ``liftoff.systems.s3.GONE_AFTER_500S`` reads in a row, as Storage's
        file backend answers; throttling and dropped connections are retried as any call is). ``size`` is the row's: 0 reads the whole (empty) object, as a range cannot address it.
        A refused key raises ConnectionRefused; any other failure StepFailed, never a guess."""

    @abstractmethod
    def check(self, bucket: str | None = None) -> None:
        """One cheap authenticated request; a refused key raises ConnectionRefused at once."""

    @abstractmethod
    def put(self, bucket: str, key: str, opener: Callable[[], Any], size: int, content_type: str | None,
            cache_control: str | None) -> None:
        """Stores the bytes ``opener()`` reads (a file-like object, opened anew for each attempt) as ``key``,
        replacing what is there: Storage writes the ``storage.objects`` row itself (the rollback carrying an
        app's upload back)."""

    @abstractmethod
    def remove(self, bucket: str, key: str) -> None:
        """Deletes ``key`` (its row and its bytes); a key that is not there raises ObjectMissing."""

    def close(self) -> None:
        """Releases what the source holds open (nothing, unless a subclass says otherwise)."""

    def __enter__(self) -> "StorageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# The S3 protocol


def s3_endpoint_url(project_url: str) -> str:
    """Supabase Storage's S3 endpoint of a project: ``https://<ref>.supabase.co/storage/v1/s3``."""
    return project_url.rstrip("/") + "/storage/v1/s3"


class S3Source(StorageSource):
    """Supabase Storage's S3-compatible endpoint (or any S3 server) through a ``liftoff.systems.s3.client``.

    ``listing="flat"`` (default) pages through ``ListObjectsV2`` as S3 defines it, in byte order of the key:
    Supabase Storage answers it from ``storage.objects`` ``COLLATE "C"``, AWS and MinIO keep that order too.
    Each key is checked against the one before, and a server that lists otherwise stops the listing with one
    line (never a silently wrong merge). ``listing="levels"`` is for such servers (SeaweedFS's filer lists folder
    by folder, so ``docs/a.pdf`` comes before ``docs-x.pdf``): one ``Delimiter="/"`` listing per folder, each
    level sorted here (a folder ``x/`` sorts as ``x/``), holding one level at a time.
    """

    listing_proves_bytes = True

    def __init__(self, client, *, retry: s3.RetryPolicy = s3.RetryPolicy(), page_size: int = 1000,
                 listing: str = "flat"):
        if listing not in ("flat", "levels"):
            raise ValueError(f"S3Source listing must be 'flat' or 'levels', got {listing!r}")
        self.client, self.retry, self.page_size, self.listing = client, retry, page_size, listing
        self.endpoint = client.meta.endpoint_url

    def list(self, bucket: str, prefix: str = "") -> Iterator[ListedFile]:
        if self.listing == "levels":
            yield from self._list_levels(bucket, prefix)
            return
        last: str | None = None
        for item in s3.list_objects(self.client, bucket, prefix, page_size=self.page_size, retry=self.retry):
            if last is not None and item.key <= last:
                raise StepFailed(f"S3 {self.endpoint} bucket '{bucket}': the listing gives {item.key!r} after "
                                 f"{last!r}, not in byte order of the key as S3 defines it; list this server "
                                 f"folder by folder (S3Source listing='levels')", bucket=bucket)
            last = item.key
            yield ListedFile(bucket, item.key, item.size, item.etag)

    def _level(self, bucket: str, prefix: str) -> list[tuple[str, ListedFile | None]]:
        """One folder level: (sort key, file) for each object, (folder prefix, None) for each folder."""
        entries: list[tuple[str, ListedFile | None]] = []
        token = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": self.page_size}
            if token:
                kwargs["ContinuationToken"] = token

            def page(kwargs=kwargs):
                with s3.tagged_with(self.client, bucket):
                    return self.client.list_objects_v2(**kwargs)

            answer = s3.call(self.retry, "list", page, self.client, bucket)
            entries += [(item["Key"], ListedFile(bucket, item["Key"], item["Size"], item.get("ETag", "").strip('"')))
                        for item in answer.get("Contents", [])]
            entries += [(folder["Prefix"], None) for folder in answer.get("CommonPrefixes", [])]
            token = answer.get("NextContinuationToken")
            if not answer.get("IsTruncated") or not token:
                return entries

    def _list_levels(self, bucket: str, prefix: str) -> Iterator[ListedFile]:
        entries = self._level(bucket, prefix)
        entries.sort(key=lambda e: e[0])
        for name, item in entries:
            if item is None:
                if name != prefix:  # a server naming the folder being listed would recurse forever
                    yield from self._list_levels(bucket, name)
            else:
                yield item

    def head(self, bucket: str, key: str) -> s3.ObjectInfo | None:
        return s3.head(self.client, bucket, key, retry=self.retry)

    def probe(self, bucket: str, key: str, size: int | None = None) -> ListedFile:
        found = s3.probe_bytes(self.client, bucket, key, size=size, retry=self.retry)
        return ListedFile(bucket, key, found.size, found.etag, error=found.missing)

    def open(self, bucket: str, key: str) -> SourceStream:
        def get():
            try:
                with s3.tagged_with(self.client, bucket):
                    return self.client.get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if s3.http_status(exc) == 404:
                    raise ObjectMissing(f"S3 {self.endpoint} bucket '{bucket}' key {key!r}: no such object "
                                        f"({s3.error_code(exc)})", bucket=bucket, key=key) from None
                raise

        answer = s3.call(self.retry, "download", get, self.client, bucket, key)
        body = answer["Body"]
        return SourceStream(f"S3 {self.endpoint}", bucket, key, answer["ContentLength"],
                            answer.get("ETag", "").strip('"') or None, answer.get("ContentType"),
                            answer.get("CacheControl"), body.iter_chunks(_CHUNK), body.close)

    def check(self, bucket: str | None = None) -> None:
        if bucket is None:
            s3.call(self.retry, "list buckets", self.client.list_buckets, self.client, "(all buckets)")
        else:
            next(iter(s3.list_objects(self.client, bucket, page_size=1, retry=self.retry)), None)

    def put(self, bucket: str, key: str, opener: Callable[[], Any], size: int, content_type: str | None,
            cache_control: str | None) -> None:
        extra = {k: v for k, v in (("ContentType", content_type), ("CacheControl", cache_control)) if v}
        s3.call(self.retry, "upload", lambda: self.client.upload_fileobj(opener(), bucket, key, ExtraArgs=extra),
                self.client, bucket, key)

    def remove(self, bucket: str, key: str) -> None:
        if self.head(bucket, key) is None:
            raise ObjectMissing(f"Supabase Storage {self.endpoint} bucket '{bucket}' key {key!r}: not there to "
                                "delete", bucket=bucket, key=key)
        s3.call(self.retry, "delete", lambda: self.client.delete_object(Bucket=bucket, Key=key), self.client, bucket,
                key)


# ---------------------------------------------------------------------------------------------------------
# The REST API


class _RestAnswer(Exception):
    """An error answer of Supabase Storage's REST API. storage-api answers most errors with HTTP 400 and the
    real status in the body's ``statusCode``; ``status`` is that one when present."""

    def __init__(self, http_status: int, status: int, error: str, message: str):
        super().__init__(f"{status} {error}: {message}" if message and message != error else f"{status} {error}")
        self.http_status, self.status, self.error, self.message = http_status, status, error, message

    @classmethod
    def of(cls, response: httpx.Response) -> "_RestAnswer":
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return cls(response.status_code, response.status_code, response.reason_phrase or "error", "")
        try:
            status = int(body.get("statusCode"))
        except (TypeError, ValueError):
            status = response.status_code
        return cls(response.status_code, status, str(body.get("error") or body.get("code") or "error"),
                   str(body.get("message") or ""))

    @classmethod
    def of_storage3(cls, exc) -> "_RestAnswer":
        try:
            status = int(exc.status)
        except (TypeError, ValueError):
            status = 0
        return cls(status, status, str(exc.code or "error"), str(exc.message or ""))

    @property
    def refused(self) -> bool:
        return self.status in (401, 403) or self.error in ("Unauthorized", "InvalidJWT", "AccessDenied")

    @property
    def transient(self) -> bool:
        return self.status >= 500 or self.http_status >= 500 or self.status == 429

    @property
    def no_bucket(self) -> bool:
        return self.status == 404 and self.error == "Bucket not found"

    @property
    def no_key(self) -> bool:
        return self.status == 404 and not self.no_bucket


_LIST_MAX = 1500  # storage.search's cap on one limit/offset page


@dataclass
class _ListPaging:
    """One listing's page size (shrunk by timeouts, kept for the rest of it) and what its calls cost."""

    size: int
    floor: int
    route: str = "list-v2"
    requests: int = 0
    seconds: float = 0.0


def _not_enabled(response: httpx.Response) -> bool:
    """listObjectsV2.ts's answer on a tenant whose database lacks the search-v2 migration."""
    try:
        body = response.json()
    except ValueError:
        return False
    return response.status_code == 400 and isinstance(body, dict) and \
        "FeatureNotEnabled" in (body.get("code"), body.get("error"))


def _rest_transient(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError) or (isinstance(exc, _RestAnswer) and exc.transient)


class RestSource(StorageSource):
    """Supabase Storage's REST API, as the ``supabase`` client reaches it with the project's service key.

    The listing asks ``POST /object/list-v2/{bucket}`` (storage-api's cursor-based listing) for every key
    under the prefix, ``with_delimiter: false``: the server answers in byte order (``name COLLATE "C"``, the
    inventory's order) from its index, ``page_size`` keys a call (1000, its cap), each page after the
    cursor naming the last key, so a page costs the same at any depth; each key is checked against the one
    before and a server that lists otherwise stops the listing with one line. The first listing of a source
    learns whether the server has that route: a 404 (``Route POST:/object/list-v2/... not found``, from a
    storage-api before it) or ``FeatureNotEnabled`` (a tenant without the search-v2 migration) makes this
    source use the limit/offset ``POST /object/list`` from then on (``offers_list_v2``): one folder level
    per call, ``page_size`` entries a page (capped at its 1500), each level sorted here into byte order (a
    folder ``x`` sorts as ``x/``), so the recursion yields the keys in the inventory's order while holding
    one level at a time; there the server walks the offset from the start of the level on every page.
    A listing call gets ``list_timeout`` seconds; one that times out is asked again at once for a quarter of
    the page (the smaller size kept for the rest of that listing), down to ``list_min_page`` entries; then
    timeouts are retried as any dropped connection and the last one fails with one line naming the URL, the
    route and the bucket. Each listing ends with one ``storage listed`` log line: route, objects, calls,
    page size, seconds spent in its calls. storage3's ``download`` returns the whole body as bytes and
    unquotes the key (a ``%`` in a key is misread), so downloads go to the same handler with httpx (``GET /object/authenticated/{bucket}/{key}``,
    which refuses a wrong key instead of serving it as anon), streamed, each path segment percent-encoded.
    ``head`` is that download's headers (the body is not read): Storage's own HEAD and info routes answer from
    the row, not the bytes.
    """

    listing_proves_bytes = False

    def __init__(self, project_url: str, service_key: str, *, page_size: int = 1000,
                 retry: s3.RetryPolicy = s3.RetryPolicy(), timeout: float = 60,
                 key_field: str = "the service key"):
        from supabase import create_client  # the supabase package is heavy: imported when used

        register_secret(service_key)
        self.project_url = project_url.rstrip("/")
        self.endpoint = self.project_url + "/storage/v1"
        self.page_size, self.retry, self.key_field = page_size, retry, key_field
        self.storage = create_client(self.project_url, service_key).storage
        self._http = httpx.Client(headers={"apikey": service_key, "Authorization": f"Bearer {service_key}"},
                                  timeout=httpx.Timeout(timeout, connect=10), follow_redirects=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RestSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls, retries, errors --------------------------------------------------------------------------

    def _where(self, bucket: str | None, key: str | None) -> str:
        return (f"Supabase Storage {self.endpoint}" + (f" bucket '{bucket}'" if bucket else "")
                + (f" key {key!r}" if key is not None else ""))

    def _run(self, what: str, fn: Callable, bucket: str | None = None, key: str | None = None, *,
             give_up: Callable[[], bool] | None = None):
        retrying = self.retry.retrying(_rest_transient, give_up=give_up, op=what, endpoint=self.endpoint,
                                       bucket=bucket, key=key)
        try:
            return retrying(fn)
        except LiftoffError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes one operator line
            answer = self._as_answer(exc)
            attempts = retrying.statistics.get("attempt_number", 1)
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            if answer is not None and answer.refused:
                raise ConnectionRefused(
                    f"{self._where(None, None)}: {what} refused ({answer}); check that {self.key_field} is the "
                    f"project's service_role key (Project Settings > API) and belongs to {self.project_url}",
                    endpoint=self.endpoint) from None
            if answer is not None and answer.no_bucket:
                raise StepFailed(f"{self._where(bucket, None)}: no such bucket ({answer}); check the bucket name "
                                 f"in storage.buckets", bucket=bucket) from None
            if answer is not None and answer.no_key:
                raise ObjectMissing(f"{self._where(bucket, key)}: no bytes ({answer})", bucket=bucket,
                                    key=key) from None
            if isinstance(exc, httpx.ConnectError):
                raise ConnectionRefused(f"{self._where(None, None)}: cannot connect{tries} "
                                        f"({error_line(exc)}); check the project URL and the network",
                                        endpoint=self.endpoint) from None
            reason = str(answer) if answer is not None else error_line(exc)
            hint = ("; Storage answers so for a row whose bytes are gone"
                    if answer is not None and answer.status == 500 and key is not None else "")
            raise StepFailed(f"{self._where(bucket, key)}: {what} failed{tries} ({reason}){hint}",
                             bucket=bucket, key=key) from None

    @staticmethod
    def _as_answer(exc: BaseException) -> _RestAnswer | None:
        from storage3.exceptions import StorageApiError

        if isinstance(exc, _RestAnswer):
            return exc
        if isinstance(exc, StorageApiError):
            return _RestAnswer.of_storage3(exc)
        return None

    def _storage3(self, fn: Callable):
        """A storage3 call whose error answers are retried like ours."""
        from storage3.exceptions import StorageApiError

        try:
            return fn()
        except StorageApiError as exc:
            raise _RestAnswer.of_storage3(exc) from None

    def _object_url(self, bucket: str, key: str, prefix: str = "authenticated/") -> str:
        # /object/authenticated/ is the same download as storage3's /object/, with strict auth: a refused key
        # is an AccessDenied there, where /object/ would take it for anon and answer "Bucket not found".
        # Uploads and deletes are /object/{bucket}/{key} (``prefix=""``).
        return (f"{self.endpoint}/object/{prefix}{quote(bucket, safe='')}/"
                + "/".join(quote(segment, safe="") for segment in key.split("/")))

    def _get(self, bucket: str, key: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """An open streamed GET of the object (status 2xx); the caller closes it."""
        response = self._http.send(self._http.build_request("GET", self._object_url(bucket, key), headers=headers),
                                   stream=True)
        if response.status_code >= 300:
            try:
                response.read()
            finally:
                response.close()
            raise _RestAnswer.of(response)
        return response

    # -- the interface -----------------------------------------------------------------------------------

    def check(self, bucket: str | None = None) -> None:
        if bucket is None:
            self._run("list buckets", lambda: self._storage3(self.storage.list_buckets))
        else:
            self._run("get bucket", lambda: self._storage3(lambda: self.storage.get_bucket(bucket)), bucket)

    # -- listing -----------------------------------------------------------------------------------------
    # list-v2 where the server serves it (one flat listing in byte order, paged by a cursor naming the last
    # key), else the limit/offset list, one folder level per call; see the class docstring.

    #: read timeout of one listing call (a page of 1000 from Storage's index takes milliseconds)
    list_timeout: float = 20.0
    #: a listing call that times out is asked again at once for a quarter of the page, down to this many
    list_min_page: int = 50
    #: whether the server has ``POST /object/list-v2``: None until the first listing asks, then remembered
    offers_list_v2: bool | None = None

    def _list_call(self, route: str, bucket: str, body: Callable[[int], dict], paging: "_ListPaging"):
        """(answer, the page size it was asked with) of one listing call, or (None, size) when the route is
        not served (storage-api's 404 ``Route POST:/object/list-v2/... not found``, or a tenant without the
        search-v2 migration's ``FeatureNotEnabled``). Error answers and dropped connections are retried as
        ``_run`` does; a timeout first shrinks the page."""
        url = f"{self.endpoint}/object/{route}/{quote(bucket, safe='')}"
        timeout = httpx.Timeout(self.list_timeout, connect=10)

        def call():
            while True:
                size, started = paging.size, time.monotonic()
                try:
                    response = self._http.post(url, json=body(size), timeout=timeout)
                except httpx.TimeoutException as exc:
                    if size <= paging.floor:
                        raise
                    paging.size = max(paging.floor, size // 4)
                    log.warning("storage list page timed out; asking for a smaller one", endpoint=self.endpoint,
                                bucket=bucket, route=f"POST /object/{route}", page=size, smaller=paging.size,
                                error=error_line(exc))
                    continue
                finally:
                    paging.requests += 1
                    paging.seconds += time.monotonic() - started
                if route == "list-v2" and (response.status_code == 404 or _not_enabled(response)):
                    return None, size
                if response.status_code >= 300:
                    raise _RestAnswer.of(response)
                return response.json(), size

        return self._run(f"listing (POST /object/{route})", call, bucket)

    def _listed(self, bucket: str, key: str, item: dict) -> ListedFile:
        metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
        etag = _text(metadata.get("eTag"))
        return ListedFile(bucket, key, _size(metadata.get("size")), etag.strip('"') if etag else None)

    def _list_flat(self, bucket: str, prefix: str, paging: "_ListPaging") -> Iterator[ListedFile]:
        """Every key under ``prefix`` through list-v2 without a delimiter; sets ``offers_list_v2``."""
        cursor, last = None, None
        while True:
            def body(limit: int, cursor=cursor) -> dict:
                return {"prefix": prefix, "limit": limit, "with_delimiter": False,
                        "sortBy": {"column": "name", "order": "asc"}, **({"cursor": cursor} if cursor else {})}

            answer, _ = self._list_call("list-v2", bucket, body, paging)
            if answer is None:
                self.offers_list_v2 = False
                return
            self.offers_list_v2 = True
            if not isinstance(answer, dict) or not isinstance(answer.get("objects"), list) or answer.get("folders"):
                raise StepFailed(f"{self._where(bucket, None)}: POST /object/list-v2 answered something else than "
                                 "a flat page ({hasNext, nextCursor, objects}, no folders)", bucket=bucket)
            for item in answer["objects"]:
                key = item.get("name") if isinstance(item, dict) else None
                if not isinstance(key, str) or (last is not None and key <= last):
                    raise StepFailed(f"{self._where(bucket, None)}: POST /object/list-v2 gives {key!r} after "
                                     f"{last!r}, not in byte order of the key", bucket=bucket)
                last = key
                yield self._listed(bucket, key, item)
            if not answer.get("hasNext"):
                return
            cursor = answer.get("nextCursor")
            if not cursor:
                raise StepFailed(f"{self._where(bucket, None)}: POST /object/list-v2 says there is more but gives "
                                 "no nextCursor", bucket=bucket)

    def _level(self, bucket: str, prefix: str, paging: "_ListPaging") -> list[tuple[str, bool, dict]]:
        """One folder level through the limit/offset list, every page: (name relative to prefix, is a folder,
        the item)."""
        entries, offset = [], 0
        while True:
            def body(limit: int, offset=offset) -> dict:
                return {"prefix": prefix, "limit": min(limit, _LIST_MAX), "offset": offset, "search": "",
                        "sortBy": {"column": "name", "order": "asc"}}

            page, size = self._list_call("list", bucket, body, paging)
            if not isinstance(page, list):
                raise StepFailed(f"{self._where(bucket, None)}: POST /object/list answered something else than a "
                                 "list of entries", bucket=bucket)
            entries += [(item["name"], item.get("id") is None, item) for item in page]
            if len(page) < min(size, _LIST_MAX):
                return entries
            offset += len(page)

    def _list_levels(self, bucket: str, folder: str, paging: "_ListPaging") -> Iterator[ListedFile]:
        entries = self._level(bucket, folder, paging)
        entries.sort(key=lambda e: e[0] + "/" if e[1] else e[0])
        for name, is_folder, item in entries:
            key = f"{folder}/{name}" if folder else name
            if is_folder:
                yield from self._list_levels(bucket, key, paging)
            else:
                yield self._listed(bucket, key, item)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ListedFile]:
        folder = prefix.rstrip("/")
        paging = _ListPaging(self.page_size, min(self.page_size, self.list_min_page))
        started, listed = time.monotonic(), 0
        if self.offers_list_v2 is not False:
            for entry in self._list_flat(bucket, f"{folder}/" if folder else "", paging):
                listed += 1
                yield entry
        if self.offers_list_v2 is False:
            paging.route = "list"
            for entry in self._list_levels(bucket, folder, paging):
                listed += 1
                yield entry
        log.info("storage listed", endpoint=self.endpoint, bucket=bucket, route=f"POST /object/{paging.route}",
                 objects=listed, requests=paging.requests, page=paging.size,
                 request_seconds=round(paging.seconds, 2), seconds=round(time.monotonic() - started, 2))

    def head(self, bucket: str, key: str) -> s3.ObjectInfo | None:
        try:
            response = self._run("download", lambda: self._get(bucket, key), bucket, key)
        except ObjectMissing:
            return None
        with contextlib.closing(response):
            return self._info(key, response)

    @staticmethod
    def _info(key: str, response: httpx.Response) -> s3.ObjectInfo:
        etag = (response.headers.get("etag") or "").strip('"')
        return s3.ObjectInfo(key=key, size=int(response.headers.get("content-length") or 0),
                             md5=s3.md5_of(etag, {}), etag=etag, content_type=response.headers.get("content-type"),
                             cache_control=response.headers.get("cache-control"),
                             content_disposition=response.headers.get("content-disposition"))

    def probe(self, bucket: str, key: str, size: int | None = None) -> ListedFile:
        statuses: list[int] = []
        answers: list[str] = []

        def first_byte() -> httpx.Response:
            try:
                return self._get(bucket, key, None if size == 0 else {"Range": "bytes=0-0"})
            except _RestAnswer as answer:
                statuses.append(answer.status)
                answers.append(str(answer))
                raise

        try:
            response = self._run("read the first byte", first_byte, bucket, key,
                                 give_up=lambda: s3.gone_after_500s(statuses))
        except ObjectMissing:
            return ListedFile(bucket, key, None, None, error=f"not found ({answers[-1] if answers else 404})")
        except StepFailed:
            if s3.gone_after_500s(statuses):
                return ListedFile(bucket, key, None, None, error=f"HTTP 500 on {s3.GONE_AFTER_500S} reads in a row, "
                                  "as Supabase Storage answers for a row whose bytes are gone")
            raise
        with contextlib.closing(response):
            if response.status_code == 206 or size == 0:
                response.read()  # one byte, or none
            etag = (response.headers.get("etag") or "").strip('"') or None
            return ListedFile(bucket, key, s3.total_size(list(response.headers.items()), response.status_code),
                              etag)

    def put(self, bucket: str, key: str, opener: Callable[[], Any], size: int, content_type: str | None,
            cache_control: str | None) -> None:
        def upload():
            body = opener()
            response = self._http.post(
                self._object_url(bucket, key, prefix=""), content=iter(lambda: body.read(_CHUNK), b""),
                headers={"x-upsert": "true", "Content-Length": str(size),
                         "Content-Type": content_type or "application/octet-stream",
                         **({"Cache-Control": cache_control} if cache_control else {})})
            if response.status_code >= 300:
                raise _RestAnswer.of(response)

        self._run("upload", upload, bucket, key)

    def remove(self, bucket: str, key: str) -> None:
        def delete():
            response = self._http.delete(self._object_url(bucket, key, prefix=""))
            if response.status_code >= 300:
                raise _RestAnswer.of(response)

        self._run("delete", delete, bucket, key)

    def open(self, bucket: str, key: str) -> SourceStream:
        response = self._run("download", lambda: self._get(bucket, key), bucket, key)
        info = self._info(key, response)
        return SourceStream(f"Supabase Storage {self.endpoint}", bucket, key, info.size, info.etag or None,
                            info.content_type, info.cache_control, response.iter_bytes(_CHUNK), response.close)


def check_bytes(source: StorageSource, listed: Iterable[ListedFile], *, concurrency: int = 8,
                proven: Callable[[ListedFile], bool] | None = None) -> Iterator[ListedFile]:
    """The listed entries, in order, each replaced by what reading its first byte says (``probe``: the
    bytes' own size and ETag, or ``error`` saying why there are none). A listing does not prove bytes:
    the REST listing is read from the rows, and so is Supabase Storage's S3 listing. Entries ``proven``
    accepts (the ledger's copied ones) pass unread. At most ``2 * concurrency`` entries are in flight; a
    refused key, or a read that fails other than as a missing file, stops it (never taken for no bytes).
    """
    def settle(item: ListedFile, future) -> ListedFile:
        if future is None:
            return item
        found = future.result()
        return replace(item, size=found.size if found.size is not None else item.size,
                       etag=found.etag or item.etag, error=found.error)

    window: deque = deque()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="storage-probe") as pool:
        for item in listed:
            read = None if proven is not None and proven(item) else pool.submit(source.probe, item.bucket, item.key,
                                                                                 item.size)
            window.append((item, read))
            if len(window) >= 2 * concurrency:
                yield settle(*window.popleft())
        while window:
            yield settle(*window.popleft())


# ---------------------------------------------------------------------------------------------------------
# Reconciliation: the inventory against a listing


@dataclass
class Finding:
    """One kind of disagreement: how many, how many bytes (the rows' sizes), and a few examples."""

    what: str
    count: int = 0
    bytes: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str, size: int | None, limit: int) -> None:
        self.count += 1
        self.bytes += size or 0
        if len(self.examples) < limit:
            self.examples.append(example)

    def line(self) -> str:
        more = f", and {self.count - len(self.examples)} more" if self.count > len(self.examples) else ""
        return f"{self.count} {self.what} ({self.bytes} bytes): {'; '.join(self.examples)}{more}"


@dataclass
class BucketTally:
    bucket: str
    rows: int = 0
    row_bytes: int = 0
    listed: int = 0
    listed_bytes: int = 0
    matched: int = 0
    problems: int = 0

    @property
    def row(self) -> dict:
        return {"bucket": self.bucket, "rows": self.rows, "row bytes": self.row_bytes, "listed": self.listed,
                "listed bytes": self.listed_bytes, "matched": self.matched, "problems": self.problems}


@dataclass
class Reconciliation:
    """What the inventory and a listing agree and disagree on. ``ok`` when every row has bytes of its size and
    every listed object has a row."""

    examples: int = DEFAULT_EXAMPLES
    buckets: dict[str, BucketTally] = field(default_factory=dict)
    rows_without_bytes: Finding = field(default_factory=lambda: Finding("rows without bytes"))
    bytes_without_row: Finding = field(default_factory=lambda: Finding("objects without a storage.objects row"))
    size_differs: Finding = field(default_factory=lambda: Finding("objects whose size differs from the row's"))
    rows_without_size: Finding = field(default_factory=lambda: Finding("rows without a size in their metadata"))
    listed_twice: Finding = field(default_factory=lambda: Finding("keys listed more than once"))
    #: every row without bytes, not only the examples: (bucket, key, the row's size, why), for the decision
    gone: list[tuple[str, str, int | None, str]] = field(default_factory=list)

    def tally(self, bucket: str) -> BucketTally:
        if bucket not in self.buckets:
            self.buckets[bucket] = BucketTally(bucket)
        return self.buckets[bucket]

    def findings(self) -> list[Finding]:
        return [f for f in (self.rows_without_bytes, self.bytes_without_row, self.size_differs,
                            self.rows_without_size, self.listed_twice) if f.count]

    @property
    def ok(self) -> bool:
        return not self.findings()

    def failures(self) -> list[str]:
        return self.lines()

    def lines(self) -> list[str]:
        """One line per kind of disagreement, with examples; empty when rows and bytes agree."""
        return [f.line() for f in self.findings()]

    def summary(self) -> str:
        counts = "; ".join(f"{t.bucket}: {t.rows} rows ({t.row_bytes} bytes), {t.listed} listed "
                           f"({t.listed_bytes} bytes)" for t in self.buckets.values())
        verdict = "rows and bytes agree" if self.ok else ", ".join(f"{f.count} {f.what}" for f in self.findings())
        return f"{counts or 'no objects'}: {verdict}"


def reconcile(inventory_rows: Iterable[SourceObject], listed: Iterable, *, bucket: str | None = None,
              examples: int = DEFAULT_EXAMPLES) -> Reconciliation:
    """Merges the inventory (``inventory``) with a listing (a ``StorageSource.list``, ``check_bytes`` of one,
    or ``liftoff.systems.s3.list_objects``), both in byte order of (bucket, key), holding only the current pair.

    A listed entry without a ``bucket`` belongs to ``bucket`` (default: the inventory's first row's). An entry
    with ``error`` is a row whose bytes could not be read. Sizes are compared when the row has one. Raises
    ValueError if either stream is out of order: a merge of unsorted streams would report false differences.
    """
    rec = Reconciliation(examples=examples)
    rows, items = iter(inventory_rows), iter(listed)
    row, item = next(rows, None), next(items, None)
    default_bucket = bucket or (row.bucket if row is not None else "")
    last_row: tuple[str, str] | None = None
    last_item: tuple[str, str] | None = None

    def item_key(entry) -> tuple[str, str]:
        return getattr(entry, "bucket", None) or default_bucket, entry.key

    def next_row():
        nonlocal row, last_row
        last_row = (row.bucket, row.key)
        row = next(rows, None)
        if row is not None and (row.bucket, row.key) <= last_row:
            raise ValueError(f"inventory not in key order: {row.bucket}/{row.key} after {'/'.join(last_row)}")

    def next_item():
        nonlocal item, last_item
        last_item = item_key(item)
        while True:
            item = next(items, None)
            if item is None or item_key(item) > last_item:
                return
            if item_key(item) < last_item:
                raise ValueError(f"listing not in key order: {'/'.join(item_key(item))} after {'/'.join(last_item)}")
            b, k = item_key(item)
            rec.listed_twice.add(f"{b}/{k}", None, examples)
            rec.tally(b).problems += 1

    def count_row(r: SourceObject) -> BucketTally:
        t = rec.tally(r.bucket)
        t.rows += 1
        t.row_bytes += r.size or 0
        return t

    def count_item(entry) -> BucketTally:
        t = rec.tally(item_key(entry)[0])
        if not getattr(entry, "error", None):
            t.listed += 1
            t.listed_bytes += entry.size or 0
        return t

    while row is not None or item is not None:
        rk = (row.bucket, row.key) if row is not None else None
        ik = item_key(item) if item is not None else None
        if ik is None or (rk is not None and rk < ik):
            count_row(row).problems += 1
            rec.rows_without_bytes.add(f"{row.bucket}/{row.key} (not listed)", row.size, examples)
            rec.gone.append((row.bucket, row.key, row.size, "not listed"))
            next_row()
        elif rk is None or ik < rk:
            count_item(item).problems += 1
            rec.bytes_without_row.add(f"{ik[0]}/{ik[1]} ({item.size} bytes)", item.size, examples)
            next_item()
        else:
            tally = count_row(row)
            count_item(item)
            error = getattr(item, "error", None)
            if error:
                tally.problems += 1
                rec.rows_without_bytes.add(f"{row.bucket}/{row.key} ({error})", row.size, examples)
                rec.gone.append((row.bucket, row.key, row.size, error))
            elif row.size is None:
                tally.problems += 1
                listed_size = f"listed with {item.size} bytes" if item.size is not None else "no size listed either"
                rec.rows_without_size.add(f"{row.bucket}/{row.key} ({listed_size})", item.size, examples)
            elif item.size is not None and item.size != row.size:
                tally.problems += 1
                rec.size_differs.add(f"{row.bucket}/{row.key} (row {row.size}, bytes {item.size})", row.size,
                                     examples)
            else:
                tally.matched += 1
            next_row()
            next_item()
    return rec
