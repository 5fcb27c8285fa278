"""The database restore's tasks (the runbook's `database` section): restore the archive into the target as the
runbook decided, each step idempotent and recorded in the ledger, so a re-run after a crash continues where the
last run stopped."""

from __future__ import annotations

import contextvars
import functools
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from liftoff.errors import StepFailed
from liftoff.ledger import Ledger
from liftoff.redaction import redact
from liftoff.reports import Progress
from liftoff.steps import done as _done, recorded
from liftoff.runbooks.model import Runbook
from liftoff.systems import pg_tools, postgres, pg_privileges as privileges, supabase
from liftoff.tasks.database.common import (
    AUTH_USERS_FILE,
    DUMP_DIR,
    exported_catalog,
    log,
    pg_tools_for,
    require_same_export_settings,
    role_rows,
)


@dataclass
class RestorePlan:
    keep: list[pg_tools.TocEntry]
    left_out: list[tuple[str, str]]  # (entry, rule)
    table_entries: dict[str, pg_tools.TocEntry]  # "schema.table" -> what loads it (TABLE DATA, or TABLE to stream)
    leftovers_policy: str
    shims: list[str]
    extensions: dict[str, str]
    decisions: list[dict] = field(default_factory=list)  # each object the Supabase choices touched
    roles: list[dict] = field(default_factory=list)

    @property
    def tables(self) -> list[str]:
        return list(self.table_entries)

    def section(self, name: str) -> list[pg_tools.TocEntry]:
        return [e for e in self.keep if e.section == name]


@task(name="plan restore", cache_policy=NO_CACHE)
def plan_restore(rb: Runbook) -> RestorePlan:
    catalog = exported_catalog(rb)
    require_same_export_settings(rb, catalog.settings)
    tools = pg_tools_for(rb, catalog.export.source_major)
    identities = {k: pg_tools.Identity(*v) for k, v in Ledger(rb.state_dir).archive_entries().items()}
    keep, left_out = [], []
    for entry in pg_tools.read_toc(tools, rb.state_dir / DUMP_DIR, identities or None):
        ok, why = supabase.keep_entry(entry, rb.database.schemas, catalog.assessment)
        (keep.append(entry) if ok else left_out.append((f"{entry.desc} {entry.schema}.{entry.name or entry.tag}", why)))
    kind = "TABLE DATA" if rb.database.strategy == "dump" else "TABLE"
    tables = {f"{e.schema}.{e.name or e.tag}": e for e in keep if e.desc == kind and e.schema in rb.database.schemas}
    shims = catalog.shim.objects if catalog.shim else []
    return RestorePlan(keep, left_out, tables, rb.database.supabase_leftovers, shims,
                       catalog.assessment.extensions_needed,
                       catalog.assessment.decisions(), role_rows(catalog.assessment))


def _target_identity(rb: Runbook) -> str:
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        return postgres.server_info(tgt, rb.target.direct).identity


@task(name="prepare target", cache_policy=NO_CACHE)
@recorded("restore.prepare")
def prepare_target(rb: Runbook, plan: RestorePlan) -> dict:
    """Claims the target in the ledger; creates the roles database.roles creates, the extensions the
    migrated objects use and (policy shim) the auth shim, with the export's users (strategy dump; stream
    loads them with the tables, from the same snapshot)."""
    ledger = Ledger(rb.state_dir)
    ledger.claim_target(_target_identity(rb))
    catalog = exported_catalog(rb)
    done = {"roles": [], "extensions": [], "shim_users_loaded": 0}
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        try:
            done["roles"] = supabase.create_roles(tgt, catalog.assessment.roles)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StepFailed(f"target {rb.target.direct.where}: cannot create the roles database.roles creates "
                             f"({redact(str(exc)).strip().splitlines()[0]}); create them as a superuser or "
                             "connect target.direct as one") from None
        for name, schema in sorted(plan.extensions.items()):
            postgres.execute(tgt, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)),
                             what=f"create schema {schema}")
            postgres.execute(tgt, sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}").format(
                sql.Identifier(name), sql.Identifier(schema)), what=f"create extension {name} on target")
            done["extensions"].append(name)
        if catalog.shim:
            supabase.create_auth_shim(tgt, catalog.shim)
            if rb.database.strategy == "dump" and not ledger.is_done("restore.data"):
                done["shim_users_loaded"] = supabase.load_auth_users(
                    tgt, catalog.shim, supabase.file_blocks(rb.state_dir / AUTH_USERS_FILE))
    return done


