"""The ``replicate`` final sync's own flows: start logical replication before the cutover, watch its lag, and
clean up what it left on the source (a slot keeps WAL until the disk is full)."""

from __future__ import annotations

from prefect import flow

from liftoff.flows.options import RunOptions, open_runbook
from liftoff.ledger import exclusive
from liftoff.reports import check_table, markdown_table, publish_markdown
from liftoff.tasks.cutover.replication import (
    check_lag,
    check_replication_ready,
    prove_while_replicating,
    start_replication,
    stop_replication,
    wait_caught_up,
)
from liftoff.flows.hooks import notify_on_failure
from liftoff.systems import pg_replication, postgres


@flow(name="start-replication", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def replicate(options: RunOptions) -> dict:
    """Succeeds when the target is subscribed to the source: a publication of every migrated table that has a
    key or replica identity, a slot made with an exported snapshot, every published table reloaded from that
    snapshot, the sequences from it, the target's subscription applying from that slot, the target caught up
    under the runbook's lag thresholds, and every table compared once (the switch-time gate re-reads only what
    changed since). Tables that cannot be published are listed: the cutover copies them in the freeze. Run it
    after the database phase (it needs the target's schema); run it again to restart replication."""
    runbook = open_runbook(options, "replicate")
    ready = check_replication_ready(runbook)
    publish_readiness(ready)
    if options.dry_run:
        return {"dry_run": True, "published": ready.published,
                "copied_in_freeze": [u.table for u in ready.unpublishable]}
    with exclusive(runbook.state_dir):
        started = start_replication(runbook, ready)
        lag = wait_caught_up(runbook, runbook.cutover.replication.apply_timeout_s)
        proven = prove_while_replicating(runbook)
    gate = check_lag(runbook)  # a failed lag gate raises; replication stays (it may catch up)
    return {"start": started, "lag_bytes": lag.bytes, "lag_s": lag.seconds, "full_gate": proven,
            "lag_gate": gate.summary()}


@flow(name="replication-lag", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def replication_lag(options: RunOptions) -> dict:
    """(the lag gate) Succeeds when the target's subscription is streaming and at most
    ``cutover.replication.max_lag_s`` seconds and ``max_lag_bytes`` behind the source. Reads only (it advances
    Liftoff's tracker slot, which frees the source's WAL)."""
    runbook = open_runbook(options, "replication-lag")
    report = check_lag(runbook)  # published, recorded, and raised when it did not pass
    return {"summary": report.summary()}


@flow(name="cleanup-replication", on_failure=[notify_on_failure], on_crashed=[notify_on_failure])
def cleanup_replication(options: RunOptions) -> dict:
    """Succeeds when this runbook's subscription (target), slots and publication (source) are gone; lists
    Liftoff's slots with the WAL each keeps before and after. The source's data is untouched."""
    runbook = open_runbook(options, "cleanup")
    before = list_on_source(runbook)
    if options.dry_run:
        return {"dry_run": True, **before}
    with exclusive(runbook.state_dir):
        dropped = stop_replication(runbook, "cleanup")
    after = list_on_source(runbook)
    publish_markdown("replication-cleanup", "\n".join([
        "# Replication cleanup", f"Dropped: {', '.join(dropped) or 'nothing (none left)'}.", "",
        "## Liftoff's slots on the source now", markdown_table(after["slots"]) if after["slots"] else "None."]))
    return {"dropped": dropped, "before": before, "after": after}


def list_on_source(runbook) -> dict:
    """Liftoff's slots (with the WAL each keeps) and publications on the source."""
    with postgres.session(runbook.source, "source") as src:
        slots, publications = pg_replication.liftoff_objects(src)
    return {"slots": [{"slot": s.slot, "active": s.active, "retained WAL bytes": s.retained_wal_bytes} for s in slots],
            "publications": publications}


def publish_readiness(ready) -> None:
    md = ["# Replication preflight", "", check_table(ready.lines), "",
          f"## Published ({len(ready.published)})", ", ".join(ready.published) or "none"]
    if ready.unpublishable:
        md += ["", "## Not published: copied whole in the freeze",
               markdown_table([{"table": u.table, "why": u.why} for u in ready.unpublishable])]
    publish_markdown("replication-preflight", "\n".join(md))
