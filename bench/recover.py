"""Benchmark: the RTO of ``recover``, from a dump and from pgBackRest, against the plan's page of shell.

One invocation builds a Supabase-shaped source with ``LocalStack`` (``--bookings``: 2,000 is the demo's size,
620,000 about 1 GB), migrates it to the target (``liftoff run database``), starts SeaweedFS with an HTTPS
listener as the backup bucket (B2's stand-in; pgBackRest needs TLS), a real sshd as the VPS and the stand-in
app on it, then measures, on the same database:

- baseline: what the plan's "Recovery Procedures" has the operator type: ``DROP DATABASE`` and
  ``pg_restore --create`` of the backup (already downloaded; apps not stopped, nothing checked);
- ``recover`` from the newest dump (``liftoff run backup`` first): downtime from the apps' stop to their
  health, per step (stop, safety dump, restore, compare, start + health + smoke);
- ``recover`` to a point in time with pgBackRest (``liftoff run pitr`` first, a full backup): the same.

The recoveries are approved through the Prefect API as an operator would. Everything it starts is stopped on
exit. Both run on the target's PostgreSQL 15 (Debian's pgbackrest 2.45 refuses 16).

    .venv/bin/python bench/recover.py --bookings 2000      # the demo's database
    .venv/bin/python bench/recover.py                      # about 1 GB
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from liftoff.prefect_server import PrefectServer  # noqa: E402
from liftoff_sandbox.s3 import S3Server  # noqa: E402
from liftoff_sandbox.stack import LocalStack  # noqa: E402

MIB = 2**20


def liftoff(flow: str, runbook: Path, env: dict[str, str], log: Path) -> float:
    started = time.monotonic()
    with open(log, "a") as out:
        proc = subprocess.run([str(Path(sys.executable).parent / "liftoff"), "run", flow, "--runbook", str(runbook)],
                              env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"liftoff run {flow} exited {proc.returncode}; see {log}")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bookings", type=int, default=620_000, help="scale of the source (620000 is about 1 GB)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="liftoff-bench-recover-"))
    workdir.chmod(0o755)  # the postgres user reads pgbackrest.conf and the CA here
    private_tmp = workdir / "tmp"
    private_tmp.mkdir()
    private_tmp.chmod(0o755)
    tempfile.tempdir = str(private_tmp)
    stack, prefect, b2 = LocalStack(bookings=args.bookings, workdir=workdir / "stack"), PrefectServer(), S3Server(tls=True)
    log = workdir / "liftoff.log"
    vps = app = None
    try:
        prefect.start()
        os.environ.update(prefect.env())  # before Prefect is imported: it reads its API URL once
        print(f"building the source: {args.bookings:,} bookings ...", flush=True)
        stack.start()
        b2.start()
        b2.client().create_bucket(Bucket="crm-backups")
        from liftoff_sandbox.crm_app import CrmApp
        from liftoff_sandbox.ssh import SshServer

        vps = SshServer().start()
        target = stack.target
        stack.new_target_database("crm")
        hba = target.datadir / "pg_hba.conf"
        hba.write_text("local all postgres peer\n" + hba.read_text())
        target.execute("SELECT pg_reload_conf()")
        shutil.copy(b2.ca_file, workdir / "ca.pem")
        (workdir / "ca.pem").chmod(0o644)
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        app = CrmApp(workdir, f"postgresql://postgres:{target.password}@{target.host}:{target.port}/crm").start()
        data = stack.runbook_data(state_dir=str(workdir / "state"), target_database="crm", strategy="stream")
        data["name"] = "bench-recover"
        data["storage"] = {}
        pg_ctl = f"runuser -u postgres -- {target.bin_dir / 'pg_ctl'} -D {target.datadir}"
        start_options = f'"-c port={target.port} -c listen_addresses={target.host} -c unix_socket_directories={target.sockdir}"'
        data["backups"] = {
            "destination": {"endpoint_url": f"https://localhost:{b2.https_port}", "bucket": "crm-backups",
                            "access_key_id": {"env": "BENCH_B2_KEY"}, "secret_access_key": {"env": "BENCH_B2_SECRET"}},
            "files": [],
            "pitr": {"stanza": "crm", "pg_path": str(target.datadir), "pg_port": target.port,
                     "pg_socket_path": str(target.sockdir), "config": str(workdir / "pgbackrest.conf"),
                     "work_dir": str(workdir / "pgbackrest"), "ca_file": str(workdir / "ca.pem"), "timeout_s": 600,
                     "restart_command": f"{pg_ctl} -l {target.root / 'server.log'} -w -t 600 restart",
                     "stop_command": f"{pg_ctl} -m fast -w -t 600 stop",
                     "start_command": f"{pg_ctl} -l {target.root / 'server.log'} -o {start_options} -w -t 600 start"}}
        data["ssh"] = {"host": vps.host, "port": vps.port, "user": vps.user, "private_key": {"env": "BENCH_SSH_KEY"},
                       "known_hosts": str(vps.known_hosts_path)}
        data["cutover"] = {"switch": {"driver": "ssh", "env": {}, "ssh": {
            "env_file": str(app.env_file), "restart": app.restart_command, "stop": app.stop_command}},
            "apps": [{"name": "crm", "health_url": app.health_url}], "health_timeout_s": 120,
            "smoke_queries": ["SELECT count(*) FROM public.bookings"], "approval_timeout_s": 600}
        runbook = workdir / "bench-recover.yaml"
        runbook.write_text(yaml.safe_dump(data, sort_keys=False))
        secrets = {"BENCH_B2_KEY": b2.access_key, "BENCH_B2_SECRET": b2.secret_key, "BENCH_SSH_KEY": vps.client_key_text,
                   "AWS_CA_BUNDLE": str(b2.ca_file)}
        os.environ.update({**stack.env, **secrets})
        env = dict(os.environ)
        migrate_s = liftoff("database", runbook, env, log)
        size = target.execute("SELECT pg_database_size('crm')")[0][0]
        print(f"migrated in {migrate_s:.0f} s: database crm is {size / MIB:,.0f} MiB", flush=True)

        liftoff("backup", runbook, env, log)
        liftoff("pitr", runbook, env, log)  # configure, a differential backup (the first is full), check

        from liftoff.flows.recover import RecoverOptions, recover
        from liftoff.ledger import Ledger
        from liftoff.runbooks.model import load_runbook
        from liftoff.systems import backups as archive
        from liftoff_sandbox.operator import answer_when_paused

        rb = load_runbook(runbook)
        approve = {"approver": "bench", "database": "crm", "approve": True}

        # Baseline: the page of shell (the dump downloaded first, as the plan has it).
        key = archive.list_backups(b2.client(), "crm-backups", "bench_recover")[0].key
        dump = private_tmp / "baseline.dump"
        b2.client().download_file("crm-backups", key, str(dump))
        started = time.monotonic()
        target.execute("DROP DATABASE crm WITH (FORCE)")
        subprocess.run([str(target.bin_dir / "pg_restore"), "--create", "--no-owner", "--jobs=4", "--dbname", target.conninfo("postgres"), str(dump)],
                       check=True, capture_output=True)
        baseline_s = time.monotonic() - started

        resumer = answer_when_paused("recover", approve, under=workdir)
        from_dump = recover(RecoverOptions(runbook=str(runbook), backup=key))
        resumer.join(5)

        target_time = target.execute("SELECT now()")[0][0]
        time.sleep(1.1)
        resumer = answer_when_paused("recover", approve, under=workdir)
        to_time = recover(RecoverOptions(runbook=str(runbook), target_time=target_time))
        resumer.join(5)
        pitr_detail = Ledger(rb.state_dir).step_detail("recover.pitr-restore")

        rows = [("baseline: DROP DATABASE + pg_restore --create (by hand, apps not stopped, nothing checked)",
                 baseline_s, baseline_s, "")]
        for label, result in (("recover from the dump", from_dump), ("recover to a point in time (pgBackRest)", to_time)):
            t = result["timings"]
            rows.append((label, result["downtime_s"], t.get("restore", 0.0),
                         ", ".join(f"{k} {v:.1f}" for k, v in t.items())))
        print(f"\nbookings {args.bookings:,}; database {size / MIB:,.0f} MiB; dump {key}")
        print(f"{'how':<92} {'downtime s':>10} {'restore s':>10}  steps (s)")
        for label, downtime, restore, steps in rows:
            print(f"{label:<92} {downtime:>10.1f} {restore:>10.1f}  {steps}")
        print(f"(recover from the dump: download before the stop {from_dump['download_s']} s; "
              f"pgBackRest restore step: {pitr_detail.get('summary')})")
        return 0
    finally:
        for service in (app, vps):
            if service is not None:
                service.stop()
        stack.stop()
        b2.stop()
        prefect.stop()
        print(f"log: {log}")
        shutil.rmtree(workdir / "state", ignore_errors=True)
        shutil.rmtree(private_tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
