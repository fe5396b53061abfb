"""The stack's state record: every host resource, written down BEFORE it is created.

`stackd down` reads it to remove everything a supervisor made, also after that supervisor died by
SIGKILL (design.md §3). The record is one JSON file, `<state>/<project>/state.json`, replaced
atomically (write a temporary file, rename it over the record) at every change.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackd.errors import StackdError
from stackd.runtime.paths import StackPaths

__all__ = ["StateRecord"]

FORMAT = 1


@dataclass
class StateRecord:
    """What one project has on the host, kept on disk as it changes."""

    paths: StackPaths
    supervisor_pid: int | None = None
    stack_file: str | None = None
    #: When the supervisor started (clock ticks after boot, /proc/PID/stat field 22): with the pid, it
    #: names one process for as long as the host runs, whatever its command line (the Python API runs a
    #: supervisor inside pytest or any other program).
    supervisor_start: int | None = None
    #: kind -> name -> details. Kinds: "cgroup" (details: paths), "dir" (path).
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.paths.state / "state.json"

    @classmethod
    def load(cls, paths: StackPaths) -> StateRecord | None:
        """The record of a project, or None when it has none."""
        file = paths.state / "state.json"
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:  # only a crash of the host leaves a torn record
            raise StackdError(
                f"{file}: the state record of project {paths.project} cannot be read ({error}); after a "
                f"reboot nothing it lists exists any more: remove {paths.state} by hand"
            ) from None
        return cls(
            paths,
            supervisor_pid=data.get("supervisor_pid"),
            stack_file=data.get("stack_file"),
            supervisor_start=data.get("supervisor_start"),
            resources=data.get("resources", {}),
        )

    @classmethod
    def for_this_process(cls, paths: StackPaths, stack_file: str | None) -> StateRecord:
        """A new record whose supervisor is the calling process."""
        pid = os.getpid()
        return cls(paths, pid, stack_file, supervisor_start=process_start(pid))

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
            "supervisor_start": self.supervisor_start,
            "resources": self.resources,
        }
        temporary = self.file.with_suffix(".tmp")
        # No fsync: the rename alone is atomic against the death of this process, the one fault the
        # record is for. What it describes (namespaces, links, cgroups, mounts) does not outlive a
        # crash of the host; fsync cost 0.3-1 ms a save on ext4, 16 saves per 3-service stack.
        with open(temporary, "w") as handle:
            json.dump(data, handle, indent=1)
        os.replace(temporary, self.file)

    def supervisor_alive(self) -> bool:
        """Whether the supervisor that wrote this record still runs (not another process that was given
        its pid after it died)."""
        if not self.supervisor_pid:
            return False
        started = process_start(self.supervisor_pid)
        if started is None:
            return False
        if self.supervisor_start is not None:
            return started == self.supervisor_start
        # A record written before the start time was kept: a reused pid is rarely a stackd process.
        with contextlib.suppress(OSError):
            return b"stackd" in Path(f"/proc/{self.supervisor_pid}/cmdline").read_bytes()
        return False


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ")".
    return int(stat[stat.rfind(")") + 2 :].split()[19])
