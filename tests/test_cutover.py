"""The cutover and its rollback against real servers: the Supabase-shaped source and a target (PostgreSQL),
a real sshd standing in for the VPS, on which a small app reads its env file and reports through its health
endpoint which database it is connected to, and a real Prefect server through which the test approves or
rejects the paused run, as an operator does in the UI (also while the `liftoff` CLI waits). The resync, the way
back to a cutover after a failed one, runs against the same servers."""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import run_cli
from liftoff.flows.cutover import cutover
from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.flows.resync import resync
from liftoff.flows.rollback import rollback
from liftoff.flows.verify import verify_database
from liftoff.errors import EXIT_NOT_APPROVED, GateFailed, NotApproved, StepFailed
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff_sandbox.crm_app import CrmApp
from liftoff_sandbox.operator import answer_when_paused
from liftoff.runbooks.model import load_runbook

_n = itertools.count()
WRITER = "crm_writer"


@pytest.fixture(scope="module")
def vps(module_env):
    from liftoff_sandbox.ssh import SshServer

    server = SshServer().start()
    module_env.setenv("LIFTOFF_TEST_SSH_KEY", server.client_key_text)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def writer(stack, module_env):
    """An app login role on the source and a table outside the migrated schemas it writes to: what the freeze
    must stop and the rollback must let through again."""
    password = secrets.token_urlsafe(12)
    stack.source.execute(
        f"CREATE ROLE {WRITER} LOGIN PASSWORD '{password}'; CREATE SCHEMA cutover_probe; "
        "CREATE TABLE cutover_probe.writes (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now()); "
        f"GRANT USAGE ON SCHEMA cutover_probe TO {WRITER}; GRANT SELECT, INSERT ON cutover_probe.writes TO {WRITER}; "
        f"GRANT USAGE ON SEQUENCE cutover_probe.writes_id_seq TO {WRITER}")
    module_env.setenv("LIFTOFF_TEST_APP_PASSWORD", stack.passwords["app"])
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


def _api_privileges(server, dbname: str = "postgres") -> dict[tuple[str, str, str], bool]:
    """Per (table, API role, privilege): whether the role may SELECT/INSERT/UPDATE/DELETE the table or view of
    ``public``, as PostgreSQL itself answers it (has_table_privilege)."""
    rows = server.execute(
        """SELECT n.nspname || '.' || c.relname, r.rolname, p.priv, has_table_privilege(r.oid, c.oid, p.priv)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN pg_roles r CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p(priv)
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v')
              AND r.rolname IN ('anon', 'authenticated', 'service_role')""", dbname=dbname)
    return {(table, role, privilege): has for table, role, privilege, has in rows}


def _events(runbook, what: str) -> int:
    """How many events of kind ``what`` the runbook's ledger holds (the cutover's log)."""
    return sum(e.what == what for e in Ledger(load_runbook(runbook).state_dir).events("cutover"))


@pytest.fixture(scope="module")
def cutover_setup(stack, vps, writer):
    """A runbook whose target database its own ledger migrated (as an operator's would be), the app running on
    the source, and the switch pointing it at the target. Shared by the tests below: each leaves the app on
    the source and the source writable, as it found them (which each asserts)."""
    name = f"cut{os.getpid()}_{next(_n)}"  # unique across the modules (and xdist workers) that share this fixture
    stack.new_target_database(name)
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=name)
    data["storage"] = {}
    source_url = (f"postgresql://{WRITER}:{writer}@{stack.source.host}:{stack.source.port}/postgres")
    app = CrmApp(stack.workdir, source_url).start()
    data.update(stack.cutover_sections(vps, app, name, WRITER, env_prefix="LIFTOFF_TEST",
                                       manual=["Team notified of the maintenance window"]))
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


MAINTENANCE = {"on": {"MAINTENANCE_MODE": "1"}, "off": {"MAINTENANCE_MODE": "0"}}


def _maintenance_value(app) -> str | None:
    found = [line.split("=", 1)[1] for line in app.env_file.read_text().splitlines()
             if line.startswith("MAINTENANCE_MODE=")]
    return found[-1] if found else None


