"""The cutover's maintenance mode (the runbook's `cutover.maintenance`, optional): the apps put in
maintenance through the switch driver before the write freeze, and taken out of it after the smoke test; the
rollback takes them out as it switches them back. Each change is an event in the ledger, so the downtime
report and the rollback know whether the site was in maintenance."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.ledger import Ledger, current_run_id
from liftoff.runbooks.model import Runbook
from liftoff.steps import recorded
from liftoff.systems.switch import SwitchDriver
from liftoff.tasks.cutover.common import PHASE, log, since_last_rollback

MAINTENANCE_ON = "cutover.maintenance-on"  # after: when, where, which keys
MAINTENANCE_OFF = "cutover.maintenance-off"


def maintenance_was_on(ledger: Ledger) -> bool:
    """Whether this cutover put the apps in maintenance (since the last rollback). Then an env file put back
    from before the switch holds ``on`` too, whatever came after: a rollback sets ``off`` again."""
    return any(e.what == MAINTENANCE_ON for e in since_last_rollback(ledger))


def _apply(rb: Runbook, driver: SwitchDriver, values: dict[str, str], what: str) -> dict:
    driver.apply_env(values)
    driver.redeploy()
    at = time.time()
    Ledger(rb.state_dir).record_event(PHASE, what, after={"at": at, "where": driver.where, "keys": sorted(values)},
                                      flow_run_id=current_run_id())
    log.info("maintenance mode", on=what == MAINTENANCE_ON, where=driver.where, keys=sorted(values))
    return {"where": driver.where, "keys": sorted(values), "at": at}


@task(name="put the apps in maintenance", cache_policy=NO_CACHE)
@recorded("cutover.maintenance-on")
def maintenance_on(rb: Runbook) -> dict:
    """Applies ``cutover.maintenance.on`` and redeploys the apps (before the freeze)."""
    from liftoff.tasks.cutover.switch import switch_driver

    with switch_driver(rb) as driver:
        return _apply(rb, driver, rb.cutover.maintenance.on, MAINTENANCE_ON)


@task(name="take the apps out of maintenance", cache_policy=NO_CACHE)
@recorded("cutover.maintenance-off")
def maintenance_off(rb: Runbook) -> dict:
    """Applies ``cutover.maintenance.off`` and redeploys the apps (after the smoke test)."""
    from liftoff.tasks.cutover.switch import switch_driver

    with switch_driver(rb) as driver:
        return _apply(rb, driver, rb.cutover.maintenance.off, MAINTENANCE_OFF)


def leave_maintenance(rb: Runbook, driver: SwitchDriver | None = None) -> bool:
    """The rollback's part: sets ``off`` when this cutover put the apps in maintenance. With ``driver`` (the
    rollback's switch back, which redeploys next) only the environment is set; without one (no switch to
    undo: the cutover stopped before it) the apps are redeployed here. Records it; True when it acted."""
    ledger = Ledger(rb.state_dir)
    if rb.cutover.maintenance is None or not maintenance_was_on(ledger):
        return False
    if driver is not None:
        driver.apply_env(rb.cutover.maintenance.off)
        ledger.record_event(PHASE, MAINTENANCE_OFF, after={"at": time.time(), "where": driver.where,
                            "keys": sorted(rb.cutover.maintenance.off), "by": "rollback"},
                            flow_run_id=current_run_id())
        return True
    from liftoff.tasks.cutover.switch import switch_driver

    with switch_driver(rb) as opened:
        _apply(rb, opened, rb.cutover.maintenance.off, MAINTENANCE_OFF)
    return True