def _restore_env(rb: Runbook) -> dict[str, str]:
    return postgres.libpq_env(rb.target.direct, "target.direct")


def _pg_restore(rb: Runbook, tools: pg_tools.PgTools, entries: list[pg_tools.TocEntry], what: str,
                *extra: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".list", dir=rb.state_dir, delete=False) as f:
        f.write("".join(e.line + "\n" for e in entries))
    try:
        argv = [tools.pg_restore, "--no-owner", "--no-acl", "--exit-on-error", f"--use-list={f.name}",
                f"--dbname={rb.target.direct.database}", *extra, str(rb.state_dir / DUMP_DIR)]
        pg_tools.run_tool(argv, _restore_env(rb), what)
    finally:
        os.unlink(f.name)


@task(name="restore schema (pre-data)", cache_policy=NO_CACHE)
@recorded("restore.pre-data", skip_if=_done)
def restore_pre_data(rb: Runbook, plan: RestorePlan) -> dict:
    """Types, tables, functions, views: in one transaction, so a crash leaves nothing half-made."""
    tools = pg_tools_for(rb, exported_catalog(rb).export.source_major)
    # Every non-data entry: pg_restore's --section picks by the archive's own section of each entry (a
    # COMMENT belongs to the section of what it comments on).
    entries = [e for e in plan.keep if e.section != "data"]
    # Pre-data commits whole or not at all: finding its objects on the target means a previous run
    # committed it and died before the ledger heard of it.
    created = [e for e in entries if e.section == "pre-data" and e.identity and e.identity.kind in _PRE_DATA_KINDS]
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        existing_schemas = {r[0] for r in tgt.execute("SELECT nspname FROM pg_namespace")}
        there = [e for e in created if _already_there(tgt, e)]
    if there and len(there) == len(created):
        return {"recovered": True}
    if there:
        missing = next(e for e in created if e not in there)
        raise StepFailed(
            f"target {rb.target.direct.where} holds {len(there)} of the {len(created)} objects the archive's "
            f"pre-data creates ({_entry_label(there[0])} is there, {_entry_label(missing)} is not); pre-data is "
            "restored in one transaction, so these were not written by this runbook's restore: restore into an "
            "empty database (target.direct.database)")
    entries = [e for e in entries if not (e.desc == "SCHEMA" and (e.name or e.tag) in existing_schemas)]
    _pg_restore(rb, tools, entries, f"restore pre-data into target {rb.target.direct.host}:{rb.target.direct.port}",
                "--section=pre-data", "--single-transaction")
    return {"entries": len(entries)}


def _data_loaded_before(rb: Runbook, detail: dict) -> dict:
    # Never again: after cutover, setting the sequences back to the source's values would reuse ids.
    return {"loaded": [], "already_loaded": len(detail.get("loaded", [])) + detail.get("already_loaded", 0),
            "skipped": True}


