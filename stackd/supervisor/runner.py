"""One service's life under the supervisor: start, watch, restart with backoff, stop.

States: created -> starting -> running -> exited | restarting -> ... ; stop() leads to stopped.
Each transition is reported through `emit(event, service, **fields)`; the runner's Events let the
dependency walker wait for "started" and "completed successfully".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import anyio

from stackd.errors import LaunchError
from stackd.runtime.instance import HostFacts, Instance, prepare
from stackd.runtime.launcher import Exit, Launcher
from stackd.runtime.paths import StackPaths
from stackd.runtime.plan import Mount
from stackd.spec.models import Service
from stackd.spec.signals import signal_number
from stackd.supervisor.health import HealthWatcher, Probe
from stackd.supervisor.restart import Backoff, RestartState, should_restart
from stackd.supervisor.state import StateRecord

__all__ = ["OutputSink", "ServiceRunner"]

Emit = Callable[..., None]


class ServicePipes(Protocol):
    """The output pipes of one run of a service (stackd.supervisor.router.ServiceOutput)."""

    stdout: int
    stderr: int

    def close_write_ends(self) -> None: ...

    async def wait(self) -> None: ...


class ServiceNetwork(Protocol):
    """What the stack's network gives a service (stackd.supervisor.network.StackNetworking)."""

    def attachment(self, name: str) -> tuple[str | None, tuple[Mount, ...]]: ...


class OutputSink(Protocol):
    """Where a service's output goes: new pipes for every run (the log router)."""

    def attach(self, service: str) -> ServicePipes: ...


def reaches(pid: int, sig: int) -> bool:
    """Whether `sig` sent to `pid` can do anything. A service's main process is pid 1 of its pid
    namespace, and the kernel drops a signal that pid 1 neither catches nor ignores (its default action
    never applies to pid 1): waiting a grace period for it to act on it would be waiting for nothing.
    SIGKILL and SIGSTOP always reach it; so does everything when /proc cannot tell."""
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if line.startswith(("SigCgt", "SigIgn")))
    bit = 1 << (sig - 1)
    return any(int(masks.get(key, "0"), 16) & bit for key in ("SigCgt", "SigIgn"))


