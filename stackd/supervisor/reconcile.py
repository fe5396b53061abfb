"""`stackd up -d` on a running stack: bring it to a changed stack file, touching only what changed.

As Compose does: a service whose resolved definition changed is recreated (stopped, its cgroup and
writable layer removed, started afresh from the new definition); a service that left the file is
stopped and removed; a new one is created; the others keep running, untouched. A dependent is
recreated with what it depends on when it must be: it shares that service's network namespace
(`network_mode = "service:NAME"`), or its `depends_on` entry says `restart = true`.

Definitions are compared as `stackd config` prints them (stackd.spec.serialize): resolved, with
defaults, interpolation done and paths absolute, so a reformatted file changes nothing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import anyio

from stackd.errors import StackdError
from stackd.spec.graph import needs, with_dependencies
from stackd.spec.models import Stack
from stackd.spec.serialize import stack_to_dict

TYPE_CHECKING = False
if TYPE_CHECKING:
    from stackd.supervisor.stack import StackSupervisor

__all__ = ["Changes", "plan_changes", "reconcile"]


@dataclass(frozen=True)
class Changes:
    """What a reconcile did (or will do), each list in the new stack file's order."""

    created: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    #: services started by it (created, recreated, and selected ones that were not running)
    started: list[str] = field(default_factory=list)
    #: why each recreated service is: "changed", or "depends on NAME"
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "recreated": self.recreated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "started": self.started,
            "reasons": self.reasons,
        }


def definitions(stack: Stack) -> dict[str, Any]:
    """Each service's resolved definition, comparable between two loads of a file."""
    services: dict[str, Any] = stack_to_dict(stack)["services"]
    return services


def plan_changes(old: Stack, new: Stack) -> Changes:
    """Which services to create, recreate, remove and leave alone to go from `old` to `new` (pure)."""
    if old.name != new.name:
        raise StackdError(f"the project name changed ({old.name} -> {new.name}): that is another stack")
    before, after = stack_to_dict(old), stack_to_dict(new)
    if before.get("network") != after.get("network"):
        raise StackdError(
            f"project {new.name}: the [network] table changed; the network cannot change under running services: "
            f"run `stackd down -p {new.name}`, then `stackd up -d`"
        )
    old_defs, new_defs = before["services"], after["services"]
    created = [name for name in new.services if name not in old.services]
    removed = [name for name in old.services if name not in new.services]
    reasons = {name: "changed" for name in new.services if name in old.services and old_defs[name] != new_defs[name]}
    grew = True
    while grew:  # dependents that must follow, transitively
        grew = False
        for name, service in new.services.items():
            if name in reasons or name in created:
                continue
            for dependency in needs(service):
                if dependency not in reasons:
                    continue
                shares = service.network_mode.kind == "service" and service.network_mode.service == dependency
                entry = service.depends_on.get(dependency)
                if shares or (entry is not None and entry.restart):
                    reasons[name] = f"depends on {dependency}"
                    grew = True
                    break
    recreated = [name for name in new.services if name in reasons]
    unchanged = [name for name in new.services if name not in reasons and name not in created]
    return Changes(created, recreated, removed, unchanged, [], {n: reasons[n] for n in recreated})


_locks: weakref.WeakKeyDictionary[Any, anyio.Lock] = weakref.WeakKeyDictionary()


async def reconcile(supervisor: StackSupervisor, stack: Stack, services: list[str] | None = None) -> Changes:
    """Bring the running `supervisor` to `stack`; then start `services` (default: all) and their
    dependencies that are not running. One reconcile at a time per supervisor."""
    lock = _locks.setdefault(supervisor, anyio.Lock())
    async with lock:
        unknown = [name for name in services or () if name not in stack.services]
        if unknown:
            raise StackdError(f"no such service: {', '.join(unknown)} (services: {', '.join(stack.services)})")
        plan = plan_changes(supervisor.stack, stack)
        old_runners = supervisor.runners
        going = [name for name in [*plan.recreated, *plan.removed] if name in old_runners]
        await _stop_dependents_first(supervisor, going)
        for name in going:
            await old_runners[name].remove()
            supervisor._emit("removed" if name in plan.removed else "recreating", name)
        supervisor.stack = stack
        supervisor.network.stack = stack
        runners = {}
        for name, service in stack.services.items():
            if name in plan.created or name in plan.recreated:
                runners[name] = supervisor.new_runner(service)
            else:
                runners[name] = old_runners[name]
        supervisor.runners = runners
        for problem in await supervisor.network.detach_unused():  # what left the stack leaves its network
            supervisor._emit("cleanup-failed", "", problem=problem)
        fresh = set(plan.created) | set(plan.recreated)
        supervisor._selected = [name for name in supervisor._selected if name in stack.services and name not in fresh]
        wanted = with_dependencies(stack, services or list(stack.services))
        start = [name for name in wanted if not runners[name].active]
        for name in start:
            if runners[name].finished.is_set():
                runners[name].rearm()
        if start:
            await supervisor._start(start)
        else:
            supervisor.network.write_names()  # a removed service leaves the hosts file
        return Changes(plan.created, plan.recreated, plan.removed, plan.unchanged, start, plan.reasons)


async def _stop_dependents_first(supervisor: StackSupervisor, names: list[str]) -> None:
    stopped = {name: anyio.Event() for name in names}

    async def stop(name: str) -> None:
        try:
            for other in names:
                if other != name and name in needs(supervisor.runners[other].service):
                    await stopped[other].wait()
            await supervisor.stop_service(name)
        finally:
            stopped[name].set()

    async with anyio.create_task_group() as group:
        for name in names:
            group.start_soon(stop, name)
