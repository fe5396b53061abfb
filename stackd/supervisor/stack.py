"""A whole stack under one supervisor: start in dependency order, run, stop in reverse order, clean up.

    async with StackSupervisor.open(stack, emit=emit, output=router) as supervisor:
        await supervisor.up()            # returns when every service has finished (or stop() was called)
    # leaving the block stops what still runs (reverse order) and removes every host resource

One dependency walk serves both directions: a service starts once what it depends on reached the
condition asked (service_started, service_completed_successfully); it stops once everything that
depends on it has stopped.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import anyio

from stackd.errors import StackdError
from stackd.runtime.instance import HostFacts
from stackd.runtime.launcher import Launcher
from stackd.runtime.paths import StackPaths
from stackd.spec.graph import needs, with_dependencies
from stackd.spec.models import Stack
from stackd.supervisor.cleanup import remove_recorded
from stackd.supervisor.network import StackNetworking
from stackd.supervisor.runner import Emit, OutputSink, ServiceRunner
from stackd.supervisor.state import StateRecord

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
        facts = HostFacts.gather()
        self.network = StackNetworking(stack, paths, record)
        self.runners = {
            name: ServiceRunner(
                service,
                project=stack.name,
                paths=paths,
                facts=facts,
                launcher=launcher,
                record=record,
                output=output,
                emit=emit,
                network=self.network,
            )
            for name, service in stack.services.items()
        }
        self._selected: list[str] = []
        self._stopping = False

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
        record = StateRecord(paths, supervisor_pid=os.getpid(), stack_file=source)
        record.save()
        try:
            async with Launcher.open() as launcher:
                supervisor = cls(stack, paths=paths, launcher=launcher, record=record, emit=emit, output=output)
                try:
                    yield supervisor
                finally:
                    with anyio.CancelScope(shield=True):
                        await supervisor.down()
        finally:
            with anyio.CancelScope(shield=True):
                problems = await remove_recorded(record)
                for problem in problems:
                    emit("cleanup-failed", "", problem=problem)

    async def up(self, services: Iterable[str] | None = None) -> None:
        """Start the services named (default all) and what they depend on; return when all have finished."""
        names = list(services or self.stack.services)
        unknown = [name for name in names if name not in self.stack.services]
        if unknown:
            raise StackdError(f"no such service: {', '.join(unknown)} (services: {', '.join(self.stack.services)})")
        self._selected = with_dependencies(self.stack, names)
        await self.network.attach(self._selected)
        if self.network.network is not None:
            network = self.network.network
            self._emit("network", "", subnet=str(network.subnet), bridge=network.bridge, gateway=str(network.gateway))
        async with anyio.create_task_group() as group:
            for name in self._selected:
                group.start_soon(self._start_when_ready, name)

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
            await self.runners[name].remove()

        async with anyio.create_task_group() as group:
            for name in self.runners:
                group.start_soon(stop, name)
