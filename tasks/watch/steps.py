"""The watch after the switch (the plan's "monitor for 24 hours"): rounds of checks every ``soak.interval_s`` for
``soak.hours``, each round every service and app of the health phase plus the plan's other thresholds (CPU as
a 5-minute average and RAM, read over ssh from /proc; each app's response time; its error rate where its health
JSON reports one), alerts posted by severity when a check gets worse (and once when it is back to ok), and a
report at the end: "safe to decommission", or what was critical and when.

The ledger is the watch's memory, so a paused or killed watch resumes where it was: ``watch.start`` records
when the watch began and when it ends (a resumed watch keeps both); each round is an item (``watch``/``round``:
its number, worst level, time, and its problems), each check's last level an item (``watch``/``level``, what
alerts compare with), and each CPU reading an item (``watch``/``cpu``, what the 5-minute average is taken from).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.checks import GateReport
from liftoff.errors import PreflightFailed
from liftoff.ledger import Ledger
from liftoff.logs import get_logger
from liftoff.redaction import one_line, redact
from liftoff.reports import publish_markdown, publish_table
from liftoff.runbooks.model import App, Runbook
from liftoff.steps import done, recorded
from liftoff.systems import http_health, vps
from liftoff.systems.webhook import notify
from liftoff.tasks.health.monitoring import (
    CRITICAL,
    NOT_CONFIGURED,
    OK,
    WARN,
    HealthLine,
    HealthReport,
    checked_health,
    check_platform_health,
)

log = get_logger(phase="watch")

PHASE = "watch"
NOT_CHECKED = "not checked"  # a threshold the app's health endpoint gives no figure for
_RANK = {OK: 0, NOT_CONFIGURED: 0, NOT_CHECKED: 0, WARN: 1, CRITICAL: 2}


# ---------------------------------------------------------------------------------------------------------
# When the watch runs


def kept_cutover(ledger: Ledger) -> str | None:
    """Why there is no kept cutover to watch (None: there is one): the switch is done and no rollback
    switched back after it."""
    steps = ledger.steps()
    switch = steps.get("cutover.switch")
    if switch is None or switch.status != "done":
        return "no switch is on record (cutover.switch is not done): the apps still use Supabase"
    back = steps.get("rollback.switch-back")
    if back is not None and back.status == "done" and (back.finished_at or 0) >= (switch.finished_at or 0):
        return "the cutover was rolled back (rollback.switch-back is done after cutover.switch)"
    return None


def _refuse_before_a_kept_cutover(rb: Runbook) -> None:
    why = kept_cutover(Ledger(rb.state_dir))
    if why is not None:
        raise PreflightFailed(f"watch: {why}; the watch starts after a kept cutover (liftoff run cutover)")


@task(name="start the watch", cache_policy=NO_CACHE)
@recorded("watch.start", skip_if=done)
def start_watch(rb: Runbook) -> dict:
    """When the watch began and when it ends; a resumed watch skips this and keeps both."""
    _refuse_before_a_kept_cutover(rb)
    now = time.time()
    soak = rb.soak
    return {"started_at": now, "ends_at": now + soak.hours * 3600, "interval_s": soak.interval_s,
            "rounds": int(soak.hours * 3600 // soak.interval_s) + 1}


def round_times(window: dict, ledger: Ledger):
    """The numbers of the rounds still to run and when each is due: round n at started_at + n * interval.
    After a pause the rounds whose time passed are skipped (the report names the gap), not run in a burst."""
    last = max((int(key) for key, *_ in ledger.items(PHASE, "round")), default=-1)
    n = last + 1
    late = time.time() - (window["started_at"] + n * window["interval_s"])
    if late > window["interval_s"]:  # resumed: the rounds due while the watch was not running are missed
        n = min(n + int(late // window["interval_s"]), window["rounds"] - 1)
    while n < window["rounds"]:
        wait = window["started_at"] + n * window["interval_s"] - time.time()
        if wait > 0:
            time.sleep(wait)
        yield n  # a round that took longer than the interval is followed at once by the next one
        n += 1


# ---------------------------------------------------------------------------------------------------------
# One round


def _cpu_line(rb: Runbook, ledger: Ledger, counters: vps.CpuCounters) -> HealthLine:
    """CPU use averaged since the latest reading at least ``soak.cpu_window_s`` old (or the oldest there is,
    while the window fills), judged against the plan's 70 / 90 %."""
    soak = rb.soak
    readings = [vps.CpuCounters(float(key), busy, int(total)) for key, _, busy, total in ledger.items(PHASE, "cpu")]
    ledger.set_items(PHASE, "cpu", [(f"{counters.at:017.3f}", "read", counters.busy, str(counters.total))])
    old_enough = [r for r in readings if counters.at - r.at >= soak.cpu_window_s]
    earlier = old_enough[-1] if old_enough else (readings[0] if readings else None)
    if earlier is None:
        return HealthLine("CPU", NOT_CHECKED, "first reading: the average starts with the next round")
    percent = counters.percent_since(earlier)
    span = counters.at - earlier.at
    level = vps.judge(percent, soak.cpu_warn_percent, soak.cpu_critical_percent)
    return HealthLine("CPU", level, f"{percent:.1f}% busy on average over the last {span:.0f} s; warn at "
                                    f"{soak.cpu_warn_percent:g}%, critical at {soak.cpu_critical_percent:g}%",
                      "" if level == OK else "find the process (top -o %CPU on the VPS); scale the VPS or the app")


