"""The acceptance test of "the cutover and the rollback lose nothing": writers keep writing through the whole
cutover and its rollback (PostgREST as ``authenticator``, the app's pool following its env file, Supabase
Auth signing users up, Supabase Storage storing uploads), each logging only what the database acknowledged
(COMMIT returned); then every acknowledged write must be where it belongs: on the target once the cutover
stood, back on the source once the rollback carried the target's changes there. Real servers throughout: the
stack's Supabase-shaped source and its target, two SeaweedFS servers (Supabase Storage's backend and the
target's S3 server), a real sshd as the VPS with the stand-in app, and the suite's Prefect server, through
which the test approves as an operator does.

Supabase Auth and Storage are not frozen by the cutover (they stay on Supabase) and write the source all the
time; the final sync's gates must leave what they write after the freeze to the catch-up, which carries it.
The sign-up trigger's table (public.profiles) is not listed in the runbook: Liftoff must find it itself."""

from __future__ import annotations

import json
import secrets
import time

import psycopg
import pytest
import yaml

from helpers import seeded_storage
from liftoff.flows.cutover import cutover
from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.flows.rollback import automatic_rollback, rollback
from liftoff.flows.storage import migrate_storage
from liftoff_sandbox import writers as w
from liftoff_sandbox.crm_app import CrmApp
from liftoff_sandbox.operator import answer_when_paused
from liftoff_sandbox.supabase_source import SUPABASE_PROJECT_URL
from test_cutover import vps  # noqa: F401 - the module's sshd standing in for the VPS

LOGIN_ROLE = "acked_writer"  # the app's LOGIN role on the source (the freeze's ``role`` method)
PLATFORM_ROLES = ("authenticator", "supabase_auth_admin", "supabase_storage_admin")  # no password in the sandbox
SEEDED_ROWS = 1500  # per test table: enough distinct rows for every update and delete of the run
UPLOAD_BUCKET = "waivers"
ON_TARGET_S = 2.0
APPROVE = {"approver": "Ada (ops)", "approve": True, "reason": "", "confirm_1": True}
ROLL_BACK = {"approver": "Ada (ops)", "approve": True, "reason": "writers acceptance test", "carry": "apply"}


@pytest.fixture(scope="module")
def storage_servers(stack, module_env):
    """Supabase Storage's S3 backend, seeded with the bytes of every ``storage.objects`` row of the source, and
    the target's S3 server (the session stack has neither)."""
    with seeded_storage(stack, "LIFTOFF_WRITERS", module_env) as (supabase_s3, target, _):
        yield supabase_s3, target


@pytest.fixture(scope="module")
def source_roles(stack, module_env):
    """Passwords for the platform's LOGIN roles the writers log in as (PostgREST's, Auth's, Storage's) and the
    app's LOGIN role; the test tables in ``public`` (owned by ``postgres``, so Supabase's default privileges
    give the API roles their access), seeded. Everything is put back at the end: the source is shared."""
    passwords = {role: secrets.token_urlsafe(12) for role in (*PLATFORM_ROLES, LOGIN_ROLE)}
    stack.source.execute(f"CREATE ROLE {LOGIN_ROLE} LOGIN PASSWORD '{passwords[LOGIN_ROLE]}'; " + " ".join(
        f"ALTER ROLE {role} PASSWORD '{passwords[role]}';" for role in PLATFORM_ROLES))
    try:
        with psycopg.connect(stack.source.conninfo(), autocommit=True) as conn:
            conn.execute("SET ROLE postgres")
            pool = w.create_tables(conn, SEEDED_ROWS, grant_to=[LOGIN_ROLE])
        module_env.setenv("LIFTOFF_TEST_APP_PASSWORD", stack.passwords["app"])
        yield passwords, pool
    finally:
        with psycopg.connect(stack.source.conninfo(), autocommit=True) as conn:
            w.drop_tables(conn)
            conn.execute("DELETE FROM auth.users WHERE email LIKE '%@writers.example'")  # their profiles cascade
            conn.execute("DELETE FROM storage.objects WHERE name LIKE 'writers/%'")
            conn.execute(f"DROP OWNED BY {LOGIN_ROLE}; DROP ROLE {LOGIN_ROLE}; " + " ".join(
                f"ALTER ROLE {role} PASSWORD NULL;" for role in PLATFORM_ROLES))


