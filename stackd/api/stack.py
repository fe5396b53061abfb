"""`open_stack`: a whole stack in an ``async with`` block, brought up, and always torn down.

    async with open_stack("stack.toml", project="t-1234") as stack:
        address = stack["db"].address                 # its IP on the stack's bridge
        result = await stack["db"].exec(["redis-cli", "ping"])
        async for line in stack.logs("web", follow=True): ...

The stack runs in a task group of the caller's event loop (anyio, on asyncio): a supervisor
(:class:`stackd.supervisor.stack.StackSupervisor`) owns the services and every host resource, written
down before it is made, and the block's exit stops everything and removes it, shielded from
cancellation: on a normal exit, an exception, a cancellation or a KeyboardInterrupt alike. A process
killed by SIGKILL leaves its state record behind; the next ``open_stack`` of the same project, or
``stackd down -p PROJECT``, removes what it lists.

A :class:`Stack` can also live on an event loop of its own in a background thread
(:func:`stackd.api.threaded.open_stack_in_thread`, the pytest plugin's way): its async methods then
work from any other event loop (each call is handed to the stack's loop and awaited), its plain methods
from any thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal as signal_module
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import anyio
import anyio.abc

from stackd.api.specs import SpecLike, resolve_spec
from stackd.api.types import (
    Event,
    ExecError,
    ExecResult,
    LogLine,
    NotReadyError,
    PublishedPort,
    parse_published_ports,
)
from stackd.errors import LaunchError, StackdError, leaf_exceptions
from stackd.runtime.paths import DEFAULT_LOG_ROOT, DEFAULT_STATE_ROOT, StackPaths
from stackd.runtime.plan import exec_plan
from stackd.spec import Service as ServiceSpec
from stackd.spec import Stack as StackSpec
from stackd.spec.graph import needs, with_dependencies
from stackd.supervisor.control import EventHub, EventSubscription, wait_ready
from stackd.supervisor.logfile import LogLine as _FileLine
from stackd.supervisor.logfile import follow_log, log_path, read_log
from stackd.supervisor.router import LogRouter
from stackd.supervisor.stack import StackSupervisor
from stackd.supervisor.state import StateRecord
from stackd.supervisor.status import ServiceStats, ServiceStatus

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

__all__ = ["Service", "Stack", "Wait", "open_stack", "supervisor_alive"]

#: What to wait for before the block starts: "healthy" (every service running, and healthy when it has a
#: health check; one-shots completed with code 0), "started" (running), or None (nothing).
Wait = Literal["healthy", "started"] | None

P = ParamSpec("P")
T = TypeVar("T")

EVENTS_KEPT = 10_000  # Stack.history
EVENT_QUEUE = 10_000  # events an events() iterator may fall behind
_REPORT_LINES = 20  # log lines of a service that is not ready, in NotReadyError

#: Called with every Stack that open_stack brings up, before the block starts (the pytest plugin
#: collects them to attach their logs to a failed test's report). Not part of the public API.
_on_open: list[Callable[[Stack], None]] = []


# --- calls from another event loop ------------------------------------------------------------------------


def _on_stack_loop(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Run an async method of Stack on the stack's own event loop when it is called from another one."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        stack: Stack = args[0]  # type: ignore[assignment]
        portal = stack._portal
        if portal is None or threading.get_ident() == stack._loop_thread:
            return await method(*args, **kwargs)
        return await _await_future(portal.start_task_soon(functools.partial(method, *args, **kwargs)))

    return wrapper


async def _await_future(future: Future[T]) -> T:
    """Await a concurrent Future from any event loop; cancelling the caller cancels the call."""
    try:
        import sniffio

        library = sniffio.current_async_library()
    except Exception:
        library = ""
    if library == "asyncio":
        import asyncio

        return await asyncio.wrap_future(future)  # a cancelled caller cancels the future (and so the call)
    try:
        return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        future.cancel()
        raise


class _CrossLoopIterator(AsyncIterator[T]):
    """An async iterator of the stack's loop, iterated from another loop: each step is handed over."""

    def __init__(self, stack: Stack, inner: AsyncIterator[T]) -> None:
        self._stack, self._inner = stack, inner

    def __aiter__(self) -> _CrossLoopIterator[T]:
        return self

    async def __anext__(self) -> T:
        portal = self._stack._portal
        assert portal is not None
        return await _await_future(portal.start_task_soon(self._inner.__anext__))

    async def aclose(self) -> None:
        portal = self._stack._portal
        close = getattr(self._inner, "aclose", None)
        if portal is not None and close is not None:
            with contextlib.suppress(Exception):
                await _await_future(portal.start_task_soon(close))


