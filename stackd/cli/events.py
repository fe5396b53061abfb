"""stackd's own events (created, started, exited, restarting, stopping...) through structlog.

Readable key=value lines on a terminal, one JSON object a line with `--log-format json`; on stderr, so
that stdout carries only the services' output.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure_events(log_format: str = "console") -> None:
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        processors.append(structlog.processors.JSONRenderer())
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def event_logger() -> Any:
    return structlog.get_logger("stackd")


#: The supervisor's events logged above info: a service that could not start is an error, what could
#: not be removed or may not work is a warning.
ERROR_EVENTS = frozenset({"failed", "dependency-failed"})
WARNING_EVENTS = frozenset({"warning", "cleanup-failed"})


def log_event(log: Any, event: str, **fields: Any) -> None:
    """Log one of the supervisor's events at its level."""
    level = log.error if event in ERROR_EVENTS else log.warning if event in WARNING_EVENTS else log.info
    level(event, **fields)
