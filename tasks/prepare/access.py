"""Every access the runbook will need, each checked by one cheap authenticated request that changes nothing
(the backup destination's probe object is written, read back and deleted). One ``CheckLine`` per access:
passed, failed (with the field to fix) or "not checked" (not in the runbook). A check that raises becomes
its own failed line and never stops the others; details pass the redaction module.

The pre-cutover checklist reads the target's services with the same functions (``target_postgres_answers``
...), so "answers" means one thing in both places.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from liftoff.checks import FAILED, NOT_CHECKED, PASSED, CheckLine, failed_line
from liftoff.errors import LiftoffError
from liftoff.redaction import error_line, one_line, redact
from liftoff.runbooks.model import RedisEndpoint, Runbook
from liftoff.systems import dns, postgres, redis_server, s3

PROBE_TIMEOUT_S = 5
PROBE_PREFIX = "liftoff-probe-"  # probe objects Liftoff writes and deletes at once; no "/" (SeaweedFS keeps a folder behind)


def checked(name: str, check: Callable[[], CheckLine], fix: str = "") -> CheckLine:
    """Runs one check; whatever it raises becomes its failed line (one line, no secret) with ``fix``."""
    try:
        line = check()
    except LiftoffError as exc:  # a secret, a credential or a host to fix: a line that could not run (exit 2)
        line = failed_line(name, exc, one_line(str(exc)), fix)
    except Exception as exc:  # noqa: BLE001 - a check's failure is its line, never the list's
        line = CheckLine(name, FAILED, error_line(exc), fix)
    return CheckLine(line.name, line.status, redact(line.detail), redact(line.fix), line.blocked)


def unchecked(name: str, why: str, fix: str) -> CheckLine:
    return CheckLine(name, NOT_CHECKED, why, fix)


FIXES = {
    "source PostgreSQL answers": "correct source (host, port, user, password); on Supabase use the direct host or "
                                 "the session pooler (port 5432), not the transaction pooler",
    "source Storage answers": "correct storage.source (its S3 access keys, or service_key for protocol rest)",
    "target PostgreSQL answers": "start PostgreSQL on the target, or correct target.direct (host, port, user, "
                                 "password)",
    "PgBouncer answers": "start PgBouncer on the target, or correct target.pooled; check its userlist/auth_query",
    "Redis answers": "start Redis on the target, or correct target.redis (host, port, password)",
    "target S3 server answers": "start the S3 server (MinIO) on the target, or correct storage.target "
                                "(endpoint_url, keys)",
    "backup destination writable": "correct backups.destination (endpoint_url, bucket, keys); the key needs "
                                   "write, read and delete on the bucket",
    "SSH to the VPS": "correct ssh (host, port, user, private_key) and ssh.known_hosts (the VPS's pinned host key)",
    "Coolify API": "correct cutover.switch.coolify (url, token, applications)",
    "DNS record": "correct cutover.checklist.dns (name, resolver), or create the record at the DNS provider",
}


# ---------------------------------------------------------------------------------------------------------
# The source


def _postgres_answers(name: str, ep, field: str) -> CheckLine:
    with postgres.session(ep, field, text_settings=False, attempts=1) as conn:
        version = conn.execute("SELECT current_setting('server_version')").fetchone()[0]
    return CheckLine(name, PASSED, f"{ep.where}: PostgreSQL {version} answered")


def _probe_client(access, field: str):
    """An S3 client for one probe: short timeouts, two connections."""
    from liftoff.tasks.storage.common import endpoint

    return s3.client(endpoint(access, field), max_pool_connections=2, connect_timeout=PROBE_TIMEOUT_S,
                     read_timeout=PROBE_TIMEOUT_S * 2)


def source_postgres_answers(rb: Runbook) -> CheckLine:
    return _postgres_answers("source PostgreSQL answers", rb.source, "source")


def source_storage_answers(rb: Runbook) -> CheckLine:
    name = "source Storage answers"
    if rb.storage.source is None:
        return unchecked(name, "no Supabase Storage in the runbook (storage.source)",
                         "add storage.source if the app keeps files in Supabase Storage")
    from liftoff.tasks.storage.common import storage_source

    src = storage_source(rb)
    try:
        src.check()
        for bucket in rb.storage.buckets:
            src.check(bucket.name)
    finally:
        src.close()
    how = "its REST API with the service key" if rb.storage.source.protocol == "rest" else "its S3 endpoint"
    return CheckLine(name, PASSED, f"{rb.storage.source.project_url}: {how} listed the buckets and opened "
                     f"{len(rb.storage.buckets)} of the runbook's")


# ---------------------------------------------------------------------------------------------------------
# The target's services


def target_postgres_answers(rb: Runbook) -> CheckLine:
    return _postgres_answers("target PostgreSQL answers", rb.target.direct, "target.direct")


def pgbouncer_answers(rb: Runbook) -> CheckLine:
    ep = rb.target.pooled
    if ep is None:
        return unchecked("PgBouncer answers", "no PgBouncer in the runbook (target.pooled)",
                         "add target.pooled (the apps' connection through PgBouncer), or check it by hand")
    # Transaction pooling: no prepared statements (psycopg's would land on another server connection), and
    # no session settings.
    with postgres.session(ep, "target.pooled", pooled=True, text_settings=False, attempts=1) as conn:
        answer = conn.execute("SELECT 1").fetchone()[0]
    if answer != 1:
        return CheckLine("PgBouncer answers", FAILED, f"{ep.where}: SELECT 1 answered {answer!r}",
                         FIXES["PgBouncer answers"])
    return CheckLine("PgBouncer answers", PASSED, f"{ep.where}: SELECT 1 answered through PgBouncer")


def redis_answers(endpoint: RedisEndpoint | None) -> CheckLine:
    if endpoint is None:
        return unchecked("Redis answers", "no Redis in the runbook (target.redis)",
                         "add target.redis, or check Redis by hand")
    redis_server.ping(endpoint)
    return CheckLine("Redis answers", PASSED, f"target.redis ({endpoint.host}:{endpoint.port}): PING answered PONG")


def target_s3_answers(rb: Runbook) -> CheckLine:
    target = rb.storage.target
    if target is None:
        return unchecked("target S3 server answers", "no S3 server in the runbook (storage.target)",
                         "add storage.target, or check the S3 server by hand")
    client = _probe_client(target, "storage.target")
    answer = s3.call(s3.RetryPolicy(attempts=2, max_seconds=15), "list buckets", client.list_buckets, client,
                     "(all buckets)")
    detail = f"{target.endpoint_url}: an authenticated list_buckets answered ({len(answer.get('Buckets', []))} buckets)"
    live = s3.minio_live(target.endpoint_url)
    if live is not None:
        detail += f"; MinIO's /minio/health/live answered {live}"
    return CheckLine("target S3 server answers", PASSED, detail)


def test_upload(rb: Runbook, bucket: str, public: bool) -> CheckLine:
    """The plan's "storage working with test uploads": a probe object put into the bucket through the target
    S3 server with the runbook's keys, read back anonymously through the same endpoint (the bytes, for a
    public bucket; refused, for a private one), then deleted. Proves the keys write, the bucket exists and its
    access rule holds for a new object; a CDN or proxy in front of ``public_url`` is not read here."""
    from liftoff.tasks.storage.common import target_bucket

    name = f"test upload to {bucket}"
    target = rb.storage.target
    tbucket = target_bucket(rb, bucket)
    client = _probe_client(target, "storage.target")
    key, body = f"{PROBE_PREFIX}{secrets.token_hex(8)}.txt", secrets.token_bytes(24)
    retry = s3.RetryPolicy(attempts=2, max_seconds=15)
    s3.call(retry, "put probe", lambda: client.put_object(Bucket=tbucket, Key=key, Body=body,
                                                          ContentType="text/plain"), client, tbucket, key)
    try:
        proof = s3.prove_bucket_access(target.endpoint_url, tbucket, key, public, retry=retry)
        read = s3.anonymous_get(target.endpoint_url, tbucket, key) if public else None
    finally:
        s3.call(retry, "delete probe", lambda: client.delete_object(Bucket=tbucket, Key=key), client, tbucket, key)
    rule = "public: anonymous download" if public else "private: no anonymous access"
    fix = (f"set the bucket's access as storage.buckets says ({rule}): re-run liftoff run storage, which sets it")
    if proof.problems:
        return CheckLine(name, FAILED, f"{target.endpoint_url} bucket {tbucket}: " + "; ".join(proof.problems), fix)
    if public and read != body:
        return CheckLine(name, FAILED, f"{target.endpoint_url} bucket {tbucket}: the anonymous read of the probe "
                         "object gave other bytes than were written", "check the S3 server and any cache in front")
    how = "read back anonymously" if public else "refused anonymously (403)"
    return CheckLine(name, PASSED, f"{target.endpoint_url} bucket {tbucket} ({rule}): a probe object written, "
                     f"{how}, deleted")


# ---------------------------------------------------------------------------------------------------------
# Where the backups go, the VPS, Coolify, DNS


def backup_destination_writable(rb: Runbook, write_probe: bool = True) -> CheckLine:
    """A probe object written, read back and deleted; with ``write_probe`` False (a dry run), one key listed."""
    name = "backup destination writable"
    if rb.backups is None:
        return unchecked(name, "no backups in the runbook (backups.destination)",
                         "add backups (the plan's B2 bucket) before the cutover")
    dest = rb.backups.destination
    client = _probe_client(dest, "backups.destination")
    key, body = f"{PROBE_PREFIX}{secrets.token_hex(8)}", secrets.token_bytes(32)
    retry = s3.RetryPolicy(attempts=2, max_seconds=15)
    if not write_probe:
        s3.call(retry, "list", lambda: client.list_objects_v2(Bucket=dest.bucket, MaxKeys=1), client, dest.bucket)
        return CheckLine(name, PASSED, f"{dest.endpoint_url} bucket {dest.bucket}: listed (a dry run writes no "
                         "probe object; the real run writes, reads back and deletes one)")
    s3.call(retry, "put probe", lambda: client.put_object(Bucket=dest.bucket, Key=key, Body=body), client,
            dest.bucket, key)
    try:
        read = s3.call(retry, "get probe", lambda: client.get_object(Bucket=dest.bucket, Key=key)["Body"].read(),
                       client, dest.bucket, key)
    finally:
        s3.call(retry, "delete probe", lambda: client.delete_object(Bucket=dest.bucket, Key=key), client,
                dest.bucket, key)
    if read != body:
        return CheckLine(name, FAILED, f"{dest.endpoint_url} bucket {dest.bucket}: the probe object read back "
                         "differs from what was written", "check the S3 server's health")
    return CheckLine(name, PASSED, f"{dest.endpoint_url} bucket {dest.bucket}: a probe object written, read back "
                     "and deleted")


def ssh_answers(rb: Runbook) -> CheckLine:
    name = "SSH to the VPS"
    if rb.ssh is None:
        return unchecked(name, "no VPS in the runbook (ssh)", "add ssh if a step acts on the VPS")
    from liftoff.systems.remote import Remote

    with Remote(rb.ssh) as remote:
        result = remote.run("true", timeout=30, check=False)
    if result.rc != 0:
        return CheckLine(name, FAILED, f"ssh {rb.ssh.user}@{rb.ssh.host}:{rb.ssh.port}: `true` exited {result.rc}",
                         FIXES[name])
    return CheckLine(name, PASSED, f"{rb.ssh.user}@{rb.ssh.host}:{rb.ssh.port}: logged in with the key, host key "
                     f"as pinned in {rb.ssh.known_hosts.name}")


def coolify_answers(rb: Runbook) -> CheckLine:
    name = "Coolify API"
    switch = rb.cutover.switch
    if switch is None or switch.driver != "coolify":
        return unchecked(name, "the runbook switches no apps through Coolify (cutover.switch.driver)",
                         "nothing to do unless the apps are deployed by Coolify")
    from liftoff.systems.coolify import TOKEN_FIELD, CoolifyClient

    settings = switch.coolify
    client = CoolifyClient(settings.url, settings.token.resolve(TOKEN_FIELD), attempts=2)
    try:
        found = {uuid: client.application(uuid) for uuid in settings.applications}
    finally:
        client.close()
    missing = [uuid for uuid, app in found.items() if app is None]
    if missing:
        return CheckLine(name, FAILED, f"{settings.url}: the token's team has no application "
                         f"{', '.join(missing)}", "correct cutover.switch.coolify.applications (the UUID on each "
                         "application's page), or use a token of the team that owns them")
    names = ", ".join(app.get("name") or uuid for uuid, app in found.items())
    return CheckLine(name, PASSED, f"{settings.url}: the token reads every application of the runbook ({names})")


def dns_record_exists(rb: Runbook) -> CheckLine:
    name = "DNS record"
    check = rb.cutover.checklist.dns
    if check is None:
        return unchecked(name, "no public record in the runbook (cutover.checklist.dns)",
                         "add cutover.checklist.dns (name, resolver) to have its TTL checked before the cutover")
    found = dns.lookup(check.name, check.resolver)
    return CheckLine(name, PASSED, f"{check.name}: {', '.join(found.answers)} (TTL {found.ttl} s, from {found.resolver})")


def access_checks(write_probe: bool = True) -> tuple[tuple[str, Callable[[Runbook], CheckLine]], ...]:
    """Every access of the runbook, in the order a migration needs them; ``write_probe`` False (a dry run):
    the backup destination is listed, not written to."""
    return (
        ("source PostgreSQL answers", source_postgres_answers),
        ("source Storage answers", source_storage_answers),
        ("target PostgreSQL answers", target_postgres_answers),
        ("PgBouncer answers", pgbouncer_answers),
        ("Redis answers", lambda rb: redis_answers(rb.target.redis)),
        ("target S3 server answers", target_s3_answers),
        ("backup destination writable", lambda rb: backup_destination_writable(rb, write_probe)),
        ("SSH to the VPS", ssh_answers),
        ("Coolify API", coolify_answers),
        ("DNS record", dns_record_exists),
    )


def check_access(rb: Runbook, *, write_probe: bool = True) -> list[CheckLine]:
    """Every access of the runbook, one line each."""
    return [checked(name, lambda check=check: check(rb), FIXES.get(name, ""))
            for name, check in access_checks(write_probe)]
