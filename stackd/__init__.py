"""stackd: run multi-service stacks on one Linux host, with no daemon and no registry.

The Python API (docs/python-api.md)::

    import stackd

    async with stackd.open_stack("stack.toml") as stack:
        address = stack["db"].address
        result = await stack["db"].exec(["redis-cli", "ping"])

Every public name is listed in ``__all__``. They are imported on first use, so ``import stackd`` stays
cheap (the CLI and the launcher import it too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> (module, attribute): loaded by __getattr__ on first use (PEP 562).
_LAZY = {
    "open_stack": ("stackd.api.stack", "open_stack"),
    "open_stack_in_thread": ("stackd.api.threaded", "open_stack_in_thread"),
    "Stack": ("stackd.api.stack", "Stack"),
    "Service": ("stackd.api.stack", "Service"),
    "ExecResult": ("stackd.api.types", "ExecResult"),
    "LogLine": ("stackd.api.types", "LogLine"),
    "Event": ("stackd.api.types", "Event"),
    "PublishedPort": ("stackd.api.types", "PublishedPort"),
    "NotReadyError": ("stackd.api.types", "NotReadyError"),
    "ExecError": ("stackd.api.types", "ExecError"),
    "ServiceStatus": ("stackd.supervisor.status", "ServiceStatus"),
    "ServiceStats": ("stackd.supervisor.status", "ServiceStats"),
    "StackSpec": ("stackd.spec.models", "Stack"),
    "ServiceSpec": ("stackd.spec.models", "Service"),
    "load_stack": ("stackd.spec.loader", "load_stack"),
    "StackdError": ("stackd.errors", "StackdError"),
    "StackFileError": ("stackd.errors", "StackFileError"),
}

__all__ = [
    "Event",
    "ExecError",
    "ExecResult",
    "LogLine",
    "NotReadyError",
    "PublishedPort",
    "Service",
    "ServiceSpec",
    "ServiceStats",
    "ServiceStatus",
    "Stack",
    "StackFileError",
    "StackSpec",
    "StackdError",
    "__version__",
    "load_stack",
    "open_stack",
    "open_stack_in_thread",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ loads them
    from stackd.api.stack import Service, Stack, open_stack
    from stackd.api.threaded import open_stack_in_thread
    from stackd.api.types import Event, ExecError, ExecResult, LogLine, NotReadyError, PublishedPort
    from stackd.errors import StackdError, StackFileError
    from stackd.spec.loader import load_stack
    from stackd.spec.models import Service as ServiceSpec
    from stackd.spec.models import Stack as StackSpec
    from stackd.supervisor.status import ServiceStats, ServiceStatus


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'stackd' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