@task(name="restore table data", cache_policy=NO_CACHE)
@recorded("restore.data", skip_if=_done, on_skip=_data_loaded_before)
def restore_data(rb: Runbook, plan: RestorePlan) -> dict:
    """Loads each table not yet loaded, ``jobs`` at a time, each in one target transaction that starts with
    TRUNCATE, then the ledger marks it loaded: a table interrupted mid-load is reloaded whole. Strategy
    ``dump`` loads from the archive (pg_restore); ``stream`` copies from the source (COPY to COPY, all
    tables from one snapshot) and then sets the sequences from that snapshot."""
    ledger = Ledger(rb.state_dir)
    catalog = exported_catalog(rb)
    tools = pg_tools_for(rb, catalog.export.source_major)
    exported = {name: rows for name, (_, rows) in ledger.tables("export").items()}
    state = ledger.tables("restore")
    entries = plan.table_entries
    if rb.database.strategy == "stream":
        with postgres.session(rb.target.direct, "target.direct") as tgt:
            holding_rows = postgres.plain_tables(tgt, rb.database.schemas)
        entries = {name: e for name, e in entries.items() if name in holding_rows}
    todo = [name for name in entries if state.get(name, ("",))[0] != "loaded"]
    todo.sort(key=lambda name: -(exported.get(name) or 0))  # largest first: the long pole starts early
    progress = Progress("restore: loading tables", len(entries))
    for _ in range(len(entries) - len(todo)):
        progress.advance("already loaded")
    # Indexes and constraints of a table are built as soon as its data is in, while other tables load (as
    # pgcopydb does); foreign keys, triggers and policies wait for the post-data step.
    _drop_before_reload(rb, plan, todo)
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        own_post_data = _post_data_by_table(plan, catalog.index_tables, tgt)

    def from_archive(name: str) -> int | None:
        entry = entries[name]
        with postgres.session(rb.target.direct, "target.direct") as tgt:
            postgres.execute(tgt, sql.SQL("TRUNCATE ONLY {}").format(sql.Identifier(entry.schema, entry.tag)),
                             what=f"truncate {name} on target")
        _pg_restore(rb, tools, [entry], f"load {name} into target", "--data-only", "--single-transaction")
        return exported.get(name)

    with ThreadPoolExecutor(max_workers=rb.database.jobs) as builds:
        pending = []

        def loaded_with(copy_table):
            def load(name: str) -> None:
                ledger.set_table("restore", name, "loading")
                rows = copy_table(name)
                ledger.set_table("restore", name, "loaded", rows)
                log.info("table loaded", table=name, rows=rows)
                progress.advance(f"{name}: {rows} rows")
                for entry in own_post_data.get(name, []):
                    pending.append(builds.submit(contextvars.copy_context().run, _pg_restore, rb, tools, [entry],
                                                 f"build {entry.desc.lower()} {entry.tag}", "--section=post-data"))
                pending.append(builds.submit(contextvars.copy_context().run, _analyze, rb, name))
            return load

        if rb.database.strategy == "dump":
            with ThreadPoolExecutor(max_workers=rb.database.jobs) as pool:
                _run_all(pool, loaded_with(from_archive), todo)
            sequences = [e for e in plan.section("data") if e.desc == "SEQUENCE SET"]
            if sequences:
                _pg_restore(rb, tools, sequences, "set sequence values on target", "--data-only",
                            "--single-transaction")
            set_sequences = len(sequences)
        else:
            with postgres.exported_snapshot(rb.source, "source") as (snap, snapshot_id):
                source_env = postgres.libpq_env(rb.source, "source")

                def streamed(name: str) -> int:
                    schema, table = name.split(".", 1)

                    def rows_from(query: str) -> pg_tools.CopyOut:  # psql reads the source, in the snapshot
                        return pg_tools.CopyOut(tools, source_env, query, snapshot_id, postgres.TEXT_SETTINGS,
                                                f"copy {name} from source {rb.source.host}:{rb.source.port}")

                    with postgres.session(rb.target.direct, "target.direct", autocommit=False) as tgt:
                        return postgres.stream_table(tgt, schema, table, rows_from)

                shim = catalog.shim

                def auth_users() -> None:  # the users the loaded rows reference, from the same snapshot
                    with postgres.session(rb.source, "source", autocommit=False) as src, \
                            postgres.session(rb.target.direct, "target.direct") as tgt:
                        postgres.join_snapshot(src, snapshot_id)
                        users = supabase.stream_auth_users(src, tgt, shim)
                    log.info("auth users loaded into the shim", rows=users)

                # auth.users loads with the tables, second in line: beside the long pole, not after every
                # table (the foreign keys to it come with the post-data step, after all of them).
                load = loaded_with(streamed)
                work = [functools.partial(load, name) for name in todo]
                if shim:
                    work.insert(min(1, len(work)), auth_users)
                with ThreadPoolExecutor(max_workers=rb.database.jobs) as pool:
                    for future in [pool.submit(contextvars.copy_context().run, w) for w in work]:
                        future.result()
                with postgres.session(rb.target.direct, "target.direct") as tgt:
                    set_sequences = postgres.copy_sequence_values(snap, tgt, rb.database.schemas)
        for future in pending:
            future.result()
    return {"loaded": todo, "already_loaded": len(entries) - len(todo), "sequences": set_sequences}


