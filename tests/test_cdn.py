"""The CDN check against real parts: the target's S3 server (SeaweedFS) with a public bucket, a caching HTTP
stand-in for the CDN (liftoff_sandbox.cdn) whose origin is that server, and the sandbox's authoritative DNS
server holding the files host (a CNAME to the CDN, or an A record). A stale edge, short cache headers and a
record that is not proxied each fail the line that names them; the checklist's line folds the report."""

from __future__ import annotations

import hashlib

import pytest

from liftoff.checks import FAILED, NOT_CHECKED, PASSED
from liftoff.runbooks.model import Runbook
from liftoff.systems import s3
from liftoff.tasks.cutover.checklist import cdn_line
from liftoff.tasks.storage.cdn import BYTES_LINE, DNS_LINE, HEADERS_LINE, check_cdn
from liftoff_sandbox.cdn import CdnStandIn
from liftoff_sandbox.dns import DnsServer
from liftoff_sandbox.s3 import S3Server

FILES = "files.crm.test"
EDGE = "crm.cdn.example.net"
KEY = "tours/lisbon.jpg"
IMAGE = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40


@pytest.fixture(scope="module")
def target_s3(module_env):
    with S3Server() as server:
        client = server.client()
        s3.ensure_bucket(client, "tour-images", True)
        s3.ensure_bucket(client, "waivers", False)
        module_env.setenv("CDN_TEST_S3_KEY", server.access_key)
        module_env.setenv("CDN_TEST_S3_SECRET", server.secret_key)
        yield server


@pytest.fixture
def image(target_s3):
    target_s3.client().put_object(Bucket="tour-images", Key=KEY, Body=IMAGE, ContentType="image/jpeg")
    return IMAGE


@pytest.fixture
def cdn(target_s3):
    with CdnStandIn(target_s3.endpoint_url) as server:
        yield server


@pytest.fixture(scope="module")
def zone():
    with DnsServer({FILES: ("CNAME", 300, [f"{EDGE}."]), EDGE: ("A", 60, ["127.0.0.1"])}) as server:
        yield server


def runbook(tmp_path, target_s3, cdn, zone, files_host: str = FILES, **settings) -> Runbook:
    pg = {"host": "127.0.0.1", "port": 1, "user": "postgres", "password": {"env": "UNUSED_PG_PASSWORD"}}
    return Runbook.model_validate({
        "name": "cdn-test", "state_dir": str(tmp_path / "state"), "source": pg, "target": {"direct": pg},
        "storage": {"buckets": [{"name": "waivers"}, {"name": "tour-images", "public": True}],
                    "target": {"endpoint_url": target_s3.endpoint_url, "access_key_id": {"env": "CDN_TEST_S3_KEY"},
                               "secret_access_key": {"env": "CDN_TEST_S3_SECRET"},
                               "public_url": f"http://{files_host}:{cdn.port}"}},
        "cdn": {"cname": "cdn.example.net", "resolver": zone.resolver, **settings}})


def statuses(report) -> dict[str, str]:
    return {line.name: line.status for line in report.lines}


def test_a_cname_to_the_cdn_serving_the_targets_bytes_cached_a_month_passes(tmp_path, target_s3, image, cdn, zone):
    report = check_cdn(runbook(tmp_path, target_s3, cdn, zone))

    assert statuses(report) == {DNS_LINE: PASSED, BYTES_LINE: PASSED, HEADERS_LINE: PASSED}, report.rows()
    assert report.line(DNS_LINE).detail.startswith(f"{FILES} -> {EDGE} -> 127.0.0.1")
    assert f"{len(image)} bytes, MD5 {hashlib.md5(image).hexdigest()}, as on the target" in report.line(BYTES_LINE).detail
    assert report.line(HEADERS_LINE).detail == ("Cache-Control 'public, max-age=2592000'; cf-cache-status HIT on "
                                                "the second fetch")
    # what the check read went through the CDN, asked for the files host, not to the S3 server directly
    assert cdn.requests == [(f"{FILES}:{cdn.port}", f"/tour-images/{KEY}", "MISS"),
                            (f"{FILES}:{cdn.port}", f"/tour-images/{KEY}", "HIT")]
    assert cdn_line(runbook(tmp_path, target_s3, cdn, zone)).status == PASSED


def test_a_stale_edge_fails_naming_both_md5s_and_passes_after_a_purge(tmp_path, target_s3, image, cdn, zone):
    rb = runbook(tmp_path, target_s3, cdn, zone)
    assert check_cdn(rb).ok  # the edge now holds the image
    changed = image[::-1]
    target_s3.client().put_object(Bucket="tour-images", Key=KEY, Body=changed, ContentType="image/jpeg")

    report = check_cdn(rb)

    assert statuses(report)[BYTES_LINE] == FAILED and statuses(report)[DNS_LINE] == PASSED
    detail = report.line(BYTES_LINE).detail
    assert f"MD5 {hashlib.md5(image).hexdigest()}; the target holds {len(changed)} bytes, MD5 " \
           f"{hashlib.md5(changed).hexdigest()}" in detail and "(fetch 1, HIT)" in detail
    assert "purge the CDN's cache" in report.line(BYTES_LINE).fix
    line = cdn_line(rb)
    assert line.status == FAILED and line.detail.startswith(f"{BYTES_LINE}: GET http://{FILES}:{cdn.port}/tour-images/")

    cdn.purge()
    assert check_cdn(rb).ok


def test_short_cache_headers_and_a_record_not_proxied_fail_their_lines(tmp_path, target_s3, image, cdn, zone):
    cdn.max_age = 3600
    report = check_cdn(runbook(tmp_path, target_s3, cdn, zone, cache_status_header="x-cache"))
    assert statuses(report) == {DNS_LINE: PASSED, BYTES_LINE: PASSED, HEADERS_LINE: FAILED}
    assert report.line(HEADERS_LINE).detail == ("Cache-Control max-age 3600 is under cdn.min_max_age_s 2592000; "
                                                "x-cache is absent on the second fetch, not HIT")

    # a grey-clouded record: the files host answers the VPS's own address, not the CDN's ranges
    zone.set("direct.crm.test", "A", 300, ["127.0.0.1"])
    report = check_cdn(runbook(tmp_path, target_s3, cdn, zone, "direct.crm.test", cname=None,
                               addresses=["104.16.0.0/13", "172.64.0.0/13"], min_max_age_s=3600))
    assert statuses(report) == {DNS_LINE: FAILED, BYTES_LINE: PASSED, HEADERS_LINE: PASSED}
    assert report.line(DNS_LINE).detail.startswith("direct.crm.test -> 127.0.0.1 (resolver 127.0.0.1:")
    assert "not through the CDN (expected addresses in 104.16.0.0/13, 172.64.0.0/13)" in report.line(DNS_LINE).detail
    # the same record with the CDN's range named passes
    assert check_cdn(runbook(tmp_path, target_s3, cdn, zone, "direct.crm.test", cname=None,
                             addresses=["127.0.0.0/8"], min_max_age_s=3600)).ok


def test_without_a_cdn_in_the_runbook_the_line_is_not_checked(tmp_path, target_s3, cdn, zone):
    rb = runbook(tmp_path, target_s3, cdn, zone).model_copy(update={"cdn": None})
    line = cdn_line(rb)
    assert line.status == NOT_CHECKED and "no CDN in the runbook" in line.detail
    with pytest.raises(ValueError, match="cname .* or addresses"):
        runbook(tmp_path, target_s3, cdn, zone, cname=None)