def _ram_line(rb: Runbook, memory: vps.Memory) -> HealthLine:
    soak = rb.soak
    level = vps.judge(memory.percent, soak.ram_warn_percent, soak.ram_critical_percent)
    return HealthLine("RAM", level, f"{memory.percent:.1f}% used ({memory.available_bytes / 1024 ** 2:,.0f} MiB "
                                    f"available of {memory.total_bytes / 1024 ** 2:,.0f} MiB); warn at "
                                    f"{soak.ram_warn_percent:g}%, critical at {soak.ram_critical_percent:g}%",
                      "" if level == OK else "find the process (top -o %MEM on the VPS); check Redis's maxmemory "
                                             "and PostgreSQL's shared_buffers and work_mem")


def _vps_lines(rb: Runbook, ledger: Ledger) -> list[HealthLine]:
    if rb.ssh is None:
        return [HealthLine(name, NOT_CONFIGURED, "no VPS in the runbook (ssh)", "add ssh to watch CPU and RAM")
                for name in ("CPU", "RAM")]
    from liftoff.systems.remote import Remote

    def read() -> list[HealthLine]:
        with Remote(rb.ssh) as remote:
            counters, memory = vps.cpu_and_memory(remote)
        return [_cpu_line(rb, ledger, counters), _ram_line(rb, memory)]

    return checked_health("CPU and RAM", "check ssh (host, user, private_key, known_hosts)", read)


def _app_lines(rb: Runbook, app: App) -> list[HealthLine]:
    """The app's response time (one GET of its health endpoint) and its error rate, where it reports one."""
    soak = rb.soak
    started = time.perf_counter()
    result = http_health.check_health(app.health_url, timeout=max(soak.response_critical_ms / 1000 * 2, 5))
    ms = (time.perf_counter() - started) * 1000
    level = vps.judge(ms, soak.response_warn_ms, soak.response_critical_ms)
    lines = [HealthLine(f"app {app.name} response time", level if result.status_code else CRITICAL,
                        f"{app.health_url}: answered in {ms:.0f} ms; warn at {soak.response_warn_ms:g} ms, critical at "
                        f"{soak.response_critical_ms:g} ms" if result.status_code else result.detail,
                        "" if level == OK and result.status_code else
                        f"look at {app.name}'s logs and at PostgreSQL's slow queries (pg_stat_statements)")]
    rate = http_health.error_rate_percent(result.body)
    if rate is None:
        lines.append(HealthLine(f"app {app.name} error rate", NOT_CHECKED,
                                "its health endpoint reports no error rate (error_rate_percent or error_rate)",
                                "add the error rate to the app's /api/health, or watch it in the app's logs"))
    else:
        level = vps.judge(rate, soak.error_rate_warn_percent, soak.error_rate_critical_percent)
        lines.append(HealthLine(f"app {app.name} error rate", level,
                                f"{rate:.2f}% of requests failed (its health endpoint); warn at "
                                f"{soak.error_rate_warn_percent:g}%, critical at {soak.error_rate_critical_percent:g}%",
                                "" if level == OK else f"read {app.name}'s error log; roll back if it is the move"))
    return lines