@pytest.fixture(scope="module")
def cutover_setup(stack, vps, storage_servers, source_roles):
    """As tests/test_cutover.py's: a runbook whose own ledger migrated its own target database (and the
    storage), the app running on the source as its LOGIN role, the switch pointing it at the target; here
    with storage, and the app's LOGIN role frozen with the ``role`` method."""
    passwords, _ = source_roles
    supabase_s3, target_s3 = storage_servers
    name = "cutwriters"
    stack.new_target_database(name)
    data = stack.runbook_data(state_dir=f"state-{name}", target_database=name)
    data["database"]["roles"] = {LOGIN_ROLE: "drop_references"}  # on the target the app logs in as crm_app
    data["storage"].update(
        source={"project_url": SUPABASE_PROJECT_URL,
                "s3": {"endpoint_url": supabase_s3.endpoint_url,
                       "access_key_id": {"env": "LIFTOFF_WRITERS_SUPABASE_S3_KEY"},
                       "secret_access_key": {"env": "LIFTOFF_WRITERS_SUPABASE_S3_SECRET"}}},
        target={"endpoint_url": target_s3.endpoint_url, "access_key_id": {"env": "LIFTOFF_WRITERS_TARGET_S3_KEY"},
                "secret_access_key": {"env": "LIFTOFF_WRITERS_TARGET_S3_SECRET"},
                "public_url": "http://files.localhost"})
    source_url = (f"postgresql://{LOGIN_ROLE}:{passwords[LOGIN_ROLE]}@{stack.source.host}:{stack.source.port}"
                  "/postgres")
    app = CrmApp(stack.workdir, source_url).start()
    data.update(stack.cutover_sections(vps, app, name, LOGIN_ROLE, env_prefix="LIFTOFF_TEST",
                                       manual=["Team notified of the maintenance window"]))
    # No cutover.unfrozen_tables: the sign-up trigger on auth.users writes public.profiles, and Liftoff finds
    # that table from the trigger's function (a rollback that missed it deleted 116 profiles)
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    migrate_database(RunOptions(runbook=str(path)))
    migrate_storage(RunOptions(runbook=str(path)))
    assert app.database() == "postgres"  # the app runs on the source
    yield path, app, name
    if app.database() != "postgres":  # a test stopped between the switch and the rollback: the app back
        automatic_rollback(RunOptions(runbook=str(path)))
    app.stop()


def _api_privileges(server, dbname: str = "postgres") -> dict[tuple[str, str, str], bool]:
    """Per (table, API role, privilege): whether the role may INSERT/UPDATE/DELETE the table or view of
    ``public``, as PostgreSQL itself answers it (has_table_privilege)."""
    rows = server.execute(
        """SELECT n.nspname || '.' || c.relname, r.rolname, p.priv, has_table_privilege(r.oid, c.oid, p.priv)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN pg_roles r CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE', 'DELETE']) AS p(priv)
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v')
              AND r.rolname IN ('anon', 'authenticated', 'service_role')""", dbname=dbname)
    return {(table, role, privilege): has for table, role, privilege, has in rows}


