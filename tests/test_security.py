"""The security checks against a real OpenSSH sshd on loopback (the "VPS" is this machine, reached as root):
the real `ss` over SSH, real listeners (a redis-server, plain sockets), real files read over SFTP, and the real
`ufw` (Debian's 0.36.2) run in a network namespace of its own with its own config root, so the machine's own
firewall is never touched. Where ufw cannot run (not installed, no right to make a namespace), the runbook's
firewall command is a script printing tests/fixtures/ufw/*.txt, which are ufw's outputs for the same commands,
recorded with that ufw here (test_recorded_ufw_outputs_are_what_ufw_prints compares them where it can run)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.parse
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml

from liftoff.flows.options import RunOptions
from liftoff.flows.security import check_security as check_security_flow
from liftoff.errors import GateFailed
from liftoff.ledger import Ledger
from liftoff.reports import last_markdown
from liftoff_sandbox.postgres import free_port
from liftoff_sandbox.redis import RedisServer
from liftoff_sandbox.ssh import SshServer
from liftoff.runbooks.model import forget_resolved_secrets, load_runbook
from liftoff.checks import FAILED, NOT_CHECKED, PASSED
from liftoff.systems.remote import Remote
from liftoff.systems.ufw import check_firewall, parse_ufw_status
from liftoff.tasks.security.gate import check_security
from liftoff.systems.ss import is_internal, parse_listeners
from liftoff.tasks.security.secrets import secret_in
from helpers import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "ufw"
NETWORKS = ["127.0.0.0/8", "::1/128", "172.16.0.0/12"]

# The ufw commands that made each recorded output (tests/fixtures/ufw/NAME.txt), from a fresh config.
UFW_STATES = {
    "inactive": [["default", "deny", "incoming"]],
    "hardened": [["default", "deny", "incoming"], ["allow", "22/tcp"], ["allow", "80/tcp"], ["allow", "443/tcp"],
                 ["--force", "enable"]],
    "default-allow": [["default", "allow", "incoming"], ["allow", "22/tcp"], ["allow", "80/tcp"],
                      ["allow", "443/tcp"], ["--force", "enable"]],
    "postgres-open": [["default", "deny", "incoming"], ["allow", "22/tcp"], ["allow", "80/tcp"], ["allow", "443/tcp"],
                      ["allow", "5432/tcp"], ["--force", "enable"]],
    "varied": [["default", "deny", "incoming"], ["limit", "22/tcp"], ["allow", "80,443/tcp"],
               ["allow", "from", "10.0.0.5", "to", "any", "port", "5432", "proto", "tcp"],
               ["allow", "6379/tcp", "comment", "redis-temp"], ["deny", "3306"],
               ["allow", "in", "on", "eth0", "to", "any", "port", "8080"], ["allow", "60000:61000/udp"],
               ["route", "allow", "in", "on", "eth1", "out", "on", "eth2"], ["allow", "OpenSSH"],
               ["allow", "out", "53"], ["allow", "from", "192.168.1.0/24"],
               ["allow", "to", "203.0.113.5", "port", "80", "proto", "tcp"], ["reject", "25"], ["--force", "enable"]],
    "reject-apps": [["default", "reject", "incoming"], ["allow", "OpenSSH"], ["allow", "WWW Full"],
                    ["allow", "from", "2001:db8::/32", "to", "any", "port", "5432", "proto", "tcp"],
                    ["--force", "enable"]],
}

# The secrets behind the test runbook's references: strong ones with characters a URL must encode, and the
# weak `postgres` (local Supabase's default), which is also a user name.
SECRETS = {
    "LIFTOFF_SEC_SOURCE_PW": "postgres",
    "LIFTOFF_SEC_TARGET_PW": "Tg7@kQ/9 vLx+Wm2",
    "LIFTOFF_SEC_APP_PW": "Ap5-nR8s-Jy3q-Zc1",
    "LIFTOFF_SEC_REDIS_PW": "Rd4hX9pLm2Qw7tYe",
}
KEY_ENV = "LIFTOFF_SEC_SSH_KEY"


class Ufw:
    """The VPS's firewall, put in one of UFW_STATES: ``ROOT/ufw`` is what the runbook's firewall command runs
    (``ROOT/ufw status verbose``). With the real ufw it runs ufw in the state's own network namespace and config
    root (each state built once, on first use); without it, it prints the state's recorded output."""

    def __init__(self, root: Path):
        self.root = root
        self.real = _real_ufw_runs()
        self.script = root / "ufw"
        self.command = f"{self.script} status verbose"
        self._built: dict[str, tuple[str, Path]] = {}  # state: (network namespace, config root)

    def set(self, state: str) -> None:
        if self.real:
            netns, config = self._build(state)
            body = f'exec ip netns exec {netns} ufw --rootdir={config} --datadir={config} "$@"'
        else:
            body = f"cat {FIXTURES / (state + '.txt')}"
        self.script.write_text(f"#!/bin/sh\n{body}\n")
        self.script.chmod(0o755)

    def _build(self, state: str) -> tuple[str, Path]:
        if state in self._built:
            return self._built[state]
        netns, config = f"liftoff-sec-{uuid.uuid4().hex[:8]}", self.root / state
        for src, dst in (("/etc/ufw", "etc/ufw"), ("/lib/ufw", "lib/ufw"), ("/usr/share/ufw", "usr/share/ufw")):
            shutil.copytree(src, config / dst, symlinks=True)
        (config / "etc/default").mkdir(parents=True)
        # ufw-init's sysctl settings are per namespace anyway; an empty file keeps it from touching any.
        (config / "etc/ufw/sysctl.conf").write_text("")
        (config / "etc/default/ufw").write_text(Path("/etc/default/ufw").read_text().replace(
            "IPT_SYSCTL=/etc/ufw/sysctl.conf", f"IPT_SYSCTL={config}/etc/ufw/sysctl.conf"))
        subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
        self._built[state] = (netns, config)
        for args in UFW_STATES[state]:
            subprocess.run(["ip", "netns", "exec", netns, "ufw", f"--rootdir={config}", f"--datadir={config}", *args],
                           check=True, capture_output=True)
        return netns, config

    def status(self, verbose: bool = True) -> str:
        return subprocess.run([str(self.script), "status", *(["verbose"] if verbose else [])], check=True,
                              capture_output=True, text=True).stdout

    def stop(self) -> None:
        for netns, config in self._built.values():
            subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)
            shutil.rmtree(config, ignore_errors=True)
        self._built.clear()


