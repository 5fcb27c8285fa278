"""What the freeze cannot stop, carried: Supabase Auth's sign-ups (and the profiles its trigger writes) go on
during the cutover; the final sync's gate leaves them to the catch-up after the switch, which carries every
one the source acknowledged before it read; `catch-up` carries the rest later; and the rollback tells the
apps' changes on the target from the source's own on those tables. Real servers: the Supabase-shaped source,
the target, the sshd standing in for the VPS, the Prefect server through which the operator answers."""

from __future__ import annotations

import time
import uuid

import pytest

from liftoff.flows.catch_up import catch_up_after_switch
from liftoff.flows.cutover import cutover
from liftoff.flows.options import RunOptions
from liftoff.flows.rollback import rollback
from liftoff.errors import StepFailed
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff_sandbox.operator import answer_when_paused
from liftoff_sandbox.writers import SignupWriter
from liftoff.runbooks.model import load_runbook
from test_cutover import APPROVE, _variant, cutover_setup, vps, writer  # noqa: F401 - module fixtures


def sign_ups(stack) -> SignupWriter:
    """Supabase Auth as the source sees it: users inserted into auth.users as supabase_auth_admin every
    ~20 ms (the app's trigger writes each one's profile), each recorded once its COMMIT returned."""
    writer = SignupWriter(stack.source.conninfo("postgres"), role="supabase_auth_admin", max_s=120)
    writer.start()
    return writer


def _on_target(stack, database: str, ids: list[str]) -> tuple[set[str], dict[str, int]]:
    """The ids present in the target's auth.users, and how many profiles each has there."""
    users = {str(r[0]) for r in stack.target.execute(
        f"SELECT id FROM auth.users WHERE id = ANY('{{{','.join(ids)}}}'::uuid[])", dbname=database)} if ids else set()
    profiles = {str(r[0]): r[1] for r in stack.target.execute(
        f"SELECT id, count(*) FROM public.profiles WHERE id = ANY('{{{','.join(ids)}}}'::uuid[]) GROUP BY id",
        dbname=database)} if ids else {}
    return users, profiles


@pytest.fixture(scope="module")
def unfrozen(cutover_setup):
    """The cutover runbook with public.profiles named as written by something the freeze cannot stop (the
    sign-up trigger on auth.users)."""
    runbook, app, name = cutover_setup
    return _variant(runbook, unfrozen_tables=["public.profiles"]), app, name


