"""Runbook step 6d, strategy ``replicate``: logical replication keeps the target current before the cutover, so
the freeze only waits for the last changes (``liftoff.systems.pg_replication``; PostgreSQL applies them).

Before the cutover (``liftoff run replicate``): a publication of the migrated tables the source user owns and
that have a key or replica identity; a logical slot created with an exported snapshot; every published table
reloaded from that snapshot (the stream strategy's copy); sequences from it; the target's subscription on that
slot (nothing copied twice, nothing missed); then the tracker slot, and a full comparison once the target
applied up to it: the tables proven equal then are re-read at the freeze only if the tracker saw them change.

At the freeze (``sync_by_replication``): wait until the target applied the source's WAL position taken after
the freeze, stop on DDL since replication started, copy the sequences and the tables never published, read the
tracker, drop what replication created, and gate the tables that changed (every definition, sequence and
access is compared too; that does not grow with the rows).
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from liftoff.errors import StepFailed
from liftoff.ledger import Ledger, current_run_id
from liftoff.logs import get_logger
from liftoff.reports import Progress, check_table, publish_markdown, publish_table
from liftoff.runbooks.model import Runbook
from liftoff.steps import recorded
from liftoff.systems import pg_replication as repl, pg_tools, postgres
from liftoff.systems.pg_compare import DatabaseReport
from liftoff.checks import FAILED, PASSED, CheckLine, CheckReport

log = get_logger(phase="replication")
PHASE = "replication"
STARTED = "replication.started"  # after: slot LSN, published tables, tables copied in the freeze, catalog
STOPPED = "replication.stopped"  # after: what was dropped, why
PROVEN = "proven"  # ledger items: table -> "match" at the full comparison while replicating (checksum: when)
CHANGED = "changed"  # ledger items: tables the tracker saw change since that comparison


def names(rb: Runbook) -> repl.Names:
    return repl.Names.for_runbook(rb.name)


def migrated_tables(rb: Runbook, src) -> list[str]:
    return [t.qualified for t in postgres.list_tables(src, rb.database.schemas)]


def started_event(rb: Runbook):
    """The last start of replication not followed by a stop: what is running, else None."""
    if not (rb.state_dir / "ledger.sqlite").exists():
        return None
    events = [e for e in Ledger(rb.state_dir).events(PHASE) if e.what in (STARTED, STOPPED)]
    return events[-1] if events and events[-1].what == STARTED else None


@task(name="replication preflight", cache_policy=NO_CACHE)
@recorded("replication.preflight", read_only=True)
def check_replication_ready(rb: Runbook) -> repl.ReplicationReadiness:
    """wal_level, REPLICATION, free slots and senders, which tables are published; and that the target can
    subscribe (a superuser, or pg_create_subscription on 16+). Raises with every failed line."""
    with postgres.session(rb.source, "source") as src:
        report = repl.readiness(src, migrated_tables(rb, src), names(rb), rb.source.where)
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        can, = tgt.execute("SELECT rolsuper OR pg_has_role(current_user, 'pg_create_subscription', 'USAGE') "
                           "FROM pg_roles WHERE rolname = current_user"
                           if tgt.info.server_version >= 160000 else
                           "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    line = CheckLine("target user may subscribe", PASSED if can else FAILED,
                     f"{rb.target.direct.where}: {'may' if can else 'may not'} CREATE SUBSCRIPTION",
                     "" if can else "grant pg_create_subscription (PostgreSQL 16+) or use a superuser for target.direct")
    report = repl.ReplicationReadiness([*report.lines, line], published=report.published,
                                       unpublishable=report.unpublishable)
    if not report.ok:
        raise StepFailed(f"replication preflight failed: {'; '.join(report.failures())}")
    return report


def _source_conninfo_for_target(rb: Runbook) -> str:
    """What the target's subscription connects with: the source as the runbook reaches it. The target server
    makes this connection, not Liftoff: it must reach the source from where it runs."""
    return postgres.conninfo(rb.source, "source")


@task(name="start replication", cache_policy=NO_CACHE)
def start_replication(rb: Runbook, readiness: repl.ReplicationReadiness) -> dict:
    """Publication, slot with an exported snapshot, every published table reloaded from that snapshot, the
    sequences from it, the subscription on the slot. A run killed half-way restarts cleanly: whatever an
    unfinished start created is dropped first (its copy was from a snapshot that is gone)."""
    if started_event(rb) is not None:
        with postgres.session(rb.source, "source") as src, postgres.session(rb.target.direct, "target.direct") as tgt:
            if repl.slot_exists(src, names(rb).slot) and repl.subscription_exists(tgt, names(rb).subscription):
                return {"already running": True}
    stop_replication(rb, "a new start")
    n = names(rb)
    ledger = Ledger(rb.state_dir)
    ledger.forget_items(PHASE)  # what an earlier replication proved says nothing about this one's copy
    with postgres.session(rb.source, "source") as src:
        repl.create_publication(src, n.publication, readiness.published)
        catalog = repl.catalog_fingerprint(src, rb.database.schemas)
        major = src.info.server_version // 10000
    # Recorded before the slot exists: a run killed from here on leaves something a later run must drop.
    ledger.record_event(PHASE, "replication.starting", after={"names": n.__dict__}, flow_run_id=current_run_id())
    try:
        slot, rows, sequences = _copy_and_subscribe(rb, readiness, major)
    except BaseException:
        stop_replication(rb, "the start failed")  # a slot left behind keeps the source's WAL
        raise
    ledger.record_event(PHASE, STARTED, after={
        "slot_lsn": slot.lsn, "published": readiness.published, "catalog": catalog,
        "copied_in_freeze": [u.table for u in readiness.unpublishable]}, flow_run_id=current_run_id())
    log.info("replication started", slot=n.slot, lsn=slot.lsn, tables=len(rows))
    return {"slot_lsn": slot.lsn, "tables": len(rows), "rows": sum(rows.values()), "sequences": sequences,
            "copied in the freeze": [u.table for u in readiness.unpublishable]}


def _copy_and_subscribe(rb: Runbook, readiness: repl.ReplicationReadiness, major: int):
    n = names(rb)
    tools = pg_tools.find_pg_tools(major, rb.database.pg_bin_dirs)
    source_env = postgres.libpq_env(rb.source, "source")
    progress = Progress("replication: initial copy from the slot's snapshot", len(readiness.published))
    rows = {}
    with repl.slot_with_snapshot(postgres.conninfo(rb.source, "source"), n.slot, rb.source.where) as slot:
        # One target transaction: every published table emptied at once (foreign keys between them allow no
        # other order; CASCADE also empties an unpublished table referencing one, reloaded in the freeze),
        # loaded with the foreign keys' triggers off, as the subscription's apply worker runs.
        with postgres.session(rb.target.direct, "target.direct", autocommit=False) as tgt:
            tgt.execute("SET LOCAL session_replication_role = replica")
            tgt.execute(sql.SQL("TRUNCATE {} CASCADE").format(
                sql.SQL(", ").join(sql.Identifier(*t.split(".", 1)) for t in readiness.published)))
            for name in readiness.published:
                schema, table = name.split(".", 1)

                def rows_from(query: str, name=name) -> pg_tools.CopyOut:
                    return pg_tools.CopyOut(tools, source_env, query, slot.snapshot, postgres.TEXT_SETTINGS,
                                            f"copy {name} from source {rb.source.host}:{rb.source.port}")

                rows[name] = postgres.stream_table(tgt, schema, table, rows_from, truncate=False)
                progress.advance(f"{name}: {rows[name]} rows")
            tgt.commit()
        with postgres.session(rb.source, "source", autocommit=False) as snap, \
                postgres.session(rb.target.direct, "target.direct") as tgt:
            postgres.join_snapshot(snap, slot.snapshot)
            sequences = postgres.copy_sequence_values(snap, tgt, rb.database.schemas)
            snap.rollback()
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        repl.create_subscription(tgt, n, _source_conninfo_for_target(rb))
    return slot, rows, sequences


@task(name="full comparison while replicating", cache_policy=NO_CACHE)
@recorded("replication.full-gate")
def prove_while_replicating(rb: Runbook, timeout_s: float = 120) -> dict:
    """The tracker slot first, then, once the target applied everything up to its start, the database gate's
    comparison of every table: a table equal now, that the tracker does not see change, is equal at the
    freeze without being read again. Tables being written differ (the two sides are read at two instants):
    they are re-read at the freeze."""
    from liftoff.tasks.database.gate import compare_as_restored, restored_assessment

    n = names(rb)
    ledger = Ledger(rb.state_dir)
    with postgres.session(rb.source, "source") as src:
        start = repl.create_tracker(src, n.tracker)
        repl.changed_tables(src, n)  # a tracker that already existed: start from now
        start = repl.flushed_lsn(src)
        repl.wait_applied(src, n, start, timeout_s, rb.source.where)
        tables = postgres.list_tables(src, rb.database.schemas)
        assessment = restored_assessment(rb, src)
    started = time.time()
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        activity = repl.target_activity(tgt, rb.database.schemas)
    report = compare_as_restored(rb, tables, assessment)
    matched = [t.table for t in report.tables if t.ok]
    ledger.replace_items(PHASE, PROVEN, ((t, "match", None, str(started)) for t in matched))
    ledger.forget_items(PHASE, CHANGED)
    ledger.record_event(PHASE, "replication.proven", after={"target_activity": activity},
                        flow_run_id=current_run_id())
    return {"from_lsn": start, "tables": len(report.tables), "proven": len(matched),
            "to re-read at the freeze": sorted(t.table for t in report.tables if not t.ok)}


def track_changes(rb: Runbook, src) -> set[str]:
    """Reads the tracker into the ledger (the slot then keeps only WAL since), returns every table changed
    since the full comparison."""
    ledger = Ledger(rb.state_dir)
    seen = repl.changed_tables(src, names(rb))
    if seen:
        ledger.set_items(PHASE, CHANGED, ((t, "changed", None, None) for t in seen))
    return {key for key, *_ in ledger.items(PHASE, CHANGED)}


class LagReport(CheckReport):
    label = "replication lag"


def publish_lag(report: LagReport, rb: Runbook) -> None:
    publish_table("replication-lag", report.rows(), "Replication lag: the target behind the source")
    publish_markdown("replication-lag", f"# Replication lag: {report.summary()}\n\n{check_table(report.lines)}")


@task(name="replication lag (gate)", cache_policy=NO_CACHE)
@recorded("replication.lag", gate="replication", title="replication lag", publish=publish_lag)
def check_lag(rb: Runbook) -> LagReport:
    """The target is streaming and at most ``cutover.replication.max_lag_s`` seconds and ``max_lag_bytes``
    behind; also reads the tracker into the ledger, so its slot holds little WAL."""
    settings = rb.cutover.replication
    with postgres.session(rb.source, "source") as src:
        lag = repl.lag(src, names(rb))
        if repl.slot_exists(src, names(rb).tracker):
            track_changes(rb, src)
    lines = [
        CheckLine("subscription streaming", PASSED if lag.streaming else FAILED,
                  f"slot {names(rb).slot} {'has' if lag.streaming else 'has no'} WAL sender",
                  "" if lag.streaming else "read the target's log for the subscription's errors"),
        CheckLine("lag in bytes", PASSED if 0 <= lag.bytes <= settings.max_lag_bytes else FAILED,
                  f"{lag.bytes} bytes of WAL not yet applied (max {settings.max_lag_bytes})"),
        CheckLine("lag in seconds", PASSED if lag.seconds <= settings.max_lag_s else FAILED,
                  f"{lag.seconds} s behind (max {settings.max_lag_s})"),
    ]
    return LagReport(lines)


def wait_caught_up(rb: Runbook, timeout_s: float) -> repl.Lag:
    """Polls the lag until it is under the runbook's thresholds, with a progress artifact; returns the last."""
    settings = rb.cutover.replication
    with postgres.session(rb.source, "source") as src:
        lag = repl.lag(src, names(rb))
        progress = Progress("replication: target catching up (bytes applied)", max(lag.bytes, 1))
        deadline = time.monotonic() + timeout_s
        first = lag.bytes
        while (lag.bytes > settings.max_lag_bytes or lag.seconds > settings.max_lag_s) and time.monotonic() < deadline:
            time.sleep(0.5)
            lag = repl.lag(src, names(rb))
            progress.advance(f"{lag.bytes} bytes, {lag.seconds} s behind", by=max(0, first - lag.bytes - progress.done))
        progress.advance(f"{lag.bytes} bytes, {lag.seconds} s behind", by=max(0, progress.total - progress.done))
    return lag


