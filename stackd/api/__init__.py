"""The Python API: open a stack from code, drive it, read its logs and events, tear it down.

`stackd` re-exports the public names (``stackd.open_stack`` ...); see docs/python-api.md.
"""

from stackd.api.specs import SpecLike, resolve_spec
from stackd.api.stack import Service, Stack, Wait, open_stack, supervisor_alive
from stackd.api.threaded import open_stack_in_thread
from stackd.api.types import Event, ExecError, ExecResult, LogLine, NotReadyError, PublishedPort

__all__ = [
    "Event",
    "ExecError",
    "ExecResult",
    "LogLine",
    "NotReadyError",
    "PublishedPort",
    "Service",
    "SpecLike",
    "Stack",
    "Wait",
    "open_stack",
    "open_stack_in_thread",
    "resolve_spec",
    "supervisor_alive",
]
