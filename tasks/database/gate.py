"""The database gate's task (the runbook's `database` section): the database gate (liftoff/systems/pg_compare.py)
run against the runbook's servers, with the decisions the restore applied, its result recorded in the ledger."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from liftoff.ledger import Ledger
from liftoff.reports import Progress, markdown_table, publish_markdown, publish_table
from liftoff.steps import recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import postgres, supabase
from liftoff.tasks.cutover.freeze import grants_withheld
from liftoff.tasks.database.common import assess_source, export_done, exported_catalog, read_shim
from liftoff.systems.pg_compare import DatabaseReport, compare_databases


def publish_gate(report: DatabaseReport, rb: Runbook) -> None:
    """The gate's tables (rows and checksums, beside the rows the export counted) and its summary."""
    exported = {}
    if (rb.state_dir / "ledger.sqlite").exists():
        exported = {n: r for n, (_, r) in Ledger(rb.state_dir).tables("export").items()}
    rows = report_rows(report, exported)
    publish_table("verify-tables", rows, "Database gate: rows and checksums per table")
    verdict = "PASSED" if report.ok else "FAILED"
    seq_rows = [{"sequence": s.sequence, "target next": s.target_next, "column max": s.column_max,
                 "status": "ok" if s.ok else "STALE"} for s in report.sequences]
    md = [f"# Database gate {verdict}", ""]
    if not report.ok:
        md += ["## What differs", *[f"- {line}" for line in report.failures()], ""]
    md += ["## Tables", markdown_table(rows), "## Sequences", markdown_table(seq_rows)]
    if report.deferred:
        md += ["## Rows left to the cutover's catch-up (written on the source during the freeze)",
               *[f"- {t}" for t in report.deferred], ""]
    if report.left_out_by_policy:
        md += ["## Left out by the runbook's decisions (see the restore plan)", *[f"- {o}" for o in report.left_out_by_policy]]
    publish_markdown("verify-summary", "\n".join(md))


@task(name="verify database (gate)", cache_policy=NO_CACHE)
@recorded("verify", gate="database", publish=publish_gate)
def run_gate(rb: Runbook) -> DatabaseReport:
    # Only a cutover's final sync has a catch-up pending; imported here, not by every database run (it
    # brings the storage modules and boto3 along).
    from liftoff.tasks.cutover.catch_up import catch_up_pending, unfrozen_tables

    with postgres.session(rb.source, "source") as src:
        tables = postgres.list_tables(src, rb.database.schemas)
        assessment = restored_assessment(rb, src)
        if read_shim(rb, src):  # the shim's copy of the users is compared like a migrated table
            tables += [t for t in postgres.list_tables(src, ["auth"]) if t.name == "users"]
        # During a cutover's final sync, what the freeze cannot stop keeps writing some tables: their rows
        # are the catch-up's (after the switch), not this gate's.
        deferred = ({t.qualified for t in unfrozen_tables(rb, src)} if catch_up_pending(rb) is not None
                    else set())
        tables = [t for t in tables if t.qualified not in deferred]
    progress = Progress("verify: comparing tables", len(tables))
    report = compare_as_restored(rb, tables, assessment,
                                 on_table_done=lambda c: progress.advance(f"{c.table}: {c.status}"))
    if deferred:
        report.defer(deferred)
    return report


def restored_assessment(rb: Runbook, src):
    """The decisions the restore applied, as the export recorded them; read afresh when the gate runs alone
    against a target this state_dir did not restore."""
    return exported_catalog(rb).assessment if export_done(rb) else assess_source(rb, src)


def compare_as_restored(rb: Runbook, tables: list, assessment, on_table_done=None) -> DatabaseReport:
    """The gate's comparison of the runbook's two databases under the restore's decisions: ``tables`` row by
    row, and every definition, sequence and mapped role's access (the source's grants as before a freeze in
    force)."""
    # The storage modules (and boto3) only when the runbook rewrites storage URLs in app columns
    from liftoff.tasks.storage.urls import rewritten_url_columns

    return compare_databases(
        lambda: postgres.connect(rb.source, "source"),
        lambda: postgres.connect(rb.target.direct, "target.direct"),
        tables, rb.database.schemas, left_out=assessment.gate_left_out(), roles=assessment.role_map,
        ignored_extensions=supabase.MANAGED_EXTENSIONS | set(assessment.extensions_unused),
        jobs=rb.database.jobs, on_table_done=on_table_done,
        outside_triggers=[("auth", "users", t.name) for t in assessment.auth_triggers],
        rewritten=rewritten_url_columns(rb), withheld=grants_withheld(rb),
    )


def report_rows(report: DatabaseReport, exported: dict[str, int] | None = None) -> list[dict]:
    exported = exported or {}
    return [
        {"table": t.table, "exported rows": exported.get(t.table, ""), "source rows": t.source_rows,
         "target rows": t.target_rows, "source checksum": t.source_checksum[:12],
         "target checksum": t.target_checksum[:12], "status": t.status}
        for t in report.tables
    ]
