"""Removing everything a state record lists: what `stackd down` does, and what a supervisor does on
its way out (the same code, so the path taken after a SIGKILL is the one every run takes).

Order: the services' processes first (killed through their cgroups, which then go), then the network
(namespaces can only go once no process is in them), then directories and the record itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stackd.runtime.cgroups import remove_cgroup_paths
from stackd.supervisor.network import teardown_from_record
from stackd.supervisor.state import StateRecord

__all__ = ["remove_recorded"]


async def remove_recorded(record: StateRecord) -> list[str]:
    """Remove every resource in `record`; tolerant of what is already gone. Returns what could not be
    removed (the record is then kept, so that a later `stackd down` tries again)."""
    problems: list[str] = []
    for name, details in list(record.resources.get("cgroup", {}).items()):
        try:
            remove_cgroup_paths([Path(p) for p in details["paths"]])
            record.discard("cgroup", name)
        except Exception as error:  # keep going: remove as much as possible
            problems.append(f"cgroup of {name}: {error}")
    try:
        problems += await teardown_from_record(record)
    except Exception as error:
        problems.append(f"network: {error}")
    for name, details in list(record.resources.get("dir", {}).items()):
        shutil.rmtree(details["path"], ignore_errors=True)
        if Path(details["path"]).exists():
            problems.append(f"directory {details['path']} could not be removed")
        else:
            record.discard("dir", name)
    if not problems:
        shutil.rmtree(record.paths.state, ignore_errors=True)
    return problems
