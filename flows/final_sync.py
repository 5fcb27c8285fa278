"""The cutover's final sync (the runbook's `cutover` section): the final sync brings the target up to the frozen
source, behind one interface.

``FullResync`` re-runs the database phase from a new export (every table reloaded) and the storage phase
(only objects added or changed since), each ending in its gate, which must pass. A later strategy (logical
replication catch-up, for near-zero downtime) implements the same ``run``.
"""

from __future__ import annotations

from typing import Protocol

from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.flows.storage import migrate_storage
from liftoff.runbooks.model import Runbook
from liftoff.tasks.cutover.sync import forget_for_full_resync


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


STRATEGIES: dict[str, FinalSync] = {"full": FullResync()}
