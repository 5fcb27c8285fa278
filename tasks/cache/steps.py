"""The cache phase's steps: Redis configured as the plan says (``cache.config``) and its gate (``verify-cache``).
What is read and set on Redis: ``liftoff.systems.redis_cache``."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.reports import publish_markdown, publish_table
from liftoff.runbooks.model import Runbook
from liftoff.steps import recorded
from liftoff.systems.redis_cache import CacheReport, apply_cache_settings, cache_settings, check_cache, read_cache_settings


@task(name="configure Redis", cache_policy=NO_CACHE)
@recorded("cache.config")
def configure_cache(rb: Runbook) -> dict:
    """With ``cache.apply``: sets what differs. Without: changes nothing and records what differs (the gate
    then names the command for each)."""
    settings = cache_settings(rb)
    if not settings.apply:
        found = read_cache_settings(rb)
        return {"where": found.where, "applied": False,
                "differ": {s.name: {"current": s.current, "wanted": s.wanted} for s in found.differences()}}
    return {**apply_cache_settings(rb), "applied": True}



def publish_cache_gate(report: CacheReport, rb: Runbook, configured: dict) -> None:
    publish_table("cache-checks", report.rows(), "Cache gate: Redis answers, its settings, a write/read round trip")
    changed = configured.get("changed") or {}
    md = [f"# Cache gate {'PASSED' if report.ok else 'FAILED'}", "", f"{report.summary()}.", ""]
    if configured.get("applied"):
        md += ["## Set by this run", *([f"- {name}: {c['from']} → {c['to']} (CONFIG SET, CONFIG REWRITE)"
                                        for name, c in changed.items()] or ["- nothing: every setting was as wanted"]),
               ""]
    elif configured.get("differ"):
        md += ["Nothing was changed: cache.apply is false.", ""]
    md += ["## Checks", report.markdown()]
    publish_markdown("cache-summary", "\n".join(md))


@task(name="verify cache (gate)", cache_policy=NO_CACHE)
@recorded("verify-cache", gate="cache", publish=publish_cache_gate)
def run_cache_gate(rb: Runbook, configured: dict) -> CacheReport:
    """The cache's gate (``check_cache``), shown with what ``configure_cache`` set (``configured``)."""
    return check_cache(rb)