def _run_all(pool: ThreadPoolExecutor, fn, items: list) -> None:
    """Runs fn on every item in the pool, each in a copy of the caller's context (run id, Prefect run
    context), and raises the first error."""
    for future in [pool.submit(contextvars.copy_context().run, fn, item) for item in items]:
        future.result()


def _entry_label(e: pg_tools.TocEntry) -> str:
    i = e.identity
    if i is None:
        return f"{e.desc.lower()} {e.schema}.{e.tag}"
    where = ".".join(p for p in (i.schema, i.table) if p is not None)
    args = f"({i.arguments})" if i.arguments is not None else ""
    return f"{i.kind} {where + '.' if where else ''}{i.name}{args}"


def _post_data_by_table(plan: RestorePlan, index_tables: dict[str, str],
                        tgt: psycopg.Connection) -> dict[str, list[pg_tools.TocEntry]]:
    """Indexes and (primary key, unique, check, exclusion) constraints of each table, from the archive,
    that the target does not hold yet. ``index_tables`` names an index's table for an archive exported
    before entries carried their identity."""
    by_table: dict[str, list[pg_tools.TocEntry]] = {}
    for e in plan.section("post-data"):
        if e.desc not in ("INDEX", "CONSTRAINT"):
            continue
        table = f"{e.identity.schema}.{e.table}" if e.table is not None else index_tables.get(f"{e.schema}.{e.tag}")
        if table and not _already_there(tgt, e):
            by_table.setdefault(table, []).append(e)
    return by_table


def _drop_before_reload(rb: Runbook, plan: RestorePlan, tables: list[str]) -> dict[str, list[str]]:
    """A new export reloads every table, also on a target a previous restore filled: its foreign keys make
    TRUNCATE fail and its triggers would fire during the load (an audit trigger adds rows). Drops the
    foreign keys that reference or belong to ``tables`` and the user triggers on them, those the archive's
    post-data creates: that step runs again after a new export and recreates whatever is missing."""
    recreated = {(e.identity.kind, e.identity.schema, e.identity.table, e.identity.name)
                 for e in plan.section("post-data") if e.identity and e.identity.kind in ("constraint", "trigger")}
    dropped: dict[str, list[str]] = {"foreign keys": [], "triggers": []}
    if not tables or not recreated or Ledger(rb.state_dir).is_done("restore.post-data"):
        return dropped
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        fks = tgt.execute(
            """SELECT n.nspname, t.relname, k.conname FROM pg_constraint k
               JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
               JOIN pg_class r ON r.oid = k.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
               WHERE k.contype = 'f' AND (n.nspname || '.' || t.relname = ANY(%(t)s)
                                          OR rn.nspname || '.' || r.relname = ANY(%(t)s))
               ORDER BY 1, 2, 3""", {"t": tables}).fetchall()
        triggers = tgt.execute(
            """SELECT n.nspname, t.relname, g.tgname FROM pg_trigger g
               JOIN pg_class t ON t.oid = g.tgrelid JOIN pg_namespace n ON n.oid = t.relnamespace
               WHERE NOT g.tgisinternal AND n.nspname || '.' || t.relname = ANY(%(t)s) ORDER BY 1, 2, 3""",
            {"t": tables}).fetchall()
        for schema, table, name in fks:
            if ("constraint", schema, table, name) in recreated:
                postgres.execute(tgt, sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                    sql.Identifier(schema, table), sql.Identifier(name)), what=f"drop foreign key {name} on target")
                dropped["foreign keys"].append(f"{schema}.{table}.{name}")
        for schema, table, name in triggers:
            if ("trigger", schema, table, name) in recreated:
                postgres.execute(tgt, sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(name), sql.Identifier(schema, table)), what=f"drop trigger {name} on target")
                dropped["triggers"].append(f"{schema}.{table}.{name}")
    if dropped["foreign keys"] or dropped["triggers"]:
        log.info("dropped before reloading tables a previous restore filled; post-data recreates them",
                 foreign_keys=dropped["foreign keys"], triggers=dropped["triggers"])
    return dropped


