"""The stack's state record: every host resource, written down BEFORE it is created.

`stackd down` reads it to remove everything a supervisor made, also after that supervisor died by
SIGKILL (design.md §3). The record is one JSON file, `<state>/<project>/state.json`, replaced
atomically (write a temporary file, fsync, rename) at every change.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackd.runtime.paths import StackPaths

__all__ = ["StateRecord"]

FORMAT = 1


@dataclass
class StateRecord:
    """What one project has on the host, kept on disk as it changes."""

    paths: StackPaths
    supervisor_pid: int | None = None
    stack_file: str | None = None
    #: kind -> name -> details. Kinds: "cgroup" (details: paths), "dir" (path).
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.paths.state / "state.json"

    @classmethod
    def load(cls, paths: StackPaths) -> StateRecord | None:
        """The record of a project, or None when it has none."""
        try:
            data = json.loads((paths.state / "state.json").read_text())
        except FileNotFoundError:
            return None
        return cls(paths, data.get("supervisor_pid"), data.get("stack_file"), data.get("resources", {}))

    def add(self, kind: str, name: str, **details: Any) -> None:
        """Write down a resource before creating it."""
        self.resources.setdefault(kind, {})[name] = details
        self.save()

    def add_all(self, kind: str, items: dict[str, dict[str, Any]]) -> None:
        """Write down several resources of one kind, in one write."""
        self.resources.setdefault(kind, {}).update(items)
        self.save()

    def forget_all(self, kinds: list[str]) -> None:
        """Forget every resource of these kinds (after they were removed)."""
        if any(self.resources.pop(kind, None) is not None for kind in list(kinds)):
            self.save()

    def discard(self, kind: str, name: str) -> None:
        """Forget a resource after it was removed."""
        if self.resources.get(kind, {}).pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        self.paths.state.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT,
            "project": self.paths.project,
            "supervisor_pid": self.supervisor_pid,
            "stack_file": self.stack_file,
            "resources": self.resources,
        }
        temporary = self.file.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.file)

    def supervisor_alive(self) -> bool:
        """Whether the supervisor that wrote this record still runs."""
        if not self.supervisor_pid:
            return False
        try:
            os.kill(self.supervisor_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A reused pid is not our supervisor: check that it is a stackd process.
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{self.supervisor_pid}/cmdline").read_bytes()
            return b"stackd" in cmdline
        return False