def test_sign_ups_during_the_freeze_are_carried_after_the_switch_and_later_ones_by_catch_up(stack, unfrozen):
    runbook, app, name = unfrozen
    resumer = answer_when_paused("cutover", APPROVE, under=stack.workdir)
    signups = sign_ups(stack)
    try:
        time.sleep(0.3)
        result = cutover(RunOptions(runbook=str(runbook)))
        resumer.join(5)
        carried = {t["table"]: t for t in result["catch_up"]["tables"]}
        until = result["catch_up"]["until"]
        before = [str(w.key[0]) for w in signups.acked() if w.acked_at < until]
        time.sleep(0.3)  # sign-ups keep coming after the cutover: Supabase Auth stays on Supabase
    finally:
        signups.stop()
    assert app.database() == name
    # the final sync's gate passed although auth.users and profiles changed under it
    ledger = Ledger(load_runbook(runbook).state_dir)
    assert ledger.latest_gate("database").passed and ledger.latest_gate("catch-up").passed
    assert "public.profiles" in (last_markdown("verify-summary") or "")
    # every sign-up acknowledged before the catch-up read the source is on the target, with one profile
    users, profiles = _on_target(stack, name, before)
    assert set(before) == users and all(profiles.get(u) == 1 for u in before), (len(before), len(users))
    assert carried["auth.users"]["inserts"] > 0 and carried["public.profiles"]["inserts"] > 0  # some came late
    assert "auth.users" in last_markdown("cutover-catch-up")

    # later sign-ups, an e-mail changed and a user deleted (its profile goes with it), by `catch-up`
    everyone = [str(w.key[0]) for w in signups.acked()]
    changed, gone = before[0], before[1]
    stack.source.execute(f"SET ROLE supabase_auth_admin; UPDATE auth.users SET email = 'new@signup.test' "
                         f"WHERE id = '{changed}'; DELETE FROM auth.users WHERE id = '{gone}'")
    # ``until`` is taken just before the catch-up's snapshot: a few sign-ups after it were carried already
    already, _ = _on_target(stack, name, everyone)
    done = catch_up_after_switch(RunOptions(runbook=str(runbook)))
    counts = {t["table"]: t for t in done["tables"]}
    users, profiles = _on_target(stack, name, everyone)
    assert users == set(everyone) - {gone} and gone not in profiles
    assert all(profiles.get(u) == 1 for u in users)
    assert stack.target.execute(f"SELECT email FROM auth.users WHERE id = '{changed}'", dbname=name) == [
        ("new@signup.test",)]
    assert counts["auth.users"]["updates"] == 1 and counts["auth.users"]["deletes"] == 1
    assert counts["auth.users"]["inserts"] == len(set(everyone) - already) > 0

    # a profile changed on both sides: named, the target's (the app's) kept
    both = before[2]
    stack.target.execute(f"UPDATE public.profiles SET full_name = 'app on the target' WHERE id = '{both}'",
                         dbname=name)
    stack.source.execute(f"UPDATE public.profiles SET full_name = 'trigger on the source' WHERE id = '{both}'")
    done = catch_up_after_switch(RunOptions(runbook=str(runbook)))
    assert any(both in c and "changed on both sides" in c for c in done["conflicts"])
    assert stack.target.execute(f"SELECT full_name FROM public.profiles WHERE id = '{both}'", dbname=name) == [
        ("app on the target",)]

    # the rollback: the app's changes on the target go back; the source's own sign-ups since stay
    app_note = stack.target.execute("INSERT INTO public.notes (owner_id, body) VALUES (gen_random_uuid(), "
                                    "'written on the target') RETURNING id", dbname=name)[0][0]
    dropped = before[3]
    stack.target.execute(f"DELETE FROM public.profiles WHERE id = '{dropped}'", dbname=name)
    late = str(uuid.uuid4())
    stack.source.execute(f"SET ROLE supabase_auth_admin; INSERT INTO auth.users (id, email) VALUES "
                         f"('{late}', 'late@signup.test')")  # its profile is written on the source only
    resumer = answer_when_paused("rollback", {"approver": "Ada (ops)", "approve": True, "reason": "test",
                                              "carry": "apply"}, under=stack.workdir)
    undone = rollback(RunOptions(runbook=str(runbook)))
    resumer.join(5)
    tables = undone["changes"]["tables"]
    assert tables["public.notes"] == {"inserts": 1, "updates": 0, "deletes": 0}
    # the profile the catch-up kept as the app wrote it goes back too; the late sign-up's is the source's own
    assert tables["public.profiles"] == {"inserts": 0, "updates": 1, "deletes": 1}
    assert undone["changes"]["total"] == 3 and not undone["changes"]["conflicts"] and not undone["changes"]["both"]
    assert stack.source.execute(f"SELECT full_name FROM public.profiles WHERE id = '{both}'") == [
        ("app on the target",)]
    assert stack.source.execute(f"SELECT body FROM public.notes WHERE id = {app_note}") == [("written on the target",)]
    assert stack.source.execute(f"SELECT count(*) FROM public.profiles WHERE id = '{dropped}'") == [(0,)]
    assert stack.source.execute(f"SELECT count(*) FROM public.profiles WHERE id = '{late}'") == [(1,)]
    assert app.database() == "postgres"


def test_catch_up_needs_a_kept_cutover(stack, unfrozen):
    runbook, _, _ = unfrozen
    with pytest.raises(StepFailed, match="no kept cutover to catch up after"):
        catch_up_after_switch(RunOptions(runbook=str(runbook)))