def _analyze(rb: Runbook, name: str) -> None:
    schema, table = name.split(".", 1)
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        postgres.execute(tgt, sql.SQL("ANALYZE {}").format(sql.Identifier(schema, table)), what=f"analyze {name}")


def _relation_exists(relkinds: str) -> str:
    return ("SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE c.relkind = ANY('{{{relkinds}}}') AND n.nspname = %(schema)s AND c.relname = %(name)s")


def _on_table_exists(catalog: str, table_col: str, name_col: str) -> str:
    return (f"SELECT 1 FROM {catalog} x JOIN pg_class t ON t.oid = x.{table_col} "
            "JOIN pg_namespace n ON n.oid = t.relnamespace "
            f"WHERE n.nspname = %(schema)s AND t.relname = %(table)s AND x.{name_col} = %(name)s")


# Whether the object an archive entry creates is on the target, by its identity (pg_tools.Identity).
_EXISTS = {
    "table": _relation_exists("r,p"),
    "view": _relation_exists("v"),
    "materialized view": _relation_exists("m"),
    "sequence": _relation_exists("S"),
    "foreign table": _relation_exists("f"),
    "index": _relation_exists("i,I"),
    "constraint": _on_table_exists("pg_constraint", "conrelid", "conname"),
    "trigger": _on_table_exists("pg_trigger", "tgrelid", "tgname"),
    "policy": _on_table_exists("pg_policy", "polrelid", "polname"),
    "rule": _on_table_exists("pg_rewrite", "ev_class", "rulename"),
    "domain constraint": "SELECT 1 FROM pg_constraint k JOIN pg_type d ON d.oid = k.contypid "
                         "JOIN pg_namespace n ON n.oid = d.typnamespace "
                         "WHERE n.nspname = %(schema)s AND d.typname = %(table)s AND k.conname = %(name)s",
    "statistics": "SELECT 1 FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace "
                  "WHERE n.nspname = %(schema)s AND s.stxname = %(name)s",
    "type": "SELECT 1 FROM pg_type y JOIN pg_namespace n ON n.oid = y.typnamespace "
            "WHERE n.nspname = %(schema)s AND y.typname = %(name)s",
    "function": "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(schema)s "
                "AND p.proname = %(name)s AND pg_get_function_identity_arguments(p.oid) = %(arguments)s",
}
_EXISTS["domain"] = _EXISTS["type"]
_EXISTS["procedure"] = _EXISTS["aggregate"] = _EXISTS["function"]

# Objects pre-data creates (schemas aside: they may exist before any restore).
_PRE_DATA_KINDS = {"table", "view", "materialized view", "sequence", "foreign table", "type", "domain", "function",
                   "procedure", "aggregate"}


