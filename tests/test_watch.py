"""The watch after the switch against real parts: a PostgreSQL 15 cluster as the target, a real sshd whose /proc
and `df` are this machine's (a CPU burner and a filled 4 MiB tmpfs cross the plan's thresholds for real), an app
health endpoint that answers slowly and reports an error rate, alerts received by a local webhook receiver, and
a watch killed mid-way (SIGKILL on the CLI's process group) that resumes. Rounds are a second apart here; the
plan's are minutes apart (soak.interval_s)."""

from __future__ import annotations

import os
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from liftoff.errors import GateFailed, PreflightFailed
from liftoff.flows.options import RunOptions
from liftoff.flows.watch import watch
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff.tasks.health.monitoring import CRITICAL, OK, WARN
from liftoff.tasks.watch.steps import NOT_CHECKED, PHASE
from liftoff_sandbox.health_endpoint import HEALTHY, HealthEndpoint
from liftoff_sandbox.postgres import PostgresServer, pg15_bin_dir
from liftoff_sandbox.ssh import SshServer
from liftoff_sandbox.webhook import WebhookReceiver

KEY_ENV, PG_ENV, HOOK_ENV = "LIFTOFF_TEST_WATCH_SSH_KEY", "LIFTOFF_TEST_WATCH_PG", "LIFTOFF_TEST_WATCH_HOOK"
DISK_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def servers(module_env, tmp_path_factory):
    disk = tmp_path_factory.mktemp("watch-disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    with SshServer() as vps, PostgresServer(pg15_bin_dir()) as pg, WebhookReceiver() as hook:
        module_env.setenv(KEY_ENV, vps.client_key_text)
        module_env.setenv(PG_ENV, pg.password)
        module_env.setenv(HOOK_ENV, hook.url)
        yield {"vps": vps, "pg": pg, "hook": hook, "disk": disk}
    subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def app():
    with HealthEndpoint() as endpoint:
        yield endpoint


def write_runbook(tmp_path, servers, app, *, seconds: float, switched: bool = True, vps: bool = True,
                  databases: tuple[str, str] = ("postgres", "postgres"), **soak) -> str:
    """``vps``: CPU, RAM, disk and connections read over ssh. This machine is shared with other test runs that
    keep its CPU busy (100 % is common): a watch that must end quiet leaves the VPS out. ``databases``: the
    source's and the target's (by default one database: the target never differs from the source)."""
    sshd, pg = servers["vps"], servers["pg"]
    direct = {"host": pg.host, "port": pg.port, "user": "postgres", "password": {"env": PG_ENV}, "sslmode": "disable"}
    data = {"name": "watch-test", "state_dir": str(tmp_path / "state"), "source": {**direct, "database": databases[0]},
            "target": {"direct": {**direct, "database": databases[1]}},
            "cutover": {"apps": [{"name": "crm", "health_url": app.health_url}]},
            "health": {"disk_paths": [str(servers["disk"])]},
            "notifications": {"webhook": {"env": HOOK_ENV}},
            "soak": {"hours": seconds / 3600, "interval_s": 1, "cpu_window_s": 1, **soak}}
    if vps:
        data["ssh"] = {"host": sshd.host, "port": sshd.port, "user": sshd.user, "private_key": {"env": KEY_ENV},
                       "known_hosts": str(sshd.known_hosts_path)}
    path = tmp_path / "runbook.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    if switched:  # what the cutover's freeze and switch steps leave in the ledger: their steps and events
        ledger = Ledger(tmp_path / "state")
        ledger.record_event("cutover", "cutover.freeze", before={"freezes": []},
                            after={"frozen_at": time.time(), "methods": ["revoke"]})
        ledger.start_step("cutover.switch", "cutover-run")
        ledger.record_event("cutover", "cutover.switch", before={}, after={"where": "the app's env file"})
        ledger.finish_step("cutover.switch", {"driver": "ssh"})
    return str(path)


def levels(tmp_path) -> dict[str, str]:
    return {key: status for key, status, *_ in Ledger(tmp_path / "state").items(PHASE, "level")}


def rounds(tmp_path) -> list[int]:
    return [int(key) for key, *_ in Ledger(tmp_path / "state").items(PHASE, "round")]


def test_it_refuses_before_a_kept_cutover(tmp_path, servers, app):
    runbook = write_runbook(tmp_path, servers, app, seconds=2, switched=False)
    with pytest.raises(PreflightFailed, match="watch: no switch is on record"):
        watch(RunOptions(runbook=runbook))
    assert rounds(tmp_path) == []


def test_a_quiet_watch_ends_safe_to_decommission_without_alerts(tmp_path, servers, app):
    servers["hook"].received.clear()
    runbook = write_runbook(tmp_path, servers, app, seconds=3, vps=False)

    result = watch(RunOptions(runbook=runbook))

    assert result["summary"].startswith("safe to decommission: 4 rounds over 0.000833333 h, no check critical")
    assert rounds(tmp_path) == [0, 1, 2, 3]
    seen = levels(tmp_path)
    assert seen["CPU"] == seen["RAM"] == "not configured"
    assert seen["app crm response time"] == OK and seen["PostgreSQL"] == OK
    assert seen["app crm error rate"] == NOT_CHECKED  # its health JSON reports none
    assert servers["hook"].received == []
    gate = Ledger(tmp_path / "state").latest_gate("watch")
    assert gate.passed and gate.summary.startswith("safe to decommission")


def test_real_load_crosses_the_thresholds_and_alerts_by_severity(tmp_path, servers, app):
    hook = servers["hook"]
    hook.received.clear()
    app.delay_s = 0.7  # over the plan's 500 ms
    app.answer = (200, {**HEALTHY, "metrics": {"error_rate_percent": 2.5}})  # over the plan's 1 %
    filler = servers["disk"] / "filler"
    filler.write_bytes(b"\0" * int(DISK_BYTES * 0.9))  # over the plan's critical 85 %
    # every core kept busy, at the lowest priority: the checks (and the other runs on this machine) go first
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(19))
               for _ in range(os.cpu_count() or 2)]
    try:
        runbook = write_runbook(tmp_path, servers, app, seconds=2, ram_warn_percent=1)  # RAM in use is above 1 %

        with pytest.raises(GateFailed) as failed:
            watch(RunOptions(runbook=runbook))
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        filler.unlink()

    message = str(failed.value)
    assert message.startswith(f"watch gate failed: disk {servers['disk']}: critical in 3 of 3 rounds, first in "
                              "round 0 (")
    assert "90.0% used" in message
    seen = levels(tmp_path)
    assert seen[f"disk {servers['disk']}"] == CRITICAL
    assert seen["CPU"] in (WARN, CRITICAL)  # every core busy: 70 % at the least, whatever else runs here
    assert seen["RAM"] == WARN and seen["app crm response time"] == WARN and seen["app crm error rate"] == WARN
    texts = [body["text"] for body in hook.received]
    critical = [t for t in texts if ": CRITICAL: " in t]
    warning = [t for t in texts if ": warning: " in t]
    assert critical[0].startswith("watch watch-test, round 0: CRITICAL: disk ")
    assert any("app crm response time: " in t and "warn at 500 ms" in t for t in warning)
    assert any("app crm error rate: 2.50% of requests failed" in t for t in warning)
    assert any("CPU: " in t for t in critical + warning)
    # an alert is sent when a check gets worse, not every round
    assert sum("RAM: " in t for t in texts) == 1
    report = last_markdown("watch-report")
    assert report.startswith("# Watch report: NOT SAFE TO DECOMMISSION") and "## Critical" in report