def _real_ufw_runs() -> bool:
    if not (shutil.which("ufw") or Path("/usr/sbin/ufw").exists()) or os.geteuid() != 0:
        return False
    name = f"liftoff-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
    return made


@pytest.fixture(scope="module")
def vps(module_env):
    server = SshServer().start()
    module_env.setenv(KEY_ENV, server.client_key_text)
    for name, value in SECRETS.items():
        module_env.setenv(name, value)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ufw(tmp_path_factory):
    firewall = Ufw(tmp_path_factory.mktemp("ufw"))
    yield firewall
    firewall.stop()


@pytest.fixture(scope="module")
def ports():
    return {"postgres": free_port(), "pgbouncer": free_port(), "redis": free_port()}


@pytest.fixture(scope="module")
def files(vps, tmp_path_factory):
    """The files the runbook names: two on the VPS (read over SFTP), one on this machine."""
    remote_dir = vps.root / "srv-crm"
    remote_dir.mkdir()
    local = tmp_path_factory.mktemp("repo") / ".env"
    return {"compose": remote_dir / "docker-compose.yml", "repo_env": remote_dir / ".env", "local_env": local}


def write_clean_files(files) -> None:
    # `postgres` appears as a user name and an image, never as a value: no hit for the weak secret.
    files["compose"].write_text("services:\n  db:\n    image: postgres:16\n    environment:\n"
                                "      POSTGRES_USER: postgres\n      POSTGRES_PASSWORD_FILE: /run/secrets/pg\n")
    files["repo_env"].write_text("NODE_ENV=production\nDATABASE_URL=${DATABASE_URL}\n")
    files["local_env"].write_text("# copy .env.example and fill in\nREDIS_URL=\n")


