"""`up` of an N-service stack until every service runs, and `down` of it, beside docker-compose and
podman-compose running the same services from the same busybox root filesystem: medians over several runs.

    python benchmarks/stack.py                                 # 50 services, 5 runs, every peer installed
    python benchmarks/stack.py --sizes 1,10,25,50 --runs 3     # up/down against the number of services
    python benchmarks/stack.py --json > stack.json             # JSON on stdout (progress on stderr)
    python benchmarks/stack.py --peers none --network bridge   # stackd only, on its bridge only

Every service is `sh` waiting for SIGTERM (it honours it), from a busybox root filesystem (or the host's,
stackd only: --rootfs host). Each tool runs twice where it can, as separate rows: services on the
stack's own bridge network (stackd's default, Compose's default network) and services without a
network (`network_mode = "none"`: a loopback only). Rows:

- stackd: from `StackSupervisor.open` (which starts the launcher and creates the network) to the last
  service's `started` event (its process exec'd), then `down` (stop in reverse order, SIGTERM honoured,
  network, cgroups and state removed).
- docker-compose: `docker-compose up -d` (returns once every container is started) and
  `docker-compose down`, each timed as a command from a Python parent, on a private dockerd
  (benchmarks/compose_peers.py); `docker compose` (v2) too when its CLI plugin is installed.
- podman-compose: `podman-compose up -d` and `podman-compose down`, podman through runc; without a
  network only (podman's bridge networks change the host's firewall).

Between up and down, untimed: every service's process must have installed its SIGTERM handler (SigCgt in
/proc/PID/status). A service's process is pid 1 of its pid namespace, and the kernel drops a signal
that pid 1 has no handler for: a `down` right after `up` could otherwise reach a shell before its
`trap` ran, which then ignores the SIGTERM and is killed after the 5 s grace period (the 5 s outlier
of issue #5; docker's containers behave the same). The wait is reported, and so is any service that
was still killed after its grace period.

Rows run interleaved: each round runs every size and, per size, every row once in a shuffled order
(fixed seed), after --warmup untimed rounds at the largest size. The same command also measures, for
stackd only (on its bridge): a crash to the restarted process running with no backoff due
(`restart = "always"`, backoff 0; from the supervisor hearing of the exit to `launch()` returning after
the exec), and the supervisor's RSS with 100 services up. Targets (design.md §5): up <= 1 s and
down <= 1 s for 50 services, restart <= 20 ms, RSS <= 80 MiB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import stackd  # noqa: F401  (installed: make setup)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
from compose_peers import ComposePeer, PeerError, PrivateDockerd, default_compose_peers
from peers import Reaper

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
network_mode = "{network}"
"""
TARGETS = {"up_s": 1.0, "down_s": 1.0, "restart_ms": 20.0, "rss_mib": 80.0}
STACKD = "stackd"
Log = Callable[[str], None]


# --- the services' SIGTERM handlers ------------------------------------------------------------------------