def _already_there(tgt: psycopg.Connection, e: pg_tools.TocEntry) -> bool:
    """Whether the target holds the exact object the entry creates (by schema, table and name from the
    source catalog: spaces, quotes, unicode and case are just characters here)."""
    i = e.identity
    q = _EXISTS.get(i.kind) if i else None
    if q is None or (i.kind in ("function", "procedure", "aggregate") and i.arguments is None):
        return False
    return tgt.execute(q, i._asdict()).fetchone() is not None


@task(name="restore indexes and constraints (post-data)", cache_policy=NO_CACHE)
@recorded("restore.post-data", skip_if=_done)
def restore_post_data(rb: Runbook, plan: RestorePlan) -> dict:
    """Foreign keys, triggers, policies and whatever index or constraint is not there yet, with ``jobs``
    parallel builds; entries already present on the target (built during the data step, or by a run that
    died midway) are not built again."""
    catalog = exported_catalog(rb)
    tools = pg_tools_for(rb, catalog.export.source_major)
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        entries = [e for e in plan.keep if e.section != "data" and not _already_there(tgt, e)]
    rest = [e for e in entries if e.desc != "FK CONSTRAINT"]
    if any(e.section == "post-data" for e in rest):
        _pg_restore(rb, tools, rest, f"restore post-data into target {rb.target.direct.host}:{rb.target.direct.port}",
                    "--section=post-data", f"--jobs={rb.database.jobs}")
    foreign_keys = _foreign_keys(rb, tools, [e for e in plan.keep if e.desc == "FK CONSTRAINT"],
                                 {e.dump_id for e in entries if e.desc == "FK CONSTRAINT"})
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        refreshed = postgres.refresh_unpopulated_matviews(tgt, rb.database.schemas)
        policies = supabase.create_rewritten_policies(tgt, catalog.assessment.policies_rewritten)
        triggers = supabase.recreate_auth_triggers(tgt, catalog.assessment.auth_triggers) if catalog.shim else []
    done = {"entries": len(entries), **foreign_keys, "refreshed": refreshed,
            "policies_with_mapped_roles": policies, "auth_triggers": triggers}
    return done


_NOT_VALID = re.compile(r"\s+NOT VALID;\s*$")


def _foreign_keys(rb: Runbook, tools: pg_tools.PgTools, archived: list[pg_tools.TocEntry], missing: set[int]) -> dict:
    """The archive's foreign keys, as pgcopydb and pg_restore do not make them: each added ``NOT VALID``
    (no scan, a moment's lock), then validated, ``jobs`` tables at a time. Adding one validated key locks both
    of its tables against every other key's creation, so pg_restore's parallel jobs queue behind the one
    checking the big table; a validation locks only its own table against another validation. A key the
    source holds NOT VALID stays so; a key a run that died left unvalidated is validated by the next
    (``missing`` are the dump ids of keys the target lacks). A key on a partitioned table (NOT VALID is refused
    there before PostgreSQL 18) is created validated, as the archive says."""
    statements = dict(zip([e.dump_id for e in archived],
                          pg_tools.entry_statements(tools, rb.state_dir / DUMP_DIR, archived, rb.state_dir)))
    validated = {}  # (schema, table, name) -> statement, of the keys the archive creates validated
    for e in archived:
        if not _NOT_VALID.search(statements[e.dump_id]) and statements[e.dump_id].startswith("ALTER TABLE ONLY "):
            validated[(e.identity.schema, e.identity.table, e.identity.name)] = statements[e.dump_id]
    target = f"target {rb.target.direct.host}:{rb.target.direct.port}"
    added = [e for e in archived if e.dump_id in missing]
    if added:
        with postgres.session(rb.target.direct, "target.direct", autocommit=False) as tgt:
            tgt.execute("SET LOCAL search_path = ''")
            for e in added:
                statement = statements[e.dump_id]
                key = (e.identity.schema, e.identity.table, e.identity.name)
                if key in validated:
                    statement = statement.rstrip().removesuffix(";") + " NOT VALID;"
                postgres.execute(tgt, statement, what=f"add foreign key {_entry_label(e)} on {target}")
            tgt.commit()
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        unvalidated = tgt.execute(
            "SELECT n.nspname, c.relname, k.conname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE k.contype = 'f' AND NOT k.convalidated "
            "AND n.nspname = ANY(%s)", [rb.database.schemas]).fetchall()
    by_table: dict[tuple[str, str], list[str]] = {}
    for schema, table, name in unvalidated:
        if (schema, table, name) in validated:
            by_table.setdefault((schema, table), []).append(name)

    def validate(table: tuple[str, str]) -> None:  # one table's keys, one after the other: they lock it alike
        with postgres.session(rb.target.direct, "target.direct") as tgt:
            for name in by_table[table]:
                postgres.execute(tgt, sql.SQL("ALTER TABLE ONLY {} VALIDATE CONSTRAINT {}").format(
                    sql.Identifier(*table), sql.Identifier(name)),
                    what=f"validate foreign key {'.'.join(table)}.{name} on {target}")

    biggest_first = sorted(by_table, key=lambda t: -len(by_table[t]))
    with ThreadPoolExecutor(max_workers=rb.database.jobs) as pool:
        _run_all(pool, validate, biggest_first)
    return {"foreign_keys_added": len(added), "foreign_keys_validated": sum(map(len, by_table.values()))}