@pytest.fixture(scope="module")
def runbook_path(vps, ufw, ports, files, tmp_path_factory):
    root = tmp_path_factory.mktemp("runbook")
    data = {
        "name": "security-test",
        "state_dir": "state",
        "source": {"host": "127.0.0.1", "port": free_port(), "database": "postgres", "user": "postgres",
                   "password": {"env": "LIFTOFF_SEC_SOURCE_PW"}},
        "target": {
            "direct": {"host": "127.0.0.1", "port": ports["postgres"], "database": "crm", "user": "liftoff",
                       "password": {"env": "LIFTOFF_SEC_TARGET_PW"}},
            "pooled": {"host": "127.0.0.1", "port": ports["pgbouncer"], "database": "crm", "user": "crm_app",
                       "password": {"env": "LIFTOFF_SEC_APP_PW"}},
            "redis": {"host": "127.0.0.1", "port": ports["redis"], "password": {"env": "LIFTOFF_SEC_REDIS_PW"}},
        },
        "ssh": {"host": vps.host, "port": vps.port, "user": vps.user, "private_key": {"env": KEY_ENV},
                "known_hosts": str(vps.known_hosts_path)},
        "security": {"firewall_command": ufw.command,
                     "secret_files": [str(files["compose"]), str(files["repo_env"])],
                     "local_secret_files": [str(files["local_env"])]},
    }
    path = root / "security.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextmanager
def listening(*addresses: tuple[str, int]):
    """Plain TCP listeners: ("127.0.0.1", port), ("::1", port), ("::", port) for every v4 and v6 address."""
    with ExitStack() as stack:
        for host, port in addresses:
            s = stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
            if host == "::":
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((host, port))
            s.listen()
        yield


def report_for(runbook_path):
    forget_resolved_secrets()
    rb = load_runbook(runbook_path)
    with Remote(rb.ssh) as remote:
        return check_security(rb, remote)


def assert_no_secret_shown(text: str) -> None:
    for value in SECRETS.values():
        if len(value) >= 8:  # the weak `postgres` is also the user name the report may show
            for n in range(6, len(value) + 1):
                assert value[:n] not in text, f"a {n}-character prefix of a secret is shown"
            assert urllib.parse.quote(value, safe="") not in text


# --- parsers against recorded and live output --------------------------------------------------------------

def test_ufw_parser_reads_defaults_and_every_rule_form_of_ufw_verbose():
    status = parse_ufw_status((FIXTURES / "varied.txt").read_text())
    assert status.active and status.default_incoming == "deny"
    by_to = {(r.to, r.source): r for r in status.rules}
    assert by_to[("80,443/tcp", "Anywhere")].ports == ((80, 80), (443, 443))
    assert by_to[("60000:61000/udp (v6)", "Anywhere (v6)")].ports == ((60000, 61000),)
    assert by_to[("60000:61000/udp (v6)", "Anywhere (v6)")].v6
    assert by_to[("22/tcp (OpenSSH (v6))", "Anywhere (v6)")].app == "OpenSSH"
    assert by_to[("8080 on eth0", "Anywhere")].interface == "eth0"
    assert by_to[("203.0.113.5 80/tcp", "Anywhere")].destination == "203.0.113.5"
    assert by_to[("6379/tcp", "Anywhere")].comment == "redis-temp"
    assert by_to[("Anywhere", "192.168.1.0/24")].ports is None
    assert by_to[("53", "Anywhere")].direction == "OUT"
    assert by_to[("Anywhere on eth2", "Anywhere on eth1")].direction == "FWD"
    assert len(status.rules) == 23

    lines = {line.name: line for line in check_firewall(status, [22, 80, 443])}
    opened = lines["firewall allows in only 22, 80, 443"]
    assert opened.status == FAILED
    # every opening beyond 22/80/443 is named once, its v4 and v6 rules together; DENY/REJECT/OUT/FWD are not
    for named in ("5432/tcp from 10.0.0.5 (v4)", "6379/tcp from Anywhere (v4 and v6)",
                  "every port from 192.168.1.0/24 (v4)", "60000:61000/udp from Anywhere (v4 and v6)"):
        assert named in opened.detail
    for not_an_opening in ("3306", "25 ", "53", "eth2", "203.0.113.5"):
        assert not_an_opening not in opened.detail
    assert "sudo ufw delete allow 6379/tcp" in opened.fix


