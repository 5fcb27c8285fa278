"""The cutover and its rollback against real servers: the Supabase-shaped source and a target (PostgreSQL),
a real sshd standing in for the VPS, on which a small app reads its env file and reports through its health
endpoint which database it is connected to, and a real Prefect server through which the test approves or
rejects the paused run, as an operator does in the UI."""

from __future__ import annotations

import itertools
import os
import secrets

import psycopg
import pytest
import yaml

from flows.cutover import cutover
from flows.database import migrate_database
from flows.options import RunOptions
from flows.rollback import rollback
from liftoff.errors import GateFailed, StepFailed
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff.sandbox.crm_app import CrmApp
from liftoff.sandbox.operator import answer_when_paused
from runbooks.model import load_runbook

_n = itertools.count()
WRITER = "crm_writer"


@pytest.fixture(scope="module")
def vps():
    from liftoff.sandbox.ssh import SshServer

    server = SshServer().start()
    os.environ["LIFTOFF_TEST_SSH_KEY"] = server.client_key_text
    yield server
    server.stop()


@pytest.fixture(scope="module")
def writer(stack):
    """An app login role on the source and a table outside the migrated schemas it writes to: what the freeze
    must stop and the rollback must let through again."""
    password = secrets.token_urlsafe(12)
    stack.source.execute(
        f"CREATE ROLE {WRITER} LOGIN PASSWORD '{password}'; CREATE SCHEMA cutover_probe; "
        "CREATE TABLE cutover_probe.writes (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now()); "
        f"GRANT USAGE ON SCHEMA cutover_probe TO {WRITER}; GRANT SELECT, INSERT ON cutover_probe.writes TO {WRITER}; "
        f"GRANT USAGE ON SEQUENCE cutover_probe.writes_id_seq TO {WRITER}")
    os.environ["LIFTOFF_TEST_APP_PASSWORD"] = stack.passwords["app"]
    yield password
    stack.source.execute(f"DROP SCHEMA cutover_probe CASCADE; DROP OWNED BY {WRITER}; DROP ROLE {WRITER}")


def _writes(stack, password: str) -> str | None:
    """An INSERT as the app's role on a new connection: None when it worked, else the error's SQLSTATE."""
    try:
        with psycopg.connect(stack.source.conninfo("postgres", WRITER, password), autocommit=True) as conn:
            conn.execute("INSERT INTO cutover_probe.writes DEFAULT VALUES")
        return None
    except psycopg.Error as exc:
        return exc.sqlstate


@pytest.fixture(scope="module")
def cutover_setup(stack, vps, writer):
    """A runbook whose target database its own ledger migrated (as an operator's would be), the app running on
    the source, and the switch pointing it at the target. Shared by the tests below: each leaves the app on
    the source and the source writable, as it found them (which each asserts)."""
    name = f"cut{next(_n)}"
    stack.new_target_database(name)
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=name)
    data["storage"] = {}
    source_url = (f"postgresql://{WRITER}:{writer}@{stack.source.host}:{stack.source.port}/postgres")
    app = CrmApp(stack.workdir, source_url).start()
    data["ssh"] = {"host": vps.host, "port": vps.port, "user": vps.user,
                   "private_key": {"env": "LIFTOFF_TEST_SSH_KEY"}, "known_hosts": str(vps.known_hosts_path)}
    data["cutover"] = {
        "checklist": {"manual": ["Team notified of the maintenance window"]},
        "freeze": [{"method": "revoke", "roles": ["anon", "authenticated", "service_role"]},
                   {"method": "role", "roles": [WRITER]}],
        "switch": {"driver": "ssh", "ssh": {"env_file": str(app.env_file), "restart": app.restart_command},
                   "env": {"DATABASE_URL": {
                       "template": f"postgresql://crm_app:${{password}}@{stack.target.host}:{stack.target.port}/{name}",
                       "secrets": {"password": {"env": "LIFTOFF_TEST_APP_PASSWORD"}}}}},
        "apps": [{"name": "crm", "health_url": app.health_url}],
        "health_timeout_s": 30,
        "smoke_queries": ["SELECT count(*) FROM public.bookings"],
        "approval_timeout_s": 120,
    }
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    migrate_database(RunOptions(runbook=str(path)))
    assert app.database() == "postgres"  # the app runs on the source
    yield path, app, name
    app.stop()


APPROVE = {"approver": "Ada (ops)", "approve": True, "reason": "", "confirm_1": True}


