"""The platform's cache: Redis with persistence and the eviction policy the plan sets, and its gate."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.reports import markdown_table, publish_markdown
from liftoff.flows.hooks import notify_on_failure
from liftoff.systems.redis_cache import cache_settings, fix_for, read_cache_settings, redis_endpoint
from liftoff.tasks.cache.steps import configure_cache, run_cache_gate


@flow(name="cache", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def setup_cache(options: RunOptions) -> dict:
    """Succeeds when target.redis answers PING, runs with the runbook's cache settings (the plan's
    ``appendonly yes``, ``maxmemory 512mb``, ``maxmemory-policy allkeys-lru`` by default) and a write/read round
    trip on a key of Liftoff's own works (the key is deleted after). With ``cache.apply`` the settings that
    differ are set first, with CONFIG REWRITE so a restart keeps them; without it nothing is changed and each
    difference is a red line with the command that fixes it. A dry run reads the settings and reports what it
    would set; it writes nothing."""
    runbook = open_runbook(options, "cache")
    if options.dry_run:
        return publish_cache_plan(runbook)
    configured = configure_cache(runbook)
    report = run_cache_gate(runbook, configured)
    return {"where": report.where, "changed": configured.get("changed", {}), "gate": report.summary()}


def publish_cache_plan(runbook) -> dict:
    settings = cache_settings(runbook)
    found = read_cache_settings(runbook)
    endpoint = redis_endpoint(runbook)
    rows = [{"setting": s.name, "current": s.current, "wanted": s.wanted,
             "would": ("nothing (as wanted)" if s.matches else
                       "CONFIG SET, then CONFIG REWRITE" if settings.apply else "report it (cache.apply is false)")}
            for s in found.settings]
    md = ["# Cache plan (dry run: nothing written)", "",
          f"Redis {found.where}: {len(found.differences())} of {len(rows)} settings differ from the plan.", "",
          markdown_table(rows)]
    if found.differences() and not settings.apply:
        md += ["## What fixes each", *[f"- {s.name}: {fix_for(endpoint, s, found.config_file)}"
                                       for s in found.differences()]]
    publish_markdown("cache-summary", "\n".join(md))
    return {"dry_run": True, "differ": [s.name for s in found.differences()], "apply": settings.apply}


