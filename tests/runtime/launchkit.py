"""Launch one service of a stack file on the real kernel and read what it saw, for the launch tests.

    result = await run_service('''
        [services.svc]
        command = ["cat", "/proc/self/status"]
    ''', tmp_path=tmp_path, project=new_project())
    assert result.exit.code == 0 and "NoNewPrivs:\\t1" in result.output

`run_service` parses the text, prepares the service (state dirs and cgroup under tmp_path), launches it
with stdout and stderr on one pipe, collects the output, waits for the exit and ALWAYS disposes of the
instance (shielded from cancellation), also when the launch fails: a LaunchError reaches the caller only
after everything is removed. `started` is the same as an async context manager, for tests that act on
a running service (measure its cgroup, kill it) before it ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import tomli_w

from stackd.runtime.instance import HostFacts, Instance, prepare
from stackd.runtime.launcher import Exit, Launcher
from stackd.runtime.paths import StackPaths
from stackd.runtime.plan import LaunchPlan, Mount
from stackd.spec import parse_stack
from stackd.spec.models import Service

__all__ = ["Result", "Running", "facts", "new_project", "run_service", "service_of", "sh", "stack_toml", "started"]

_FACTS: HostFacts | None = None


def facts() -> HostFacts:
    """The host facts, gathered once per test session (they do not change while the tests run)."""
    global _FACTS
    if _FACTS is None:
        _FACTS = HostFacts.gather()
    return _FACTS


def new_project() -> str:
    """A unique project name per test: lt-<6 hex digits>."""
    return f"lt-{secrets.token_hex(3)}"


def sh(script: str) -> list[str]:
    """A shell command line for `command` (stack_toml doubles every "$" so the shell sees it)."""
    return ["sh", "-c", textwrap.dedent(script).strip()]


def _literal(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("$", "$$")  # Compose interpolation: "$$" is a literal "$"
    if isinstance(value, list | tuple):
        return [_literal(item) for item in value]
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    return value


def stack_toml(service: str = "svc", **keys: Any) -> str:
    """The text of a stack file with one service `service` and these keys, every string taken literally."""
    return tomli_w.dumps({"services": {service: _literal(keys)}})


def service_of(toml_text: str, *, tmp_path: Path, project: str, service: str | None = None) -> Service:
    """The Service `service` (default: the only one) of a stack file text, anchored in tmp_path."""
    stack = parse_stack(textwrap.dedent(toml_text), file=Path(tmp_path) / "stack.toml", project=project)
    if service is None:
        (service,) = stack.services
    return stack[service]


@dataclass
class Result:
    """What a service did: how it ended, what it printed, and why it ended as the supervisor says it."""

    exit: Exit
    output: str
    reason: str
    oom_killed: bool
    #: What `inspect(instance)` returned, called after the exit and before dispose (e.g. the upper layer).
    inspected: Any = None

    @property
    def lines(self) -> list[str]:
        return self.output.splitlines()


@dataclass
class Running:
    """A launched service: its instance, launcher and pid, and its output as it arrives."""

    instance: Instance
    launcher: Launcher
    pid: int
    _chunks: list[bytes] = field(default_factory=list)
    _eof: anyio.Event = field(default_factory=anyio.Event)

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    async def wait(self, timeout: float = 20.0) -> Exit:
        """The exit of the service; on timeout the cgroup is killed and TimeoutError raised."""
        try:
            with anyio.fail_after(timeout):
                return await self.launcher.wait(self.pid)
        except TimeoutError:
            self.instance.cgroup.kill()
            raise

    async def drained(self, timeout: float = 5.0) -> str:
        """All of the output, once every writer of the pipe is gone."""
        with anyio.fail_after(timeout):
            await self._eof.wait()
        return self.output

    def result(self, exit: Exit, inspected: Any = None) -> Result:
        return Result(exit, self.output, self.instance.exit_reason(exit), self.instance.oom_killed(exit), inspected)


async def _read_pipe(fd: int, running_chunks: list[bytes], eof: anyio.Event) -> None:
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            if not chunk:
                return
            running_chunks.append(chunk)
    finally:
        eof.set()


@asynccontextmanager
async def started(
    toml_text: str,
    *,
    tmp_path: Path,
    project: str,
    service: str | None = None,
    extra_binds: Sequence[Mount] = (),
    edit_plan: Callable[[LaunchPlan], LaunchPlan] | None = None,
    stderr: int | None = None,
) -> AsyncIterator[Running]:
    """Prepare and launch the service; yield it running; on the way out kill what is left and dispose.

    stdout (and stderr unless `stderr` gives another fd) go to one pipe that `Running` collects.
    """
    spec = service_of(toml_text, tmp_path=tmp_path, project=project, service=service)
    tmp = Path(tmp_path)
    paths = StackPaths(project, state_root=tmp / "state", log_root=tmp / "log")
    instance = prepare(spec, project=project, paths=paths, facts=facts(), extra_binds=extra_binds)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        os.set_blocking(read_fd, False)
        plan = edit_plan(instance.plan) if edit_plan is not None else instance.plan
        async with Launcher.open() as launcher:
            running = Running(instance, launcher, 0)
            try:
                instance.mark_started()
                running.pid = await launcher.launch(
                    plan, stdout=write_fd, stderr=write_fd if stderr is None else stderr
                )
            finally:
                os.close(write_fd)  # the service holds its own copies now
            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(_read_pipe, read_fd, running._chunks, running._eof)
                    try:
                        yield running
                    finally:
                        with anyio.CancelScope(shield=True):
                            # Whatever still runs (a failed test, a daemonised grandchild) goes now, which
                            # also closes the pipe's last writers and so ends the reader.
                            instance.cgroup.kill()
                            with anyio.move_on_after(5):
                                await running._eof.wait()
                            group.cancel_scope.cancel()
            except BaseExceptionGroup as group_error:
                raise _only(group_error) from None
    finally:
        with anyio.CancelScope(shield=True):
            os.close(read_fd)
            instance.dispose()


def _only(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside (nested) task-group wrappers, so tests see what was raised; else the group."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group


async def run_service(
    toml_text: str,
    *,
    tmp_path: Path,
    project: str,
    service: str | None = None,
    timeout: float = 20.0,
    extra_binds: Sequence[Mount] = (),
    edit_plan: Callable[[LaunchPlan], LaunchPlan] | None = None,
    inspect: Callable[[Instance], Any] | None = None,
) -> Result:
    """Run the service to its end and return what it did (see the module docstring)."""
    async with started(
        toml_text, tmp_path=tmp_path, project=project, service=service, extra_binds=extra_binds, edit_plan=edit_plan
    ) as running:
        exit = await running.wait(timeout)
        with contextlib.suppress(TimeoutError):
            await running.drained(5)
        inspected = inspect(running.instance) if inspect is not None else None
        return running.result(exit, inspected)