def catches(pid: int, signum: int = signal.SIGTERM) -> bool | None:
    """Whether process `pid` has a handler for `signum` (None: it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        return None
    return False


def waiting_for_handlers(pids: list[int]) -> list[int]:
    return [pid for pid in pids if catches(pid) is False]


async def wait_for_handlers(pids: list[int], timeout: float = 10.0) -> float:
    """Wait until every process of `pids` catches SIGTERM; return the seconds waited."""
    start = time.perf_counter()
    while waiting_for_handlers(pids) and time.perf_counter() - start < timeout:
        await anyio.sleep(0.001)
    return time.perf_counter() - start


# --- stackd -------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    up: float
    down: float
    handlers_wait: float = 0.0
    killed: int = 0  # services still SIGKILLed after their grace period


def stack_of(count: int, rootfs: str, workdir: Path, network: str = "bridge") -> tuple[Any, StackPaths]:
    project = f"bench-{secrets.token_hex(3)}"
    text = "".join(SERVICE.format(index=i, rootfs=rootfs, network=network) for i in range(count))
    stack = parse_stack(text, file=workdir / "stack.toml", project=project)
    return stack, StackPaths(project, state_root=workdir / "state", log_root=workdir / "log")


async def stackd_run(count: int, rootfs: str, workdir: Path, network: str) -> Sample:
    stack, paths = stack_of(count, rootfs, workdir, network)
    started: list[float] = []
    killed: list[str] = []

    def emit(event: str, service: str, **fields: Any) -> None:
        if event == "started":
            started.append(time.perf_counter())
        elif event == "killing":
            killed.append(service)

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
            group.cancel_scope.cancel()
        waited = await wait_for_handlers([runner.pid for runner in supervisor.runners.values() if runner.pid])
        t1 = time.perf_counter()
        await supervisor.down()
        down = time.perf_counter() - t1
    return Sample(up, down, waited, len(killed))


async def rss_with(count: int, rootfs: str, workdir: Path) -> float:
    """The supervisor's RSS (this process) with `count` services running."""
    stack, paths = stack_of(count, rootfs, workdir)
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
        await wait_for_handlers([runner.pid for runner in supervisor.runners.values() if runner.pid])
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


# --- peers --------------------------------------------------------------------------------------------------


async def peer_run(peer: ComposePeer, count: int, project: str, reaper: Reaper) -> Sample:
    try:
        up = peer.up(count, project)
        pids = peer.pids(project)
        if len(pids) != count:
            raise PeerError(f"{len(pids)} of {count} services running after up")
        waited = await wait_for_handlers(pids)
        down = peer.down(count, project)
    except BaseException:
        peer.force_down(count, project)
        raise
    finally:
        reaper.settle(timeout=10)  # what the peer left running (conmon, shims) exits and is reaped, untimed
    return Sample(up, down, waited)


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    tool: str
    network: str
    what: str
    skipped: str | None = None
    samples: dict[int, list[Sample]] = field(default_factory=dict)


def row_name(tool: str, network: str) -> str:
    return f"{tool} ({'bridge' if network == 'bridge' else 'no network'})"


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
    }


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


async def bench(args: argparse.Namespace, workdir: Path, prefix: str, log: Log) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.UTC)
    load_start = loadavg()
    rss_start = rss_mib(os.getpid())
    busybox = make_busybox_rootfs(workdir / "rootfs")
    rootfs = "host" if args.rootfs == "host" else str(busybox)
    networks = ("bridge", "none") if args.network == "both" else (args.network,)
    rows = []
    for network in networks:
        kind = "the stack's bridge, an address each" if network == "bridge" else "network_mode none"
        rows.append(Row(row_name(STACKD, network), STACKD, network, f"StackSupervisor, {args.rootfs} rootfs, {kind}"))
    peers: dict[str, ComposePeer] = {}
    daemons: list[PrivateDockerd] = []
    reaper = Reaper()
    chosen = set(args.peers.split(",")) if args.peers not in ("all", "none") else set()
    if args.peers != "none":
        candidates, daemons = default_compose_peers(workdir / "peers", prefix=prefix, networks=networks)
        for peer in candidates:
            if chosen and peer.tool not in chosen:
                continue
            row = Row(peer.name, peer.tool, peer.network, peer.name)
            rows.append(row)
            if args.rootfs == "host":
                row.skipped = "peers run from the busybox rootfs only"
                continue
            log(f"preparing {peer.name} ...")
            try:
                row.skipped = peer.prepare(busybox)
            except (PeerError, OSError) as error:
                row.skipped = str(error)
            if row.skipped:
                log(f"  skipped: {row.skipped}")
                peer.close()
            else:
                row.what = peer.what
                peers[peer.name] = peer
    try:
        reaper.baseline()  # the private dockerd(s) stay; everything else a peer leaves is reaped
        shuffle = random.Random(5)
        sizes = args.sizes
        schedule = [(True, max(sizes))] * args.warmup + [(False, size) for _ in range(args.runs) for size in sizes]
        live = [row for row in rows if not row.skipped]
        for number, (warmup, size) in enumerate(schedule):
            order = live[:]
            shuffle.shuffle(order)
            for row in order:
                if row.skipped:
                    continue
                try:
                    if row.tool == STACKD:
                        sample = await stackd_run(size, rootfs, workdir, row.network)
                    else:
                        project = f"{prefix.replace('-', '')}r{number}"
                        sample = await peer_run(peers[row.name], size, project, reaper)
                except PeerError as error:
                    row.skipped = f"failed: {error}"
                    log(f"{row.name}: {row.skipped}")
                    continue
                if not warmup:
                    row.samples.setdefault(size, []).append(sample)
                log(
                    f"{'warmup ' if warmup else ''}{size:3d} services  {row.name:<30} up {sample.up * 1000:8.1f} ms  "
                    f"down {sample.down * 1000:8.1f} ms  (handlers {sample.handlers_wait * 1000:.1f} ms"
                    f"{f', {sample.killed} killed after the grace period' if sample.killed else ''})"
                )
        log("restart latency ...")
        latencies = await restart_latency(rootfs, workdir)
        log("RSS with 100 services ...")
        rss = await rss_with(100, rootfs, workdir)
    finally:
        for peer in peers.values():
            peer.close()
        for daemon in daemons:
            daemon.close()
        reaper.settle(timeout=10)
    return report(args, rows, started, load_start, rss_start, latencies, rss)


