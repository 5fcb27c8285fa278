"""The plan's pre-cutover checklist, every line a machine can check, as a gate: a plain function of the runbook
returning a report with ``ok``, ``failures()`` and ``summary()`` (the cutover's step records it in the ledger).

One line per check, in the plan's order: the target's PostgreSQL, PgBouncer, Redis and S3 server answer; the
latest database and storage gates passed and are fresh; the latest backup was restore-tested; the platform
phases' gates (pooler, cache, tuning, health, security) passed and are fresh, or were never run; each app's
health endpoint is green; the CDN serves the public files (when the runbook has one); the public record's DNS
TTL is short. Each line is passed, failed or "not checked"
(not configured in the runbook, or a phase Liftoff does not run yet): a "not checked" line does not fail the
checklist, but it is shown red, never as passed, so the approver sees what nobody checked. A check that raises
becomes its own failed line; it never stops the others. Details pass the redaction module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from liftoff.checks import FAILED, PASSED, CheckLine, CheckReport
from liftoff.ledger import GateRecord, Ledger
from liftoff.logs import get_logger
from liftoff.redaction import one_line
from liftoff.reports import check_table, md_cell, sentence
from liftoff.runbooks.model import App, Runbook
from liftoff.systems import dns, http_health as health, pg_replication, postgres
from liftoff.tasks.storage.cdn import cdn_not_configured, check_cdn
from liftoff.tasks.prepare.access import (
    FIXES,
    PROBE_TIMEOUT_S,
    checked,
    pgbouncer_answers,
    redis_answers,
    target_postgres_answers,
    target_s3_answers,
    test_upload,
    unchecked,
)

log = get_logger(phase="cutover")

@dataclass(frozen=True)
class ChecklistReport(CheckReport):
    label: ClassVar[str] = "checklist"

    def markdown(self) -> str:
        out = ["# Pre-cutover checklist", "", f"**{md_cell(sentence(self.summary()))}.**", "",
               check_table(self.lines)]
        if self.not_checked():
            out += ["Lines marked 🔴 were **not checked** by a machine: check them yourself before approving."]
        return "\n".join(out) + ("\n" if self.not_checked() else "")


def run_checklist(rb: Runbook) -> ChecklistReport:
    """Checks every machine-checkable line of the pre-cutover checklist against the runbook's systems and
    ledger. Reads only; each line stands on its own (a server that is down fails its line, not the others)."""
    ledger = Ledger(rb.state_dir)
    max_age_s = rb.cutover.checklist.max_gate_age_hours * 3600
    checks: list[tuple[str, Callable[[], CheckLine]]] = [
        ("target PostgreSQL answers", lambda: target_postgres_answers(rb)),
        ("PgBouncer answers", lambda: pgbouncer_answers(rb)),
        ("Redis answers", lambda: redis_answers(rb.target.redis)),
        ("target S3 server answers", lambda: target_s3_answers(rb)),
        ("database gate passed", lambda: _gate_fresh(ledger, "database", max_age_s, rb)),
        ("storage gate passed", lambda: _gate_fresh(ledger, "storage", max_age_s, rb)),
        ("latest backup restore-tested", lambda: _backup_restore_tested(ledger, max_age_s, rb)),
        *[(f"{phase} gate passed", lambda phase=phase: _platform_gate(ledger, phase, max_age_s))
          for phase in _PLATFORM_GATES],
    ]
    if rb.cutover.final_sync == "replicate":
        checks.append(("replication lag under threshold", lambda: _replication_lag(rb)))
    if rb.storage.wanted and rb.storage.target is not None:  # the plan's "storage working with test uploads"
        checks += [(f"test upload to {b.name}", lambda b=b: test_upload(rb, b.name, b.public))
                   for b in rb.storage.buckets]
    checks.append((CDN_LINE, lambda: cdn_line(rb)))
    if rb.cutover.apps:
        checks += [(f"app {app.name} healthy", lambda app=app: _app_healthy(app)) for app in rb.cutover.apps]
    else:
        checks.append(("apps healthy", lambda: unchecked(
            "apps healthy", "the runbook lists no apps (cutover.apps)",
            "add each app's health_url under cutover.apps, or check the apps by hand")))
    checks.append(("DNS TTL", lambda: _dns_ttl(rb)))
    lines = [_checked(name, check) for name, check in checks]
    report = ChecklistReport(lines)
    log.info("pre-cutover checklist", ok=report.ok, failed=len(report.failures()),
             not_checked=len(report.not_checked()))
    return report


def _checked(name: str, check: Callable[[], CheckLine]) -> CheckLine:
    return checked(name, check, _FIXES.get(name, ""))


_FIXES = {
    **FIXES,
    "DNS TTL": "check cutover.checklist.dns (the record's name, and resolver as ip or ip:port)",
    "database gate passed": "run liftoff run verify --runbook FILE",
    "storage gate passed": "run liftoff run verify-storage --runbook FILE",
}


# ---------------------------------------------------------------------------------------------------------
# What the ledger says: the gates, and the backup's restore test

_GATE_FLOWS = {
    # phase: (the flow that runs the whole phase, the flow that re-runs its gate alone)
    "database": ("database", "verify"),
    "storage": ("storage", "verify-storage"),
}


def _age(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _gate_fresh(ledger: Ledger, phase: str, max_age_s: float, rb: Runbook) -> CheckLine:
    name = f"{phase} gate passed"
    whole, gate_only = _GATE_FLOWS[phase]
    if phase == "storage" and not (rb.storage.wanted or rb.storage.buckets):  # listed buckets count too
        return unchecked(name, "the runbook has no storage phase (storage.target, storage.buckets)",
                          "nothing to do if the app keeps no files in Supabase Storage")
    gate = ledger.latest_gate(phase)
    if gate is None:
        return CheckLine(name, FAILED, f"no {phase} gate has run for runbook {rb.name}",
                         f"run liftoff run {whole} --runbook FILE")
    # After a failed cutover the target holds the frozen source's export, which the source's later writes
    # made stale: only a fresh export brings it up again (re-running the gate alone fails the same way).
    return _judge_gate(name, gate, max_age_s,
                       failed_fix=(f"fix what the gate reports, then run liftoff run {gate_only} --runbook FILE; "
                                   "after a failed cutover, liftoff run resync --runbook FILE (a fresh export and "
                                   "sync)"),
                       old_fix=f"run liftoff run {gate_only} --runbook FILE for a fresh gate")


def _judge_gate(name: str, gate: GateRecord, max_age_s: float, *, failed_fix: str, old_fix: str) -> CheckLine:
    age = gate.age_seconds
    run = f" (flow run {gate.flow_run_id})" if gate.flow_run_id else ""
    if not gate.passed:
        return CheckLine(name, FAILED, f"the latest {gate.phase} gate failed {_age(age)} ago{run}: "
                                       f"{one_line(gate.summary)}", failed_fix)
    if age > max_age_s:
        return CheckLine(name, FAILED, f"the latest {gate.phase} gate passed {_age(age)} ago{run}, older than "
                                       f"cutover.checklist.max_gate_age_hours ({max_age_s / 3600:g} h)", old_fix)
    return CheckLine(name, PASSED, f"passed {_age(age)} ago{run}: {one_line(gate.summary)}")


# The platform phases' gates, in the plan's order: what each proves, for the line that says it was not run.
_PLATFORM_GATES = {
    "pooler": "PgBouncer's config with SCRAM auth, and 100 clients through it within the pool",
    "cache": "Redis's persistence and eviction settings, and a write/read round trip",
    "tuning": "PostgreSQL's memory and connection settings as the plan tunes them, none waiting for a restart",
    "health": "every service and app answering, disk and connections under the thresholds",
    "security": "the firewall, services listening only inside, no secret in the named files",
}


_PLATFORM_FLOWS = {"tuning": "tune"}  # a phase whose flow has another name


def _platform_gate(ledger: Ledger, phase: str, max_age_s: float) -> CheckLine:
    """A platform phase's latest gate: failed or stale fails the line; never run is "not checked" (shown
    red, it does not fail the checklist: a plan may leave a phase to the operator)."""
    name = f"{phase} gate passed"
    gate = ledger.latest_gate(phase)
    run = _PLATFORM_FLOWS.get(phase, phase)
    if gate is None:
        return unchecked(name, f"no {phase} gate is on record ({_PLATFORM_GATES[phase]})",
                          f"run liftoff run {run} --runbook FILE, or check it by hand before approving")
    return _judge_gate(name, gate, max_age_s,
                       failed_fix=f"fix what the gate reports, then run liftoff run {run} --runbook FILE",
                       old_fix=f"run liftoff run {run} --runbook FILE for a fresh gate")


def _backup_restore_tested(ledger: Ledger, max_age_s: float, rb: Runbook) -> CheckLine:
    name = "latest backup restore-tested"
    gate = ledger.latest_gate("backup")
    if gate is None:
        return unchecked(name, "no backup restore test is on record (Liftoff's backup phase has not run)",
                          "restore the latest backup into a scratch database and check it by hand before approving")
    return _judge_gate(name, gate, max_age_s, failed_fix="fix the backup, then run its restore test again",
                       old_fix="run the backup's restore test again for a fresh result")


# ---------------------------------------------------------------------------------------------------------
# The CDN, the apps, and the public record

CDN_LINE = "CDN in front of the files"


def cdn_line(rb: Runbook) -> CheckLine:
    """The CDN check's lines folded into one (``liftoff.tasks.storage.cdn``)."""
    why = cdn_not_configured(rb)
    if why is not None:
        return unchecked(CDN_LINE, why, "add cdn (cname or addresses) to the runbook, or check the CDN by hand: "
                                        "the files host proxied, an image's bytes and cache headers")
    report = check_cdn(rb)
    if not report.ok:
        return CheckLine(CDN_LINE, FAILED, "; ".join(report.failures()),
                         "; ".join(line.fix for line in report.lines if line.status == FAILED and line.fix))
    details = "; ".join(f"{line.name}: {line.detail}" for line in report.lines)
    if report.not_checked():
        return unchecked(CDN_LINE, details, "name an object with cdn.bucket and cdn.key")
    return CheckLine(CDN_LINE, PASSED, details)



