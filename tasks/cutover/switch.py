"""The cutover's switch (the runbook's `cutover.switch` and `cutover.apps`): the apps move to the target. Their
environment is changed through the runbook's switch driver (an env file over SSH, or Coolify's API), the
driver's undo record goes to the ledger's event log, and the apps are redeployed. ``switch_back`` is the
rollback's inverse."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.ledger import Event, Ledger, current_run_id
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.tasks.cutover.common import PHASE, SWITCHED, log, require_switch, resolve_env, since_last_rollback
from liftoff.systems.switch import SwitchDriver


def switch_driver(rb: Runbook) -> SwitchDriver:
    require_switch(rb)
    switch = rb.cutover.switch
    if switch.driver == "ssh":
        from liftoff.systems.remote import EnvFileSwitch, Remote

        return EnvFileSwitch(Remote(rb.ssh), switch.ssh)
    from liftoff.systems.coolify import CoolifySwitch

    return CoolifySwitch(switch.coolify)


@task(name="switch the apps to the target", cache_policy=NO_CACHE)
@recorded("cutover.switch")
def switch_apps(rb: Runbook) -> dict:
    """Sets the apps' new environment and redeploys them. The first switch of a cutover records the undo
    record; a re-run keeps that one (it restores the environment from before the cutover)."""
    ledger = Ledger(rb.state_dir)
    env = resolve_env(rb)
    earlier = [e for e in since_last_rollback(ledger) if e.what == SWITCHED]
    with switch_driver(rb) as driver:
        undo = driver.apply_env(env)
        if not earlier:
            try:
                ledger.record_event(PHASE, SWITCHED, before=undo,
                                    after={"at": time.time(), "where": driver.where, "keys": sorted(env)},
                                    flow_run_id=current_run_id())
            except Exception:
                driver.restore_env(undo)  # without its undo record in the ledger, the switch must not stand
                raise
        log.info("apps' environment switched", where=driver.where, keys=sorted(env))
        driver.redeploy()
    return {"where": driver.where, "keys": sorted(env), "at": time.time()}


def switch_back(rb: Runbook, event: Event) -> str:
    """Puts back the environment from before the cutover and redeploys (the rollback's step)."""
    from liftoff.tasks.cutover.maintenance import leave_maintenance, rewind_maintenance

    with switch_driver(rb) as driver:
        rewind_maintenance(rb, driver)  # maintenance off after the smoke test changed what the switch wrote
        driver.restore_env(event.before)
        leave_maintenance(rb, driver)  # the environment put back may be the maintenance one (set before the switch)
        driver.redeploy()
        return driver.where
