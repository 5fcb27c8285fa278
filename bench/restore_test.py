"""Benchmark: how long a backup takes and how long proving it by a restore takes (the RTO), at a given size.

One invocation builds a Supabase-shaped source with ``LocalStack`` (``--bookings``: 2,000 is the demo's size,
620,000 about 1 GB as in bench/db_copy.py), migrates it to the target with ``liftoff run database`` (strategy
stream), starts a SeaweedFS server as the backup bucket (Backblaze B2's stand-in), then runs
``liftoff run backup`` (dump + restore test + retention) and ``liftoff run restore-test`` alone, and prints
what the ledger recorded: the dump's size and seconds, and each restore test's download, restore and RTO.

    .venv/bin/python bench/restore_test.py --bookings 2000     # the demo's database
    .venv/bin/python bench/restore_test.py                     # about 1 GB

Everything it starts is stopped on exit. The bucket is on loopback: on B2 the download adds the archive's
size divided by the VPS's bandwidth.
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
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"liftoff run {flow} exited {proc.returncode}; see {log}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bookings", type=int, default=620_000, help="scale of the source (620000 is about 1 GB)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="liftoff-bench-backup-"))
    private_tmp = workdir / "tmp"
    private_tmp.mkdir()
    for path in (workdir, private_tmp):
        path.chmod(0o755)  # the postgres user must reach its data directory
    tempfile.tempdir = str(private_tmp)
    stack, prefect, b2 = LocalStack(bookings=args.bookings, workdir=workdir / "stack"), PrefectServer(), S3Server()
    log = workdir / "liftoff.log"
    try:
        prefect.start()
        print(f"building the source: {args.bookings:,} bookings ...", flush=True)
        stack.start()
        b2.start()
        b2.client().create_bucket(Bucket="crm-backups")
        stack.new_target_database("crm")
        data = stack.runbook_data(state_dir=str(workdir / "state"), target_database="crm", strategy="stream")
        data["name"] = "bench-backup"
        data["backups"] = {"destination": {"endpoint_url": b2.endpoint_url, "bucket": "crm-backups",
                                           "access_key_id": {"env": "BENCH_B2_KEY"},
                                           "secret_access_key": {"env": "BENCH_B2_SECRET"}}}
        runbook = workdir / "bench-backup.yaml"
        runbook.write_text(yaml.safe_dump(data, sort_keys=False))
        env = {**os.environ, **stack.env, **prefect.env(), "BENCH_B2_KEY": b2.access_key,
               "BENCH_B2_SECRET": b2.secret_key}
        migrate_s = liftoff("database", runbook, env, log)
        size = stack.target.execute("SELECT pg_database_size('crm')")[0][0]
        print(f"migrated in {migrate_s:.0f} s: database crm is {size / MIB:,.0f} MiB", flush=True)
        backup_s = liftoff("backup", runbook, env, log)
        alone_s = liftoff("restore-test", runbook, env, log)

        from liftoff.ledger import Ledger

        ledger = Ledger(workdir / "state")
        dump = ledger.step_detail("backup.dump")
        tests = [e.after for e in ledger.events("backup") if e.what == "backup.restore-tested"]
        print(f"\nbookings {args.bookings:,}; database {size / MIB:,.0f} MiB ({size:,} bytes); "
              f"{dump['tables']} tables, {dump['rows']:,} rows")
        print(f"backup: pg_dump -Fc streamed to the bucket: {dump['bytes'] / MIB:,.1f} MiB in {dump['seconds']} s "
              f"(liftoff run backup, all steps: {backup_s:.1f} s)")
        for label, t in zip(("restore test in `backup`", "restore-test alone"), tests):
            print(f"{label}: download {t['download_s']} s + restore {t['restore_s']} s = RTO {t['rto_s']} s "
                  f"({'passed' if t['passed'] else 'FAILED'})")
        print(f"(liftoff run restore-test, process included: {alone_s:.1f} s)")
        return 0 if tests and all(t["passed"] for t in tests) else 1
    finally:
        stack.stop()
        b2.stop()
        prefect.stop()
        print(f"log: {log}")
        shutil.rmtree(private_tmp, ignore_errors=True)
        shutil.rmtree(workdir / "state", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
