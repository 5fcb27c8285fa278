"""The cutover's smoke test (the runbook's `cutover.health_timeout_s` and `cutover.smoke_queries`): the apps are
healthy on the target, and the runbook's smoke queries answer through PgBouncer (as the apps connect)."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import StepFailed
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import http_health as health, postgres
from liftoff.tasks.cutover.common import log


def wait_apps_healthy(rb: Runbook) -> dict[str, float]:
    """Polls each app's health until healthy or ``cutover.health_timeout_s``; returns seconds per app."""
    waited = {}
    for app in rb.cutover.apps:
        started = time.monotonic()
        result = health.wait_healthy(app.health_url, rb.cutover.health_timeout_s)
        if not result.healthy:
            raise StepFailed(f"app {app.name} is not healthy at {app.health_url} after "
                             f"{rb.cutover.health_timeout_s} s (cutover.health_timeout_s): {result.detail}")
        waited[app.name] = round(time.monotonic() - started, 2)
        log.info("app healthy", app=app.name, seconds=waited[app.name])
    return waited


@task(name="smoke test the apps on the target", cache_policy=NO_CACHE)
@recorded("cutover.smoke")
def smoke_test(rb: Runbook) -> dict:
    waited = wait_apps_healthy(rb)
    return {"healthy_after_s": waited, "smoke_queries": run_smoke_queries(rb)}


def run_smoke_queries(rb: Runbook) -> int:
    """Runs each of ``cutover.smoke_queries`` read-only through target.pooled (target.direct without one);
    returns how many answered. StepFailed naming the first that failed."""
    answered = 0
    if rb.cutover.smoke_queries:
        endpoint, field = (rb.target.pooled, "target.pooled") if rb.target.pooled else (rb.target.direct,
                                                                                          "target.direct")
        with postgres.session(endpoint, field, pooled=rb.target.pooled is not None, autocommit=False) as conn:
            for i, query in enumerate(rb.cutover.smoke_queries, start=1):
                try:
                    conn.execute("SET TRANSACTION READ ONLY")
                    conn.execute(query).fetchall()
                    conn.rollback()
                except Exception as exc:  # noqa: BLE001 - any failure of a smoke query fails the smoke test
                    conn.rollback()
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise StepFailed(f"smoke query {i} (cutover.smoke_queries[{i - 1}]) failed through "
                                     f"{endpoint.host}:{endpoint.port}: {first}") from None
                answered += 1
    return answered