def report(
    args: argparse.Namespace,
    rows: list[Row],
    started: datetime.datetime,
    load_start: list[float],
    rss_start: float,
    latencies: list[float],
    rss: float,
) -> dict[str, Any]:
    out_rows: list[dict[str, Any]] = []
    for row in rows:
        points = []
        for size, samples in sorted(row.samples.items()):
            up = summary([s.up for s in samples])
            down = summary([s.down for s in samples])
            points.append(
                {
                    "services": size,
                    "up_s": up,
                    "down_s": down,
                    "up_samples_s": [round(s.up, 4) for s in samples],
                    "down_samples_s": [round(s.down, 4) for s in samples],
                    "handlers_wait_ms_max": round(max(s.handlers_wait for s in samples) * 1000, 1),
                    "killed_after_grace": sum(s.killed for s in samples),
                }
            )
        out_rows.append(
            {
                "name": row.name,
                "tool": row.tool,
                "network": row.network,
                "what": row.what,
                "skipped": row.skipped,
                "points": points,
            }
        )
    restart = summary([x * 1000 for x in latencies])
    verdict: dict[str, Any] = {
        "restart_ms": "PASS" if restart["median"] <= TARGETS["restart_ms"] else "MISS",
        "rss_mib": "PASS" if rss <= TARGETS["rss_mib"] else "MISS",
    }
    for entry in out_rows:  # the targets are for 50 services, per stackd row
        point: Any = next((p for p in entry["points"] if p["services"] == 50), None)
        if entry["tool"] == STACKD and point:
            verdict[str(entry["name"])] = {
                metric: "PASS" if point[metric]["median"] <= TARGETS[metric] else "MISS"
                for metric in ("up_s", "down_s")
            }
    return {
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1),
        "machine": {**machine(), "loadavg_start": load_start, "loadavg_end": loadavg()},
        "rootfs": args.rootfs,
        "runs": args.runs,
        "warmup": args.warmup,
        "sizes": args.sizes,
        "rows": out_rows,
        "restart_ms": restart,
        "rss_mib_100_services": round(rss, 1),
        "rss_mib_at_start": round(rss_start, 1),
        "targets": TARGETS,
        "verdict": verdict,
    }


