"""The supervisor's events reach the log at their level: errors, warnings, the rest as info."""

from __future__ import annotations

import structlog.testing

from stackd.cli.events import event_logger, log_event


def test_warnings_are_logged_as_warnings() -> None:
    with structlog.testing.capture_logs() as logs:
        log = event_logger()
        log_event(log, "warning", service=None, problem="the host's firewall drops forwarded traffic")
        log_event(log, "cleanup-failed", service=None, problem="network: busy")
        log_event(log, "failed", service="web", error="service web: exec: ENOENT")
        log_event(log, "started", service="web", pid=12)
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("warning", "warning"),
        ("cleanup-failed", "warning"),
        ("failed", "error"),
        ("started", "info"),
    ]