def test_a_killed_watch_resumes_keeping_its_start_and_its_rounds(tmp_path, servers, app):
    runbook = write_runbook(tmp_path, servers, app, seconds=8, vps=False)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "liftoff"), "run", "watch", "--runbook", runbook],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(rounds(tmp_path)) < 2:
        time.sleep(0.1)
    assert proc.poll() is None, "the watch ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ledger = Ledger(tmp_path / "state")
    before = rounds(tmp_path)
    started = ledger.step_detail("watch.start")

    result = watch(RunOptions(runbook=runbook))

    assert ledger.step_detail("watch.start") == started  # the same window: it ends when it was to end
    after = rounds(tmp_path)
    assert after[: len(before)] == before and len(after) > len(before) and after == sorted(set(after))
    assert after[-1] == started["rounds"] - 1 == 8
    assert result["summary"].startswith(f"safe to decommission: {len(after)} rounds over")
    assert ledger.latest_gate("watch").passed


def test_each_round_says_how_much_the_target_changed_and_whether_the_rollback_is_still_possible(tmp_path, servers,
                                                                                                 app):
    """Source and target equal at the switch; the apps then write on the target between rounds (3 inserts, an
    update, a delete): the rounds after say so per table. A table the target no longer has makes the rollback
    impossible (it could not be compared): a warning, alerted."""
    pg, hook = servers["pg"], servers["hook"]
    hook.received.clear()
    for db in ("watch_src", "watch_tgt"):
        pg.execute(f"DROP DATABASE IF EXISTS {db}")
        pg.execute(f"CREATE DATABASE {db}")
        pg.execute("CREATE TABLE public.bookings (id int PRIMARY KEY, seats int NOT NULL); "
                   "INSERT INTO public.bookings SELECT g, g % 5 FROM generate_series(1, 50) g", dbname=db)
    runbook = write_runbook(tmp_path, servers, app, seconds=6, vps=False, databases=("watch_src", "watch_tgt"))

    def apps_write_then_a_table_goes() -> None:
        while 0 not in rounds(tmp_path):
            time.sleep(0.05)
        pg.execute("INSERT INTO public.bookings VALUES (51, 1), (52, 2), (53, 3); "
                   "UPDATE public.bookings SET seats = 9 WHERE id = 7; DELETE FROM public.bookings WHERE id = 8",
                   dbname="watch_tgt")
        while not any(r >= 3 for r in rounds(tmp_path)):
            time.sleep(0.05)
        pg.execute("ALTER TABLE public.bookings RENAME TO bookings_gone", dbname="watch_tgt")

    writer = threading.Thread(target=apps_write_then_a_table_goes, daemon=True)
    writer.start()
    result = watch(RunOptions(runbook=runbook))
    writer.join(timeout=10)

    recorded = {int(key): json.loads(detail)["changes"]
                for key, _, _, detail in Ledger(tmp_path / "state").items(PHASE, "round")}
    assert recorded[0] == {"possible": True, "why": None, "rows": 0, "objects": 0, "tables": {}}
    changed = [n for n, c in recorded.items() if c.get("rows")]
    assert changed, recorded
    assert recorded[changed[0]] == {"possible": True, "why": None, "rows": 5, "objects": 0,
                                    "tables": {"public.bookings": {"inserts": 3, "updates": 1, "deletes": 1}}}
    last = recorded[max(recorded)]
    assert last["possible"] is False and last["why"].startswith("tables not compared: public.bookings: ")
    assert result["summary"].startswith("safe to decommission") and "rollback possible" in result["summary"]
    warned = [body["text"] for body in hook.received if ": warning: " in body["text"]]
    assert any("rollback possible: no: tables not compared: public.bookings" in t for t in warned)