def stop_replication(rb: Runbook, why: str) -> list[str]:
    """Drops the subscription, both slots and the publication this runbook's name owns, whoever created them
    (idempotent; every path of the cutover and the rollback calls it). Each side is tried even when the
    other cannot be reached; what could not be dropped is raised after both were tried."""
    n = names(rb)
    dropped, errors = [], []
    try:
        with postgres.session(rb.target.direct, "target.direct") as tgt:
            if repl.drop_subscription(tgt, n):
                dropped.append(f"subscription {n.subscription}")
    except Exception as exc:  # noqa: BLE001 - the source side is dropped all the same
        errors.append(f"target: {exc}")
    try:
        with postgres.session(rb.source, "source") as src:
            dropped += repl.drop_source_side(src, n)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"source: {exc}")
    if dropped and (rb.state_dir / "ledger.sqlite").exists():
        Ledger(rb.state_dir).record_event(PHASE, STOPPED, after={"dropped": dropped, "why": why},
                                          flow_run_id=current_run_id())
        log.info("replication stopped", dropped=dropped, why=why)
    if errors:
        raise StepFailed(f"replication objects could not all be dropped ({'; '.join(errors)}): run "
                         "`liftoff run cleanup` once the server answers")
    return dropped


@task(name="final sync by replication", cache_policy=NO_CACHE)
@recorded("cutover.replicated-sync")
def sync_by_replication(rb: Runbook) -> dict:
    """With the source frozen: the target applied every change up to the WAL position read now; no DDL since
    replication started; sequences from the source; the tables never published copied whole; replication
    dropped. Returns the tables the switch-time gate must re-read."""
    started = started_event(rb)
    n = names(rb)
    if started is None:
        raise StepFailed(f"runbook {rb.name}: cutover.final_sync is replicate but replication is not running: "
                         f"run `liftoff run replicate` first")
    timings = {}
    with postgres.session(rb.source, "source") as src, postgres.session(rb.target.direct, "target.direct") as tgt:
        if not (repl.slot_exists(src, n.slot) and repl.subscription_exists(tgt, n.subscription)):
            raise StepFailed(f"replication of runbook {rb.name} is gone (slot {n.slot} or subscription "
                             f"{n.subscription} missing): run `liftoff run replicate` again")
        ddl = repl.ddl_since(started.after["catalog"], repl.catalog_fingerprint(src, rb.database.schemas))
        if ddl:
            raise StepFailed(f"DDL on the source since replication started ({'; '.join(ddl[:3])}): logical "
                             "replication does not carry it; nothing was switched. Apply the same DDL on the "
                             "target or run `liftoff run resync`, then `liftoff run replicate`")
        lsn = repl.flushed_lsn(src)
        timings["wait for apply"] = repl.wait_applied(src, n, lsn, rb.cutover.replication.apply_timeout_s,
                                                     rb.source.where)
        changed = track_changes(rb, src) if repl.slot_exists(src, n.tracker) else None
        sequences = postgres.copy_sequence_values(src, tgt, rb.database.schemas)
        moved = _moved_on_target(rb, tgt)
    copied = _copy_unpublished(rb, started.after.get("copied_in_freeze") or [])
    stop_replication(rb, "the final sync is done")
    ledger = Ledger(rb.state_dir)
    proven = ({key for key, *_ in ledger.items(PHASE, PROVEN)} if changed is not None and moved is not None
              else set())
    return {"applied_up_to": lsn, "timings": timings, "sequences": sequences, "copied": copied,
            "changed": sorted((changed or set()) | (moved or set())), "proven": sorted(proven),
            "statistics reset": moved is None}


