"""Logical replication from the source to the target, PostgreSQL's own: a publication and a logical slot on the
source, a subscription on the target that applies the changes. Liftoff writes no change applier.

Names are derived from the runbook (``Names``), so what one runbook created is found, listed and dropped by
that name alone, also by a run that did not create it (a killed run resumed, ``liftoff run cleanup``).

Besides the subscription's slot there is a second, "tracker" slot on the same publication, read through SQL
(``pg_logical_slot_get_binary_changes``): which tables the source changed since a full gate. The switch-time
gate re-reads only those (``changed_tables``), so the downtime does not grow with the data.
No Prefect here: plain functions over psycopg connections, testable against real servers.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from liftoff.checks import FAILED, PASSED, CheckLine, CheckReport
from liftoff.errors import ConnectionRefused, StepFailed


@dataclass(frozen=True)
class Names:
    """What Liftoff creates for one runbook: on the source a publication, the subscription's slot and the
    tracker slot; on the target a subscription."""

    publication: str
    slot: str
    tracker: str
    subscription: str

    @classmethod
    def for_runbook(cls, runbook_name: str) -> "Names":
        base = "liftoff_" + re.sub(r"[^a-z0-9_]", "_", runbook_name.lower())[:40]
        return cls(publication=base, slot=base, tracker=base + "_track", subscription=base)


PREFIX = "liftoff_"


# ---------------------------------------------------------------------------------------------------------
# Preflight


@dataclass(frozen=True)
class Unpublishable:
    table: str
    why: str


@dataclass(frozen=True)
class ReplicationReadiness(CheckReport):
    label = "replication preflight"
    published: list[str] = field(default_factory=list)
    unpublishable: list[Unpublishable] = field(default_factory=list)


def split_publishable(conn: psycopg.Connection, tables: list[str]) -> tuple[list[str], list[Unpublishable]]:
    """Which of ``tables`` (schema.table) may join the publication. A table without a primary key and without
    a replica identity (``REPLICA IDENTITY DEFAULT`` with no key, or ``NOTHING``) makes every UPDATE and DELETE
    on it fail on the source once it is published: such a table is never published (it is copied in the
    freeze instead). One the connected user does not own cannot be added (Supabase's auth and storage tables)."""
    rows = conn.execute(
        """SELECT n.nspname || '.' || c.relname, c.relreplident,
                  EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                  pg_has_role(current_user, c.relowner, 'USAGE'), c.relkind
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname || '.' || c.relname = ANY(%s)""", (tables,)).fetchall()
    published, refused = [], []
    for name, identity, has_pk, owned, relkind in rows:
        if not owned:
            refused.append(Unpublishable(name, "not owned by the source user: copied in the freeze"))
        elif identity == "n" or (identity == "d" and not has_pk):
            refused.append(Unpublishable(name, "no primary key or replica identity (publishing it would make its "
                                               "UPDATE/DELETE fail on the source): copied in the freeze"))
        else:
            published.append(name)
    return sorted(published), sorted(refused, key=lambda u: u.table)


def readiness(conn: psycopg.Connection, tables: list[str], names: Names, where: str) -> ReplicationReadiness:
    """The source can feed a subscription: ``wal_level=logical``, the user has REPLICATION (or is a
    superuser), two replication slots free (subscription and tracker; Liftoff's own count as free) and a WAL
    sender free, and which tables are published. Reads only."""
    lines = []
    wal_level = conn.execute("SHOW wal_level").fetchone()[0]
    lines.append(CheckLine("wal_level is logical", PASSED if wal_level == "logical" else FAILED,
                           f"{where}: wal_level = {wal_level}",
                           "" if wal_level == "logical" else "set wal_level = logical and restart the source"))
    can, = conn.execute("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    lines.append(CheckLine("source user has REPLICATION", PASSED if can else FAILED,
                           f"{where}: {'REPLICATION granted' if can else 'the role lacks REPLICATION'}",
                           "" if can else "ALTER ROLE ... REPLICATION (Supabase's postgres has it)"))
    max_slots, used, ours = conn.execute(
        """SELECT current_setting('max_replication_slots')::int, count(*),
                  count(*) FILTER (WHERE slot_name IN (%s, %s)) FROM pg_replication_slots""",
        (names.slot, names.tracker)).fetchone()
    free = max_slots - used + ours
    lines.append(CheckLine("replication slots free", PASSED if free >= 2 else FAILED,
                           f"{where}: {free} of max_replication_slots = {max_slots} free (2 needed)",
                           "" if free >= 2 else "drop unused slots (liftoff status lists Liftoff's) or raise "
                           "max_replication_slots"))
    max_senders, senders = conn.execute(
        """SELECT current_setting('max_wal_senders')::int,
                  (SELECT count(*) FROM pg_stat_replication WHERE application_name <> %s)""",
        (names.subscription,)).fetchone()
    lines.append(CheckLine("WAL sender free", PASSED if max_senders - senders >= 1 else FAILED,
                           f"{where}: {senders} of max_wal_senders = {max_senders} in use",
                           "" if max_senders > senders else "raise max_wal_senders"))
    published, refused = split_publishable(conn, tables)
    lines.append(CheckLine("tables publishable", PASSED,
                           f"{len(published)} published; {len(refused)} copied in the freeze instead"
                           + (f" ({', '.join(u.table for u in refused[:5])})" if refused else "")))
    return ReplicationReadiness(lines, published=published, unpublishable=refused)