class _LiveIterator(AsyncIterator[T]):
    """Wraps a never-ending async iterator (a followed log, the events) so that it ends, quietly, once
    the stack is closed. Each step runs in a cancel scope of its own that the stack's close cancels."""

    def __init__(self, stack: Stack, inner: AsyncIterator[T], on_close: Callable[[], None] | None = None) -> None:
        self._stack, self._inner, self._on_close = stack, inner, on_close
        self._done = False

    def __aiter__(self) -> _LiveIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._done or self._stack.closed:
            await self.aclose()
            raise StopAsyncIteration
        with anyio.CancelScope() as scope:
            self._stack._live.add(scope)
            try:
                return await self._inner.__anext__()
            except StopAsyncIteration:
                await self.aclose()
                raise
            finally:
                self._stack._live.discard(scope)
        await self.aclose()  # cancelled by the stack's close
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        if self._on_close is not None:
            self._on_close()
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await close()


# --- the stack --------------------------------------------------------------------------------------------


class Service:
    """One service of a running :class:`Stack` (``stack["db"]``): its address, ports, state, and
    the operations of the stack applied to it alone."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack = stack
        self.name = name

    def __repr__(self) -> str:
        return f"<stackd.Service {self.stack.project}/{self.name}>"

    @property
    def spec(self) -> ServiceSpec:
        """Its validated definition (:class:`stackd.spec.Service`)."""
        return self.stack.spec.services[self.name]

    @property
    def address(self) -> str | None:
        """Its IPv4 address on the stack's bridge, reachable from the host (None without one:
        ``network_mode`` ``none`` or ``host``, or not started)."""
        address = self.stack._supervisor.network.address(self.name)
        return str(address) if address is not None else None

    @property
    def ports(self) -> tuple[PublishedPort, ...]:
        """Its published ports, with the host ports actually bound (``ports = ["8080:80"]``)."""
        return parse_published_ports(list(self.stack._supervisor.ports_of(self.name)))

    def port(self, container_port: int, protocol: str = "tcp") -> tuple[str, int]:
        """``(host_ip, host_port)`` where `container_port` is published on the host; StackdError if it is not."""
        for published in self.ports:
            if published.container_port == container_port and published.protocol == protocol:
                return published.address
        shown = ", ".join(str(p) for p in self.ports) or "none"
        raise StackdError(
            f"service {self.name}: port {container_port}/{protocol} is not published (published: {shown})"
        )

    @property
    def status(self) -> ServiceStatus:
        """Its state now (state, health, pid, restarts, exit code...), as ``stackd ps`` shows it."""
        return next(s for s in self.stack.status() if s.name == self.name)

    @property
    def pid(self) -> int | None:
        """The host pid of its main process while it runs."""
        return self.status.pid

    @property
    def health(self) -> str | None:
        """``"starting"``, ``"healthy"`` or ``"unhealthy"`` while it runs; None without a health check."""
        return self.status.health

    def stats(self) -> ServiceStats | None:
        """Its resource use now (None before its first start)."""
        return next((s for s in self.stack.stats() if s.name == self.name), None)

    async def exec(
        self,
        command: Sequence[str] | str,
        *,
        user: str | int | None = None,
        env: Mapping[str, str] | None = None,
        working_dir: str | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run `command` inside this service; see :meth:`Stack.exec`."""
        return await self.stack.exec(
            self.name,
            command,
            user=user,
            env=env,
            working_dir=working_dir,
            input=input,
            timeout=timeout,
            check=check,
        )

    def logs(
        self, *, follow: bool = False, tail: int | None = None, since: datetime | float | None = None
    ) -> AsyncIterator[LogLine]:
        """Its log lines; see :meth:`Stack.logs`."""
        return self.stack.logs(self.name, follow=follow, tail=tail, since=since)

    def log_text(self, *, tail: int | None = None) -> str:
        """Its log as text, one line per line written; see :meth:`Stack.log_text`."""
        return self.stack.log_text(self.name, tail=tail, prefix=False)

    async def wait_for_log(self, pattern: str | re.Pattern[str], *, timeout: float = 60.0) -> LogLine:
        """The first line of its log that contains `pattern` (a string, or a regex searched); see
        :meth:`Stack.wait_for_log`."""
        return await self.stack.wait_for_log(self.name, pattern, timeout=timeout)

    async def wait_healthy(self, *, timeout: float = 60.0) -> None:
        """Until it is healthy (running, for a service without a health check)."""
        await self.stack.wait_healthy(self.name, timeout=timeout)

    async def wait_started(self, *, timeout: float = 60.0) -> None:
        """Until it runs (or completed with code 0)."""
        await self.stack.wait_started(self.name, timeout=timeout)

    async def start(self, *, wait: Wait = "started", timeout: float = 60.0) -> None:
        """Start it (and what it depends on) if it is not running."""
        await self.stack.start(self.name, wait=wait, timeout=timeout)

    async def stop(self, *, timeout: float | None = None) -> None:
        """Stop it; it is not restarted (see :meth:`Stack.stop`)."""
        await self.stack.stop(self.name, timeout=timeout)

    async def restart(self, *, timeout: float | None = None, wait: Wait = "started") -> None:
        """Stop it if it runs and start it again (see :meth:`Stack.restart`)."""
        await self.stack.restart(self.name, timeout=timeout, wait=wait)

    async def kill(self, signal: int | str = signal_module.SIGKILL) -> None:
        """Send `signal` to its main process; its restart policy applies (see :meth:`Stack.kill`)."""
        await self.stack.kill(self.name, signal=signal)

    async def pause(self) -> None:
        """Freeze its processes (cgroup freezer)."""
        await self.stack.pause(self.name)

    async def unpause(self) -> None:
        """Thaw its processes."""
        await self.stack.unpause(self.name)