def _moved_on_target(rb: Runbook, tgt) -> set[str] | None:
    """Tables the target's own statistics saw written since the full comparison (None: re-read them all)."""
    proven = [e for e in Ledger(rb.state_dir).events(PHASE) if e.what == "replication.proven"]
    if not proven:
        return None
    return repl.moved_since(proven[-1].after["target_activity"], repl.target_activity(tgt, rb.database.schemas))


def _publish_database_gate(report: DatabaseReport, rb: Runbook, *args) -> None:
    from liftoff.tasks.database.gate import publish_gate

    publish_gate(report, rb)


def _copy_unpublished(rb: Runbook, tables: list[str]) -> dict[str, int]:
    """The migrated tables never published (no key, not owned), each reloaded whole from one snapshot of the
    frozen source (the ones Supabase's services write are left to the catch-up, as in the full sync)."""
    from liftoff.tasks.cutover.catch_up import unfrozen_tables

    if not tables:
        return {}
    with postgres.exported_snapshot(rb.source, "source") as (snap, snapshot_id):
        unfrozen = {t.qualified for t in unfrozen_tables(rb, snap)}
        tools = pg_tools.find_pg_tools(snap.info.server_version // 10000, rb.database.pg_bin_dirs)
        env = postgres.libpq_env(rb.source, "source")
        copied = {}
        for name in [t for t in tables if t not in unfrozen]:
            schema, table = name.split(".", 1)

            def rows_from(query: str, name=name) -> pg_tools.CopyOut:
                return pg_tools.CopyOut(tools, env, query, snapshot_id, postgres.TEXT_SETTINGS,
                                        f"copy {name} from source {rb.source.host}:{rb.source.port}")

            with postgres.session(rb.target.direct, "target.direct", autocommit=False) as tgt:
                copied[name] = postgres.stream_table(tgt, schema, table, rows_from)
    return copied


@task(name="switch-time gate (changed tables)", cache_policy=NO_CACHE)
@recorded("verify", gate="database", publish=_publish_database_gate)
def gate_changed_tables(rb: Runbook, synced: dict) -> DatabaseReport:
    """The database gate with rows re-read only for tables not proven equal while replicating, or changed
    since (the tracker), or copied in the freeze; definitions, sequences and access compared whole. The
    tables of what the freeze cannot stop are the catch-up's."""
    from liftoff.tasks.cutover.catch_up import unfrozen_tables
    from liftoff.tasks.database.gate import compare_as_restored, restored_assessment

    with postgres.session(rb.source, "source") as src:
        every = postgres.list_tables(src, rb.database.schemas)
        assessment = restored_assessment(rb, src)
        deferred = {t.qualified for t in unfrozen_tables(rb, src)}
    unchanged = set(synced["proven"]) - set(synced["changed"]) - set(synced["copied"])
    reread = [t for t in every if t.qualified not in unchanged and t.qualified not in deferred]
    report = compare_as_restored(rb, reread, assessment)
    if deferred:
        report.defer(deferred)
    log.info("switch-time gate", reread=len(reread), unchanged=len(unchanged & {t.qualified for t in every}))
    return report