# ---------------------------------------------------------------------------------------------------------
# Setting up


def create_publication(conn: psycopg.Connection, name: str, tables: list[str]) -> None:
    """The publication of exactly ``tables``; an existing one of that name is set to them."""
    idents = sql.SQL(", ").join(sql.Identifier(*t.split(".", 1)) for t in tables)
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    verb = "ALTER PUBLICATION {} SET TABLE {}" if exists else "CREATE PUBLICATION {} FOR TABLE {}"
    conn.execute(sql.SQL(verb).format(sql.Identifier(name), idents))


@dataclass(frozen=True)
class SlotSnapshot:
    slot: str
    lsn: str  # the slot's consistent point: every change after it is streamed, none before
    snapshot: str  # exported: a transaction that sets it sees the source exactly at ``lsn``


@contextlib.contextmanager
def slot_with_snapshot(conninfo: str, slot: str, where: str):
    """``CREATE_REPLICATION_SLOT slot LOGICAL pgoutput (SNAPSHOT 'export')`` on a replication connection, held
    open while the caller copies from the exported snapshot (it lives until the connection's next command).
    The slot outlives the connection. Simple query protocol: a walsender refuses the extended one."""
    try:
        conn = psycopg.connect(conninfo, autocommit=True, replication="database")
    except psycopg.OperationalError as exc:
        raise ConnectionRefused(f"{where}: replication connection refused ({_first(exc)}); the source's "
                                "pg_hba.conf must allow it, and Supabase's transaction pooler (6543) never does: "
                                "use the direct host") from None
    try:
        result = conn.pgconn.exec_(
            f"CREATE_REPLICATION_SLOT {sql.Identifier(slot).as_string(conn)} LOGICAL pgoutput "
            "(SNAPSHOT 'export')".encode())
        if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
            raise StepFailed(f"{where}: CREATE_REPLICATION_SLOT {slot} failed: "
                             f"{(result.error_message or b'').decode(errors='replace').strip()}")
        yield SlotSnapshot(slot=result.get_value(0, 0).decode(), lsn=result.get_value(0, 1).decode(),
                           snapshot=result.get_value(0, 2).decode())
    finally:
        conn.close()


def create_tracker(conn: psycopg.Connection, tracker: str) -> str:
    """The tracker slot (SQL-created); returns the LSN from which it records changes."""
    row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                       (tracker,)).fetchone()
    if row:
        return row[0]
    return conn.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
                        (tracker,)).fetchone()[0]


def create_subscription(target: psycopg.Connection, names: Names, source_conninfo: str) -> None:
    """The target's subscription on the existing slot, copying nothing (the initial copy came from the slot's
    snapshot). The source's conninfo is stored in ``pg_subscription``, readable by superusers only."""
    if subscription_exists(target, names.subscription):
        return
    try:
        _subscribe(target, names, source_conninfo)
    except psycopg.OperationalError as exc:  # CREATE SUBSCRIPTION: "could not connect to the publisher"
        if not isinstance(exc, psycopg.errors.ConnectionFailure) and "could not connect" not in str(exc):
            raise
        raise ConnectionRefused(
            f"the target server could not connect to the source for the subscription ({_first(exc)}): the "
            "subscription connects from the target's host, not from here; Supabase's direct host "
            "(db.<ref>.supabase.co) is IPv6-only unless the project has the IPv4 add-on, and its poolers do not "
            "carry replication") from None


def _subscribe(target: psycopg.Connection, names: Names, source_conninfo: str) -> None:
    target.execute(sql.SQL(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (copy_data = false, create_slot = false, "
        "slot_name = {}, enabled = true)").format(
        sql.Identifier(names.subscription), sql.Literal(source_conninfo), sql.Identifier(names.publication),
        sql.Literal(names.slot)))


def subscription_exists(target: psycopg.Connection, name: str) -> bool:
    return target.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)).fetchone() is not None


def slot_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone() is not None


# ---------------------------------------------------------------------------------------------------------
# While replicating


