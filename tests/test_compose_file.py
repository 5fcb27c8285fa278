"""docker-compose.dev.yml: the local copy of the VPS stack.

Docker does not run in CI, so these tests read the real file and check the properties an operator
relies on: every service reports health, nothing listens beyond localhost, no secret is written into
the file, and the settings that make the dev stack behave like the VPS (transaction pooling, Redis
eviction, PostgreSQL 15 -> 16) are really there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

SERVERS = False  # no server, no flow: runs under `pytest -m "not servers"`

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "docker-compose.dev.yml"

EXPECTED_SERVICES = {"source", "target", "pgbouncer", "redis", "minio", "prefect"}

EXPECTED_HOST_PORTS = {
    "source": {"127.0.0.1:54322:5432"},
    "target": {"127.0.0.1:55432:5432"},
    "pgbouncer": {"127.0.0.1:6432:6432"},
    "redis": {"127.0.0.1:6379:6379"},
    "minio": {"127.0.0.1:9000:9000", "127.0.0.1:9001:9001"},
    "prefect": {"127.0.0.1:4200:4200"},
}

# Which service must be healthy before another one starts.
REQUIRED_HEALTHY_DEPENDENCIES = {
    "pgbouncer": {"target"},
    "prefect": {"target"},
}

SECRET_KEY_WORDS = ("PASSWORD", "SECRET", "KEY")
# The whole value is one required reference: ${NAME:?message}. No default (`:-`), no literal.
REQUIRED_REFERENCE = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}$")
# user:password@ inside a URL; the password part must be a required reference too.
URL_CREDENTIALS = re.compile(r"://[^:/@\s]+:(?P<password>[^@\s]+)@")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def environment_of(service: dict) -> dict[str, str]:
    """A service's environment as a dict, whichever of compose's two spellings it uses."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(entry.split("=", 1) if "=" in entry else (entry, "") for entry in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def image_major_version(image: str) -> int:
    tag = image.rsplit(":", 1)[1]
    return int(re.match(r"\d+", tag).group())


def test_stack_defines_exactly_the_six_vps_services(services):
    assert set(services) == EXPECTED_SERVICES


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_every_service_has_a_healthcheck_command(services, name):
    healthcheck = services[name].get("healthcheck") or {}
    assert not healthcheck.get("disable"), f"{name}: healthcheck is disabled"
    assert healthcheck.get("test"), f"{name}: healthcheck has no `test` command"


@pytest.mark.parametrize("name", ["source", "target"])
def test_postgres_services_report_health_with_pg_isready(services, name):
    test = services[name]["healthcheck"]["test"]
    command = test if isinstance(test, str) else " ".join(test)
    assert "pg_isready" in command


def test_prefect_healthcheck_probes_the_api_health_endpoint(services):
    test = services["prefect"]["healthcheck"]["test"]
    command = test if isinstance(test, str) else " ".join(test)
    assert "http://localhost:4200/api/health" in command


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_host_ports_are_the_expected_ones_and_bound_to_localhost_only(services, name):
    ports = services[name].get("ports") or []
    assert all(isinstance(port, str) for port in ports), f"{name}: use short 'ip:host:container' syntax"
    assert set(ports) == EXPECTED_HOST_PORTS[name]
    for port in ports:
        assert port.startswith("127.0.0.1:"), f"{name}: {port} would listen on every interface"


def test_pgbouncer_pools_by_transaction(services):
    assert environment_of(services["pgbouncer"]).get("POOL_MODE") == "transaction"


def test_pgbouncer_authenticates_with_scram(services):
    assert environment_of(services["pgbouncer"]).get("AUTH_TYPE") == "scram-sha-256"


@pytest.mark.parametrize(
    "flag",
    ["--appendonly yes", "--maxmemory 512mb", "--maxmemory-policy allkeys-lru"],
)
def test_redis_persists_and_evicts_least_recently_used_keys_at_512mb(services, flag):
    command = services["redis"]["command"]
    command = command if isinstance(command, str) else " ".join(command)
    assert flag in command


def test_target_runs_postgres_16(services):
    image = services["target"]["image"]
    assert image.split(":")[0] == "postgres"
    assert image_major_version(image) == 16


def test_source_runs_postgres_15_like_supabase(services):
    image = services["source"]["image"]
    assert image.split(":")[0] in {"supabase/postgres", "postgres"}
    assert image_major_version(image) == 15


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_secrets_are_required_environment_references_not_literals(services, name):
    for key, value in environment_of(services[name]).items():
        if any(word in key.upper() for word in SECRET_KEY_WORDS):
            assert REQUIRED_REFERENCE.match(value), (
                f"{name}.{key}: expected ${{VAR:?message}}, found a literal or a default"
            )
        credentials = URL_CREDENTIALS.search(value)
        if credentials:
            assert REQUIRED_REFERENCE.match(credentials["password"]), (
                f"{name}.{key}: the password inside this URL must be ${{VAR:?message}}"
            )


@pytest.mark.parametrize("name", sorted(REQUIRED_HEALTHY_DEPENDENCIES))
def test_service_waits_for_its_dependencies_to_be_healthy(services, name):
    depends_on = services[name].get("depends_on") or {}
    assert isinstance(depends_on, dict), f"{name}: list-form depends_on cannot wait for health"
    for dependency in REQUIRED_HEALTHY_DEPENDENCIES[name]:
        assert dependency in depends_on, f"{name} does not depend on {dependency}"
        assert depends_on[dependency].get("condition") == "service_healthy"


def test_named_volumes_used_by_services_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source} is not declared"


def test_target_keeps_its_data_in_a_named_volume(services):
    volumes = services["target"].get("volumes") or []
    assert any(v.split(":", 1)[1] == "/var/lib/postgresql/data" for v in volumes)
