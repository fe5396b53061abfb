"""What `ps`, `stats` and the Python API tell about a service: plain, JSON-ready snapshots."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stackd.supervisor.runner import ServiceRunner

__all__ = ["ServiceStats", "ServiceStatus", "service_stats", "service_status"]


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """One service as `ps` shows it."""

    name: str
    #: created, starting, running, paused, restarting, stopping, exited, stopped
    state: str
    #: starting, healthy, unhealthy; None without a health check
    health: str | None
    pid: int | None
    restarts: int
    #: seconds since the latest start (None when not running)
    uptime: float | None
    address: str | None
    ports: tuple[str, ...] = ()
    exit_code: int | None = None
    exit_reason: str = ""
    network_mode: str = "bridge"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ports"] = list(self.ports)
        return data


def service_status(runner: ServiceRunner, *, address: str | None, ports: tuple[str, ...] = ()) -> ServiceStatus:
    """The snapshot of one runner."""
    running = runner.active and runner.state in ("running", "starting")
    state = "paused" if running and runner.paused else runner.state
    exit = runner.last_exit
    return ServiceStatus(
        name=runner.name,
        state=state,
        health=runner.health if running else None,
        pid=runner.pid if running else None,
        restarts=runner.restart.restarts,
        uptime=round(time.time() - runner.started_wall, 3) if running and runner.started_wall else None,
        address=address,
        ports=ports,
        exit_code=None if running or exit is None else exit.code,
        exit_reason="" if running else runner.last_reason,
        network_mode=str(runner.service.network_mode),
    )


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """A service's resource use now: counters (CPU time, network bytes) and levels (memory, pids).
    Rates (CPU %, bytes/s) come from two snapshots: `cpu_percent(earlier)`."""

    name: str
    time: float
    cpu_usage_usec: int
    memory: int
    memory_limit: int | None
    pids: int
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def cpu_percent(self, earlier: ServiceStats) -> float:
        """CPU use between two snapshots, as `docker stats` shows it (100% = one CPU)."""
        elapsed = self.time - earlier.time
        if elapsed <= 0:
            return 0.0
        return max(0.0, (self.cpu_usage_usec - earlier.cpu_usage_usec) / 1e6 / elapsed * 100)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def service_stats(runner: ServiceRunner) -> ServiceStats | None:
    """The resource use of a service that has a cgroup (None before its first start)."""
    if runner.instance is None:
        return None
    cgroup = runner.instance.cgroup.stats()
    rx = tx = 0
    if runner.pid is not None and runner.active:
        rx, tx = _net_counters(runner.pid)
    return ServiceStats(
        name=runner.name,
        time=time.monotonic(),
        cpu_usage_usec=cgroup.cpu_usage_usec,
        memory=cgroup.memory_current,
        memory_limit=cgroup.memory_limit,
        pids=cgroup.pids_current,
        net_rx_bytes=rx,
        net_tx_bytes=tx,
    )


def _net_counters(pid: int) -> tuple[int, int]:
    """Bytes received and sent by every interface but lo of the process's network namespace."""
    rx = tx = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]:
            name, _, numbers = line.partition(":")
            if name.strip() == "lo":
                continue
            fields = numbers.split()
            rx += int(fields[0])
            tx += int(fields[8])
    return rx, tx
