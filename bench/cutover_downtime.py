"""Benchmark: the cutover's write downtime with ``cutover.final_sync: full`` against ``replicate``, as a writer
at 50 transactions/s sees it, in one invocation.

For each strategy a fresh Supabase-shaped source (``--bookings``: 2,000 is the demo's size, 620,000 about 1 GB
as in bench/db_copy.py) is migrated with the database phase; a stand-in app runs on the source behind a real
sshd (the switch rewrites its env file); a writer inserts 50 rows/s through the connection the app's env file
names (the source as an app login role, then the target as ``crm_app``), reconnecting after every error, from
before replication starts until after the cutover. Then: for ``replicate`` ``liftoff run replicate`` (its time
is "replication start": initial copy, caught up, full comparison) and the lag gate under that writer; the
cutover, approved through the Prefect API as an operator would. Printed: the cutover's own downtime (freeze to
healthy apps), the write downtime the writer saw (its first refused write to its first write accepted on the
target), the final sync's seconds, and the writes that went through.

    .venv/bin/python bench/cutover_downtime.py --bookings 2000     # the demo's size
    .venv/bin/python bench/cutover_downtime.py                     # about 1 GB

Everything it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from liftoff.prefect_server import PrefectServer  # noqa: E402
from liftoff_sandbox.crm_app import CrmApp  # noqa: E402
from liftoff_sandbox.ssh import SshServer  # noqa: E402
from liftoff_sandbox.stack import LocalStack  # noqa: E402

WRITER = "bench_writer"
APPROVE = {"approver": "bench", "approve": True, "reason": "", "confirm_1": True}


class FollowingWriter(threading.Thread):
    """Inserts ``rate`` rows/s into public.bench_writes through the database the app's env file names."""

    def __init__(self, env_file: Path, rate: float):
        super().__init__(daemon=True)
        self.env_file, self.rate = env_file, rate
        self.ok = self.refused = 0
        self.events: list[tuple[float, bool, str]] = []  # (when, accepted, where)
        self.stopping = threading.Event()

    def url(self) -> str:
        return next(line.split("=", 1)[1] for line in self.env_file.read_text().splitlines()
                    if line.startswith("DATABASE_URL="))

    def run(self):
        conn, where = None, ""
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                if conn is None:
                    url = self.url()
                    where = url.rsplit("/", 1)[-1]
                    conn = psycopg.connect(url, autocommit=True, connect_timeout=3)
                conn.execute("INSERT INTO public.bench_writes (note) VALUES ('w')")
                self.ok += 1
                self.events.append((time.time(), True, where))
            except psycopg.Error:
                self.refused += 1
                self.events.append((time.time(), False, where))
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(max(0.0, 1 / self.rate - (time.monotonic() - started)))

    def downtime(self, target_db: str) -> float | None:
        """First refused write to the first write accepted on the target after it."""
        first_refused = next((at for at, ok, _ in self.events if not ok), None)
        if first_refused is None:
            return None
        back = next((at for at, ok, where in self.events if ok and where == target_db and at > first_refused), None)
        return round(back - first_refused, 2) if back else None


def max_lag(stack, runbook: Path) -> str:
    """The worst lag seen in 5 s of sampling (every 0.25 s) while the writer writes."""
    from liftoff.runbooks.model import load_runbook
    from liftoff.systems import pg_replication

    names = pg_replication.Names.for_runbook(load_runbook(runbook).name)
    worst_s = worst_bytes = 0
    with psycopg.connect(stack.source.conninfo(), autocommit=True) as conn:
        for _ in range(20):
            lag = pg_replication.lag(conn, names)
            worst_s, worst_bytes = max(worst_s, lag.seconds), max(worst_bytes, lag.bytes)
            time.sleep(0.25)
    return f"{worst_s} / {worst_bytes}"