@dataclass(frozen=True)
class Lag:
    bytes: int  # the source's WAL not yet confirmed applied by the target
    seconds: float  # replay lag as the source's WAL sender measures it (0 when caught up)
    streaming: bool  # a WAL sender serves the subscription
    source_lsn: str
    confirmed_lsn: str | None


def lag(conn: psycopg.Connection, names: Names) -> Lag:
    """How far the target is behind, read on the source: WAL bytes between ``pg_current_wal_lsn()`` and the
    slot's ``confirmed_flush_lsn``, and ``pg_stat_replication.replay_lag`` of its sender."""
    row = conn.execute(
        """SELECT pg_current_wal_lsn()::text, s.confirmed_flush_lsn::text,
                  COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn), -1)::bigint,
                  EXTRACT(epoch FROM COALESCE(r.replay_lag, '0'))::float8, r.pid IS NOT NULL
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
            WHERE s.slot_name = %s""", (names.slot,)).fetchone()
    if row is None:
        raise StepFailed(f"no replication slot {names.slot} on the source: start replication first "
                         "(`liftoff run replicate`)")
    current, confirmed, behind, seconds, streaming = row
    return Lag(bytes=int(behind), seconds=round(seconds, 3), streaming=bool(streaming), source_lsn=current,
               confirmed_lsn=confirmed)


def flushed_lsn(conn: psycopg.Connection) -> str:
    """The WAL position every commit acknowledged so far is at or before: the *insert* position. With
    ``synchronous_commit = off`` (an app may set it per transaction) a commit returns once its record is
    inserted, before it is written or flushed, so ``pg_current_wal_lsn()`` (the write position) can be short
    of it: waiting for the target to apply up to that would let an acknowledged write miss the switch. The
    walsender sends only flushed WAL, so waiting for this position also waits for the WAL writer."""
    return conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]


def wait_applied(conn: psycopg.Connection, names: Names, lsn: str, timeout_s: float, where: str) -> float:
    """Waits until the target confirmed it applied (and flushed) every change up to ``lsn`` (the slot's
    ``confirmed_flush_lsn``); returns the seconds waited. A subscription whose apply fails (a row it cannot
    write, a column it does not have) never gets there: the error says where to look."""
    started = time.monotonic()
    while True:
        done, active = conn.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn, active FROM pg_replication_slots WHERE slot_name = %s",
            (lsn, names.slot)).fetchone() or (None, None)
        if done is None:
            raise StepFailed(f"{where}: replication slot {names.slot} is gone")
        if done:
            return round(time.monotonic() - started, 3)
        if time.monotonic() - started > timeout_s:
            raise StepFailed(f"{where}: the target did not apply the source's changes up to {lsn} within "
                             f"{timeout_s} s (cutover.replication.apply_timeout_s; slot {names.slot} "
                             f"{'streaming' if active else 'not streaming'}): read the target's server log for "
                             f"subscription {names.subscription}'s apply errors")
        time.sleep(0.05)


def changed_tables(conn: psycopg.Connection, names: Names) -> set[str]:
    """Consumes the tracker slot up to the source's flushed WAL and returns the published tables it saw
    change (inserted, updated, deleted or truncated rows). pgoutput sends a Relation message before the first
    change of each table in a decoding call: those name them."""
    rows = conn.execute(
        "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
        "'publication_names', %s)", (names.tracker, names.publication)).fetchall()
    found = set()
    for (data,) in rows:
        data = bytes(data)
        if data[:1] == b"R":  # Relation: Int32 oid, String namespace, String name, ...
            rest = data[5:]
            namespace, _, rest = rest.partition(b"\0")
            name, _, _ = rest.partition(b"\0")
            found.add(f"{namespace.decode()}.{name.decode()}")
    return found


def target_activity(conn: psycopg.Connection, schemas: list[str]) -> dict:
    """What the target's own statistics say about writes to each table: rows inserted, updated and deleted
    (any writer: a direct write on the target too, which the source's tracker cannot see) and the file it lives
    in (TRUNCATE, VACUUM FULL and CLUSTER change it), with the database's ``stats_reset`` instant. A table whose
    entry moved, or any reset, means "re-read"."""
    rows = conn.execute(
        """SELECT n.nspname || '.' || c.relname, c.relfilenode::bigint,
                  coalesce(s.n_tup_ins + s.n_tup_upd + s.n_tup_del, 0)::bigint
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
            WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p')""", (schemas,)).fetchall()
    reset, = conn.execute("SELECT stats_reset::text FROM pg_stat_database WHERE datname = current_database()").fetchone()
    return {"stats_reset": reset, "tables": {name: [node, writes] for name, node, writes in rows}}


