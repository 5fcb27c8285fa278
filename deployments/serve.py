"""Serves every phase flow as a Prefect deployment: an operator starts a run from the UI with the
runbook path and options (a form rendered from ``RunOptions``), and this process runs it.

    liftoff-serve            # or: python -m deployments.serve [--only migrate-database]

Schedules (nightly dry-run rehearsals) and the rollback flow come with the deployments issue.
"""

from __future__ import annotations

import argparse

from prefect import serve

from flows.database import migrate_database
from flows.export import export_database
from flows.preflight import preflight
from flows.restore import restore_database
from flows.verify import verify_database
from liftoff.logs import configure

FLOWS = {
    "preflight": preflight,
    "export": export_database,
    "restore": restore_database,
    "verify": verify_database,
    "migrate-database": migrate_database,
}


def deployments(only: list[str] | None = None):
    return [
        flow.to_deployment(name=name, description=(flow.__doc__ or "").strip().splitlines()[0],
                           tags=["liftoff", "database"])
        for name, flow in FLOWS.items()
        if not only or name in only
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve Liftoff's flows as Prefect deployments.")
    parser.add_argument("--only", nargs="*", choices=sorted(FLOWS), help="serve only these")
    args = parser.parse_args()
    configure()
    serve(*deployments(args.only))


if __name__ == "__main__":
    main()