def test_ufw_app_profiles_count_by_their_ports_and_reject_is_a_closed_default():
    lines = check_firewall(parse_ufw_status((FIXTURES / "reject-apps.txt").read_text()), [22, 80, 443, 5432])
    assert [line.status for line in lines] == [PASSED, PASSED, PASSED]


def test_the_short_ufw_status_is_refused_it_hides_the_default_and_the_profiles_ports():
    # `ufw status` (not verbose) after the reject-apps commands
    short = parse_ufw_status((FIXTURES / "reject-apps-not-verbose.txt").read_text())
    assert short.active and short.default_incoming is None
    lines = {line.name: line for line in check_firewall(short, [22, 80, 443, 5432])}
    assert lines["firewall denies incoming by default"].status == FAILED
    assert "ufw status verbose" in lines["firewall denies incoming by default"].fix
    assert "application profile WWW Full (its ports are not shown" in lines["firewall allows in only 22, 80, 443, 5432"].detail


def test_recorded_ufw_outputs_are_what_ufw_prints(ufw):
    if not ufw.real:
        pytest.skip("ufw cannot run here (not installed, or no network namespaces): the recordings are used as is")
    for state in UFW_STATES:
        ufw.set(state)
        assert ufw.status() == (FIXTURES / f"{state}.txt").read_text(), state
    assert ufw.status(verbose=False) == (FIXTURES / "reject-apps-not-verbose.txt").read_text()


def test_listeners_from_real_ss_wildcards_are_public_loopback_and_lo_device_are_not():
    p = [free_port() for _ in range(6)]
    with listening(("127.0.0.1", p[0]), ("0.0.0.0", p[1]), ("::1", p[2]), ("::", p[3])):
        lo_bound = socket.socket()
        lo_bound.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        lo_bound.bind(("0.0.0.0", p[4]))
        lo_bound.listen()
        mapped = socket.socket(socket.AF_INET6)
        mapped.bind(("::ffff:127.0.0.1", p[5]))
        mapped.listen()
        try:
            text = subprocess.run(["ss", "-tlnp"], capture_output=True, text=True, check=True).stdout
        finally:
            lo_bound.close()
            mapped.close()
    found = {s.port: s for s in parse_listeners(text) if s.port in p}
    assert {port: found[port].shown for port in p} == {
        p[0]: f"127.0.0.1:{p[0]}", p[1]: f"0.0.0.0:{p[1]}", p[2]: f"[::1]:{p[2]}", p[3]: f"*:{p[3]}",
        p[4]: f"0.0.0.0%lo:{p[4]}", p[5]: f"[::ffff:127.0.0.1]:{p[5]}"}
    assert found[p[0]].processes and "python" in found[p[0]].processes[0]
    public = {port for port in p if not is_internal(found[port], NETWORKS)}
    assert public == {p[1], p[3]}


def test_listeners_on_a_link_local_device_and_the_docker_network():
    # ss's lines as printed here (the link-local one captured on this machine's eth0; docker-proxy's form with
    # two processes as ss prints several owners of one socket)
    text = ("State  Recv-Q Send-Q Local Address:Port  Peer Address:PortProcess\n"
            'LISTEN 0      128    [fe80::fc:ff:fe00:1]%eth0:43211         [::]:*    users:(("python3",pid=6418,fd=3))\n'
            'LISTEN 0      4096        172.18.0.1:6379       0.0.0.0:*    users:(("docker-proxy",pid=812,fd=4),'
            '("docker-proxy",pid=813,fd=4))\n'
            "LISTEN 0      128            0.0.0.0:2024       0.0.0.0:*\n")
    link_local, docker, unseen = parse_listeners(text)
    assert (link_local.address, link_local.interface, link_local.port) == ("fe80::fc:ff:fe00:1", "eth0", 43211)
    assert not is_internal(link_local, NETWORKS)
    assert docker.processes == ("docker-proxy",) and is_internal(docker, NETWORKS)
    assert unseen.processes == () and not is_internal(unseen, NETWORKS)


