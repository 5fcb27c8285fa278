"""The CDN in front of the public files (the runbook's ``cdn``), checked as the plan sets it up: the files host
(``storage.target.public_url``'s) resolves through the CDN (a CNAME to it, or its addresses); an object of a
public bucket fetched through it twice, from the address the name resolved to, has the target's bytes (size and
MD5, read from the target's S3 server with the runbook's keys) both times; and the answers carry the cache
headers the runbook expects (Cache-Control max-age at least ``cdn.min_max_age_s``, and a cache HIT on the
second fetch). A plain function returning a report of lines; reads only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import quote, urlsplit

from liftoff.checks import FAILED, NOT_CHECKED, PASSED, CheckLine, CheckReport
from liftoff.logs import get_logger
from liftoff.redaction import one_line
from liftoff.runbooks.model import Runbook
from liftoff.systems import dns
from liftoff.systems.cdn import fetch_through, through_cdn
from liftoff.tasks.prepare.access import PROBE_PREFIX
from liftoff.tasks.storage.common import target_bucket, target_client

log = get_logger(phase="storage")

DNS_LINE, BYTES_LINE, HEADERS_LINE = "CDN resolves the files host", "CDN serves the target's bytes", "CDN cache headers"


@dataclass(frozen=True)
class CdnReport(CheckReport):
    label: ClassVar[str] = "CDN check"


def cdn_not_configured(rb: Runbook) -> str | None:
    """Why the CDN cannot be checked (None: it can)."""
    if rb.cdn is None:
        return "no CDN in the runbook (cdn: cname or addresses)"
    if rb.storage.target is None:
        return "no storage.target: the files host is storage.target.public_url's"
    return None


def _probe_object(rb: Runbook) -> tuple[str, str] | str:
    """(bucket, key) of the object to fetch, or why there is none."""
    cdn = rb.cdn
    bucket = cdn.bucket or next((b.name for b in rb.storage.buckets if b.public), None)
    if bucket is None:
        return "no public bucket in storage.buckets (or cdn.bucket): nothing the CDN serves to fetch"
    if cdn.key:
        return bucket, cdn.key
    client = target_client(rb)
    page = client.list_objects_v2(Bucket=target_bucket(rb, bucket), MaxKeys=20)
    key = next((o["Key"] for o in page.get("Contents", []) if not o["Key"].startswith(PROBE_PREFIX)), None)
    return (bucket, key) if key else f"bucket {target_bucket(rb, bucket)} on the target is empty: no object to fetch"


def check_cdn(rb: Runbook) -> CdnReport:
    cdn, target = rb.cdn, rb.storage.target
    host = urlsplit(target.public_url).hostname
    try:
        found = dns.lookup(host, cdn.resolver)
    except Exception as exc:  # a name that does not resolve fails every line: nothing can be fetched
        why = one_line(str(exc))
        return CdnReport([CheckLine(DNS_LINE, FAILED, why, f"point {host} at the CDN (a proxied CNAME)"),
                          CheckLine(BYTES_LINE, NOT_CHECKED, f"{host} did not resolve"),
                          CheckLine(HEADERS_LINE, NOT_CHECKED, f"{host} did not resolve")])
    ok, seen = through_cdn(found, cdn.cname, cdn.addresses)
    how = " or ".join(filter(None, [f"a CNAME to {cdn.cname}" if cdn.cname else "",
                                    f"addresses in {', '.join(cdn.addresses)}" if cdn.addresses else ""]))
    lines = [CheckLine(DNS_LINE, PASSED, f"{seen} ({found.resolver})") if ok else
             CheckLine(DNS_LINE, FAILED, f"{seen} ({found.resolver}): not through the CDN (expected {how})",
                       f"make {host} a proxied record at the CDN (Cloudflare: the orange cloud on), or correct "
                       "cdn.cname / cdn.addresses")]
    probe = _probe_object(rb)
    if isinstance(probe, str):
        return CdnReport(lines + [CheckLine(BYTES_LINE, NOT_CHECKED, probe, "name one with cdn.bucket and cdn.key"),
                                  CheckLine(HEADERS_LINE, NOT_CHECKED, probe, "name one with cdn.bucket and cdn.key")])
    bucket, key = probe
    tbucket = target_bucket(rb, bucket)
    url = f"{target.public_url.rstrip('/')}/{quote(tbucket, safe='')}/{quote(key, safe='/')}"
    fetched = [fetch_through(url, found.answers[0]) for _ in range(2)]  # the second is the one a cache answers
    held = target_client(rb).get_object(Bucket=tbucket, Key=key)["Body"].read()
    lines.append(_bytes_line(url, fetched, held, cdn.cache_status_header))
    lines.append(_headers_line(rb, fetched[-1]))
    report = CdnReport(lines)
    log.info("CDN check", ok=report.ok, url=url)
    return report


def _bytes_line(url: str, fetched, held: bytes, status_header: str | None) -> CheckLine:
    want = hashlib.md5(held).hexdigest()
    for n, got in enumerate(fetched, 1):
        if got.status != 200:
            return CheckLine(BYTES_LINE, FAILED, f"GET {url} (fetch {n}) answered {got.status}",
                             "check the CDN's origin (the target's S3 server) and that the bucket is public")
        md5 = hashlib.md5(got.body).hexdigest()
        if md5 != want:
            cache = (got.header(status_header) if status_header else None) or "no cache status"
            return CheckLine(BYTES_LINE, FAILED, f"GET {url} (fetch {n}, {cache}): {len(got.body)} bytes, MD5 {md5}; "
                             f"the target holds {len(held)} bytes, MD5 {want}",
                             "purge the CDN's cache for the files host, then check again")
    return CheckLine(BYTES_LINE, PASSED, f"GET {url}: {len(held)} bytes, MD5 {want}, as on the target "
                                         f"({len(fetched)} fetches)")


def _headers_line(rb: Runbook, got) -> CheckLine:
    cdn = rb.cdn
    problems, seen = [], [f"Cache-Control {got.header('cache-control')!r}"]
    if got.max_age is None or got.max_age < cdn.min_max_age_s:
        problems.append(f"Cache-Control max-age {got.max_age if got.max_age is not None else 'absent'} is under "
                        f"cdn.min_max_age_s {cdn.min_max_age_s}")
    if cdn.cache_status_header:
        status = got.header(cdn.cache_status_header)
        seen.append(f"{cdn.cache_status_header} {status} on the second fetch")
        if (status or "").upper() != "HIT":
            problems.append(f"{cdn.cache_status_header} is {status or 'absent'} on the second fetch, not HIT")
    if problems:
        return CheckLine(HEADERS_LINE, FAILED, "; ".join(problems),
                         "set the CDN's cache rule for the files host (the plan: images cached a month, Edge and "
                         "Browser TTL), then check again")
    return CheckLine(HEADERS_LINE, PASSED, "; ".join(seen))