def target_changes(rb: Runbook, ledger: Ledger) -> tuple[list[HealthLine], dict]:
    """How much the target changed since the switch, per table (the rollback's own change capture, counted
    while the apps write: ``count_changes_on_target``), and whether the rollback is still possible: the ledger
    holds the switch and the source's freeze since the last rollback, both databases answer, every table was
    compared and no row changed on both sides. Returns the two lines and, for the round's record, the counts."""
    from liftoff.tasks.cutover.common import FROZEN, SWITCHED, since_last_rollback
    from liftoff.tasks.cutover.rollback import count_changes_on_target

    events = since_last_rollback(ledger)
    switch = next((e for e in events if e.what == SWITCHED), None)
    freeze = next((e for e in events if e.what == FROZEN), None)
    try:
        found = count_changes_on_target(rb, frozen=False)
    except Exception as exc:  # noqa: BLE001 - an unreachable side is what the line says
        why = one_line(str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return [HealthLine("target changes since the switch", NOT_CHECKED, f"not counted: {why}",
                           "check source and target.direct"),
                HealthLine("rollback possible", WARN, f"unknown: the changes could not be counted ({why})",
                           "make the source and the target reachable again: the rollback reads both")], \
            {"possible": False, "why": why}
    counts = found.counts()
    total = sum(sum(c.values()) for c in counts.values())
    tables = "; ".join(f"{t}: {c['inserts']} inserted, {c['updates']} updated, {c['deletes']} deleted"
                       for t, c in sorted(counts.items()))
    objects = len(found.objects)
    detail = (f"{total} rows in {len(counts)} tables" + (f" ({tables})" if tables else "")
              + (f"; {objects} objects in the buckets" if objects else ""))
    why_not = ("the ledger holds no switch since the last rollback: the apps' environment could not be put back"
               if switch is None else
               "the ledger holds no write freeze of the source: its own writes cannot be told from the target's"
               if freeze is None else found.unknown if found.unknown else
               f"{len(found.both)} rows changed on both sides (e.g. {found.both[0][0]}): the rollback would not carry "
               "them" if found.both else None)
    frozen_at = time.strftime("%H:%M UTC", time.gmtime((freeze.after or {}).get("frozen_at") or freeze.at)) \
        if freeze else ""
    possible = HealthLine("rollback possible", WARN, f"no: {why_not}", "read the rollback's plan: liftoff run "
                          "rollback --dry-run") if why_not else HealthLine(
        "rollback possible", OK, f"yes: the source is frozen since {frozen_at} and answers; a rollback would carry "
                                 f"{found.total} changes back")
    return [HealthLine("target changes since the switch", OK, detail), possible], \
        {"possible": why_not is None, "why": why_not, "rows": total, "objects": objects, "tables": counts}


def check_round(rb: Runbook, ledger: Ledger) -> HealthReport:
    """Every check of one round: the health phase's (services, apps, disk, connections), then CPU, RAM and each
    app's response time and error rate."""
    lines = list(check_platform_health(rb).lines)
    lines += _vps_lines(rb, ledger)
    for app in rb.cutover.apps:
        lines += checked_health(f"app {app.name} response time", f"check {app.name}'s health_url",
                          lambda app=app: _app_lines(rb, app))
    return HealthReport([HealthLine(x.service, x.status, redact(x.detail), redact(x.fix)) for x in lines])


def worst(lines) -> str:
    return max((line.status for line in lines), key=lambda s: _RANK.get(s, 0), default=OK)


def _alerts(rb: Runbook, ledger: Ledger, n: int, report: HealthReport) -> list[str]:
    """Posts one message per severity for the checks that got worse this round, and one for those back to
    ok; returns the messages posted. Each check's level is kept, so an alert is sent once per change."""
    before = {key: status for key, status, *_ in ledger.items(PHASE, "level")}
    worse = {CRITICAL: [], WARN: []}
    recovered = []
    for line in report.lines:
        was = before.get(line.service, OK)
        if _RANK.get(line.status, 0) > _RANK.get(was, 0):
            worse[line.status].append(f"{line.service}: {line.detail}")
        elif _RANK.get(line.status, 0) == 0 and _RANK.get(was, 0) > 0:
            recovered.append(line.service)
    ledger.set_items(PHASE, "level", [(line.service, line.status, n, None) for line in report.lines])
    messages = []
    for severity, label in ((CRITICAL, "CRITICAL"), (WARN, "warning")):
        if worse[severity]:
            messages.append(f"watch {rb.name}, round {n}: {label}: " + "; ".join(worse[severity]))
    if recovered:
        messages.append(f"watch {rb.name}, round {n}: back to ok: {', '.join(recovered)}")
    for text in messages:
        notify(rb, text)
    return messages


@task(name="watch round", cache_policy=NO_CACHE)
def watch_round(rb: Runbook, n: int) -> dict:
    """One round: every check, alerts for what got worse, the round recorded in the ledger."""
    ledger = Ledger(rb.state_dir)
    report = check_round(rb, ledger)
    lines, changes = target_changes(rb, ledger)
    report = HealthReport(report.lines + [HealthLine(x.service, x.status, redact(x.detail), redact(x.fix)) for x in lines])
    level = worst(report.lines)
    problems = [f"{line.service}: {line.detail}" for line in report.lines if line.status in (WARN, CRITICAL)]
    detail = json.dumps({"at": time.time(), "critical": [p for line, p in _with_status(report, CRITICAL)],
                         "warn": [p for line, p in _with_status(report, WARN)], "changes": changes})
    alerts = _alerts(rb, ledger, n, report)
    ledger.set_items(PHASE, "round", [(f"{n:06d}", level, int(time.time()), redact(detail))])
    log.info("watch round", round=n, level=level, problems=len(problems), alerts=len(alerts))
    return {"round": n, "level": level, "problems": problems, "alerts": alerts, "rows": report.rows(),
            "changes": changes}


def _with_status(report: HealthReport, status: str):
    return [(line, f"{line.service}: {line.detail}") for line in report.lines if line.status == status]


# ---------------------------------------------------------------------------------------------------------
# The report at the end


@dataclass(frozen=True)
class WatchReport(GateReport):
    started_at: float
    ends_at: float
    planned: int
    rounds: list[tuple[int, str, dict]] = field(default_factory=list)  # (number, worst level, detail)

    def missed(self) -> list[int]:
        held = {n for n, _, _ in self.rounds}
        last = max(held, default=-1)
        return [n for n in range(last + 1) if n not in held]

    def _by_check(self, severity: str) -> dict[str, list[tuple[int, dict, str]]]:
        """Each check that was at ``severity``: the rounds (number, detail, its line) it was, in order."""
        seen: dict[str, list[tuple[int, dict, str]]] = {}
        for n, _, d in self.rounds:
            for problem in d.get(severity, []):
                seen.setdefault(problem.split(": ", 1)[0], []).append((n, d, problem))
        return seen

    def failures(self) -> list[str]:
        """One line per check that was critical: in how many rounds, and the first time with what it read."""
        out = [f"{name}: critical in {len(hits)} of {len(self.rounds)} rounds, first in round {hits[0][0]} "
               f"({time.strftime('%H:%M:%S', time.gmtime(hits[0][1]['at']))} UTC): {hits[0][2].split(': ', 1)[1]}"
               for name, hits in self._by_check("critical").items()]
        if not self.rounds:
            out.append("no round of checks ran")
        return out

    def warnings(self) -> list[str]:
        return [f"{name}: warned in {len(hits)} of {len(self.rounds)} rounds, first: {hits[0][2].split(': ', 1)[1]}"
                for name, hits in self._by_check("warn").items()]

    def summary(self) -> str:
        hours = (self.ends_at - self.started_at) / 3600
        if not self.ok:
            failed = ", ".join(self._by_check("critical")) or "no round ran"
            return (f"watch failed: critical in {sum(1 for _, lv, _ in self.rounds if lv == CRITICAL)} of "
                    f"{len(self.rounds)} rounds ({failed}): not safe to decommission")
        head = f"safe to decommission: {len(self.rounds)} rounds over {hours:g} h, no check critical"
        if self.warnings():
            head += f"; warned: {', '.join(self._by_check('warn'))}"
        if self.missed():
            head += f"; {len(self.missed())} rounds missed while the watch was not running"
        return head

    def markdown(self) -> str:
        md = [f"# Watch report: {'SAFE TO DECOMMISSION' if self.ok else 'NOT SAFE TO DECOMMISSION'}", "",
              f"{self.summary()}.", "",
              f"From {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.started_at))} to "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.ends_at))} UTC, "
              f"{len(self.rounds)} of {self.planned} planned rounds.", ""]
        if self.failures():
            md += ["## Critical", *[f"- {f}" for f in self.failures()], ""]
        if self.warnings():
            md += ["## Warnings", *[f"- {w}" for w in self.warnings()], ""]
        if self.missed():
            md += [f"Rounds missed (the watch was not running): {', '.join(map(str, self.missed()))}.", ""]
        last = next(((n, d["changes"]) for n, _, d in reversed(self.rounds) if "changes" in d), None)
        if last:
            n, changes = last
            md += [f"## The target since the switch (round {n})", "",
                   f"Rollback possible: {'yes' if changes.get('possible') else 'no: ' + str(changes.get('why'))}.", ""]
            if changes.get("tables"):
                md += ["| table | inserted | updated | deleted |", "|---|---|---|---|",
                       *[f"| {t} | {c['inserts']} | {c['updates']} | {c['deletes']} |"
                         for t, c in sorted(changes["tables"].items())], ""]
            elif "rows" in changes:
                md += ["No row changed on the target since the switch.", ""]
        return "\n".join(md)