class Stack:
    """A running stack, as :func:`open_stack` yields it: its services, their addresses and ports, their
    logs and events, and operations on them. Valid inside the ``async with`` block; afterwards what it
    tells is final (statuses, logs on disk) and its operations raise StackdError."""

    def __init__(
        self,
        spec: StackSpec,
        *,
        supervisor: StackSupervisor,
        router: LogRouter,
        hub: EventHub,
        history: deque[Event],
        selected: list[str],
    ) -> None:
        self.spec = spec
        self._supervisor = supervisor
        self._router = router
        self._hub = hub
        self._history = history
        self._selected = selected
        self._services = {name: Service(self, name) for name in spec.services}
        self._live: set[anyio.CancelScope] = set()
        self._closed = False
        self._up_error: BaseException | None = None
        self._loop_thread = threading.get_ident()
        self._portal: BlockingPortal | None = None
        # Set once its services are stopped (their output on disk, their ports free), before its
        # cgroups, network and state are removed: open_stack_in_thread(defer_cleanup=...) waits for this.
        self._services_down = threading.Event()

    def __repr__(self) -> str:
        return f"<stackd.Stack {self.project} services={list(self._services)}{' closed' if self._closed else ''}>"

    # -- what it is ------------------------------------------------------------------------------------

    @property
    def project(self) -> str:
        """The project name: names its state, logs, cgroups (``stackd ps -p PROJECT`` shows it)."""
        return self.spec.name

    @property
    def services(self) -> Mapping[str, Service]:
        """Every service of the stack file, in its order (also those not started)."""
        return self._services

    def __getitem__(self, name: str) -> Service:
        try:
            return self._services[name]
        except KeyError:
            raise KeyError(f"no such service: {name} (services: {', '.join(self._services)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._services)

    def __len__(self) -> int:
        return len(self._services)

    def __contains__(self, name: object) -> bool:
        return name in self._services

    @property
    def state_dir(self) -> Path:
        """The stack's state directory (``<state root>/<project>``)."""
        return self._supervisor.paths.state

    @property
    def log_dir(self) -> Path:
        """The stack's log directory (``<log root>/<project>``): ``<service>.log`` per service; it
        outlives the stack."""
        return self._supervisor.paths.logs

    @property
    def closed(self) -> bool:
        """Whether the stack was torn down (the ``async with`` block ended)."""
        return self._closed

    # -- state -----------------------------------------------------------------------------------------

    def status(self) -> list[ServiceStatus]:
        """Every service's state now, in the stack file's order (``stackd ps``)."""
        return self._supervisor.status()

    def stats(self) -> list[ServiceStats]:
        """The resource use of every service that has a cgroup (``stackd stats``)."""
        return self._supervisor.stats()

    @property
    def history(self) -> list[Event]:
        """Every event since the stack was opened (the latest 10 000)."""
        return list(self._history)

    def events(self, *services: str) -> AsyncIterator[Event]:
        """The stack's events from now on (of `services` only, if given), until the stack is closed."""
        self._check_names(services)
        if self._crossing():
            return _CrossLoopIterator(self, self._portal_call(self.events, *services))
        subscription = self._hub.subscribe(services or None, max_items=EVENT_QUEUE)
        return _LiveIterator(self, _events(subscription), on_close=subscription.close)

    # -- waiting ---------------------------------------------------------------------------------------

    @_on_stack_loop
    async def wait_healthy(self, *services: str, timeout: float = 60.0) -> None:
        """Until every service named (default: every service started) is healthy, or running when it has
        no health check, or completed with code 0. Raises NotReadyError when one fails (exits, turns
        unhealthy, a dependency fails) or `timeout` seconds pass, with the last lines of its log."""
        await self._wait(services, healthy=True, timeout=timeout)

    @_on_stack_loop
    async def wait_started(self, *services: str, timeout: float = 60.0) -> None:
        """Until every service named (default: every service started) runs, or completed with code 0.
        Raises NotReadyError as :meth:`wait_healthy` does."""
        await self._wait(services, healthy=False, timeout=timeout)

    async def _wait(self, services: Sequence[str], *, healthy: bool, timeout: float | None) -> None:
        self._check_open()
        self._check_names(services)
        names = list(services) or list(self._selected)
        states = await wait_ready(self._supervisor, names, self._hub, healthy=healthy, timeout=timeout)
        if self._up_error is not None:
            raise self._up_error
        bad = {name: detail for name, (state, detail) in states.items() if state != "ready"}
        if bad:
            waited = "healthy" if healthy else "started"
            timed_out = all(states[name][0] == "waiting" for name in bad)
            head = (
                f"project {self.project}: not {waited} after {timeout:g}s"
                if timed_out and timeout is not None
                else f"project {self.project}: not {waited}"
            )
            lines = [head + ": " + ", ".join(f"{name} ({detail})" for name, detail in bad.items())]
            for name in bad:
                text = self.log_text(name, tail=_REPORT_LINES, prefix=False)
                if text:
                    lines.append(f"--- last lines of {name}'s log ({log_path(self.log_dir, name)}):")
                    lines.append(text.rstrip("\n"))
            raise NotReadyError("\n".join(lines), bad)

    @_on_stack_loop
    async def wait_for_log(self, service: str, pattern: str | re.Pattern[str], *, timeout: float = 60.0) -> LogLine:
        """The first line of `service`'s log (from its start) that contains `pattern` (a string), or
        that the regex `pattern` matches (``re.search``). TimeoutError after `timeout` seconds."""
        self._check_names([service])

        def matches(line: LogLine) -> bool:
            if isinstance(pattern, re.Pattern):
                return pattern.search(line.text) is not None
            return pattern in line.text

        with anyio.fail_after(timeout):
            iterator = self.logs(service, follow=True)
            try:
                async for line in iterator:
                    if matches(line):
                        return line
            finally:
                await iterator.aclose()  # type: ignore[attr-defined]
        raise StackdError(f"service {service}: the stack closed before its log showed {pattern!r}")

    # -- exec ------------------------------------------------------------------------------------------

    @_on_stack_loop
    async def exec(
        self,
        service: str,
        command: Sequence[str] | str,
        *,
        user: str | int | None = None,
        env: Mapping[str, str] | None = None,
        working_dir: str | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run `command` inside a running service, as ``stackd exec`` does: in its namespaces and cgroup,
        as its user (or `user`), with its confinement; its environment plus `env`.

        `command` is an argv list, or a string run by ``/bin/sh -c``. `input` is written to its stdin
        (default: /dev/null). Returns its exit code and its whole stdout and stderr. After `timeout`
        seconds it is killed and TimeoutError raised. With `check`, a non-zero exit raises ExecError.
        ExecError also when it cannot be started (no such command, the service is not running).
        """
        self._check_open()
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else [str(a) for a in command]
        if not argv:
            raise ValueError("exec: empty command")
        runner = self._supervisor.runner(service)
        if not runner.active or runner.pid is None or runner.instance is None or runner.state != "running":
            raise ExecError(f"service {service} is not running (state: {runner.state})")
        plan = exec_plan(
            runner.instance.plan,
            runner.pid,
            argv,
            user=user,
            env={str(k): str(v) for k, v in (env or {}).items()},
            working_dir=working_dir,
        )
        launcher = self._supervisor.launcher
        fds: list[int] = []
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            fds += [out_r, out_w]
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds += [err_r, err_w]
            in_r = in_w = -1
            data = input.encode() if isinstance(input, str) else input
            if data is not None:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                fds += [in_r, in_w]
            try:
                pid = await launcher.exec(plan, stdin=in_r, stdout=out_w, stderr=err_w)
            except LaunchError as error:
                why = error.detail or str(error)
                raise ExecError(f"service {service}: cannot run {argv[0]}: {why}") from None
            for fd in (out_w, err_w, in_r):  # the command holds its own copies now
                if fd >= 0:
                    os.close(fd)
                    fds.remove(fd)
            buffers: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray()}
            ended = {out_r: anyio.Event(), err_r: anyio.Event()}
            for fd in (out_r, err_r):
                os.set_blocking(fd, False)
            exit = None
            try:
                with anyio.fail_after(timeout):
                    async with anyio.create_task_group() as group:
                        for fd in (out_r, err_r):
                            group.start_soon(_read_to_end, fd, buffers[fd], ended[fd])
                        if data is not None:
                            os.set_blocking(in_w, False)
                            fds.remove(in_w)
                            group.start_soon(_write_all_and_close, in_w, data)
                        exit = await launcher.wait(pid)
                        # Read to the end; but a daemonised grandchild may hold the pipes open: what was
                        # written until shortly after the command's exit counts, not what comes later.
                        with anyio.move_on_after(0.5):
                            for event in ended.values():
                                await event.wait()
                        group.cancel_scope.cancel()
            except BaseException as error:  # a timeout, or the caller cancelled: the command goes too
                if launcher.exited(pid) is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal_module.SIGKILL)
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await launcher.wait(pid)
                if isinstance(error, TimeoutError):
                    raise TimeoutError(f"service {service}: {argv[0]} did not finish within {timeout:g}s") from None
                raise
            for fd in (out_r, err_r):
                _drain(fd, buffers[fd])
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        assert exit is not None
        code = exit.code if exit.code is not None else 128 + (exit.signal or 0)
        result = ExecResult(code, bytes(buffers[out_r]), bytes(buffers[err_r]))
        if check and code != 0:
            detail = result.stderr.decode(errors="replace").strip()[-2000:]
            raise ExecError(
                f"service {service}: {' '.join(argv)} exited with code {code}" + (f": {detail}" if detail else ""),
                result,
            )
        return result

    # -- logs ------------------------------------------------------------------------------------------

    def logs(
        self,
        service: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: datetime | float | None = None,
    ) -> AsyncIterator[LogLine]:
        """The lines of `service`'s log: those on disk now, and with `follow` every new one as it is
        written, until you stop iterating or the stack is closed. `tail`: only the last N lines on disk;
        `since`: only lines written from then on (a datetime, or seconds since the epoch).

        The log is on disk (``<log dir>/<service>.log``), so it can also be read after the stack is
        closed (without `follow`)."""
        self._check_names([service])
        if self._crossing() and follow:
            return _CrossLoopIterator(self, self._portal_call(self.logs, service, follow=True, tail=tail, since=since))
        path = log_path(self.log_dir, service)
        if not follow:
            return _lines_of(service, read_log(path, tail=tail, since=since))
        return _LiveIterator(self, _followed(service, follow_log(path, tail=tail, since=since)))

    def log_text(self, *services: str, tail: int | None = None, prefix: bool | None = None) -> str:
        """The logs of `services` (default: all) as text, each line ending in a newline. With several
        services (or `prefix`), each line starts with ``service | ``, and lines are in time order."""
        self._check_names(services)
        names = list(services) or list(self._services)
        prefixed = len(names) > 1 if prefix is None else prefix
        width = max(len(name) for name in names) if names else 0
        lines: list[tuple[bytes, int, str]] = []
        for index, name in enumerate(names):
            for line in read_log(log_path(self.log_dir, name), tail=tail):
                text = line.data.decode(errors="replace")
                lines.append((line.stamp, index, f"{name:<{width}} | {text}" if prefixed else text))
        if prefixed:
            lines.sort(key=lambda item: (item[0], item[1]))
        return "".join(text + "\n" for _, _, text in lines)

    # -- operations ------------------------------------------------------------------------------------

    @_on_stack_loop
    async def start(self, *services: str, wait: Wait = "started", timeout: float = 60.0) -> None:
        """Start the services named (default: all) that are not running, with what they depend on, and
        wait for them as `wait` says (see :func:`open_stack`)."""
        self._check_open()
        self._check_names(services)
        names = list(services) or list(self._services)
        for name in names:
            if not self._supervisor.runners[name].active:
                await self._supervisor.start_service(name)
        self._selected = list(dict.fromkeys([*self._selected, *with_dependencies(self.spec, names)]))
        if wait is not None:
            await self._wait(names, healthy=wait == "healthy", timeout=timeout)

    @_on_stack_loop
    async def stop(self, *services: str, timeout: float | None = None) -> None:
        """Stop the services named (default: all), dependents first: their stop_signal, then SIGKILL
        after `timeout` seconds (default: each one's stop_grace_period). They are not restarted; their
        last output is on disk when this returns."""
        self._check_open()
        self._check_names(services)
        names = list(services) or list(self._services)
        for group in _stop_order(self.spec, names):
            async with anyio.create_task_group() as tasks:
                for name in group:
                    tasks.start_soon(functools.partial(self._supervisor.stop_service, name, grace=timeout))

    @_on_stack_loop
    async def restart(self, *services: str, timeout: float | None = None, wait: Wait = "started") -> None:
        """Stop the services named (default: all) if they run, start them again, and wait as `wait` says."""
        self._check_open()
        self._check_names(services)
        names = list(services) or list(self._services)
        for name in names:
            await self._supervisor.restart_service(name, grace=timeout)
        if wait is not None:
            await self._wait(names, healthy=wait == "healthy", timeout=60.0)

    @_on_stack_loop
    async def kill(self, *services: str, signal: int | str = signal_module.SIGKILL) -> None:
        """Send `signal` (a number or a name, ``"SIGHUP"`` or ``"HUP"``) to the main process of the
        services named (default: every running one); their restart policies apply to the exit."""
        self._check_open()
        self._check_names(services)
        number = _signal_number(signal)
        names = list(services) or [n for n, r in self._supervisor.runners.items() if r.active]
        for name in names:
            self._supervisor.kill_service(name, number)

    @_on_stack_loop
    async def pause(self, *services: str) -> None:
        """Freeze every process of the services named (default: all running), with the cgroup freezer."""
        self._check_open()
        self._check_names(services)
        for name in list(services) or [n for n, r in self._supervisor.runners.items() if r.active]:
            await self._supervisor.pause_service(name)

    @_on_stack_loop
    async def unpause(self, *services: str) -> None:
        """Thaw the services named (default: every paused one)."""
        self._check_open()
        self._check_names(services)
        for name in list(services) or [n for n, r in self._supervisor.runners.items() if r.paused]:
            await self._supervisor.unpause_service(name)

    # -- internals -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StackdError(f"project {self.project} is closed (the open_stack block has ended)")

    def _check_names(self, names: Sequence[str]) -> None:
        unknown = [name for name in names if name not in self._services]
        if unknown:
            raise StackdError(f"no such service: {', '.join(unknown)} (services: {', '.join(self._services)})")

    def _crossing(self) -> bool:
        """Whether this call comes from outside the stack's own event loop thread (and must be handed over)."""
        return self._portal is not None and threading.get_ident() != self._loop_thread

    def _portal_call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._portal is not None
        return self._portal.call(functools.partial(function, *args, **kwargs))

    def _close(self) -> None:
        self._closed = True
        for scope in list(self._live):
            scope.cancel()
        self._hub.close()


async def _events(subscription: EventSubscription) -> AsyncIterator[Event]:
    while True:
        try:
            records = await subscription.receive()
        except anyio.EndOfStream:
            if subscription.overflowed:
                raise StackdError(f"events: the reader fell more than {subscription.max_items} events behind") from None
            return
        for record in records:
            yield Event.from_record(record)


def _line(service: str, line: _FileLine) -> LogLine:
    when = datetime.fromisoformat(line.stamp.decode().replace("Z", "+00:00"))
    return LogLine(service, line.stream, when, line.data, line.complete)


async def _lines_of(service: str, lines: Iterator[_FileLine]) -> AsyncIterator[LogLine]:
    for line in lines:
        yield _line(service, line)


async def _followed(service: str, lines: AsyncIterator[_FileLine]) -> AsyncIterator[LogLine]:
    try:
        async for line in lines:
            yield _line(service, line)
    finally:
        close = getattr(lines, "aclose", None)
        if close is not None:
            await close()


def _signal_number(sig: int | str) -> int:
    if isinstance(sig, int):
        return int(sig)
    name = sig.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal_module.Signals[name])
    except KeyError:
        raise StackdError(f"no such signal: {sig}") from None


def _stop_order(spec: StackSpec, names: list[str]) -> list[list[str]]:
    """`names` in groups to stop one after the other: every service after all that depend on it."""
    left = list(dict.fromkeys(names))
    groups: list[list[str]] = []
    while left:
        group = [n for n in left if not any(n in needs(spec.services[other]) for other in left if other != n)]
        if not group:  # a cycle cannot pass validation; stop the rest together anyway
            group = left
        groups.append(group)
        left = [n for n in left if n not in group]
    return groups


async def _read_to_end(fd: int, buffer: bytearray, ended: anyio.Event) -> None:
    try:
        while True:
            await anyio.wait_readable(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                return
            buffer += data
    finally:
        ended.set()


def _drain(fd: int, buffer: bytearray) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return
        if not data:
            return
        buffer += data


async def _write_all_and_close(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            await anyio.wait_writable(fd)
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                return  # it did not read all its input: its business
            view = view[written:]
    finally:
        os.close(fd)


# --- liveness of another process's stack ------------------------------------------------------------------


def supervisor_alive(paths: StackPaths) -> int | None:
    """The pid of the live process that runs the project of `paths`, or None when none does (no record,
    or its writer died: what it left may be removed). Any process counts, not only `stackd`: the Python
    API runs a supervisor inside test runners and tools; the record's start time tells a reused pid apart."""
    record = StateRecord.load(paths)
    if record is None or not record.supervisor_alive():
        return None
    return record.supervisor_pid


# --- open_stack -------------------------------------------------------------------------------------------


@asynccontextmanager
async def open_stack(
    spec: SpecLike,
    *,
    project: str | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    services: Sequence[str] | None = None,
    wait: Wait = "healthy",
    timeout: float = 60.0,
    stop_timeout: float | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Stack]:
    """Bring a stack up for the ``async with`` block and always tear it down afterwards.

    - `spec`: a stack file (or a directory holding ``stack.toml``), a dict with the stack file's keys,
      or a :class:`stackd.spec.Stack`; validated as ``stackd config`` does (StackFileError lists every
      problem before anything touches the host).
    - `project`: the project name (default: the file's ``name`` key, else its directory's name; for a
      dict, the current directory's name). One project runs once at a time on a host: StackdError if
      another live process has it up; what a dead one left behind is removed first.
    - `env`: the environment ``${VAR}`` interpolation reads (default: ``os.environ``).
    - `base_dir`: where the relative paths of a dict or a model start (default: the current directory).
    - `services`: start only these (and what they depend on); default all.
    - `wait`: ``"healthy"`` (default): the block starts once every service started runs and, when it has
      a health check, is healthy (a one-shot: completed with code 0); ``"started"``: once they run;
      None: at once. NotReadyError (with the last log lines) when one fails or `timeout` passes.
    - `stop_timeout`: seconds between the stop signal and SIGKILL at teardown (default: each service's
      ``stop_grace_period``).
    - `state_dir`, `log_dir`: the roots of state and logs (default: ``/run/stackd`` and
      ``/var/log/stackd``, or ``$STACKD_STATE_DIR`` and ``$STACKD_LOG_DIR``, as the CLI).

    Teardown stops every service (dependents first), then removes cgroups, network namespaces, links
    and state, shielded from cancellation; the logs stay in ``<log_dir>/<project>``.
    """
    stack_spec = resolve_spec(spec, project=project, env=env, base_dir=base_dir)
    if services:
        unknown = [name for name in services if name not in stack_spec.services]
        if unknown:
            known = ", ".join(stack_spec.services)
            raise StackdError(f"no such service: {', '.join(unknown)} (services: {known})")
    paths = StackPaths(
        stack_spec.name,
        state_root=Path(state_dir) if state_dir is not None else DEFAULT_STATE_ROOT,
        log_root=Path(log_dir) if log_dir is not None else DEFAULT_LOG_ROOT,
    )
    running = supervisor_alive(paths)
    if running is not None:
        raise StackdError(
            f"project {stack_spec.name} is already up (process {running}): choose another project name, "
            f"or stop it (`stackd down -p {stack_spec.name}`)"
        )
    hub = EventHub()
    history: deque[Event] = deque(maxlen=EVENTS_KEPT)

    def emit(event: str, service: str, **fields: Any) -> None:
        hub.publish(event, service, fields)
        history.append(Event(datetime.now(UTC), event, service or None, {key: value for key, value in fields.items()}))

    selected = with_dependencies(stack_spec, list(services or stack_spec.services))

    async def run(*, task_status: anyio.abc.TaskStatus[Stack]) -> None:
        """The stack's life, in a task of its own, shielded: an outer cancellation (a timeout around the
        block, Ctrl-C under asyncio.run) must not cut the launcher's and the log router's tasks while the
        services are being stopped; the block ends, then `stop` starts the teardown."""
        with anyio.CancelScope(shield=True):
            async with (
                LogRouter(paths.logs) as router,
                StackSupervisor.open(stack_spec, emit=emit, output=router, paths=paths) as supervisor,
            ):
                handle = Stack(
                    stack_spec, supervisor=supervisor, router=router, hub=hub, history=history, selected=selected
                )
                try:
                    async with anyio.create_task_group() as tasks:

                        async def up() -> None:
                            try:
                                await supervisor.up(selected)
                            except Exception as error:  # reported by the wait, or by the next one
                                handle._up_error = error
                                emit("up-failed", "", error=str(error))

                        tasks.start_soon(up)
                        task_status.started(handle)
                        await stop.wait()
                        tasks.cancel_scope.cancel()
                finally:
                    handle._close()
                    try:
                        await supervisor.down(grace=stop_timeout)
                    finally:
                        handle._services_down.set()

    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as group:
            try:
                handle = await group.start(run)
                try:
                    for hook in list(_on_open):
                        hook(handle)
                    if wait is not None:
                        await handle._wait(selected, healthy=wait == "healthy", timeout=timeout)
                    elif handle._up_error is not None:
                        raise handle._up_error
                    yield handle
                finally:
                    handle._close()
            finally:
                stop.set()
    except BaseExceptionGroup as group:
        # Task groups (ours, the supervisor's) wrap what the block raised: give the caller its own
        # exception back (pytest.raises(MyError), except KeyboardInterrupt), unless there are several.
        leaves = leaf_exceptions(group)
        if len(leaves) != 1:
            raise
        error, context = leaves[0], leaves[0].__context__
        try:
            raise error
        finally:
            error.__context__ = context
