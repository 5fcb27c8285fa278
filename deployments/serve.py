"""Serves every phase flow as a Prefect deployment: an operator starts a run from the UI with the
runbook path and options (a form rendered from ``RunOptions``), and this process runs it.

    liftoff-serve            # or: python -m deployments.serve [--only migrate-database]

Schedules (nightly dry-run rehearsals) and the rollback flow come with the deployments issue.
"""

from __future__ import annotations

import argparse

from prefect import serve

from liftoff.logs import configure
from liftoff.phases import PHASES

# Deployment name -> (flow, phase): every flow of every phase in the registry; the composed database flow
# keeps the name its deployment has always had.
FLOWS = {("migrate-database" if f.name == "database" else f.name): (f, phase.name)
         for phase in PHASES for f in phase.flows}


def deployments(only: list[str] | None = None):
    result = []
    for name, (entry, phase) in FLOWS.items():
        if only and name not in only:
            continue
        flow = entry.load()
        result.append(flow.to_deployment(name=name, description=(flow.__doc__ or "").strip().splitlines()[0],
                                         tags=["liftoff", phase]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve Liftoff's flows as Prefect deployments.")
    parser.add_argument("--only", nargs="*", choices=sorted(FLOWS), help="serve only these")
    args = parser.parse_args()
    configure()
    serve(*deployments(args.only))


if __name__ == "__main__":
    main()