def _variant(runbook, ssh: dict | None = None, **cutover_changes):
    """The same runbook (same state_dir, same ledger) with some cutover (or ssh) settings changed."""
    data = yaml.safe_load(runbook.read_text())
    for key, value in cutover_changes.items():
        data["cutover"][key] = value
    data["ssh"].update(ssh or {})
    path = runbook.with_name(f"{runbook.stem}-{next(_n)}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_cutover_switches_the_app_and_rollback_puts_it_back(stack, writer, cutover_setup):
    runbook, app, name = cutover_setup
    assert _writes(stack, writer) is None
    resumer = answer_when_paused("cutover", APPROVE)
    result = cutover(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert app.database() == name  # the app now runs on the target
    assert _writes(stack, writer) == "25006"  # read_only_sql_transaction: the source takes no app writes
    assert 0 < result["downtime_s"] and set(result["steps"]) == {"freeze", "final sync", "switch", "smoke test"}
    assert "Downtime" in last_markdown("cutover-downtime")
    ledger = Ledger(load_runbook(runbook).state_dir)
    audit = [e for e in ledger.events("cutover") if e.what == "cutover.approval"]
    assert audit[-1].after["input"]["approver"] == "Ada (ops)" and audit[-1].before["checklist"]
    assert ledger.latest_gate("cutover").passed

    # the app wrote on the target since the switch: the rollback shows it and asks first
    stack.target.execute("INSERT INTO public.notes (owner_id, body) VALUES (gen_random_uuid(), 'after the switch')",
                         dbname=name)
    resumer = answer_when_paused("rollback", {"approver": "Ada (ops)", "approve": True, "reason": "app broken"})
    undone = rollback(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert any(r["where"].startswith("public.notes") for r in undone["stranded"])
    assert "public.notes" in last_markdown("rollback-plan")
    assert undone["unfreeze"]["lifted"] and undone["switch"]["switched_back"]
    assert app.database() == "postgres"  # back on the source
    assert _writes(stack, writer) is None  # and the source takes writes again
    with pytest.raises(StepFailed, match="nothing to roll back"):
        rollback(RunOptions(runbook=str(runbook)))


def test_a_rejection_ends_the_run_and_changes_nothing(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    resumer = answer_when_paused("cutover", {**APPROVE, "approve": False, "reason": "payments team not ready"})
    result = cutover(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert result["rejected"] and result["reason"] == "payments team not ready"
    assert app.database() == "postgres" and _writes(stack, writer) is None
    audit = [e for e in Ledger(load_runbook(runbook).state_dir).events("cutover") if e.what == "cutover.approval"]
    assert audit[-1].after["outcome"] == "rejected"


def test_an_approval_without_every_manual_line_confirmed_changes_nothing(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    resumer = answer_when_paused("cutover", {**APPROVE, "confirm_1": False})
    with pytest.raises(StepFailed, match="without confirming: Team notified"):
        cutover(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert app.database() == "postgres" and _writes(stack, writer) is None


def test_a_failed_smoke_test_rolls_back_by_itself(stack, writer, cutover_setup):
    runbook, app, name = cutover_setup
    runbook = _variant(runbook, smoke_queries=["SELECT count(*) FROM public.no_such_table"])
    resumer = answer_when_paused("cutover", APPROVE)
    with pytest.raises(StepFailed) as failed:
        cutover(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert "smoke test" in str(failed.value) and "rolled back automatically" in str(failed.value)
    assert app.database() == "postgres" and _writes(stack, writer) is None


def test_the_checklist_stops_a_cutover_whose_database_gate_is_stale(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    runbook = _variant(runbook, checklist={"manual": ["Team notified of the maintenance window"],
                                           "max_gate_age_hours": 1e-6})
    with pytest.raises(GateFailed, match="database"):
        cutover(RunOptions(runbook=str(runbook)))
    assert app.database() == "postgres" and _writes(stack, writer) is None


def test_no_approval_in_time_changes_nothing(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    with pytest.raises(StepFailed, match=r"no approval within 3 s \(cutover.approval_timeout_s\)"):
        cutover(RunOptions(runbook=str(_variant(runbook, approval_timeout_s=3))))
    assert app.database() == "postgres" and _writes(stack, writer) is None


def test_an_unknown_host_key_stops_the_switch_and_the_rollback_leaves_the_source_writable(stack, writer,
                                                                                         cutover_setup):
    runbook, app, _ = cutover_setup
    stranger = runbook.with_name("empty_known_hosts")
    stranger.write_text("")
    resumer = answer_when_paused("cutover", APPROVE)
    with pytest.raises(StepFailed) as failed:
        cutover(RunOptions(runbook=str(_variant(runbook, ssh={"known_hosts": str(stranger)}))))
    resumer.join(5)
    message = str(failed.value)
    assert "at the switch" in message and "known_hosts" in message and "rolled back automatically" in message
    assert app.database() == "postgres" and _writes(stack, writer) is None


def test_an_app_never_healthy_on_the_target_is_rolled_back_onto_the_source(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    broken = {"DATABASE_URL": {"template": f"postgresql://crm_app:${{password}}@{stack.target.host}:"
                                           f"{stack.target.port}/no_such_database",
                               "secrets": {"password": {"env": "LIFTOFF_TEST_APP_PASSWORD"}}}}
    data = yaml.safe_load(runbook.read_text())
    switch = {**data["cutover"]["switch"], "env": broken}
    resumer = answer_when_paused("cutover", APPROVE)
    with pytest.raises(StepFailed) as failed:
        cutover(RunOptions(runbook=str(_variant(runbook, switch=switch, health_timeout_s=4))))
    resumer.join(5)
    message = str(failed.value)
    assert "app crm is not healthy" in message and "after 4 s" in message and "rolled back automatically" in message
    assert app.database() == "postgres" and _writes(stack, writer) is None