def test_cutover_switches_the_app_and_rollback_puts_it_back(stack, writer, cutover_setup):
    runbook, app, name = cutover_setup
    runbook = _variant(runbook, maintenance=MAINTENANCE)  # the site in maintenance through the cutover
    assert _writes(stack, writer) is None
    before_freeze = _api_privileges(stack.source)
    assert any(has for (_, _, privilege), has in before_freeze.items() if privilege == "INSERT")
    resumer = answer_when_paused("cutover", APPROVE, under=stack.workdir)
    result = cutover(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert app.database() == name  # the app now runs on the target
    assert _writes(stack, writer) == "25006"  # read_only_sql_transaction: the source takes no app writes
    assert 0 < result["downtime_s"] and {"freeze", "final sync", "switch", "smoke test"} <= set(result["steps"])
    assert "Downtime" in last_markdown("cutover-downtime")
    ledger = Ledger(load_runbook(runbook).state_dir)
    # maintenance on before the freeze, off after the smoke test; the downtime report says the site was in it
    order = [e.what for e in ledger.events("cutover") if e.what in (
        "cutover.maintenance-on", "cutover.freeze", "cutover.switch", "cutover.maintenance-off")][-4:]
    assert order == ["cutover.maintenance-on", "cutover.freeze", "cutover.switch", "cutover.maintenance-off"]
    assert result["maintenance"] and list(result["steps"])[-1] == "maintenance off"
    assert _maintenance_value(app) == "0" and "was in maintenance mode" in last_markdown("cutover-downtime")
    audit = [e for e in ledger.events("cutover") if e.what == "cutover.approval"]
    assert audit[-1].after["input"]["approver"] == "Ada (ops)" and audit[-1].before["checklist"]
    assert ledger.latest_gate("cutover").passed

    # The final sync exported the frozen source, yet the target's API roles hold the source's access as it was
    # before the freeze (INSERT/UPDATE/DELETE included), while the source's stay frozen.
    assert _api_privileges(stack.target, name) == before_freeze
    frozen = _api_privileges(stack.source)
    assert not any(has for (_, _, privilege), has in frozen.items() if privilege != "SELECT")
    assert {k: v for k, v in frozen.items() if k[2] == "SELECT"} == {
        k: v for k, v in before_freeze.items() if k[2] == "SELECT"}

    # the app wrote on the target since the switch: a resync, which reloads every table, is refused
    stack.target.execute("INSERT INTO public.notes (owner_id, body) VALUES (gen_random_uuid(), 'after the switch')",
                         dbname=name)
    with pytest.raises(StepFailed, match="no rollback followed.*run `liftoff run rollback` first") as refused:
        resync(RunOptions(runbook=str(runbook)))
    assert "\n" not in str(refused.value)
    assert stack.target.execute("SELECT count(*) FROM public.notes WHERE body = 'after the switch'",
                                dbname=name) == [(1,)]

    # the rollback shows the app's write on the target and asks first; "file" leaves the shared source as it was
    resumer = answer_when_paused("rollback", {"approver": "Ada (ops)", "approve": True, "reason": "app broken",
                                              "carry": "file"}, under=stack.workdir)
    undone = rollback(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert "public.notes" in last_markdown("rollback-plan")
    assert undone["unfreeze"]["lifted"] and undone["switch"]["switched_back"]
    assert app.database() == "postgres"  # back on the source
    # the env file put back is the one from before the switch, written in maintenance: the rollback sets off
    assert _maintenance_value(app) == "0"
    assert _writes(stack, writer) is None  # and the source takes writes again
    assert _api_privileges(stack.source) == before_freeze  # with exactly the grants it had
    with pytest.raises(StepFailed, match="nothing to roll back"):
        rollback(RunOptions(runbook=str(runbook)))

    # the app's note is only on the target and in the rollback's file: nothing reloads the target until the
    # operator says it was dealt with
    changes_file = Path(undone["changes"]["file"])
    assert json.loads(changes_file.read_text().splitlines()[0])["row"]["body"] == "after the switch"
    assert changes_file.stat().st_mode & 0o077 == 0  # the apps' data: the owner's only
    with pytest.raises(StepFailed, match=r"left the apps' changes on the target 1 change\(s\) only in .*touch (\S+)") \
            as stranded:
        resync(RunOptions(runbook=str(runbook)))
    Path(re.search(r"touch (\S+?)` and run again", str(stranded.value)).group(1)).touch()

    # rolled back, the target is brought up to the source again before the next attempt
    synced = resync(RunOptions(runbook=str(runbook)))
    assert synced["database"]["verify"]["tables"] > 0
    assert Ledger(load_runbook(runbook).state_dir).latest_gate("database").passed
    assert stack.target.execute("SELECT count(*) FROM public.notes WHERE body = 'after the switch'",
                                dbname=name) == [(0,)]
    assert _api_privileges(stack.target, name) == before_freeze


REJECT = {**APPROVE, "approve": False, "reason": "payments team not ready"}
REJECTED = ("cutover rejected by Ada (ops): payments team not ready; nothing changed, the source is writable and "
            "the apps stay on it")


def test_a_rejection_ends_the_run_and_changes_nothing(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    freezes, starts = _events(runbook, "cutover.freeze"), _events(runbook, "cutover.started")
    resumer = answer_when_paused("cutover", REJECT, under=stack.workdir)
    with pytest.raises(NotApproved) as rejected:
        cutover(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert str(rejected.value) == REJECTED
    assert rejected.value.exit_code == EXIT_NOT_APPROVED == 4
    assert app.database() == "postgres" and _writes(stack, writer) is None
    assert (_events(runbook, "cutover.freeze"), _events(runbook, "cutover.started")) == (freezes, starts)
    audit = [e for e in Ledger(load_runbook(runbook).state_dir).events("cutover") if e.what == "cutover.approval"]
    assert audit[-1].after["outcome"] == "rejected"


def test_a_rejection_from_the_cli_exits_4_with_one_line_naming_who_rejected(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    resumer = answer_when_paused("cutover", REJECT, under=stack.workdir)  # the operator answers in the UI while the CLI waits
    done = run_cli("run", "cutover", "--runbook", str(runbook), timeout=180)
    resumer.join(5)
    assert done.returncode == EXIT_NOT_APPROVED, done.stdout[-2000:] + done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if line.startswith(("error:", "unexpected error:"))]
    assert said == [f"error: {REJECTED}"], done.stderr[-2000:]
    assert app.database() == "postgres" and _writes(stack, writer) is None


def test_an_approval_without_every_manual_line_confirmed_changes_nothing(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    freezes = _events(runbook, "cutover.freeze")
    resumer = answer_when_paused("cutover", {**APPROVE, "confirm_1": False}, under=stack.workdir)
    with pytest.raises(NotApproved, match=r"^approved by Ada \(ops\) without confirming: Team notified of the "
                                          r"maintenance window; nothing changed") as unconfirmed:
        cutover(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert unconfirmed.value.exit_code == EXIT_NOT_APPROVED
    assert app.database() == "postgres" and _writes(stack, writer) is None
    assert _events(runbook, "cutover.freeze") == freezes


def test_a_final_sync_whose_gate_fails_is_rolled_back_and_resync_brings_the_target_up_to_the_source(
        stack, writer, cutover_setup):
    runbook, app, name = cutover_setup
    before_freeze = _api_privileges(stack.source)
    # a policy on the target only: the reload leaves it, so the final sync's gate fails after the freeze
    stack.target.execute("CREATE POLICY everyone ON public.payments FOR SELECT TO public USING (true)", dbname=name)
    try:
        resumer = answer_when_paused("cutover", APPROVE, under=stack.workdir)
        with pytest.raises(StepFailed) as failed:
            cutover(RunOptions(runbook=str(runbook)))
        resumer.join(5)
    finally:
        stack.target.execute("DROP POLICY everyone ON public.payments", dbname=name)
    message = str(failed.value)
    assert "\n" not in message
    assert "cutover failed at the final sync (database gate failed: policy public.payments.everyone:" in message
    assert "rolled back automatically" in message and f"`liftoff run resync --runbook {runbook}`" in message
    assert app.database() == "postgres" and _writes(stack, writer) is None
    assert _api_privileges(stack.source) == before_freeze

    # the source takes writes again, which the failed final sync's export does not hold
    stack.source.execute(
        "INSERT INTO public.customers (full_name, email) VALUES ('Resync Probe', 'resync@example.com')")
    try:
        with pytest.raises(GateFailed) as stale:
            verify_database(RunOptions(runbook=str(runbook)))
        first = str(stale.value).splitlines()[0]
        assert first.startswith("database gate failed: table public.customers: row count differs"), first
        resync(RunOptions(runbook=str(runbook)))
        assert Ledger(load_runbook(runbook).state_dir).latest_gate("database").passed
        assert stack.target.execute("SELECT full_name FROM public.customers WHERE email = 'resync@example.com'",
                                    dbname=name) == [("Resync Probe",)]
    finally:  # the source is shared with other tests: as it was (customers has no sequence to move back)
        stack.source.execute("DELETE FROM public.customers WHERE email = 'resync@example.com'")

    # The reason is the gate's first line (its first differences), once: not every difference folded after it.
    # Checked last: the steps above leave the shared runbook with a passed gate for the tests after this one.
    assert ("cutover failed at the final sync (database gate failed: policy public.payments.everyone: on the target "
            "only, not on the source); rolled back automatically") in message, message


def test_a_failed_smoke_test_rolls_back_by_itself(stack, writer, cutover_setup):
    runbook, app, name = cutover_setup
    runbook = _variant(runbook, smoke_queries=["SELECT count(*) FROM public.no_such_table"], maintenance=MAINTENANCE)
    resumer = answer_when_paused("cutover", APPROVE, under=stack.workdir)
    with pytest.raises(StepFailed) as failed:
        cutover(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    assert "smoke test" in str(failed.value) and "rolled back automatically" in str(failed.value)
    assert app.database() == "postgres" and _writes(stack, writer) is None
    assert _maintenance_value(app) == "0"  # the automatic rollback took the site out of maintenance


def test_the_checklist_stops_a_cutover_whose_database_gate_is_stale(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    runbook = _variant(runbook, checklist={"manual": ["Team notified of the maintenance window"],
                                           "max_gate_age_hours": 1e-6})
    with pytest.raises(GateFailed, match="database"):
        cutover(RunOptions(runbook=str(runbook)))
    assert app.database() == "postgres" and _writes(stack, writer) is None


def test_no_approval_in_time_changes_nothing(stack, writer, cutover_setup):
    runbook, app, _ = cutover_setup
    freezes = _events(runbook, "cutover.freeze")
    with pytest.raises(NotApproved, match=r"^no approval within 3 s \(cutover.approval_timeout_s\); nothing "
                                          r"changed") as timed_out:
        cutover(RunOptions(runbook=str(_variant(runbook, approval_timeout_s=3))))
    assert timed_out.value.exit_code == EXIT_NOT_APPROVED
    assert app.database() == "postgres" and _writes(stack, writer) is None
    assert _events(runbook, "cutover.freeze") == freezes
    audit = [e for e in Ledger(load_runbook(runbook).state_dir).events("cutover") if e.what == "cutover.approval"]
    assert audit[-1].after["outcome"] == "timed out"


def test_an_unknown_host_key_stops_the_switch_and_the_rollback_leaves_the_source_writable(stack, writer,
                                                                                         cutover_setup):
    runbook, app, _ = cutover_setup
    stranger = runbook.with_name("empty_known_hosts")
    stranger.write_text("")
    resumer = answer_when_paused("cutover", APPROVE, under=stack.workdir)
    with pytest.raises(StepFailed) as failed:
        cutover(RunOptions(runbook=str(_variant(runbook, ssh={"known_hosts": str(stranger)}))))
    resumer.join(5)
    message = str(failed.value)
    assert "at the switch" in message and "known_hosts" in message and "rolled back automatically" in message
    assert app.database() == "postgres" and _writes(stack, writer) is None


def test_an_app_never_healthy_on_the_target_is_rolled_back_onto_the_source(stack, writer, cutover_setup):
    """Something wrote on the target between the switch and the failed smoke test (another app, a worker):
    the automatic rollback finds it with the target frozen, writes it to its file, says where, and leaves
    the source as it was."""
    runbook, app, name = cutover_setup
    broken = {"DATABASE_URL": {"template": f"postgresql://crm_app:${{password}}@{stack.target.host}:"
                                           f"{stack.target.port}/no_such_database",
                               "secrets": {"password": {"env": "LIFTOFF_TEST_APP_PASSWORD"}}}}
    data = yaml.safe_load(runbook.read_text())
    switch = {**data["cutover"]["switch"], "env": broken}
    ledger = Ledger(load_runbook(runbook).state_dir)
    switches = len([e for e in ledger.events("cutover") if e.what == "cutover.switch"])
    body = f"written during the smoke test {secrets.token_hex(4)}"

    def write_after_the_switch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len([e for e in ledger.events("cutover") if e.what == "cutover.switch"]) > switches:
                stack.target.execute(f"INSERT INTO public.notes (owner_id, body) VALUES (gen_random_uuid(), '{body}')",
                                     dbname=name)
                return
            time.sleep(0.05)

    other_app = threading.Thread(target=write_after_the_switch, daemon=True)
    other_app.start()
    resumer = answer_when_paused("cutover", APPROVE, under=stack.workdir)
    with pytest.raises(StepFailed) as failed:
        cutover(RunOptions(runbook=str(_variant(runbook, switch=switch, health_timeout_s=4))))
    resumer.join(5)
    other_app.join(5)
    message = str(failed.value)
    assert "app crm is not healthy" in message and "after 4 s" in message and "rolled back automatically" in message
    assert app.database() == "postgres" and _writes(stack, writer) is None
    where = re.search(r"1 change\(s\) the apps made on the target were written to (\S+\.jsonl)", message)
    assert where, message
    lines = [json.loads(line) for line in Path(where.group(1)).read_text().splitlines()]
    assert [(c["table"], c["op"], c["row"]["body"]) for c in lines] == [("public.notes", "insert", body)]
    assert stack.source.execute(f"SELECT count(*) FROM public.notes WHERE body = '{body}'") == [(0,)]
    # the next cutover would reload the target over that row: refused, before anything is asked or changed
    with pytest.raises(StepFailed, match=r"only in \S+\.jsonl; reloading the target would destroy them"):
        cutover(RunOptions(runbook=str(runbook)))