class ServiceRunner:
    """Runs one service until it is stopped or its restart policy gives up."""

    def __init__(
        self,
        service: Service,
        *,
        project: str,
        paths: StackPaths,
        facts: HostFacts,
        launcher: Launcher,
        record: StateRecord,
        output: OutputSink,
        emit: Emit,
        backoff: Backoff | None = None,
        network: ServiceNetwork | None = None,
    ) -> None:
        self.service = service
        self.name = service.name
        self._project, self._paths, self._facts = project, paths, facts
        self._launcher, self._record, self._output, self._emit = launcher, record, output, emit
        self._network = network
        self.restart = RestartState(backoff or Backoff(**dataclasses.asdict(service.restart_backoff)))
        self.state = "created"
        self.pid: int | None = None
        self.last_exit: Exit | None = None
        self.last_reason = ""
        self.instance: Instance | None = None
        self.started = anyio.Event()  # set at the first successful start
        self.healthy = anyio.Event()  # set the first time the health check passes
        self.health: str | None = None  # "starting", "healthy", "unhealthy"; None without a healthcheck
        self._restart_unhealthy = False
        self._unhealthy = anyio.Event()
        self.finished = anyio.Event()  # set when the runner will not start the service again
        self._stop_requested = False
        self._stop_event = anyio.Event()
        self._started_at = 0.0
        self.started_wall: float | None = None  # time.time() of the latest start, for `ps`
        self.paused = False
        self._pipes: ServicePipes | None = None

    # -- the main loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Start the service and keep it running as its restart policy says; return when done."""
        try:
            while not self._stop_requested:
                try:
                    await self._start_once()
                except LaunchError as error:
                    if self._stop_requested:  # stopped while starting: its cgroup was killed, no failure
                        self.state = "stopped"
                        return
                    self.state = "exited"
                    self.last_reason = str(error)
                    self._emit("failed", self.name, error=str(error))
                    return
                exit = await self._watch(self.pid or 0)
                if self._pipes is not None:
                    with anyio.move_on_after(5):  # a grandchild may still hold the pipes open
                        await self._pipes.wait()  # its last words are on disk before its exit is told
                self._exited(exit)
                ran_for = time.monotonic() - self._started_at
                self.restart.on_exit(ran_for)
                unhealthy, self._restart_unhealthy = self._restart_unhealthy, False
                if not unhealthy and not should_restart(
                    self.service.restart,
                    code=exit.code,
                    signal=exit.signal,
                    restarts=self.restart.restarts,
                    stopped_by_user=self._stop_requested,
                ):
                    return
                delay = self.restart.next_delay()
                self.state = "restarting"
                self._emit("restarting", self.name, delay=round(delay, 3), restarts=self.restart.restarts)
                with anyio.move_on_after(delay):
                    await self._stop_event.wait()
        finally:
            process_gone = self.pid is None or self._launcher.exited(self.pid) is not None
            if process_gone and self.state not in ("exited", "stopped"):
                self.state = "stopped" if self._stop_requested else "exited"
            self.finished.set()

    async def _start_once(self) -> None:
        self.state = "starting"
        if self.instance is None:
            cgroup_paths = [str(p) for p in self._facts.driver.service_paths(self._project, self.name)]
            self._record.add("cgroup", self.name, paths=cgroup_paths)
            self._record.add("dir", self.name, path=str(self._paths.service(self.name)))
            self.instance = await anyio.to_thread.run_sync(self._prepare)
        self._pipes = self._output.attach(self.name)
        try:
            self.instance.mark_started()
            self.pid = await self._launcher.launch(
                self.instance.plan, stdout=self._pipes.stdout, stderr=self._pipes.stderr
            )
        finally:
            self._pipes.close_write_ends()  # the service holds its own copies (or failed to start)
        self._started_at = time.monotonic()
        self.started_wall = time.time()
        self.state = "running"
        self._emit("started", self.name, pid=self.pid)
        self.started.set()

    async def _watch(self, pid: int) -> Exit:
        """Wait for the process to end, probing its health meanwhile when it has a healthcheck."""
        check = self.service.healthcheck
        if check is None or self.instance is None:
            return await self._launcher.wait(pid)
        self.health = "starting"
        self._unhealthy = anyio.Event()
        watcher = HealthWatcher(
            check, launcher=self._launcher, plan=self.instance.plan, pid=pid, on_change=self._health_changed
        )
        async with anyio.create_task_group() as group:
            group.start_soon(watcher.run)
            if check.on_unhealthy == "restart":
                group.start_soon(self._restart_when_unhealthy, pid)
            exit = await self._launcher.wait(pid)
            group.cancel_scope.cancel()
        return exit

    def _health_changed(self, status: str, probe: Probe) -> None:
        going = self._stop_requested or (self.pid is not None and self._launcher.exited(self.pid) is not None)
        if status == "unhealthy" and going:
            return  # the probe failed because the service is stopping or has ended: that is reported
        self.health = status
        self._emit(status, self.name, detail=probe.detail[-200:])
        if status == "healthy":
            self.healthy.set()
        else:
            self._unhealthy.set()

    async def _restart_when_unhealthy(self, pid: int) -> None:
        """healthcheck.on_unhealthy = "restart": stop the process as `stop` would; run() starts it again."""
        await self._unhealthy.wait()
        self._restart_unhealthy = True
        self._emit("restarting-unhealthy", self.name, signal=self.service.stop_signal)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal_number(self.service.stop_signal))
        await anyio.sleep(self.service.stop_grace_period)
        if self._launcher.exited(pid) is None and self.instance is not None:
            await anyio.to_thread.run_sync(self.instance.cgroup.kill)

    def _prepare(self) -> Instance:
        join_netns, binds = self._network.attachment(self.name) if self._network else (None, ())
        return prepare(
            self.service,
            project=self._project,
            paths=self._paths,
            facts=self._facts,
            join_netns=join_netns,
            extra_binds=binds,
        )

    def _exited(self, exit: Exit) -> None:
        if self.last_exit is not None and self.last_exit.pid == exit.pid:
            return  # already reported (by run() or by stop(), whichever saw it first)
        self.last_exit = exit
        self.last_reason = self.instance.exit_reason(exit) if self.instance else str(exit)
        self.state = "exited"
        fields: dict[str, Any] = {"pid": exit.pid, "reason": self.last_reason}
        if exit.code is not None:
            fields["code"] = exit.code
        if self.instance is not None and self.instance.oom_killed(exit):
            self._emit("oom", self.name, limit=self.service.mem_limit)
        self._emit("exited", self.name, **fields)

    @property
    def active(self) -> bool:
        """Whether the runner is running the service (or about to start or restart it)."""
        return self.state in ("starting", "running", "restarting", "stopping") and not self.finished.is_set()

    def rearm(self) -> None:
        """Make a finished runner ready to run() again (`stackd start` / `restart` of the service)."""
        self._stop_requested = False
        self._stop_event = anyio.Event()
        self.finished = anyio.Event()
        self.state = "created"

    def send_signal(self, sig: int) -> None:
        """Signal the service's main process (`stackd kill`); its restart policy then applies."""
        if self.pid is None or not self.active or self._launcher.exited(self.pid) is not None:
            raise ProcessLookupError(f"service {self.name} is not running")
        os.kill(self.pid, sig)

    async def pause(self) -> None:
        """Freeze every process of the service (cgroup freezer)."""
        if self.instance is None or not self.active:
            raise ProcessLookupError(f"service {self.name} is not running")
        await anyio.to_thread.run_sync(self.instance.cgroup.freeze)
        self.paused = True
        self._emit("paused", self.name)

    async def unpause(self) -> None:
        if self.instance is None or not self.paused:
            raise ProcessLookupError(f"service {self.name} is not paused")
        await anyio.to_thread.run_sync(self.instance.cgroup.thaw)
        self.paused = False
        self._emit("unpaused", self.name)

    # -- stopping --------------------------------------------------------------------------------

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop the service: its stop_signal, then SIGKILL to its whole cgroup after the grace period."""
        self._stop_requested = True
        self._stop_event.set()
        if self.paused and self.instance is not None:  # a frozen process cannot handle its stop signal
            await anyio.to_thread.run_sync(self.instance.cgroup.thaw)
            self.paused = False
        grace = self.service.stop_grace_period if grace is None else grace
        if self.state in ("running", "starting") and self.pid is not None and self.last_exit_pid != self.pid:
            self.state = "stopping"
            number = signal_number(self.service.stop_signal)
            # With `init`, pid 1 is tini: it takes every signal with sigtimedwait, which /proc cannot
            # show (the waited signals are unblocked while it waits), and passes it on.
            if self.service.init or reaches(self.pid, number):
                self._emit("stopping", self.name, signal=self.service.stop_signal, grace=grace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, number)
                with anyio.move_on_after(grace):
                    await self._launcher.wait(self.pid)
                if self._launcher.exited(self.pid) is None:
                    self._emit("killing", self.name, after=grace)
            else:
                self._emit(
                    "killing",
                    self.name,
                    after=0,
                    reason=f"pid 1 of the service has no {self.service.stop_signal} handler: the kernel would drop it",
                )
        if self.instance is not None:
            await anyio.to_thread.run_sync(self.instance.cgroup.kill)
            if self.pid is not None:
                self._exited(await self._launcher.wait(self.pid))
        self.state = "stopped"

    @property
    def last_exit_pid(self) -> int | None:
        return self.last_exit.pid if self.last_exit else None

    async def remove(self) -> None:
        """Remove the service's cgroup and state (after stop)."""
        if self.instance is not None:
            await anyio.to_thread.run_sync(self.instance.dispose)
            self._record.discard("cgroup", self.name)
            self._record.discard("dir", self.name)
            self.instance = None
