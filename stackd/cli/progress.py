"""The start-up progress line of `stackd up` on a terminal, like Compose's `[+] Running 3/5`.

While the stack comes up, one line at the bottom of the terminal (on stderr) says how far it is:

    [+] up 3/5 · network 10.213.7.0/24 · db healthy · web starting · worker waiting

It replaces the per-service "started"/"healthy" event lines of that phase; the services' output and the
other events (failures, exits, restarts) print above it as usual. When every service is ready (running,
healthy when it has a health check, or completed), it becomes one summary line and goes away:

    [+] up 5/5 in 0.42 s

Off a terminal, or with --log-format json, there is no progress line: every event is printed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["ProgressLine"]

#: Events the line shows instead of printing them while the stack comes up.
_ABSORBED = {"started", "starting", "healthy", "network"}


class ProgressLine:
    """Tracks the services being started and draws their progress on `stream` (a terminal)."""

    def __init__(self, services: Sequence[str], *, checked: Sequence[str] = (), stream: TextIO) -> None:
        self.stream = stream
        self.state = {name: "waiting" for name in services}
        self.checked = set(checked)  # services with a health check: ready when healthy
        self.network = ""
        self.started_at = time.monotonic()
        self.active = True
        self._lock = threading.Lock()
        self._shown = False

    def ready(self, name: str) -> bool:
        state = self.state[name]
        return state in ("healthy", "completed") or (state == "running" and name not in self.checked)

    def on_event(self, event: str, service: str, fields: dict[str, Any]) -> bool:
        """Update from one supervisor event; True when the line shows it (so it need not be printed)."""
        if not self.active:
            return False
        if event == "network":
            self.network = str(fields.get("subnet", ""))
        elif service in self.state:
            if event == "started":
                self.state[service] = "running"
            elif event == "starting":  # the health check's first state
                self.state[service] = "starting"
            elif event == "healthy":
                self.state[service] = "healthy"
            elif event == "exited":
                self.state[service] = "completed" if fields.get("code") == 0 else "exited"
            elif event in ("failed", "dependency-failed"):
                self.state[service] = "failed"
            elif event == "restarting":
                self.state[service] = "restarting"
        absorbed = event in _ABSORBED
        settled = all(self.ready(n) or self.state[n] in ("failed", "exited") for n in self.state)
        if settled:
            self.finish()
        else:
            self.redraw()
        return absorbed

    def text(self) -> str:
        done = sum(1 for name in self.state if self.ready(name))
        parts = [f"[+] up {done}/{len(self.state)}"]
        if self.network:
            parts.append(f"network {self.network}")
        parts += [f"{name} {state}" for name, state in self.state.items() if not self.ready(name)]
        return " · ".join(parts)

    def finish(self) -> None:
        """Replace the line with its summary and stop drawing."""
        if not self.active:
            return
        self.active = False
        done = sum(1 for name in self.state if self.ready(name))
        summary = f"[+] up {done}/{len(self.state)} in {time.monotonic() - self.started_at:.2f} s"
        with self._lock:
            self._erase()
            self.stream.write(summary + "\n")
            self.stream.flush()

    def redraw(self) -> None:
        with self._lock:
            self._erase()
            self._draw()

    # The printer's Overlay: called from its writing thread around every write.
    def hide(self) -> None:
        self._lock.acquire()
        self._erase()

    def show(self) -> None:
        try:
            self._draw()
        finally:
            self._lock.release()

    def _draw(self) -> None:
        if not self.active:
            return
        width = _columns(self.stream)
        line = self.text()
        if len(line) > width - 1:
            line = line[: width - 2] + "…"
        self.stream.write(line)
        self.stream.flush()
        self._shown = True

    def _erase(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 100