def run_strategy(strategy: str, bookings: int, workdir: Path) -> dict:
    from liftoff.errors import GateFailed
    from liftoff.flows.cutover import cutover
    from liftoff.ledger import Ledger
    from liftoff.runbooks.model import load_runbook
    from liftoff.flows.database import migrate_database
    from liftoff.flows.options import RunOptions
    from liftoff.flows.replication import replicate, replication_lag
    from liftoff_sandbox.operator import answer_when_paused

    stack = LocalStack(bookings=bookings, workdir=workdir / strategy, env_prefix=f"BENCH_{strategy.upper()}").start()
    vps = SshServer().start()
    app = None
    try:
        owner = {"user": "postgres", "password": stack.passwords["source"]}
        password = secrets.token_urlsafe(12)
        stack.source.execute(f"CREATE ROLE {WRITER} LOGIN PASSWORD '{password}'")
        stack.source.execute(
            "CREATE TABLE public.bench_writes (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), "
            f"note text); GRANT INSERT ON public.bench_writes TO {WRITER}; "
            f"GRANT USAGE ON SEQUENCE public.bench_writes_id_seq TO {WRITER}", **owner)
        db = f"bench_{strategy}"
        stack.new_target_database(db)
        data = stack.runbook_data(state_dir=f"state-{strategy}", target_database=db)
        data["storage"] = {}
        data["database"]["roles"] = {WRITER: "drop_references"}
        app = CrmApp(stack.workdir, f"postgresql://{WRITER}:{password}@{stack.source.host}:{stack.source.port}/postgres").start()
        data.update(stack.cutover_sections(vps, app, db, WRITER, env_prefix=f"BENCH_{strategy.upper()}",
                                           manual=["Team notified of the maintenance window"]))
        data["cutover"]["final_sync"] = strategy
        path = stack.workdir / f"{strategy}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        options = RunOptions(runbook=str(path))
        migrate_database(options)
        stack.target.execute(f"GRANT INSERT ON public.bench_writes TO crm_app; "
                             f"GRANT USAGE ON SEQUENCE public.bench_writes_id_seq TO crm_app", dbname=db)
        writer = FollowingWriter(app.env_file, rate=50)
        writer.start()
        row: dict = {"strategy": strategy, "bookings": bookings}
        if strategy == "replicate":
            started = time.monotonic()
            replicate(options)
            row["replication start s"] = round(time.monotonic() - started, 1)
            row["max lag s / bytes (5 s at 50 tx/s)"] = max_lag(stack, path)
            row["lag gate"] = replication_lag(options)["summary"]
        time.sleep(2)
        resumer = answer_when_paused("cutover", APPROVE, under=stack.workdir)
        try:
            result = cutover(options)
        except GateFailed as exc:  # after the switch: the downtime was measured and recorded all the same
            if "the cutover stands" not in str(exc):
                raise
            done = [e for e in Ledger(load_runbook(path).state_dir).events("cutover") if e.what == "cutover.completed"]
            result = {"downtime_s": done[-1].after["downtime_s"], "steps": done[-1].after["steps"]}
            row["catch-up"] = str(exc).split(";")[0][:160]
        resumer.join(5)
        time.sleep(3)
        writer.stopping.set()
        writer.join(10)
        row.update({"cutover downtime s": result["downtime_s"], "final sync s": result["steps"].get("final sync"),
                    "write downtime s": writer.downtime(db), "writes ok": writer.ok, "refused": writer.refused,
                    "steps": result["steps"]})
        return row
    finally:
        if app is not None:
            app.stop()
        vps.stop()
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bookings", type=int, default=620_000, help="scale of the source (620000 is about 1 GB)")
    parser.add_argument("--strategies", default="full,replicate")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="liftoff-bench-cutover-"))
    workdir.chmod(0o755)
    prefect = PrefectServer().start()
    os.environ.update(prefect.env())
    rows = []
    try:
        for strategy in args.strategies.split(","):
            rows.append(run_strategy(strategy, args.bookings, workdir))
            print(rows[-1], flush=True)
    finally:
        prefect.stop()
    columns = ["strategy", "bookings", "replication start s", "max lag s / bytes (5 s at 50 tx/s)",
               "cutover downtime s", "write downtime s",
               "final sync s", "writes ok", "refused", "lag gate"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
