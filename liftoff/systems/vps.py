"""The VPS's own numbers, read over SSH with the tools it has: disk use per path (``df``), judged against the
health thresholds (ok, warn, critical); its TCP connections are ``liftoff.systems.ss``'s.

The parser takes the tool's text as it is: ``df -P -B1`` (POSIX format: one line per filesystem, sizes in
bytes; a mount point or device with spaces in it is fine). Knows SSH only through
``liftoff.systems.remote.Remote``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal

from liftoff.errors import StepFailed
from liftoff.systems.remote import Remote

Level = Literal["ok", "warn", "critical"]

_DF_LINE = re.compile(r"^(?P<fs>.*?)\s+(?P<size>\d+)\s+(?P<used>\d+)\s+(?P<avail>\d+)\s+(?P<pcent>\d+|-)%?\s+"
                      r"(?P<mount>/.*)$")


def judge(value: float, warn: float, critical: float) -> Level:
    """At or above ``critical``: critical; at or above ``warn``: warn; else ok."""
    return "critical" if value >= critical else "warn" if value >= warn else "ok"


@dataclass(frozen=True)
class DiskUsage:
    path: str  # the path asked about
    filesystem: str
    mount: str
    size_bytes: int
    used_bytes: int
    available_bytes: int

    @property
    def percent(self) -> float:
        """Used share of what users can have (used + available), as df's Capacity column counts it: the
        blocks reserved for root are not counted as free."""
        usable = self.used_bytes + self.available_bytes
        return 100.0 * self.used_bytes / usable if usable else 0.0


def parse_df(text: str, path: str) -> DiskUsage:
    """The one filesystem line of ``df -P -B1 -- PATH``."""
    for line in text.splitlines():
        m = _DF_LINE.match(line.strip())
        if m:
            return DiskUsage(path, m["fs"], m["mount"], int(m["size"]), int(m["used"]), int(m["avail"]))
    raise ValueError(f"df printed no filesystem line for {path}: {' | '.join(text.strip().splitlines()[:3])!r}")


def disk_usage(remote: Remote, path: str) -> DiskUsage:
    result = remote.run(f"LC_ALL=C df -P -B1 -- {shlex.quote(path)}", check=False, timeout=60)
    if result.rc != 0:
        why = (result.stderr.strip().splitlines() or [f"exited {result.rc}"])[-1]
        raise StepFailed(f"ssh {remote.where}: df {path} failed ({why}); check health.disk_paths")
    return parse_df(result.stdout, path)