def test_weak_secret_counts_only_where_it_stands_as_a_value_strong_one_also_url_encoded():
    assert not secret_in(b"POSTGRES_USER: postgres\nimage: postgres:16\n", "postgres")
    assert secret_in(b"POSTGRES_PASSWORD=postgres\n", "postgres")
    assert secret_in(b"url: postgresql://postgres:postgres@db:5432/x\n", "postgres")
    strong = SECRETS["LIFTOFF_SEC_TARGET_PW"]
    assert secret_in(f"DATABASE_URL=postgresql://u:{urllib.parse.quote(strong, safe='')}@h/db".encode(), strong)
    assert not secret_in(strong[:-1].encode(), strong)


# --- the checks over SSH ------------------------------------------------------------------------------------

def test_clean_vps_passes_every_check_and_records_the_gate(vps, ufw, ports, files, runbook_path):
    ufw.set("hardened")
    write_clean_files(files)
    with RedisServer(host="127.0.0.1", port=ports["redis"]), \
            listening(("127.0.0.1", ports["postgres"]), ("::1", ports["pgbouncer"])):
        result = check_security_flow(RunOptions(runbook=str(runbook_path)))
    assert result["passed"] == result["lines"] == 9
    gate = Ledger(load_runbook(runbook_path).state_dir).latest_gate("security")
    assert gate.passed and gate.flow_run_id
    report = report_for(runbook_path)  # the same checks, line by line (the services are stopped now)
    assert {line.name: line.status for line in report.lines} == {
        "firewall active": PASSED, "firewall denies incoming by default": PASSED,
        "firewall allows in only 22, 80, 443": PASSED, f"PostgreSQL (port {ports['postgres']}) not public": PASSED,
        f"PgBouncer (port {ports['pgbouncer']}) not public": PASSED, f"Redis (port {ports['redis']}) not public": PASSED,
        f"no secret in {files['compose']}": PASSED, f"no secret in {files['repo_env']}": PASSED,
        f"no secret in local {files['local_env']}": PASSED}


def test_services_listening_on_every_address_fail_with_their_fixes(vps, ufw, ports, files, runbook_path):
    ufw.set("hardened")
    write_clean_files(files)
    with RedisServer(host="0.0.0.0", port=ports["redis"]), \
            listening(("127.0.0.1", ports["postgres"]), ("::", ports["pgbouncer"])):
        report = report_for(runbook_path)
    redis_line = report.line(f"Redis (port {ports['redis']}) not public")
    assert redis_line.status == FAILED
    assert f"0.0.0.0:{ports['redis']} (every address) (redis-server)" in redis_line.detail
    assert "bind 127.0.0.1" in redis_line.fix
    pgbouncer_line = report.line(f"PgBouncer (port {ports['pgbouncer']}) not public")
    assert pgbouncer_line.status == FAILED and f"*:{ports['pgbouncer']} (every address)" in pgbouncer_line.detail
    assert "listen_addr = 127.0.0.1" in pgbouncer_line.fix
    assert report.line(f"PostgreSQL (port {ports['postgres']}) not public").status == PASSED
    assert not report.ok


@pytest.mark.parametrize("state, line, detail, fix", [
    ("inactive", "firewall active", "Status: inactive", "sudo ufw enable"),
    ("default-allow", "firewall denies incoming by default", "Default: allow (incoming)",
     "sudo ufw default deny incoming"),
    ("postgres-open", "firewall allows in only 22, 80, 443", "5432/tcp from Anywhere (v4 and v6)",
     "sudo ufw delete allow 5432/tcp"),
])
def test_firewall_inactive_default_allow_or_an_extra_port_fails_its_line(vps, ufw, files, runbook_path, state, line,
                                                                         detail, fix):
    ufw.set(state)
    write_clean_files(files)
    report = report_for(runbook_path)
    failed = [entry for entry in report.lines if entry.status == FAILED]
    assert [entry.name for entry in failed] == [line]
    assert detail in failed[0].detail and fix in failed[0].fix
    if state == "inactive":  # what cannot be judged while it is off is shown red, not passed
        assert [entry.status for entry in report.lines[1:3]] == [NOT_CHECKED, NOT_CHECKED]