def watch_report(rb: Runbook) -> WatchReport:
    ledger = Ledger(rb.state_dir)
    window = ledger.step_detail("watch.start")
    rounds = [(int(key), level, json.loads(detail or "{}")) for key, level, _, detail in ledger.items(PHASE, "round")]
    return WatchReport(window["started_at"], window["ends_at"], window["rounds"], rounds)


def publish_watch_report(report: WatchReport, rb: Runbook) -> None:
    publish_table("watch-rounds", [{"round": n, "level": level, "critical": "; ".join(d.get("critical", [])),
                                    "warn": "; ".join(d.get("warn", [])),
                                    "rows changed on the target": d.get("changes", {}).get("rows"),
                                    "rollback possible": d.get("changes", {}).get("possible")}
                                   for n, level, d in report.rounds],
                  "Watch: one row per round of checks")
    publish_markdown("watch-report", report.markdown())


@task(name="watch report (gate)", cache_policy=NO_CACHE)
@recorded("watch.report", gate="watch", publish=publish_watch_report)
def run_watch_gate(rb: Runbook) -> WatchReport:
    """Passes when rounds ran and no check was critical in any of them."""
    return watch_report(rb)


def round_message(result: dict) -> str:
    return one_line(f"round {result['round']}: {result['level']}"
                    + (f" ({'; '.join(result['problems'])[:200]})" if result["problems"] else ""))