def print_report(result: dict[str, Any]) -> None:
    info = result["machine"]
    print(
        f"\nstackd stack benchmark, {result['date']}, Linux {info['kernel']}, {info['cpus']} CPUs, "
        f"Python {info['python']}; {result['rootfs']} rootfs, {result['runs']} runs (+{result['warmup']} warmup); "
        f"load average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at the end"
    )
    stackd = {
        (row["network"], p["services"]): p for row in result["rows"] if row["tool"] == STACKD for p in row["points"]
    }
    width = max(len(row["name"]) for row in result["rows"])
    up_head, down_head = "up, median (min-max) ms", "down, median (min-max) ms"
    print(f"\n{'services':>8}  {'row':<{width}} | {up_head:<28} {'x':>6} | {down_head:<28} {'x':>6}")
    for size in result["sizes"]:
        for row in result["rows"]:
            point = next((p for p in row["points"] if p["services"] == size), None)
            if point is None:
                continue
            reference = stackd.get((row["network"], size))
            cells = []
            for metric in ("up_s", "down_s"):
                stat = point[metric]
                text = f"{stat['median'] * 1000:.1f} ({stat['min'] * 1000:.1f}-{stat['max'] * 1000:.1f})"
                ratio = f"{stat['median'] / reference[metric]['median']:.1f}x" if reference else ""
                cells.append(f"{text:<28} {ratio:>6}")
            print(f"{size:>8}  {row['name']:<{width}} | {cells[0]} | {cells[1]}")
    print("x: the row's median over stackd's with the same network at the same size")
    for row in result["rows"]:
        if row["skipped"]:
            print(f"skipped: {row['name']}: {row['skipped']}")
        else:
            print(f"{row['name']}: {row['what']}")
            killed = sum(p["killed_after_grace"] for p in row["points"])
            if killed:
                print(f"  {killed} service(s) still killed after the grace period")
    verdict = result["verdict"]
    print()
    for row in result["rows"]:
        point = next((p for p in row["points"] if p["services"] == 50), None)
        if row["tool"] != STACKD or point is None:
            continue
        for metric, what in (("up_s", "up"), ("down_s", "down")):
            print(
                f"{what} of 50 services, {row['name']}: {point[metric]['median'] * 1000:.1f} ms  "
                f"target 1000 ms: {verdict[row['name']][metric]}"
            )
    restart = result["restart_ms"]
    print(
        f"crash to restarted (no backoff due), {restart['n']} crashes: median {restart['median']:.1f} ms "
        f"(min {restart['min']:.1f}, max {restart['max']:.1f})  target 20 ms: {verdict['restart_ms']}"
    )
    print(
        f"supervisor RSS with 100 services up: {result['rss_mib_100_services']:.1f} MiB "
        f"(at start: {result['rss_mib_at_start']:.1f} MiB)  target 80 MiB: {verdict['rss_mib']}; "
        "one launcher process for the whole stack, none per service"
    )
    print(f"({result['seconds']:.0f} s in all)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--services", type=int, default=50, help="the stack's size when --sizes is not given")
    parser.add_argument("--sizes", default="", metavar="N,...", help="measure at each of these sizes (e.g. 1,10,25,50)")
    parser.add_argument("--runs", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first, at the largest size (default 1)")
    parser.add_argument("--rootfs", choices=("host", "busybox"), default="busybox")
    parser.add_argument(
        "--peers",
        default="all",
        help="all (default), none, or a list of: docker-compose,docker compose v2,podman-compose",
    )
    parser.add_argument(
        "--network",
        choices=("both", "bridge", "none"),
        default="both",
        help="the services' network: the stack's bridge, none (a loopback only), or both as separate rows (default)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON (progress goes to stderr)")
    args = parser.parse_args(argv)
    args.sizes = sorted({int(x) for x in args.sizes.split(",") if x}) if args.sizes else [args.services]
    if args.runs < 1 or args.warmup < 0 or min(args.sizes) < 1:
        parser.error("--runs and the sizes must be >= 1, --warmup >= 0")
    if os.geteuid() != 0:
        print("stack.py: run as root (namespaces, cgroups, mounts)", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    prefix = f"sb{secrets.token_hex(3)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"stackd-{prefix}-"))
    try:
        log(f"work directory {workdir}")
        result = anyio.run(lambda: bench(args, workdir, prefix, log))
    except KeyboardInterrupt:
        log("interrupted: cleaned up")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
