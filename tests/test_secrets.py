"""Secrets never appear in logs, artifacts, exceptions or the UI: a full run's every trace is searched."""

from __future__ import annotations

from pathlib import Path

from helpers import fresh_runbook, run_cli
from liftoff.redaction import redact


def _everything_prefect_kept() -> str:
    from prefect.client.orchestration import get_client

    chunks = []
    with get_client(sync_client=True) as client:
        offset = 0
        while batch := client.read_logs(limit=200, offset=offset):
            chunks += [log.message for log in batch]
            offset += len(batch)
        offset = 0
        while batch := client.read_artifacts(limit=200, offset=offset):
            chunks += [f"{a.key} {a.description} {a.data}" for a in batch]
            offset += len(batch)
        chunks += [str(run.parameters) + str(run.state) for run in client.read_flow_runs(limit=200)]
    return "\n".join(chunks)


def test_no_secret_in_any_log_artifact_or_error_of_a_full_run(stack):
    runbook = fresh_runbook(stack, "secrets")
    ok = run_cli("run", "database", "--runbook", str(runbook))
    assert ok.returncode == 0, ok.stderr[-3000:]
    wrong = "Wr0ng-Passw0rd-for-the-test"
    failed = run_cli("run", "database", "--runbook", str(runbook),
                     env={"LIFTOFF_LOCAL_TARGET_PASSWORD": wrong})
    assert failed.returncode == 2 and "password authentication failed" in failed.stderr

    kept = _everything_prefect_kept()
    assert "verify-summary" in kept and "phase started" in kept  # we are reading the real records
    state_files = "\n".join(p.read_bytes().decode("utf-8", "replace")
                            for p in Path(runbook.parent / "state-secrets").rglob("*") if p.is_file())
    haystack = "\n".join([ok.stdout, ok.stderr, failed.stdout, failed.stderr, kept, state_files])
    for secret in [*stack.secrets, wrong]:
        assert secret not in haystack


def test_redaction_strips_passwords_from_dsns_and_conninfo():
    assert redact("postgresql://postgres:s3cr3t@db.example.com:5432/postgres") == \
        "postgresql://postgres:***@db.example.com:5432/postgres"
    assert redact("host=db user=postgres password=s3cr3t dbname=x") == "host=db user=postgres password=*** dbname=x"
    assert redact("PGPASSWORD=s3cr3t pg_dump") == "PGPASSWORD=*** pg_dump"
    assert redact("source.password: a secret given inline") == "source.password: a secret given inline"
