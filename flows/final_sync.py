"""The cutover's final sync (the runbook's `cutover` section): the final sync brings the target up to the frozen
source, behind one interface.

``FullResync`` (``cutover.final_sync: full``) re-runs the database phase from a new export (every table reloaded) and the storage phase
(only objects added or changed since), each ending in its gate, which must pass. ``ReplicatedSync``
(``replicate``) waits for logical replication to apply the last changes and re-reads only what changed.
"""

from __future__ import annotations

from typing import Protocol

from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.flows.storage import migrate_storage
from liftoff.runbooks.model import Runbook
from liftoff.tasks.cutover.replication import gate_changed_tables, sync_by_replication
from liftoff.tasks.cutover.sync import forget_for_full_resync, forget_for_replicated_sync


class FinalSync(Protocol):
    name: str

    def run(self, runbook: Runbook, options: RunOptions) -> dict:
        """Returns once the target holds what the frozen source holds, both gates passed; raises otherwise."""


class FullResync:
    name = "full"

    def run(self, runbook: Runbook, options: RunOptions) -> dict:
        forget_for_full_resync(runbook)
        done = {"database": migrate_database(options)}
        if runbook.storage.wanted:
            done["storage"] = migrate_storage(options)
        return done


class ReplicatedSync:
    """The target kept current by logical replication (``liftoff run replicate``) before the freeze: wait for
    the last changes, stop on DDL, sequences and unpublished tables copied, replication dropped, then the
    database gate re-reading only the tables that changed since it was proven (its downtime follows the
    writes, not the data), and the storage phase as in ``full``."""

    name = "replicate"

    def run(self, runbook: Runbook, options: RunOptions) -> dict:
        synced = sync_by_replication(runbook)
        forget_for_replicated_sync(runbook)
        report = gate_changed_tables(runbook, synced)  # published, recorded, raised when it did not pass
        done = {"database": {**synced, "re-read": len(report.tables)}}
        if runbook.storage.wanted:
            done["storage"] = migrate_storage(options)
        return done


STRATEGIES: dict[str, FinalSync] = {"full": FullResync(), "replicate": ReplicatedSync()}
