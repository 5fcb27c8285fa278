"""The rehearsal's arithmetic: the downtime estimate from measured steps, and the comparison with
earlier rehearsals."""

from __future__ import annotations

import time
from collections.abc import Iterable


from liftoff.ledger import Event, StepRecord
from liftoff.logs import get_logger
from liftoff.runbooks.model import Runbook
from liftoff.tasks.rehearsal.scratch import DONE, FAILED
from liftoff.systems import postgres

log = get_logger(phase="rehearsal")
# With no real cutover recorded yet, the freeze, the switch and the smoke test are taken as this long.
ASSUMED_SWITCH_S = 60.0


# ---------------------------------------------------------------------------------------------------------
# Measuring: the downtime estimate and the comparison with earlier rehearsals


def step_seconds(steps: dict[str, StepRecord], names: Iterable[str]) -> dict[str, float]:
    return {n: round(steps[n].seconds, 2) for n in names if n in steps and steps[n].seconds is not None}


def last_cutover_switch(events: list[Event]) -> dict[str, float] | None:
    """The freeze, switch and smoke durations of the last completed real cutover (its ``cutover.completed``
    event), or None when none completed."""
    completed = [e for e in events if e.what == "cutover.completed" and isinstance(e.after, dict)]
    if not completed:
        return None
    steps = completed[-1].after.get("steps") or {}
    return {k: float(v) for k, v in steps.items() if k != "final sync" and isinstance(v, (int, float))}


def estimate_downtime(final_sync: dict[str, float], copy_seconds: float, changed_fraction: float,
                      switch: dict[str, float] | None) -> dict:
    """Estimated cutover downtime: the final sync's steps as the rehearsal measured them (the storage copy
    scaled to the share of bytes the real target still lacks), then the freeze, switch and smoke test of the
    last real cutover, or an assumption that says so."""
    parts = dict(final_sync)
    parts["storage.copy (what changed)"] = round(copy_seconds * max(0.0, min(1.0, changed_fraction)), 2)
    assumption = None
    if switch:
        parts.update({f"cutover {k}": round(v, 2) for k, v in switch.items()})
    else:
        parts["freeze, switch and smoke test (assumed)"] = ASSUMED_SWITCH_S
        assumption = (f"no real cutover is recorded yet: the freeze, the switch and the smoke test are assumed to "
                      f"take {ASSUMED_SWITCH_S:.0f} s")
    return {"downtime_s": round(sum(parts.values()), 2), "parts": parts, "assumption": assumption}


def changed_share(real: Runbook) -> tuple[float, str]:
    """The share of the inventory's bytes the real target does not hold yet (not copied, or changed on the
    source since): what the final sync's storage copy would move. Reads the real ledger, never writes it."""
    from liftoff.ledger import Ledger
    from liftoff.systems import supabase_storage
    from liftoff.tasks.storage.plan import pending

    if not (real.state_dir / "ledger.sqlite").exists():
        return 1.0, "the real storage phase has not run yet: every object counts as changed"
    ledger = Ledger(real.state_dir)
    total = changed = 0
    with postgres.session(real.source, "source") as conn:
        for b in real.storage.buckets:
            total += sum(obj.size or 0 for obj in supabase_storage.inventory(conn, b.name))
            changed += sum(obj.size or 0 for obj in pending(real, conn, ledger, b.name))
    share = changed / total if total else 0.0
    return share, f"{changed:,} of {total:,} bytes are not on the real target yet"


def comparison_rows(events: list[Event]) -> list[dict]:
    """One row per recorded rehearsal, oldest first, with the change in estimated downtime against the one
    before."""
    rows, previous = [], None
    for e in events:
        if e.what not in (DONE, FAILED) or not isinstance(e.after, dict):
            continue
        a = e.after
        phases, sizes = a.get("phases", {}), a.get("sizes", {})
        downtime = (a.get("estimate") or {}).get("downtime_s")
        row = {
            "when (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.at)),
            "passed": "yes" if e.what == DONE else "NO",
            "database s": _num(phases.get("database", {}).get("seconds")),
            "storage s": _num(phases.get("storage", {}).get("seconds")),
            "DB rows": _num(sizes.get("database", {}).get("rows")),
            "source DB bytes": _num(sizes.get("database", {}).get("source_bytes")),
            "objects": _num(sizes.get("storage", {}).get("objects")),
            "object bytes": _num(sizes.get("storage", {}).get("bytes")),
            "est. downtime s": _num(downtime),
            "change": _change(previous, downtime),
        }
        rows.append(row)
        if downtime is not None:
            previous = downtime
    return rows


def changes(previous: dict, current: dict) -> list[dict]:
    """Each measured figure of two rehearsals' events (their ``after``), side by side with its change."""
    def figures(a: dict) -> dict[str, float | None]:
        out = {f"{p} phase, s": v.get("seconds") for p, v in a.get("phases", {}).items()}
        for v in a.get("phases", {}).values():
            out.update({f"step {s}, s": sec for s, sec in (v.get("steps") or {}).items()})
        for kind, v in a.get("sizes", {}).items():
            out.update({f"{kind} {k}": n for k, n in v.items() if isinstance(n, (int, float))})
        out["estimated downtime, s"] = (a.get("estimate") or {}).get("downtime_s")
        return out

    before, now = figures(previous), figures(current)
    return [{"figure": k, "previous": _num(before.get(k)), "this one": _num(now.get(k)),
             "change": _change(before.get(k), now.get(k))} for k in now]


def _num(v) -> str:
    if v is None:
        return "–"
    return f"{v:,.2f}" if isinstance(v, float) and not v.is_integer() else f"{int(v):,}"


def _change(before, now) -> str:
    if before is None or now is None:
        return "–"
    delta = now - before
    pct = f" ({delta / before * 100:+.0f}%)" if before else ""
    if isinstance(delta, float) and not delta.is_integer():
        return f"{delta:+,.2f}{pct}"
    return f"{int(delta):+,}{pct}"