def test_secret_found_in_a_file_is_named_by_its_field_never_by_its_value(vps, ufw, files, runbook_path):
    ufw.set("hardened")
    write_clean_files(files)
    target_pw = urllib.parse.quote(SECRETS["LIFTOFF_SEC_TARGET_PW"], safe="")
    files["repo_env"].write_text(f"DATABASE_URL=postgresql://liftoff:{target_pw}@127.0.0.1:5432/crm\n"
                                 "POSTGRES_PASSWORD=postgres\n")
    files["local_env"].write_text(f"REDIS_PASSWORD='{SECRETS['LIFTOFF_SEC_REDIS_PW']}'\n")
    try:
        with pytest.raises(GateFailed) as raised:
            check_security_flow(RunOptions(runbook=str(runbook_path)))
        report = report_for(runbook_path)
    finally:
        write_clean_files(files)
    on_vps = report.line(f"no secret in {files['repo_env']}")
    assert on_vps.status == FAILED
    assert on_vps.detail == ("holds the value of source.password (env:LIFTOFF_SEC_SOURCE_PW), "
                             "target.direct.password (env:LIFTOFF_SEC_TARGET_PW)")
    assert f"rotate target.direct.password (env:LIFTOFF_SEC_TARGET_PW), then remove it from {files['repo_env']}" \
        in on_vps.fix
    local = report.line(f"no secret in local {files['local_env']}")
    assert local.detail == "holds the value of target.redis.password (env:LIFTOFF_SEC_REDIS_PW)"
    assert report.line(f"no secret in {files['compose']}").status == PASSED
    gate = Ledger(load_runbook(runbook_path).state_dir).latest_gate("security")
    assert not gate.passed and "target.direct.password" in gate.summary
    assert_no_secret_shown("\n".join([str(raised.value), report.markdown(), str(report.rows()), gate.summary]))


def test_an_unresolvable_secret_or_a_failing_command_fails_its_line(vps, ufw, files, runbook_path, tmp_path):
    ufw.set("hardened")
    write_clean_files(files)
    data = yaml.safe_load(runbook_path.read_text())
    data["state_dir"] = str(tmp_path / "state")
    data["security"]["listeners_command"] = "no-such-ss -tlnp"
    data["target"]["redis"]["password"] = {"env": "LIFTOFF_SEC_UNSET_VARIABLE"}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    report = report_for(other)
    resolved = report.line("every secret of the runbook resolved")
    assert resolved.status == FAILED and "LIFTOFF_SEC_UNSET_VARIABLE is not set" in resolved.detail
    listeners = report.line("internal services not public")
    assert listeners.status == FAILED and "`no-such-ss -tlnp` exited 127" in listeners.detail
    assert "listeners_command" in listeners.fix
    assert report.line("firewall active").status == PASSED


def test_cli_run_security_exits_3_on_a_red_line_and_the_ledger_records_the_failed_gate(vps, ufw, files,
                                                                                      runbook_path):
    write_clean_files(files)
    ufw.set("default-allow")
    run = run_cli("run", "security", "--runbook", str(runbook_path), env={**SECRETS, KEY_ENV: vps.client_key_text})
    assert run.returncode == 3, run.stderr
    assert "sudo ufw default deny incoming" in run.stdout  # the report's table, with each red line's fix
    assert "error: firewall denies incoming by default: Default: allow (incoming)" in " ".join(run.stderr.split())
    gate = Ledger(load_runbook(runbook_path).state_dir).latest_gate("security")
    assert not gate.passed and gate.summary.startswith("firewall denies incoming by default")
    assert gate.flow_run_id


def test_dry_run_says_what_it_would_check_and_connects_to_nothing(runbook_path, ports, files):
    before = Ledger(load_runbook(runbook_path).state_dir).latest_gate("security")
    assert check_security_flow(RunOptions(runbook=str(runbook_path), dry_run=True)) == {"dry_run": True}
    plan = last_markdown("security-summary")
    assert f"Redis :{ports['redis']}" in plan and str(files["repo_env"]) in plan and "ufw status verbose" in plan
    assert Ledger(load_runbook(runbook_path).state_dir).latest_gate("security") == before
