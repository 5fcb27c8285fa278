"""The operator at the Prefect UI, for the tests and the demo: answers the next paused run of a flow through
the Prefect API with ``run_input``, as the UI's form does when the operator submits it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path


def answer_when_paused(flow_name: str, run_input: dict, timeout: float = 300, *,
                       under: str | Path | None = None) -> threading.Thread:
    """Starts a thread that waits for a run of ``flow_name`` to pause (one not paused already) and resumes it
    with ``run_input``; join it after the flow returned. ``under``: only a run whose runbook is in that
    folder (several test workers, or the demo, may share one Prefect server and pause runs of one flow)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus

    async def paused(client) -> set:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
        return {r.id for r in runs if under is None or _runbook_under(r.parameters, Path(under))}

    async def before() -> set:
        async with get_client() as client:
            return await paused(client)

    async def resume(seen: set) -> None:
        async with get_client() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for run_id in await paused(client) - seen:
                    # Prefect sets the run Paused, then saves its input's schema: a resume in between is
                    # rejected ("Run input schema not found") and the run waits on. CI lost an approval to
                    # that gap; the answer is sent again until the server accepts it, as an operator would.
                    answered = await client.resume_flow_run(run_id, run_input=run_input)
                    if answered.status == SetStateStatus.ACCEPT:
                        return
                await asyncio.sleep(0.5)

    seen = asyncio.run(before())
    thread = threading.Thread(target=lambda: asyncio.run(resume(seen)), name=f"answer-{flow_name}", daemon=True)
    thread.start()
    return thread


def _runbook_under(parameters: dict, folder: Path) -> bool:
    runbook = ((parameters or {}).get("options") or {}).get("runbook")
    return bool(runbook) and Path(runbook).resolve().is_relative_to(folder.resolve())