def _writers(stack, app, storage_servers, source_roles) -> w.Writers:
    passwords, pool = source_roles
    supabase_s3, _ = storage_servers
    source = stack.source
    return w.Writers([
        w.TableWriter("api", w.api_route(app.env_file, source.port,
                                         source.conninfo("postgres", "authenticator", passwords["authenticator"])),
                      pool, read_write=True, number=1),
        w.TableWriter("login", w.env_file_route(app.env_file, source.port), pool, read_write=False, number=2),
        w.SignupWriter(source.conninfo("postgres", "supabase_auth_admin", passwords["supabase_auth_admin"])),
        w.Uploader(supabase_s3.client(), source.conninfo("postgres", "supabase_storage_admin",
                                                         passwords["supabase_storage_admin"]), UPLOAD_BUCKET),
    ])


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_the_cutover_and_its_rollback_lose_no_acknowledged_write(stack, storage_servers, source_roles,
                                                                   cutover_setup):
    runbook, app, name = cutover_setup
    supabase_s3, target_s3 = storage_servers
    before_freeze = _api_privileges(stack.source)
    assert any(before_freeze.values())
    writers = _writers(stack, app, storage_servers, source_roles).start()
    rows: list[dict] = []
    problems: list[str] = []
    try:
        assert _wait_for(lambda: all(x.acked() for x in writers.writers), 10), {
            x.kind: (x.outcomes, x.errors) for x in writers.writers}

        resumer = answer_when_paused("cutover", APPROVE, under=stack.workdir)
        started = time.time()
        try:
            result = cutover(RunOptions(runbook=str(runbook)))
        finally:
            resumer.join(5)
        returned = time.time()
        assert app.database() == name  # the cutover stood: the app runs on the target

        # --- right after the kept cutover: the target holds every write acknowledged on the source -------
        # the catch-up read the source at ``until``: every sign-up and upload acknowledged before is carried
        copied_until = result["catch_up"]["until"]
        with psycopg.connect(stack.target.conninfo(name), autocommit=True) as tgt:
            source_side = [x for x in writers.acked(where=w.SOURCE, before=returned) if x.kind in ("api", "login")]
            signups = writers.acked("signup", before=copied_until)
            for kind in ("api", "login"):
                mine = [x for x in source_side if x.kind == kind]
                lost = w.missing_on(tgt, mine)
                rows.append(_row(f"{kind} (source, before the switch) on target", mine, lost))
                if lost:
                    problems.append(f"{len(lost)} of {len(mine)} {kind} writes acknowledged on the source are missing "
                                    f"on the target after the cutover, e.g. {_examples(lost)}")
            lost = w.missing_on(tgt, signups)
            rows.append(_row("signup (before catch-up) on target", signups, lost))
            if lost:
                problems.append(f"{len(lost)} of {len(signups)} sign-ups acknowledged before the catch-up read the "
                                f"source are missing on the target's auth.users, e.g. {_examples(lost)}")
            lost = w.missing_profiles(tgt, signups)
            rows.append(_row("signup (before catch-up): profile on target", signups, lost))
            if lost:
                problems.append(f"{len(lost)} of {len(signups)} sign-ups acknowledged before the catch-up read the "
                                f"source have no profile on the target, e.g. {_examples(lost)}")
        uploads = writers.acked("upload", before=copied_until)
        lost = w.missing_uploads(target_s3.client(), uploads)
        rows.append(_row("upload (before catch-up) on target S3", uploads, lost))
        if lost:
            problems.append(f"{len(lost)} of {len(uploads)} uploads acknowledged before "
                            f"the catch-up read the source are missing on the target's S3 "
                            f"server, e.g. {_examples(lost)}")
        after_cutover = _api_privileges(stack.target, name)
        if after_cutover != before_freeze:
            differ = sorted(k for k in before_freeze.keys() | after_cutover.keys()
                            if before_freeze.get(k) != after_cutover.get(k))
            problems.append(f"the API roles' privileges on the target differ from the source's before the freeze "
                            f"at {len(differ)} (table, role, privilege), e.g. {differ[:5]}")

        # --- the apps write on the target, then the rollback carries it all back --------------------------
        assert _wait_for(lambda: len(writers.acked(where=w.TARGET)) >= 20, 10), {
            x.kind: (x.outcomes, x.errors) for x in writers.writers}
        # and the app stores a file on the target's S3 server, as it does once it runs there
        app_file = f"app-uploads/{secrets.token_hex(6)}.pdf"
        target_s3.client().put_object(Bucket=UPLOAD_BUCKET, Key=app_file, Body=b"%PDF uploaded on the target")
        time.sleep(ON_TARGET_S)
        resumer = answer_when_paused("rollback", ROLL_BACK, under=stack.workdir)
        try:
            undone = rollback(RunOptions(runbook=str(runbook)))
        finally:
            resumer.join(5)
        # the file is a change the rollback names in its file and, with apply, uploads to Supabase Storage
        # (here its S3 endpoint: the sandbox's SeaweedFS stands in for it)
        named = [json.loads(line) for line in open(undone["changes"]["file"]) if '"object"' in line]
        if undone["changes"]["objects"] != 1 or [o["object"]["key"] for o in named] != [app_file]:
            problems.append(f"the rollback named {undone['changes']['objects']} object change(s) "
                            f"({[o['object']['key'] for o in named]}), expected the app's upload {app_file}")
        carried_back = supabase_s3.client().get_object(Bucket=UPLOAD_BUCKET, Key=app_file)["Body"].read()
        if carried_back != b"%PDF uploaded on the target":
            problems.append("the app's upload on the target is not on Supabase Storage after the rollback")
        rolled_back = time.time()
        assert app.database() == "postgres"  # back on the source
        login = writers["login"]
        writes_again = _wait_for(lambda: writers.acked("login", where=w.SOURCE, after=rolled_back), 10)
        if not writes_again:
            problems.append(f"the LOGIN-role writer did not write on the source within 10 s of the rollback "
                            f"({dict(login.outcomes)}; {login.errors[-3:]})")
    except BaseException:
        writers.stop()
        _print_writers(writers)
        raise
    writers.stop()

    # --- after the rollback: the source holds every write acknowledged on the target ----------------------
    target_side = writers.acked(where=w.TARGET)
    with psycopg.connect(stack.source.conninfo(), autocommit=True) as src:
        for kind in ("api", "login"):
            mine = [x for x in target_side if x.kind == kind]
            lost = w.missing_on(src, mine)
            rows.append(_row(f"{kind} (target, after the switch) on source", mine, lost))
            if lost:
                problems.append(f"{len(lost)} of {len(mine)} {kind} writes acknowledged on the target are missing on "
                                f"the source after the rollback, e.g. {_examples(lost)}")
        again = [x for x in writers.acked(where=w.SOURCE, after=returned) if x.kind in ("api", "login")]
        lost = w.missing_on(src, again)
        rows.append(_row("api+login (source, after the switch back) on source", again, lost))
        if lost:
            problems.append(f"{len(lost)} of {len(again)} writes acknowledged on the source after the switch back are "
                            f"missing there, e.g. {_examples(lost)}")
        # each key was written once: every acknowledged write, wherever it went, must show on the source now
        every = [x for x in writers.acked() if x.kind in ("api", "login")]
        lost = w.missing_on(src, every)
        rows.append(_row("api+login (all) on source at the end", every, lost))
        if lost:
            problems.append(f"{len(lost)} of {len(every)} acknowledged table writes are not on the source at the end, "
                            f"e.g. {_examples(lost)}")
        signups = writers.acked("signup")
        lost = w.missing_on(src, signups)
        rows.append(_row("signup (all) on source auth.users", signups, lost))
        if lost:
            problems.append(f"{len(lost)} of {len(signups)} sign-ups are missing on the source, e.g. {_examples(lost)}")
        lost = w.missing_profiles(src, signups)
        rows.append(_row("signup (all): profile on source", signups, lost))
        if lost:
            switched = min((x.acked_at for x in target_side), default=returned)
            problems.append(
                f"{len(lost)} of {len(signups)} sign-ups lost the profile the source's trigger made for them "
                f"(public.profiles): acknowledged from {lost[0].acked_at - started:+.1f} s to "
                f"{lost[-1].acked_at - started:+.1f} s after the cutover started (first write on the target "
                f"{switched - started:+.1f} s, rollback returned {rolled_back - started:+.1f} s), e.g. "
                f"{_examples(lost)}")

    # --- the rollback's count of the target's changes against the truth from the log ----------------------
    truth = w.true_changes(target_side)
    reported = (undone.get("changes") or {}).get("tables", {})
    in_doubt = writers.in_doubt()
    changes = []
    for table in sorted(set(truth) | set(reported)):
        said, true = reported.get(table, {}), truth.get(table, {})
        for op in ("inserts", "updates", "deletes"):
            changes.append({"table": table, "op": op, "reported": said.get(op, 0), "true": true.get(op, 0)})
    wrong = [c for c in changes if c["reported"] != c["true"]]
    if wrong and not in_doubt:
        problems.append("the rollback's reported changes differ from the true ones: " + "; ".join(
            f"{c['table']} {c['op']}: reported {c['reported']}, true {c['true']}" for c in wrong))
    elif wrong:  # a COMMIT in doubt may have happened: the report may count it
        doubtful = w.true_changes(in_doubt)
        beyond = [c for c in wrong if not c["true"] <= c["reported"] <=
                  c["true"] + doubtful.get(c["table"], {}).get(c["op"], 0)]
        if beyond:
            problems.append("the rollback's reported changes differ from the true ones beyond the writes in "
                            "doubt: " + "; ".join(f"{c['table']} {c['op']}: reported {c['reported']}, true "
                                                  f"{c['true']}" for c in beyond))
    total_true = sum(sum(c.values()) for c in truth.values()) + 1  # and the app's upload on the target
    if (undone.get("changes") or {}).get("total") != total_true and not in_doubt:
        problems.append(f"the rollback reported {(undone.get('changes') or {}).get('total')} change(s) in all; "
                        f"the writers made {total_true} on the target")
    conflicts = (undone.get("changes") or {}).get("conflicts") or []
    if conflicts:
        problems.append(f"the rollback's carry had {len(conflicts)} conflict(s), e.g. {conflicts[:3]}")

    _print_report(writers, rows, changes, undone, result, started, returned, rolled_back, copied_until)
    assert not problems, "\n".join(problems)


