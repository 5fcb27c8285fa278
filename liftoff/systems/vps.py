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




# ---------------------------------------------------------------------------------------------------------
# CPU and memory, from /proc (Linux)


@dataclass(frozen=True)
class CpuCounters:
    """The first line of /proc/stat: jiffies since boot, all CPUs together. Use is a difference of two."""

    at: float  # when it was read (this machine's clock, seconds)
    busy: int  # user + nice + system + irq + softirq + steal
    total: int  # busy + idle + iowait

    def percent_since(self, earlier: "CpuCounters") -> float:
        """Share of time the CPUs were busy between ``earlier`` and this reading."""
        total = self.total - earlier.total
        return 100.0 * (self.busy - earlier.busy) / total if total > 0 else 0.0


def parse_proc_stat(text: str, at: float) -> CpuCounters:
    line = next((line for line in text.splitlines() if line.startswith("cpu ")), None)
    if line is None:
        raise ValueError("/proc/stat has no 'cpu' line")
    fields = [int(x) for x in line.split()[1:]]
    fields += [0] * (8 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]  # guest time is counted inside user
    busy = user + nice + system + irq + softirq + steal
    return CpuCounters(at, busy, busy + idle + iowait)


@dataclass(frozen=True)
class Memory:
    total_bytes: int
    available_bytes: int  # MemAvailable: what can be had without swapping (the kernel's estimate)

    @property
    def percent(self) -> float:
        return 100.0 * (1 - self.available_bytes / self.total_bytes) if self.total_bytes else 0.0


def parse_meminfo(text: str) -> Memory:
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    if "MemTotal" not in values or "MemAvailable" not in values:
        raise ValueError("/proc/meminfo has no MemTotal or MemAvailable (a kernel older than 3.14?)")
    return Memory(values["MemTotal"], values["MemAvailable"])


def cpu_and_memory(remote: Remote) -> tuple[CpuCounters, Memory]:
    """One SSH command reading /proc/stat and /proc/meminfo; the CPU counters are stamped with this machine's
    time (differences only are used)."""
    import time

    result = remote.run("head -1 /proc/stat; echo ---; cat /proc/meminfo", check=False, timeout=30)
    at = time.time()
    if result.rc != 0 or "---" not in result.stdout:
        why = (result.stderr.strip().splitlines() or [f"exited {result.rc}"])[-1]
        raise StepFailed(f"ssh {remote.where}: reading /proc/stat and /proc/meminfo failed ({why}); the watch "
                         "reads CPU and memory from a Linux VPS")
    stat, _, meminfo = result.stdout.partition("---")
    return parse_proc_stat(stat, at), parse_meminfo(meminfo)
