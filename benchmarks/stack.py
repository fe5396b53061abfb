"""`up` of an N-service stack until every service runs, and `down` of it: medians over several runs.

    python benchmarks/stack.py [--services 50] [--runs 5] [--rootfs host|busybox]

Every service is `sh` waiting for SIGTERM (it honours it), from a busybox root filesystem or the host's.
Targets (design.md §5): up <= 1 s and down <= 1 s for 50 services. The stack's network is not set up
yet (each service has its own empty network namespace), so these figures do not include it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from stackd.runtime.paths import StackPaths
from stackd.spec import parse_stack
from stackd.supervisor.restart import Backoff
from stackd.supervisor.router import LogRouter
from stackd.supervisor.stack import StackSupervisor
from stackd.testing.rootfs import make_busybox_rootfs

SERVICE = """
[services.s{index}]
command = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait; done"]
rootfs = "{rootfs}"
stop_grace_period = "5s"
"""


async def one_run(count: int, rootfs: str, workdir: Path) -> tuple[float, float]:
    project = f"bench-{secrets.token_hex(3)}"
    text = "".join(SERVICE.format(index=i, rootfs=rootfs) for i in range(count))
    stack = parse_stack(text, file=workdir / "stack.toml", project=project)
    paths = StackPaths(project, state_root=workdir / "state", log_root=workdir / "log")
    started: list[float] = []

    def emit(event: str, service: str, **fields: Any) -> None:
        if event == "started":
            started.append(time.perf_counter())

    t0 = time.perf_counter()
    async with (
        LogRouter(paths.logs) as router,
        StackSupervisor.open(stack, emit=emit, output=router, paths=paths) as supervisor,
    ):
        async with anyio.create_task_group() as group:
            group.start_soon(supervisor.up)
            while len(started) < count:
                await anyio.sleep(0.001)
            up = max(started) - t0
            t1 = time.perf_counter()
            group.cancel_scope.cancel()
        await supervisor.down()
        down = time.perf_counter() - t1
    return up, down


async def one_run_rss(count: int, rootfs: str, workdir: Path) -> float:
    """The supervisor's RSS (this process) with `count` services running."""
    project = f"bench-{secrets.token_hex(3)}"
    text = "".join(SERVICE.format(index=i, rootfs=rootfs) for i in range(count))
    stack = parse_stack(text, file=workdir / "stack.toml", project=project)
    paths = StackPaths(project, state_root=workdir / "state", log_root=workdir / "log")
    started: list[str] = []

    def emit(event: str, service: str, **fields: Any) -> None:
        if event == "started":
            started.append(service)

    async with (
        LogRouter(paths.logs) as router,
        StackSupervisor.open(stack, emit=emit, output=router, paths=paths) as supervisor,
        anyio.create_task_group() as group,
    ):
        group.start_soon(supervisor.up)
        while len(started) < count:
            await anyio.sleep(0.001)
        rss = rss_mib(os.getpid())
        group.cancel_scope.cancel()
    return rss


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def restart_latency(rootfs: str, workdir: Path, crashes: int = 30) -> list[float]:
    """From a crash (the launcher's exit report) to the restarted process running, with no backoff due."""
    project = f"bench-{secrets.token_hex(3)}"
    text = f'[services.crash]\ncommand = ["true"]\nrootfs = "{rootfs}"\nrestart = "always"\n'
    stack = parse_stack(text, file=workdir / "stack.toml", project=project)
    paths = StackPaths(project, state_root=workdir / "state", log_root=workdir / "log")
    exits: list[float] = []
    starts: list[float] = []

    def emit(event: str, service: str, **fields: Any) -> None:
        if event == "exited":
            exits.append(time.perf_counter())
        elif event == "started":
            starts.append(time.perf_counter())

    async with (
        LogRouter(paths.logs) as router,
        StackSupervisor.open(stack, emit=emit, output=router, paths=paths) as supervisor,
    ):
        supervisor.runners["crash"].restart.backoff = Backoff(initial=0.0, maximum=0.0)
        async with anyio.create_task_group() as group:
            group.start_soon(supervisor.up)
            while len(starts) <= crashes:
                await anyio.sleep(0.001)
            group.cancel_scope.cancel()
    return [start - exit for exit, start in zip(exits, starts[1:], strict=False)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rootfs", choices=("host", "busybox"), default="busybox")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stackd-bench-") as tmp:
        workdir = Path(tmp)
        rss_before = rss_mib(os.getpid())
        rootfs = "host" if args.rootfs == "host" else str(make_busybox_rootfs(workdir / "rootfs"))
        ups, downs = [], []
        for _ in range(args.runs):
            up, down = await one_run(args.services, rootfs, workdir)
            ups.append(up)
            downs.append(down)
            print(f"  up {up * 1000:7.1f} ms   down {down * 1000:7.1f} ms", file=sys.stderr)
        latencies = await restart_latency(rootfs, workdir)
        big = await one_run_rss(100, rootfs, workdir)
    up_median, down_median = statistics.median(ups), statistics.median(downs)
    print(f"{args.services} services ({args.rootfs} rootfs), {args.runs} runs, medians:")
    print(
        f"  up to all running: {up_median * 1000:.1f} ms (min {min(ups) * 1000:.1f}, max {max(ups) * 1000:.1f})"
        f"  target 1000 ms: {'PASS' if up_median <= 1 else 'MISS'}"
    )
    print(
        f"  down:              {down_median * 1000:.1f} ms (min {min(downs) * 1000:.1f}, "
        f"max {max(downs) * 1000:.1f})  target 1000 ms: {'PASS' if down_median <= 1 else 'MISS'}"
    )
    restart = statistics.median(latencies)
    print(
        f"crash to restarted (no backoff due), {len(latencies)} crashes: median {restart * 1000:.1f} ms "
        f"(min {min(latencies) * 1000:.1f}, max {max(latencies) * 1000:.1f})  target 20 ms: "
        f"{'PASS' if restart <= 0.02 else 'MISS'}"
    )
    print(
        f"supervisor RSS with 100 services up: {big:.1f} MiB (at start: {rss_before:.1f} MiB)  target 80 MiB: "
        f"{'PASS' if big <= 80 else 'MISS'}; one launcher process for the whole stack, none per service"
    )


if __name__ == "__main__":
    anyio.run(main)
