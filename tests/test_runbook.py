"""The runbook model: valid files load; each problem gets one line naming file, key path and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import ROOT, run_cli
from liftoff.errors import RunbookInvalid
from liftoff.runbooks.model import load_runbook

SERVERS = False  # no server, no flow: runs under `pytest -m "not servers"`

GOOD = {
    "name": "crm",
    "state_dir": "state",
    "source": {"host": "db.example.supabase.co", "user": "postgres", "password": {"env": "SRC_PW"}},
    "target": {"direct": {"host": "10.0.0.5", "user": "liftoff", "password": {"prefect_secret": "vps-db"}}},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "runbook.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _problems(tmp_path: Path, data: dict) -> list[str]:
    with pytest.raises(RunbookInvalid) as failed:
        load_runbook(_write(tmp_path, data))
    return failed.value.problems


@pytest.mark.parametrize("name", ["tour-crm.yaml", "local.yaml"])
def test_shipped_runbooks_are_valid(name):
    runbook = load_runbook(ROOT / "runbooks" / name)
    assert runbook.state_dir.is_absolute()


def test_production_runbook_has_the_plans_shape():
    runbook = load_runbook(ROOT / "runbooks" / "tour-crm.yaml")
    assert runbook.target.pooled.port == 6432
    assert [b.name for b in runbook.storage.buckets] == ["tour-images", "documents", "backups"]
    assert "backblazeb2" in runbook.backups.destination.endpoint_url


def test_relative_state_dir_is_resolved_against_the_runbook_file(tmp_path):
    assert load_runbook(_write(tmp_path, GOOD)).state_dir == tmp_path / "state"


def test_unknown_key_is_named_with_its_path(tmp_path):
    data = {**GOOD, "database": {"jobz": 4}}
    [problem] = _problems(tmp_path, data)
    assert problem == f"{tmp_path / 'runbook.yaml'}: database.jobz: unknown key"


def test_missing_field_is_named(tmp_path):
    data = {**GOOD, "source": {"host": "h", "password": {"env": "X"}}}
    assert _problems(tmp_path, data) == [f"{tmp_path / 'runbook.yaml'}: source.user: missing field"]


def test_inline_secret_is_refused_without_echoing_it(tmp_path):
    data = {**GOOD, "source": {**GOOD["source"], "password": "hunter2-value"}}
    [problem] = _problems(tmp_path, data)
    assert "source.password: a secret given inline" in problem
    assert "hunter2-value" not in problem


def test_bad_url_and_bad_port_each_get_a_line(tmp_path):
    data = {**GOOD, "target": {"direct": {**GOOD["target"]["direct"], "port": 70000}},
            "backups": {"destination": {"endpoint_url": "ftp://b2", "bucket": "b", "access_key_id": {"env": "A"},
                                        "secret_access_key": {"env": "B"}}}}
    problems = _problems(tmp_path, data)
    assert any("target.direct.port" in p for p in problems)
    assert any("backups.destination.endpoint_url: expected an http(s) URL" in p for p in problems)


def test_host_with_credentials_is_refused(tmp_path):
    data = {**GOOD, "source": {**GOOD["source"], "host": "postgres://u:pw@db"}}
    [problem] = _problems(tmp_path, data)
    assert "source.host: expected a host name" in problem


def test_cli_validate_exits_2_with_one_line_per_problem(tmp_path):
    data = {**GOOD, "colour": "blue", "source": {**GOOD["source"], "password": "inline-pw-123"}}
    done = run_cli("validate", str(_write(tmp_path, data)))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith("error: ") for l in lines)
    assert "Traceback" not in done.stderr and "inline-pw-123" not in done.stderr


def test_cli_validate_accepts_a_good_file(tmp_path):
    done = run_cli("validate", str(_write(tmp_path, GOOD)))
    assert done.returncode == 0, done.stderr
    assert "valid runbook 'crm'" in done.stdout


def test_storage_source_needs_the_access_of_its_protocol(tmp_path):
    source = {"project_url": "https://abcd.supabase.co", "protocol": "rest"}
    [problem] = _problems(tmp_path, {**GOOD, "storage": {"source": source}})
    assert "storage.source" in problem and "protocol rest needs service_key" in problem
    [problem] = _problems(tmp_path, {**GOOD, "storage": {"source": {**source, "protocol": "s3"}}})
    assert "storage.source" in problem and "protocol s3 needs s3" in problem
    [problem] = _problems(tmp_path, {**GOOD, "storage": {"source": {**source, "service_key": "eyJhbGciOi.inline"}}})
    assert "storage.source.service_key: a secret given inline" in problem and "eyJhbGciOi" not in problem
    rb = load_runbook(_write(tmp_path, {**GOOD, "storage": {"source": {**source, "service_key": {"env": "K"}}}}))
    assert rb.storage.source.protocol == "rest" and rb.storage.source.s3 is None


def test_relative_paths_in_a_runbook_are_read_from_its_folder_not_from_where_liftoff_runs(tmp_path, monkeypatch):
    data = yaml.safe_load((ROOT / "runbooks" / "local.yaml").read_text())
    data["security"] = {"local_secret_files": ["../crm-app/.env", "/etc/crm/.env"]}
    folder = tmp_path / "ops"
    folder.mkdir()
    (folder / "rb.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir("/")

    runbook = load_runbook(folder / "rb.yaml")

    assert runbook.security.local_secret_files == [tmp_path / "crm-app" / ".env", Path("/etc/crm/.env")]
    assert runbook.state_dir == (folder / data["state_dir"]).resolve()


def test_a_runbook_is_validated_once_per_content_and_an_edit_is_seen_at_once(tmp_path):
    """A flow and its subflows share one parsed runbook; rewriting the file (even within the same clock tick,
    to text of the same length) gives the next reader the new content."""
    path = _write(tmp_path, GOOD)
    first = load_runbook(path)
    assert load_runbook(path) is first
    edited = {**GOOD, "name": GOOD["name"][:-1] + ("x" if GOOD["name"][-1] != "x" else "y")}
    path.write_text(yaml.safe_dump(edited))
    again = load_runbook(path)
    assert again.name == edited["name"] != first.name


def test_the_storage_phase_is_wanted_when_any_part_is_set_and_configured_only_when_all_are(tmp_path):
    rb = load_runbook(_write(tmp_path, GOOD))
    assert (rb.storage.wanted, rb.storage.configured) == (False, False)
    listed = rb.storage.model_copy(update={"buckets": [{"name": "avatars", "public": True}]})
    assert (listed.wanted, listed.configured) == (False, False)  # a list waiting for its endpoints
    local = load_runbook(ROOT / "runbooks" / "local.yaml").storage
    half = local.model_copy(update={"target": local.buckets[0]})  # any value: only its presence is asked
    assert (half.wanted, half.configured) == (True, False)
