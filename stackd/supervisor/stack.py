"""A whole stack under one supervisor: start in dependency order, run, stop in reverse order, clean up.

    async with StackSupervisor.open(stack, emit=emit, output=router) as supervisor:
        await supervisor.up()            # returns when every service has finished (or stop() was called)
    # leaving the block stops what still runs (reverse order) and removes every host resource

One dependency walk serves both directions: a service starts once what it depends on reached the
condition asked (service_started, service_completed_successfully); it stops once everything that
depends on it has stopped.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import anyio
import anyio.abc

from stackd.errors import StackdError
from stackd.runtime.instance import HostFacts
from stackd.runtime.launcher import Launcher
from stackd.runtime.network.publish import PortPublisher
from stackd.runtime.paths import StackPaths
from stackd.spec.graph import needs, with_dependencies
from stackd.spec.models import Service, Stack
from stackd.supervisor.cleanup import remove_recorded
from stackd.supervisor.network import StackNetworking
from stackd.supervisor.reconcile import Changes, reconcile
from stackd.supervisor.runner import Emit, OutputSink, ServiceRunner
from stackd.supervisor.state import StateRecord
from stackd.supervisor.status import ServiceStats, ServiceStatus, service_stats, service_status

__all__ = ["StackSupervisor"]


class StackSupervisor:
    """Owns the launcher, the runners and the state record of one running stack."""

    def __init__(
        self,
        stack: Stack,
        *,
        paths: StackPaths,
        launcher: Launcher,
        record: StateRecord,
        emit: Emit,
        output: OutputSink,
    ) -> None:
        self.stack = stack
        self.paths = paths
        self.record = record
        self._emit = emit
        self.launcher = launcher  # also runs `stackd exec` (supervisor/control.py)
        self._facts, self._output = HostFacts.gather(), output
        self.network = StackNetworking(stack, paths, record)
        self.publisher = PortPublisher()  # published ports: listeners of this process (no task, no rule)
        self.runners = {name: self.new_runner(service) for name, service in stack.services.items()}
        self._selected: list[str] = []
        self._stopping = False
        self._tasks: anyio.abc.TaskGroup | None = None  # where services run; open while the supervisor is
        # Each service's task is shielded from the caller's cancellation, so that a cancelled supervisor
        # still stops its services the orderly way (down() needs their tasks); open() ends them after.
        self._service_scopes: set[anyio.CancelScope] = set()

    def new_runner(self, service: Service) -> ServiceRunner:
        return ServiceRunner(
            service,
            project=self.stack.name,
            paths=self.paths,
            facts=self._facts,
            launcher=self.launcher,
            record=self.record,
            output=self._output,
            emit=self._emit,
            network=self.network,
        )

    async def apply(self, stack: Stack, services: Iterable[str] | None = None) -> Changes:
        """`up -d` again: recreate what changed in `stack`, remove what left it (supervisor/reconcile.py)."""
        return await reconcile(self, stack, list(services) if services else None)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, stack: Stack, *, emit: Emit, output: OutputSink, paths: StackPaths | None = None
    ) -> AsyncIterator[StackSupervisor]:
        """Take the project (refusing when another supervisor runs it), then always stop and clean up."""
        paths = paths or StackPaths(stack.name)
        previous = StateRecord.load(paths)
        if previous is not None:
            if previous.supervisor_alive():
                raise StackdError(
                    f"project {stack.name} is already up (supervisor pid {previous.supervisor_pid}): "
                    f"stop it with `stackd down -p {stack.name}`"
                )
            await remove_recorded(previous)  # what a dead supervisor left behind
        source = str(stack.source.resolve()) if stack.source else ""
        record = StateRecord.for_this_process(paths, source)
        record.save()
        cleaned = False
        try:
            async with Launcher.open() as launcher:
                supervisor = cls(stack, paths=paths, launcher=launcher, record=record, emit=emit, output=output)
                async with anyio.create_task_group() as supervisor._tasks:
                    try:
                        yield supervisor
                    finally:
                        with anyio.CancelScope(shield=True):
                            try:
                                await supervisor.down()
                            finally:
                                await supervisor.publisher.aclose()
                        for scope in list(supervisor._service_scopes):
                            scope.cancel()
                # Every service is gone: the launcher process ends while the rest is removed.
                launcher.begin_close()
                with anyio.CancelScope(shield=True):
                    cleaned = True
                    await _remove_reporting(record, emit)
        finally:
            if not cleaned:
                with anyio.CancelScope(shield=True):
                    await _remove_reporting(record, emit)

    async def up(self, services: Iterable[str] | None = None) -> None:
        """Start the services named (default all) and what they depend on; return when all have finished."""
        names = list(services or self.stack.services)
        unknown = [name for name in names if name not in self.stack.services]
        if unknown:
            raise StackdError(f"no such service: {', '.join(unknown)} (services: {', '.join(self.stack.services)})")
        selected = with_dependencies(self.stack, names)
        await self._start(selected)
        for name in selected:
            await self.runners[name].finished.wait()

    async def _start(self, names: list[str]) -> None:
        """Make the network of these services, then start each once its dependencies are ready."""
        if self._stopping or self._tasks is None:
            raise StackdError(f"project {self.stack.name} is stopping")
        had_network = self.network.network is not None
        await self.network.attach(names)
        if not had_network and self.network.network is not None:
            network = self.network.network
            self._emit("network", "", subnet=str(network.subnet), bridge=network.bridge, gateway=str(network.gateway))
        while self.network.warnings:
            self._emit("warning", "", problem=self.network.warnings.pop(0))
        await self._publish(names)
        self._selected = list(dict.fromkeys([*self._selected, *names]))
        for name in names:
            self._tasks.start_soon(self._run_service, name)

    # -- operations on services of a running stack (stackd start/stop/restart/kill/pause, the API) --

    def runner(self, name: str) -> ServiceRunner:
        """The runner of service `name`; StackdError naming the services when there is none."""
        try:
            return self.runners[name]
        except KeyError:
            raise StackdError(f"no such service: {name} (services: {', '.join(self.stack.services)})") from None

    async def start_service(self, name: str) -> None:
        """Start a service that is not running, with what it depends on that is not running either."""
        self.runner(name)
        wanted = [n for n in with_dependencies(self.stack, [name]) if not self.runners[n].active]
        for n in wanted:
            if self.runners[n].finished.is_set():
                self.runners[n].rearm()
        await self._start(wanted)

    def kill_service(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the service's main process; its restart policy applies to the exit."""
        try:
            self.runner(name).send_signal(sig)
        except ProcessLookupError as error:
            raise StackdError(str(error)) from None

    async def pause_service(self, name: str) -> None:
        """Freeze the service's processes (cgroup freezer) until unpause_service."""
        try:
            await self.runner(name).pause()
        except ProcessLookupError as error:
            raise StackdError(str(error)) from None

    async def unpause_service(self, name: str) -> None:
        try:
            await self.runner(name).unpause()
        except ProcessLookupError as error:
            raise StackdError(str(error)) from None

    def status(self) -> list[ServiceStatus]:
        """Every service's snapshot, in the stack file's order."""
        result = []
        for name, runner in self.runners.items():
            address = self.network.address(name)
            result.append(service_status(runner, address=str(address) if address else None, ports=self.ports_of(name)))
        return result

    def ports_of(self, name: str) -> tuple[str, ...]:
        """The service's published ports as "127.0.0.1:8080->80/tcp" (the actual host ports)."""
        return tuple(str(port) for port in self.publisher.published(name))

    async def _publish(self, names: list[str]) -> None:
        """Listen on the host ports of these services (those not listening yet), before any of them
        starts: a port that cannot be had fails the start with nothing of this call left bound."""
        fresh: list[str] = []
        try:
            for name in names:
                service = self.stack[name]
                address = self.network.address(name)
                if not service.ports or address is None or self.publisher.published(name):
                    continue
                ports = await self.publisher.publish(name, service.ports, address)
                fresh.append(name)
                self._emit("published", name, ports=[str(port) for port in ports])
        except BaseException:
            for name in fresh:
                await self.publisher.unpublish(name)
            raise

    def stats(self) -> list[ServiceStats]:
        """Resource use of every service that has a cgroup."""
        return [s for s in (service_stats(r) for r in self.runners.values()) if s is not None]

    async def stop_service(self, name: str, *, grace: float | None = None) -> None:
        """Stop one service (stop_signal, then SIGKILL after the grace period); it is not restarted.
        Returns once its last output is on disk."""
        runner = self.runner(name)
        was_active = runner.active
        await runner.stop(grace=grace)
        if was_active:
            await runner.finished.wait()
        await self.publisher.unpublish(name)  # as Docker does: a stopped service's ports are free

    async def restart_service(self, name: str, *, grace: float | None = None) -> None:
        """Stop the service if it runs, and start it again."""
        runner = self.runner(name)
        await self.stop_service(name, grace=grace)
        runner.rearm()
        await self._start([name])

    async def _run_service(self, name: str) -> None:
        with anyio.CancelScope(shield=True) as scope:
            self._service_scopes.add(scope)
            try:
                await self._start_when_ready(name)
            finally:
                self._service_scopes.discard(scope)

    async def _start_when_ready(self, name: str) -> None:
        runner = self.runners[name]
        service = runner.service
        for dependency in needs(service):
            if dependency not in self._selected:
                continue
            condition = service.depends_on[dependency].condition if dependency in service.depends_on else None
            target = self.runners[dependency]
            if condition == "service_completed_successfully":
                await target.finished.wait()
                code = target.last_exit.code if target.last_exit else None
                if code != 0:
                    self._emit("dependency-failed", name, dependency=dependency, reason=target.last_reason)
                    runner.finished.set()
                    return
            else:
                awaited = target.healthy if condition == "service_healthy" else target.started
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as race:

                        async def started(awaited: anyio.Event = awaited, scope: anyio.CancelScope = scope) -> None:
                            await awaited.wait()
                            scope.cancel()

                        async def gave_up(target: ServiceRunner = target, scope: anyio.CancelScope = scope) -> None:
                            await target.finished.wait()
                            scope.cancel()

                        race.start_soon(started)
                        race.start_soon(gave_up)
                if not awaited.is_set():
                    self._emit("dependency-failed", name, dependency=dependency, reason=target.last_reason)
                    runner.finished.set()
                    return
            if self._stopping:
                runner.finished.set()
                return
        if self._stopping:
            runner.finished.set()
            return
        await runner.run()

    async def down(self, *, grace: float | None = None) -> None:
        """Stop every service, dependents before what they depend on, then remove their resources."""
        self._stopping = True
        stopped = {name: anyio.Event() for name in self.runners}
        dependents: dict[str, list[str]] = {name: [] for name in self.runners}
        for name, runner in self.runners.items():
            for dependency in needs(runner.service):
                if dependency in dependents:
                    dependents[dependency].append(name)

        async def stop(name: str) -> None:
            for dependent in dependents[name]:
                await stopped[dependent].wait()
            try:
                await self.runners[name].stop(grace=grace)
            finally:
                stopped[name].set()
            await self.publisher.unpublish(name)
            await self.runners[name].remove()

        async with anyio.create_task_group() as group:
            for name in self.runners:
                group.start_soon(stop, name)


async def _remove_reporting(record: StateRecord, emit: Emit) -> None:
    """Remove what the record lists; tell what could not be removed."""
    for problem in await remove_recorded(record):
        emit("cleanup-failed", "", problem=problem)
