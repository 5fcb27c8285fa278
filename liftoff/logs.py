"""Structured logs: one event dict per line, context bound once, secrets redacted for every line.

On a terminal the lines are rendered for people; elsewhere as JSON. Inside a Prefect run each line is
also forwarded to the run logger, so it shows in the Prefect UI with the run.
"""

from __future__ import annotations

import logging
import sys

import structlog

from liftoff import redaction

_configured = False


def _redact(_, __, event_dict):
    return redaction.redact_value(event_dict)


def _forward_to_prefect(_, method_name, event_dict):
    """Sends the event to the Prefect run logger when there is a run; leaves the dict for the renderer."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() or TaskRunContext.get():
            fields = {k: v for k, v in event_dict.items() if k not in ("event", "level", "timestamp")}
            summary = " ".join(f"{k}={v}" for k, v in fields.items())
            level = getattr(logging, method_name.upper(), logging.INFO) if method_name != "exception" else logging.ERROR
            get_run_logger().log(level, f"{event_dict.get('event')} {summary}".strip())
    except Exception:  # never let logging break a migration step
        pass
    return event_dict


class _OperatorErrorOnOneLine(logging.Filter):
    """A task or flow run that failed with an error meant for the operator (``LiftoffError``: a gate's
    difference, a refused login, a runbook problem) is logged as its first line, the gate's one-line summary,
    not as a traceback; the unexpected keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        from liftoff.errors import LiftoffError

        what = "Task run" if record.name.startswith("prefect.task_runs") else "Flow run"
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, LiftoffError):
            record.msg, record.args = f"{what} failed (exit {exc.exit_code}): %s", (redaction.first_line(exc),)
            record.exc_info, record.exc_text = None, None
        elif record.levelno >= logging.ERROR and not exc:  # Prefect's "failed with exception: Type('...')" line
            message = record.getMessage()
            for cls in _operator_errors(LiftoffError):
                at = message.find(f"{cls.__name__}(")
                if at >= 0:
                    text = message[at + len(cls.__name__) + 2:].split("\\n")[0].removesuffix("')").removesuffix('")')
                    record.msg, record.args = f"{what} failed (exit {cls.exit_code}): %s", (redaction.redact(text),)
                    record.exc_info, record.exc_text = None, None
                    break
        return True


def _operator_errors(base: type) -> list[type]:
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted(found, key=lambda c: -len(c.__name__))  # ChecksBlocked before a shorter name inside it


def _quiet_operator_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OperatorErrorOnOneLine) for f in logger.filters):
            logger.addFilter(_OperatorErrorOnOneLine())


def configure(json: bool | None = None, level: int = logging.INFO, stream=None) -> None:
    """Idempotent. ``json=None`` picks JSON unless the stream is a terminal."""
    global _configured
    redaction.install()
    _quiet_operator_errors()
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            _forward_to_prefect,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(**context):
    if not _configured:
        configure()
    return structlog.get_logger().bind(**context)


def bind_run(**context) -> None:
    """Binds run-wide context (run id, flow, phase) to every later event of this thread/task."""
    structlog.contextvars.bind_contextvars(**context)
