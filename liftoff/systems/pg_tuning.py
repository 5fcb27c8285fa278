"""PostgreSQL on the target as the plan tunes it for the 16 GB VPS: shared_buffers 1GB, effective_cache_size 3GB,
work_mem 32MB, maintenance_work_mem 256MB, max_connections 100, wal_buffers 32MB (the runbook's ``tuning``).

``read_tuning`` reads what the server runs with (``pg_settings``: the value in its unit, the context that says
whether a change needs a restart, where the value comes from, and ``pending_restart``) beside what the runbook
wants; ``apply_tuning`` sets what differs (``ALTER SYSTEM``, then ``pg_reload_conf()``) and waits until the
reload shows; ``check_tuning`` is the gate: one line per setting, and one line naming every setting that is
changed in the configuration but waits for a restart. Each red line says what fixes it.

Knows PostgreSQL only (psycopg); which server is ``target.direct``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import ClassVar

import psycopg
from psycopg import sql

from liftoff.checks import FAILED, PASSED, CheckLine, CheckReport
from liftoff.errors import StepFailed
from liftoff.logs import get_logger
from liftoff.redaction import one_line
from liftoff.reports import check_table, md_cell
from liftoff.runbooks.model import Runbook, Tuning, pg_memory_bytes
from liftoff.systems.postgres import session

log = get_logger(phase="tuning")

FIELD = "target.direct"
RESTART_LINE = "restart pending"
_RELOAD_WAIT_S = 10
# Settings a value on the server's command line or in its environment fixes: ALTER SYSTEM cannot override them.
_ABOVE_ALTER_SYSTEM = {"command line", "environment variable"}


def tuning_settings(rb: Runbook) -> Tuning:
    """The runbook's tuning section, or the plan's defaults when it has none (check only, apply false)."""
    return rb.tuning or Tuning()


def unit_bytes(unit: str | None) -> int | None:
    """Bytes of one unit of a ``pg_settings.unit`` (``8kB``, ``kB``, ``MB``, ``B``); None for a plain number."""
    if not unit:
        return None
    m = re.fullmatch(r"(\d*)(B|kB|MB|GB|TB)", unit)
    if not m:
        return None
    return (int(m.group(1)) if m.group(1) else 1) * pg_memory_bytes(f"1{m.group(2)}")


def readable(size: int) -> str:
    """A byte count as PostgreSQL prints it (``1GB``, ``256MB``, ``64kB``): the largest whole unit."""
    for unit in ("TB", "GB", "MB", "kB"):
        if size and size % pg_memory_bytes(f"1{unit}") == 0:
            return f"{size // pg_memory_bytes(f'1{unit}')}{unit}"
    return f"{size}B"


def wanted_value(name: str, wanted: str) -> int:
    """The wanted setting in comparable form: bytes for a memory setting, the number otherwise."""
    return int(wanted) if name == "max_connections" else pg_memory_bytes(wanted)


@dataclass(frozen=True)
class PgSetting:
    name: str
    wanted: str
    value: int  # bytes for a memory setting, the number otherwise: what the server runs with
    shown: str  # the same, as PostgreSQL prints it
    context: str  # postmaster: a change needs a restart; sighup, user: a reload is enough
    source: str  # where the running value comes from: default, configuration file, command line, ...
    pending_restart: bool  # the configuration holds a new value that waits for a restart

    @property
    def matches(self) -> bool:
        return self.value == wanted_value(self.name, self.wanted)

    @property
    def needs_restart(self) -> bool:
        return self.context == "postmaster"


@dataclass
class TuningSettings:
    where: str  # host:port
    settings: list[PgSetting] = field(default_factory=list)
    pending_restart: list[str] = field(default_factory=list)  # every setting of the server that waits for one

    def differences(self) -> list[PgSetting]:
        return [s for s in self.settings if not s.matches]

    def setting(self, name: str) -> PgSetting:
        return next(s for s in self.settings if s.name == name)


def _read(conn: psycopg.Connection, tuning: Tuning, where: str) -> TuningSettings:
    wanted = tuning.wanted()
    rows = conn.execute("SELECT name, setting, unit, context, source, pending_restart FROM pg_settings "
                        "WHERE name = ANY(%s)", (list(wanted),)).fetchall()
    found = TuningSettings(where)
    by_name = {row[0]: row for row in rows}
    for name, want in wanted.items():
        _, setting, unit, context, source, pending = by_name[name]
        per_unit = unit_bytes(unit)
        value = int(setting) * per_unit if per_unit else int(setting)
        found.settings.append(PgSetting(name, want, value, readable(value) if per_unit else str(value), context,
                                        source, bool(pending)))
    found.pending_restart = [r[0] for r in conn.execute(
        "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name").fetchall()]
    return found


def read_tuning(rb: Runbook) -> TuningSettings:
    """What target.direct runs with, beside the runbook's tuning. Reads only; a server that does not answer
    raises ConnectionRefused naming target.direct."""
    ep = rb.target.direct
    with session(ep, FIELD) as conn:
        return _read(conn, tuning_settings(rb), f"{ep.host}:{ep.port}")


def alter_system(name: str, value: str) -> str:
    return f"ALTER SYSTEM SET {name} = '{value}';"


def fix_for(s: PgSetting) -> str:
    """What the operator does so the server runs with the wanted value."""
    if s.pending_restart:
        return f"restart PostgreSQL (e.g. sudo systemctl restart postgresql): {s.name} is set and waits for it"
    if s.source in _ABOVE_ALTER_SYSTEM:
        return (f"{s.name} is given on the server's {s.source}, which overrides postgresql.conf and ALTER SYSTEM: "
                f"change it there to {s.wanted}")
    then = "then restart PostgreSQL" if s.needs_restart else "SELECT pg_reload_conf();"
    return f"{alter_system(s.name, s.wanted)} {then} (or set tuning.apply: true and run liftoff run tune)"


def apply_tuning(rb: Runbook) -> dict:
    """Sets every setting that differs and is not already waiting for a restart (ALTER SYSTEM, which writes
    postgresql.auto.conf, so a restart keeps it), reloads, and waits until the reload shows. Returns what
    changed and which of them wait for a restart. Idempotent: a second run changes nothing."""
    ep = rb.target.direct
    tuning = tuning_settings(rb)
    with session(ep, FIELD) as conn:
        found = _read(conn, tuning, f"{ep.host}:{ep.port}")
        todo = [s for s in found.differences() if not (s.pending_restart and _in_auto_conf(conn, s))]
        for s in todo:
            try:
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(s.name), sql.Literal(s.wanted)))
            except psycopg.errors.InsufficientPrivilege:
                raise StepFailed(
                    f"{FIELD} ({ep.host}:{ep.port}): user '{ep.user}' may not ALTER SYSTEM SET {s.name}: connect as a "
                    f"superuser, or GRANT ALTER SYSTEM ON PARAMETER {', '.join(tuning.wanted())} TO {ep.user}; or "
                    "set tuning.apply: false and set them by hand") from None
        if todo:
            conn.execute("SELECT pg_reload_conf()")
    after = _wait_for_reload(rb, tuning, {s.name for s in todo}) if todo else found
    changed = {s.name: {"from": s.shown, "to": s.wanted} for s in todo}
    needs_restart = [s.name for s in after.settings if s.pending_restart]
    log.info("tuning applied", changed=sorted(changed), needs_restart=needs_restart)
    return {"where": found.where, "changed": changed, "needs_restart": needs_restart}


def _in_auto_conf(conn: psycopg.Connection, s: PgSetting) -> bool:
    """Whether the configuration files already hold the wanted value (it only waits for a restart)."""
    try:
        rows = conn.execute("SELECT setting FROM pg_file_settings WHERE name = %s AND applied IS NOT NULL "
                            "ORDER BY seqno DESC LIMIT 1", (s.name,)).fetchall()
    except psycopg.errors.InsufficientPrivilege:  # pg_file_settings is a superuser's view: set it again
        return False
    if not rows:
        return False
    try:
        return wanted_value(s.name, rows[0][0]) == wanted_value(s.name, s.wanted)
    except ValueError:
        return False


def _wait_for_reload(rb: Runbook, tuning: Tuning, names: set[str]) -> TuningSettings:
    """pg_reload_conf() only signals the server: read again (a new session each time) until every changed
    setting runs with its new value or waits for a restart."""
    ep = rb.target.direct
    deadline = time.monotonic() + _RELOAD_WAIT_S
    while True:
        with session(ep, FIELD) as conn:
            found = _read(conn, tuning, f"{ep.host}:{ep.port}")
        if all(s.matches or s.pending_restart for s in found.settings if s.name in names):
            return found
        if time.monotonic() > deadline:
            return found  # the gate names what still differs
        time.sleep(0.2)


@dataclass(frozen=True)
class TuningReport(CheckReport):
    label: ClassVar[str] = "tuning gate"
    where: str = ""

    def markdown(self) -> str:
        return check_table(self.lines, "setting")


def check_tuning(rb: Runbook) -> TuningReport:
    """The tuning gate: one line per setting (passed when the server runs with the wanted value), then one
    line for the settings that wait for a restart (any of the server's: the running server is not what its
    configuration says until then). Reads only."""
    found = read_tuning(rb)
    lines = []
    for s in found.settings:
        if s.matches:
            lines.append(CheckLine(s.name, PASSED, f"{s.shown} (as the plan wants; from {s.source})"))
            continue
        why = ("set in the configuration, waits for a restart" if s.pending_restart else
               f"from {s.source}{', needs a restart to change' if s.needs_restart else ''}")
        lines.append(CheckLine(s.name, FAILED, f"runs with {s.shown}, the plan wants {s.wanted} ({why})", fix_for(s)))
    if found.pending_restart:
        names = ", ".join(found.pending_restart)
        lines.append(CheckLine(RESTART_LINE, FAILED, f"{names}: changed in the configuration, PostgreSQL needs a "
                                                     "restart to run with them",
                               "restart PostgreSQL in a quiet moment (e.g. sudo systemctl restart postgresql; "
                               "PgBouncer's clients reconnect), then run liftoff run tune again"))
    else:
        lines.append(CheckLine(RESTART_LINE, PASSED, "no setting waits for a restart"))
    report = TuningReport(lines, where=found.where)
    log.info("tuning gate", ok=report.ok, failed=[one_line(f) for f in report.failures()])
    return report


def plan_rows(found: TuningSettings, apply: bool) -> list[dict]:
    """The dry run's table: each setting, what it runs with, what the plan wants, what a run would do."""
    return [{"setting": s.name, "current": s.shown, "wanted": s.wanted,
             "would": ("nothing (as wanted)" if s.matches else
                       "nothing: set, waits for a restart" if s.pending_restart else
                       md_cell(f"ALTER SYSTEM, reload{' (then a restart)' if s.needs_restart else ''}") if apply
                       else "report it (tuning.apply is false)")} for s in found.settings]
