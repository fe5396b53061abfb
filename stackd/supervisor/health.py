"""Health checks: run the service's `healthcheck.test` inside it, on Compose's schedule.

Inside means the service's namespaces, cgroup, user, capabilities and seccomp (stackd.runtime.plan's
exec_plan). Schedule, as Docker's: during `start_period` probes run every `start_interval` and failures
do not count; afterwards every `interval`; a probe that runs longer than `timeout` fails (and is killed);
`retries` consecutive failures make the service unhealthy, one success makes it healthy again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from stackd.errors import LaunchError
from stackd.runtime.launcher import Launcher
from stackd.runtime.plan import LaunchPlan, exec_plan
from stackd.spec.models import Healthcheck

__all__ = ["HealthWatcher", "Probe"]

OUTPUT_KEPT = 4096  # bytes of a failing probe's output kept for the event


@dataclass(frozen=True, slots=True)
class Probe:
    """The result of one health probe."""

    ok: bool
    detail: str


class HealthWatcher:
    """Probes one running service until cancelled; calls `on_change(status, probe)` when its health
    changes ("healthy" or "unhealthy"). `status` starts as "starting"."""

    def __init__(
        self,
        check: Healthcheck,
        *,
        launcher: Launcher,
        plan: LaunchPlan,
        pid: int,
        on_change: Callable[[str, Probe], None],
    ) -> None:
        self.check = check
        self._launcher, self._plan, self._pid = launcher, plan, pid
        self._on_change = on_change
        self.status = "starting"
        self.failures = 0

    async def run(self) -> None:
        started = time.monotonic()
        while True:
            in_start_period = time.monotonic() - started < self.check.start_period
            starting = self.status == "starting"
            await anyio.sleep(self.check.start_interval if in_start_period and starting else self.check.interval)
            in_start_period = time.monotonic() - started < self.check.start_period
            probe = await self.probe()
            if probe.ok:
                self.failures = 0
                if self.status != "healthy":
                    self.status = "healthy"
                    self._on_change("healthy", probe)
            elif not (in_start_period and self.status == "starting"):
                self.failures += 1
                if self.failures >= self.check.retries and self.status != "unhealthy":
                    self.status = "unhealthy"
                    self._on_change("unhealthy", probe)

    async def probe(self) -> Probe:
        """Run the test once inside the service; ok when it exits 0 within the timeout."""
        read, write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            try:
                pid = await self._launcher.exec(
                    exec_plan(self._plan, self._pid, self.check.test), stdout=write, stderr=write
                )
            except LaunchError as error:
                return Probe(False, str(error))
            finally:
                os.close(write)
            with anyio.move_on_after(self.check.timeout) as scope:
                exit = await self._launcher.wait(pid)
            if scope.cancelled_caught:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await self._launcher.wait(pid)
                return Probe(False, f"timed out after {self.check.timeout:g}s")
            output = b""
            with contextlib.suppress(BlockingIOError):
                output = os.read(read, OUTPUT_KEPT)
            text = output.decode(errors="replace").strip()
            return Probe(exit.code == 0, text or str(exit))
        finally:
            os.close(read)