@task(name="restore grants", cache_policy=NO_CACHE)
@recorded("restore.grants")
def restore_grants(rb: Runbook) -> list[str]:
    """Gives every mapped role exactly the source's privileges on the migrated objects (GRANT and REVOKE,
    default privileges, and on the auth shim), then adds the runbook's app_roles grants as reported extras
    that never widen what a source role was allowed unless the runbook says so. Idempotent."""
    catalog = exported_catalog(rb)
    role_map, owner, schemas = catalog.assessment.role_map, rb.target.direct.user, rb.database.schemas
    done = []
    with postgres.session(rb.target.direct, "target.direct") as tgt:
        statements = privileges.plan_grants(catalog.grants, privileges.read_grants(tgt, schemas),
                                            privileges.grantable_objects(tgt, schemas), role_map, owner=owner)
        statements += privileges.plan_default_grants(catalog.default_grants, privileges.read_default_grants(tgt, schemas),
                                                     role_map, owner)
        for statement in statements:
            postgres.execute(tgt, statement, what="restore the source's grants on target")
        done.append(f"source grants: {len(statements)} GRANT/REVOKE statements for "
                    f"{', '.join(sorted({r for r in role_map.values() if r and r != owner})) or 'no role'} and PUBLIC")
        if catalog.shim:
            n = supabase.grant_auth_shim(tgt, catalog.shim, role_map, owner)
            done.append(f"auth shim grants: {n} statements")
        source_roles = {r for r in role_map.values() if r}
        for role in rb.database.app_roles:
            if role.name in source_roles and not role.widen:
                done.append(f"{role.name}: the source's grants only (a source role; database.app_roles "
                            f"widen: true adds {role.privileges} on top)")
                continue
            r = sql.Identifier(role.name)
            table_privs = "SELECT, INSERT, UPDATE, DELETE" if role.privileges == "read_write" else "SELECT"
            seq_privs = "USAGE, SELECT, UPDATE" if role.privileges == "read_write" else "USAGE, SELECT"
            for schema in schemas:
                s = sql.Identifier(schema)
                for stmt in (
                    sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT " + table_privs + " ON ALL TABLES IN SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT " + seq_privs + " ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {} TO {}").format(s, r),
                    sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT " + table_privs + " ON TABLES TO {}").format(s, r),
                ):
                    postgres.execute(tgt, stmt, what=f"grant to {role.name}")
            done.append(f"extra: {role.name} gets {role.privileges} on {', '.join(schemas)} (database.app_roles"
                        f"{'; widens a source role' if role.name in source_roles else ''})")
    return done