def _row(what: str, acked: list, missing: list) -> dict:
    return {"check": what, "acknowledged": len(acked), "present": len(acked) - len(missing), "missing": len(missing)}


def _examples(writes: list, n: int = 3) -> str:
    return ", ".join(f"{x.table} {x.op} {x.key} at {x.acked_at:.2f}" for x in writes[:n])


def _print_writers(writers) -> None:
    print("\n== writers ==")
    print(f"{'writer':8} {'acked':>6} {'source':>7} {'target':>7} {'in doubt':>9}  outcomes")
    for x in writers.writers:
        acked = x.acked()
        print(f"{x.kind:8} {len(acked):>6} {sum(a.where == 'source' for a in acked):>7} "
              f"{sum(a.where == 'target' for a in acked):>7} {len(x.in_doubt()):>9}  {dict(x.outcomes)}")
        for error in x.errors[:3]:
            print(f"{'':8} error: {error}")


def _print_report(writers, rows, changes, undone, result, started, returned, rolled_back, copied_until) -> None:
    _print_writers(writers)
    print(f"\ncutover: {returned - started:.1f} s (downtime {result.get('downtime_s')} s); catch-up bound "
          f"{copied_until - started:+.1f} s after the cutover started; rollback returned "
          f"{rolled_back - started:+.1f} s")
    print(f"\n{'check':52} {'acknowledged':>12} {'present':>8} {'missing':>8}")
    for r in rows:
        print(f"{r['check']:52} {r['acknowledged']:>12} {r['present']:>8} {r['missing']:>8}")
    print(f"\n{'rollback changes':34} {'op':8} {'reported':>8} {'true':>6}")
    for c in changes:
        mark = "" if c["reported"] == c["true"] else "  <- differs"
        print(f"{c['table']:34} {c['op']:8} {c['reported']:>8} {c['true']:>6}{mark}")
    carried = undone.get("changes") or {}
    print(f"reported total {carried.get('total')}, carried {carried.get('carried')}, "
          f"conflicts {len(carried.get('conflicts') or [])}, file {carried.get('file')}")
