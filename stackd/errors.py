"""The one exception hierarchy of stackd.

Library code raises these; only the CLI turns them into messages and exit codes. Every error says what
went wrong and where: the stack file and key path, or the service, the step, the path and the errno.
"""

from __future__ import annotations

import errno as errno_module
import os
from dataclasses import dataclass

__all__ = [
    "CgroupError",
    "LaunchError",
    "NetworkError",
    "Problem",
    "StackFileError",
    "StackdError",
    "leaf_exceptions",
]


class StackdError(Exception):
    """Base class of every error stackd raises on purpose."""

    #: The exit code the CLI uses for this kind of error.
    exit_code: int = 1


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a stack file: where it is and what is wrong."""

    file: str
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class StackFileError(StackdError):
    """The stack file cannot be used: every problem found in it, all at once."""

    exit_code = 2

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = "invalid stack file" if count == 1 else f"invalid stack file ({count} problems)"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class LaunchError(StackdError):
    """A service could not be started: which service, at which step, on which path, with which errno."""

    def __init__(
        self,
        service: str,
        step: str,
        *,
        errno: int | None = None,
        path: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.service = service
        self.step = step
        self.errno = errno
        self.path = path
        self.detail = detail
        parts = [f"service {service}: {step}"]
        if errno is not None:
            name = errno_module.errorcode.get(errno, str(errno))
            parts.append(f": {name} ({os.strerror(errno)})")
        if path:
            parts.append(f" on {path}")
        if detail:
            parts.append(f": {detail}")
        super().__init__("".join(parts))


class CgroupError(StackdError):
    """A cgroup could not be created, configured, read or removed."""


class NetworkError(StackdError):
    """A bridge, namespace, veth, address or route could not be set up or removed."""


def leaf_exceptions(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in `group` and in the groups inside it (task groups nest them), in order."""
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves += leaf_exceptions(error) if isinstance(error, BaseExceptionGroup) else [error]
    return leaves
