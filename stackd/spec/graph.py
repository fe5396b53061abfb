"""Which services a service needs: its depends_on targets and the owner of a shared network namespace."""

from __future__ import annotations

from collections.abc import Iterable

from stackd.spec.models import Service, Stack

__all__ = ["needs", "with_dependencies"]


def needs(service: Service) -> list[str]:
    """The services `service` cannot start without (in file order, without duplicates)."""
    names = list(service.depends_on)
    if service.network_mode.kind == "service" and service.network_mode.service:
        names.append(service.network_mode.service)
    return list(dict.fromkeys(names))


def with_dependencies(stack: Stack, names: Iterable[str]) -> list[str]:
    """`names` and everything they need, transitively, in the stack file's order."""
    wanted: set[str] = set()
    pending = [name for name in names if name in stack.services]
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending += [dep for dep in needs(stack.services[name]) if dep in stack.services]
    return [name for name in stack.services if name in wanted]