def _app_healthy(app: App) -> CheckLine:
    name = f"app {app.name} healthy"
    result = health.check_health(app.health_url, timeout=PROBE_TIMEOUT_S)
    if result.healthy:
        return CheckLine(name, PASSED, f"{app.health_url}: {result.detail}")
    return CheckLine(name, FAILED, f"{app.health_url}: {result.detail}",
                     f"make {app.name} healthy (its /api/health lists what is down), or correct cutover.apps "
                     "health_url")


def _replication_lag(rb: Runbook) -> CheckLine:
    """``final_sync: replicate``: the subscription streams and the target is under the runbook's lag limits."""
    name, limits = "replication lag under threshold", rb.cutover.replication
    with postgres.session(rb.source, "source") as src:
        lag = pg_replication.lag(src, pg_replication.Names.for_runbook(rb.name))
    detail = f"{lag.bytes} bytes and {lag.seconds} s behind (max {limits.max_lag_bytes} bytes, {limits.max_lag_s} s)"
    if not lag.streaming:
        return CheckLine(name, FAILED, f"the subscription is not streaming; {detail}",
                         "read the target's log for the subscription's apply errors, or `liftoff run replicate`")
    if lag.bytes > limits.max_lag_bytes or lag.seconds > limits.max_lag_s:
        return CheckLine(name, FAILED, detail, "wait for the target to catch up (`liftoff run replication-lag`)")
    return CheckLine(name, PASSED, detail)


def _dns_ttl(rb: Runbook) -> CheckLine:
    check = rb.cutover.checklist.dns
    if check is None:
        return unchecked("DNS TTL", "no public record in the runbook (cutover.checklist.dns)",
                          "add cutover.checklist.dns (name, resolver), or check the record's TTL by hand")
    found = dns.lookup(check.name, check.resolver)
    source = (f"{'authoritative answer' if found.authoritative else 'cached answer'} from {found.resolver}: "
              f"{', '.join(found.answers)}")
    if found.ttl > check.max_ttl:
        return CheckLine("DNS TTL", FAILED, f"{check.name}: TTL {found.ttl} s is above cutover.checklist.dns.max_ttl "
                                            f"{check.max_ttl} s ({source})",
                         f"lower the TTL of {check.name} to {check.max_ttl} s or less at the DNS provider, then "
                         f"wait {found.ttl} s (the old TTL) before the cutover")
    caveat = "" if found.authoritative else (
        "; a resolver's cache counts the TTL down, so the record's own may be higher: name its authoritative "
        "server in cutover.checklist.dns.resolver to be sure")
    return CheckLine("DNS TTL", PASSED, f"{check.name}: TTL {found.ttl} s <= {check.max_ttl} s ({source}){caveat}")
