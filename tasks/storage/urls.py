"""The storage URL rewrite (the runbook's `storage.rewrite`), its tasks: the app's Storage URLs in the target
database point at the target's files.

The rewrite runs only after the storage gate passed (a URL must not point at a file that is not there). Each
column's changed rows (primary key, old value, new value) go to the ledger's event log in the same breath as
the target's transaction commits: the events are written first, inside it, so a run that dies between the
two leaves events whose rows still hold their old values, which the inverse counts as already restored.
``restore_storage_urls`` replays those events backwards (the rollback's step).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.errors import StepFailed
from liftoff.ledger import Event, Ledger, current_run_id
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import postgres, storage_urls
from liftoff.tasks.storage.common import PHASE, log
from liftoff.tasks.storage.plan import recorded_gone
from liftoff.systems.pg_compare import RewrittenColumn

REWRITE_EVENT = "storage.rewrite-urls"
RESTORE_EVENT = "storage.restore-urls"


def url_columns(rb: Runbook) -> list[storage_urls.ColumnSpec]:
    return [storage_urls.ColumnSpec(c.table, c.column, c.kind, c.bucket) for c in rb.storage.rewrite]


def url_mapping(rb: Runbook, gone: dict[str, set[str]] | None = None) -> storage_urls.UrlMapping:
    """The rewrite's mapping: only the runbook's buckets move, and files whose bytes are gone on the source
    (``gone``, else as the storage plan last recorded them in the ledger) keep their URLs."""
    if gone is None:
        ledger = Ledger(rb.state_dir) if (rb.state_dir / "ledger.sqlite").exists() else None
        gone = {b.name: recorded_gone(ledger, b.name) for b in rb.storage.buckets} if ledger else {}
    return storage_urls.UrlMapping(rb.storage.source.project_url, rb.storage.target.public_url,
                                   rb.storage.bucket_prefix, frozenset(b.name for b in rb.storage.buckets),
                                   {bucket: frozenset(keys) for bucket, keys in gone.items()})


@task(name="preview storage URL rewrite", cache_policy=NO_CACHE)
def preview_storage_urls(rb: Runbook, gone: dict[str, set[str]] | None = None) -> list[storage_urls.ColumnPreview]:
    """Per column of ``storage.rewrite``: rows it would change, rows it cannot map and why, rows it leaves
    (a bucket not moved, a file with no bytes on the source: ``gone``, else the ledger's), examples. Reads
    only."""
    if not rb.storage.rewrite:
        return []
    m = url_mapping(rb, gone)
    with postgres.session(rb.target.direct, "target.direct") as conn:
        return storage_urls.preview_rewrite(conn, url_columns(rb), m.project_url, m.public_base,
                                            bucket_prefix=m.bucket_prefix, moved=m.moved, gone=m.gone)


def _require_storage_gate(ledger: Ledger) -> None:
    gate = ledger.latest_gate(PHASE)
    if gate is None or not gate.passed:
        why = "has not run" if gate is None else f"failed ({gate.summary})"
        raise StepFailed(f"storage URL rewrite refused: the storage gate {why}; URLs must not point at files the "
                         "target may lack. Run `liftoff run storage` (or verify-storage) until it passes")


@task(name="rewrite storage URLs", cache_policy=NO_CACHE)
@recorded("storage.rewrite")
def rewrite_storage_urls(rb: Runbook) -> dict:
    """Rewrites the runbook's URL columns on the target, all in one transaction, and records each changed
    row's old value in the ledger. Idempotent: values already on the public base are left alone."""
    if not rb.storage.rewrite:
        return {"columns": 0, "rows_changed": 0}
    ledger = Ledger(rb.state_dir)
    _require_storage_gate(ledger)
    m = url_mapping(rb)
    with postgres.session(rb.target.direct, "target.direct") as conn:
        with conn.transaction():  # commits after the events are in the ledger, or not at all
            result = storage_urls.rewrite(conn, url_columns(rb), m.project_url, m.public_base, m.bucket_prefix,
                                          moved=m.moved, gone=m.gone)
            for change in result.changes:
                if change["rows"]:
                    ledger.record_event(PHASE, REWRITE_EVENT, before=None, after=change, flow_run_id=current_run_id())
    columns = {f"{c['table']}.{c['column']}": {"rows_changed": len(c["rows"]), "unmappable": c["unmappable"],
                                              "already_rewritten": c["already_rewritten"],
                                              "bucket_not_moved": c["not_moved"], "no_bytes_on_source": c["no_bytes"],
                                              "no_bytes_values": c["no_bytes_values"]} for c in result.changes}
    log.info("storage URLs rewritten", rows=result.rows_changed, columns=len(columns),
             bucket_not_moved=sum(c["not_moved"] for c in result.changes),
             no_bytes_on_source=sum(c["no_bytes"] for c in result.changes))
    return {"columns": columns, "rows_changed": result.rows_changed}


def rewritten_url_columns(rb: Runbook) -> dict[str, list[RewrittenColumn]]:
    """The URL columns the database gate must expect rewritten: those of ``storage.rewrite`` once the ledger
    records the rewrite done (a restore forgets it, and the gate expects the source's values again)."""
    if not rb.storage.rewrite or rb.storage.source is None or rb.storage.target is None:
        return {}
    if not (rb.state_dir / "ledger.sqlite").exists() or not Ledger(rb.state_dir).is_done("storage.rewrite"):
        return {}
    m, columns = url_mapping(rb), {}
    for spec in url_columns(rb):
        columns.setdefault(spec.table, []).append(
            RewrittenColumn(spec.column, lambda value, spec=spec: m.expected(value, spec)))
    return columns


def pending_rewrites(ledger: Ledger) -> list[Event]:
    """The rewrite events since the last restore: what a rollback puts back, oldest first."""
    return [e for e in ledger.events_since(PHASE, RESTORE_EVENT) if e.what == REWRITE_EVENT]


@task(name="restore storage URLs", cache_policy=NO_CACHE)
@recorded("storage.restore-urls")
def restore_storage_urls(rb: Runbook) -> dict:
    """Puts back the exact old value of every row the rewrites since the last restore changed, newest first,
    in one transaction, only where a row still holds what the rewrite wrote; rows the app changed since, or
    deleted, are counted and named, never overwritten."""
    ledger = Ledger(rb.state_dir)
    events = pending_rewrites(ledger)
    with postgres.session(rb.target.direct, "target.direct") as conn:
        with conn.transaction():
            result = storage_urls.inverse(conn, [e.after for e in events])
            ledger.record_event(PHASE, RESTORE_EVENT, before={"events": [e.id for e in events]},
                                after={"restored": result.restored, "already_restored": result.already_restored,
                                       "kept": result.kept, "missing": result.missing},
                                flow_run_id=current_run_id())
        ledger.forget_steps("storage.rewrite")  # the next storage run rewrites again
    log.info("storage URLs restored", rows=result.restored, kept=len(result.kept), missing=len(result.missing))
    return {"restored": result.restored, "already_restored": result.already_restored,
            "kept": result.kept[:20], "kept_count": len(result.kept), "missing_count": len(result.missing)}
