"""migrate-database as a deployment on a real Prefect server, triggered through the client like a UI click."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import fresh_runbook


def test_migrate_database_deployment_runs_when_triggered_through_the_api(stack):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    runbook = fresh_runbook(stack, "deployed")
    server = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--only", "migrate-database"],
                              cwd="/", env=os.environ.copy(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    deployment = client.read_deployment_by_name("migrate-database/migrate-database")
                    break
                except Exception:
                    assert time.monotonic() < deadline and server.poll() is None, "deployment never appeared"
                    time.sleep(1)
            schema = deployment.parameter_openapi_schema
            assert "options" in schema["properties"]  # the form the UI renders: runbook path + dry_run
            run = run_deployment("migrate-database/migrate-database",
                                 parameters={"options": {"runbook": str(runbook), "dry_run": False}}, timeout=240)
            assert run.state.is_completed(), run.state
        assert stack.target.execute("SELECT count(*) FROM public.bookings", dbname="deployed")[0][0] == \
            stack.counts["public.bookings"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
