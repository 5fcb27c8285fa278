"""What the operator sees: Prefect artifacts (tables, markdown, progress) and the same events for the CLI.

Everything published passes through the redaction module first. Outside a Prefect run the artifacts are
skipped; local listeners (the CLI's progress display) are told either way.
"""

from __future__ import annotations

import contextvars
import json
import re
from typing import Callable

from liftoff.redaction import redact, redact_value

_listeners: list[Callable[[str, float, str], None]] = []
_last_markdown: dict[str, str] = {}


def subscribe(listener: Callable[[str, float, str], None]) -> Callable[[], None]:
    """``listener(step, percent, message)`` on every progress update; returns an unsubscribe function."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(FlowRunContext.get() or TaskRunContext.get())


_runbook_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("liftoff_runbook", default=None)


def for_runbook(name: str) -> None:
    """Artifact keys of this run start with the runbook's name, so a demo, a rehearsal and production keep
    separate artifact histories in one Prefect server."""
    _runbook_name.set(name)


def _key(text: str) -> str:
    prefix = _runbook_name.get()
    return re.sub(r"[^a-z0-9-]+", "-", (f"{prefix}-{text}" if prefix else text).lower()).strip("-")[:100]


def artifact_key(runbook: str, key: str) -> str:
    """The Prefect artifact key a run of ``runbook`` publishes ``key`` under."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{runbook}-{key}".lower()).strip("-")[:100]


def publish_table(key: str, rows: list[dict], description: str) -> None:
    if _in_run():
        _on_the_flow_run("table", key, json.dumps(redact_value(rows)), redact(description))


def publish_markdown(key: str, markdown: str, description: str = "") -> None:
    markdown = redact(markdown)
    _last_markdown[key] = markdown
    if _in_run():
        _on_the_flow_run("markdown", key, markdown, redact(description) or None)


def _on_the_flow_run(kind: str, key: str, data: str, description: str | None) -> None:
    """Creates the artifact on the flow run, also when a task (a gate's) publishes it: Prefect's own
    ``create_*_artifact`` would tie it to the task run, which the run's Artifacts tab lists below the flow
    run's, under a graph that keeps re-rendering. A phase's reports and its gate's table are the run's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.context import FlowRunContext, TaskRunContext

    flow_run = FlowRunContext.get()
    flow_run_id = flow_run.flow_run.id if flow_run is not None else TaskRunContext.get().task_run.flow_run_id
    with get_client(sync_client=True) as client:
        client.create_artifact(artifact=ArtifactCreate(type=kind, key=_key(key), description=description, data=data,
                                                       flow_run_id=flow_run_id))


def last_markdown(key: str) -> str | None:
    return _last_markdown.get(key)


class Progress:
    """A Prefect progress artifact plus local listeners, for one long step."""

    def __init__(self, step: str, total: int):
        self.step, self.total, self.done = step, max(total, 1), 0
        self._artifact_id = None
        if _in_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact_id = create_progress_artifact(progress=0.0, description=f"{step}: starting")
        self._notify(f"{step}: 0/{total}")

    def advance(self, message: str = "", by: int = 1) -> None:
        self.done += by
        if self._artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(artifact_id=self._artifact_id, progress=self.percent,
                                     description=redact(f"{self.step}: {message}"))
        self._notify(message)

    @property
    def percent(self) -> float:
        return round(100.0 * self.done / self.total, 1)

    def _notify(self, message: str) -> None:
        for listener in list(_listeners):
            listener(self.step, self.percent, redact(message))


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# A report of check lines (the checklist, the cache, health and security gates): each line has ``name``,
# ``status``, ``detail`` and ``fix``; these render it the same way everywhere.
CHECK_MARKS = {"passed": "✅ passed", "failed": "❌ failed", "not checked": "🔴 not checked", "ok": "✅ ok",
               "warn": "⚠️ warn", "critical": "❌ critical", "not configured": "➖ not configured"}


def md_cell(text: str) -> str:
    """Text that stays in its markdown table cell: ``|`` escaped, an empty cell kept."""
    return text.replace("|", "\\|") or " "


def sentence(text: str) -> str:
    """A summary as a heading that reads as a sentence ("Checklist passed: 13 of 13 lines passed")."""
    return text[:1].upper() + text[1:]


def check_rows(lines, label: str = "check") -> list[dict]:
    """One row per check line, for a table artifact (and the cutover's approval form)."""
    return [{label: line.name, "status": line.status, "detail": line.detail, "fix": line.fix} for line in lines]


def check_table(lines, label: str = "check") -> str:
    """The markdown table of check lines, a mark per status."""
    out = [f"| | {label} | detail | fix |", "|---|---|---|---|"]
    out += [f"| {CHECK_MARKS[line.status]} | {md_cell(line.name)} | {md_cell(line.detail)} | {md_cell(line.fix)} |"
            for line in lines]
    return "\n".join(out) + "\n"