def moved_since(before: dict, now: dict) -> set[str] | None:
    """Tables whose activity entry changed between two ``target_activity`` readings; None (re-read every
    table) when the statistics were reset or a counter went back (a reset of one table's counters)."""
    if before.get("stats_reset") != now.get("stats_reset"):
        return None
    moved = set()
    for name, (node, writes) in now["tables"].items():
        old = before["tables"].get(name)
        if old is None or old[0] != node or old[1] != writes:
            if old is not None and writes < old[1]:
                return None
            moved.add(name)
    return moved


def catalog_fingerprint(conn: psycopg.Connection, schemas: list[str]) -> dict[str, list[str]]:
    """Each table of ``schemas`` with its columns and types: DDL is not replicated, so the cutover compares
    this at the freeze with what it was when replication started, and stops on any difference."""
    rows = conn.execute(
        """SELECT n.nspname || '.' || c.relname,
                  coalesce(array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                     || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END ORDER BY a.attnum)
                           FILTER (WHERE a.attnum > 0 AND NOT a.attisdropped), '{}')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_attribute a ON a.attrelid = c.oid
            WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p')
            GROUP BY 1 ORDER BY 1""", (schemas,)).fetchall()
    return {name: list(columns) for name, columns in rows}


def ddl_since(before: dict[str, list[str]], now: dict[str, list[str]]) -> list[str]:
    lines = [f"table {t} created" for t in sorted(set(now) - set(before))]
    lines += [f"table {t} dropped" for t in sorted(set(before) - set(now))]
    lines += [f"table {t} altered: {', '.join(sorted(set(now[t]) ^ set(before[t])))}"
              for t in sorted(set(now) & set(before)) if now[t] != before[t]]
    return lines


# ---------------------------------------------------------------------------------------------------------
# Listing and dropping


@dataclass(frozen=True)
class SlotInfo:
    slot: str
    active: bool
    retained_wal_bytes: int | None


def liftoff_objects(conn: psycopg.Connection) -> tuple[list[SlotInfo], list[str]]:
    """Liftoff's slots on the source with the WAL each keeps, and its publications."""
    slots = [SlotInfo(name, bool(active), retained) for name, active, retained in conn.execute(
        """SELECT slot_name, active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name LIKE 'liftoff\\_%' ORDER BY 1""")]
    pubs = [r[0] for r in conn.execute("SELECT pubname FROM pg_publication WHERE pubname LIKE 'liftoff\\_%' ORDER BY 1")]
    return slots, pubs


def drop_subscription(target: psycopg.Connection, names: Names) -> bool:
    """Drops the target's subscription without touching the source's slot (dropped on its own, so a source
    that cannot be reached does not leave the subscription behind)."""
    if not subscription_exists(target, names.subscription):
        return False
    sub = sql.Identifier(names.subscription)
    target.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sub))
    target.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(sub))
    target.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sub))
    return True


def _drop_slot(conn: psycopg.Connection, slot: str, timeout_s: float) -> bool:
    """Drops a replication slot; one a WAL sender still holds (a subscription disabled a moment ago) is waited
    for, then its sender ended. Whether it dropped the slot (False: there was none)."""
    deadline = time.monotonic() + timeout_s
    while slot_exists(conn, slot):
        pid = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        if pid and pid[0] is not None:
            if time.monotonic() > deadline:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid[0],))
            time.sleep(0.1)
            continue
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return True
        except psycopg.errors.ObjectInUse:
            time.sleep(0.1)
        except psycopg.errors.UndefinedObject:
            return False
    return False


def drop_source_side(conn: psycopg.Connection, names: Names, timeout_s: float = 15) -> list[str]:
    """Drops both slots and the publication; a slot still held by a WAL sender (a subscription disabled a
    moment ago) is waited for, then its sender ended. Returns what it dropped."""
    dropped = [f"slot {slot}" for slot in (names.slot, names.tracker) if _drop_slot(conn, slot, timeout_s)]
    if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (names.publication,)).fetchone():
        conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(names.publication)))
        dropped.append(f"publication {names.publication}")
    return dropped


def drop_liftoff_objects(conn: psycopg.Connection, timeout_s: float = 15) -> list[str]:
    """Drops every slot and publication named as Liftoff names them (``liftoff_``), whichever runbook made
    them (the decommission: nothing Liftoff made may keep WAL on the old database). A slot a WAL sender still
    holds is waited for, then its sender ended. Returns what it dropped, in the order dropped."""
    slots, publications = liftoff_objects(conn)
    dropped = [f"slot {info.slot}" for info in slots if _drop_slot(conn, info.slot, timeout_s)]
    for name in publications:
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
        dropped.append(f"publication {name}")
    return dropped


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def decode_lsn(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)

