"""Launch benchmark (issue #3): one service running `true`, from the launch request to its exit.

    python benchmarks/launch.py [--runs 50] [--json] [--quiet-ms 100] [--only ROW,...]   (as root)

stackd is measured with rootfs = a busybox directory and rootfs = "host", each launch with its mount,
uts, ipc, pid, net (empty) and cgroup namespaces and cgroup limits (cpus 0.5, mem_limit 64MiB,
pids_limit 64), two ways:
  launch                  launch() -> wait() with the launcher already running and the service's
                          cgroup and state directories already prepared: the hot path of design.md §5's
                          15 ms budget (a restart does exactly this);
  prepare+launch+dispose  the same plus creating the cgroup (with its limits) and state directories
                          before, and killing/removing them after.
In the same run, in a shuffled order each round, the peers of benchmarks/peers.py: unshare -muinpf,
bwrap, runc run, podman run --rm. Each row's median is printed with its ratio to stackd's "launch"
median (busybox rootfs, quiet host), which is checked against the 15 ms target (PASS/MISS; a MISS
never fails the process).

Every row is measured twice a round: once after --quiet-ms (100) with nothing launched ("quiet host"),
then at once again ("back-to-back"). It matters: moving a process into a cgroup (cgroup.procs, which
stackd, runc and podman all do) waits for an RCU grace period (7-17 ms here) when no task moved between
cgroups in the last ~50 ms, and costs ~0.2 ms otherwise (the kernel's cgroup_threadgroup_rwsem; see
benchmarks/README.md). A single launch or restart on an idle host pays it; the services of one `up`
after the first do not.

Everything lives under a fresh temporary directory and a unique project name (bench-<hex>); cgroups,
state, runc and podman containers are removed at the end, also on Ctrl-C, SIGTERM or an error.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import stackd  # noqa: F401  (installed: make setup)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
from peers import Limits, Peer, PeerFailed, Reaper, default_peers

from stackd.runtime.instance import HostFacts, Instance, prepare
from stackd.runtime.launcher import Launcher
from stackd.runtime.paths import StackPaths
from stackd.spec import Service, parse_stack
from stackd.testing.rootfs import make_busybox_rootfs

TARGET_MS = 15.0
LIMITS = Limits(cpus=0.5, memory=64 << 20, pids=64)
ROW_KEYS = (
    "stackd-launch",
    "stackd-launch-host",
    "stackd-cycle",
    "stackd-cycle-host",
    "unshare",
    "bwrap",
    "runc",
    "podman",
)

_STACK = """
[services.{name}]
command = ["true"]
rootfs = "{rootfs}"
network_mode = "none"
cpus = 0.5
mem_limit = "64MiB"
pids_limit = 64
"""


@dataclass
class Series:
    """The samples (ns) of one row in one condition, and the named phases of each run."""

    samples: list[int] = field(default_factory=list)
    #: Named phases of one run (ns each), e.g. "to exec" for stackd's rows.
    phases: dict[str, list[int]] = field(default_factory=dict)

    def add(self, elapsed: int, **phases: int) -> None:
        self.samples.append(elapsed)
        for name, value in phases.items():
            self.phases.setdefault(name, []).append(value)

    def clear(self) -> None:
        self.samples.clear()
        self.phases.clear()

    def stats(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        ms = [s / 1e6 for s in self.samples]
        return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "n": len(ms)}

    def phase_medians(self) -> dict[str, float]:
        return {name: statistics.median(values) / 1e6 for name, values in self.phases.items() if values}


@dataclass
class Row:
    """One line of the table: a tool and rootfs, measured on a quiet host and back-to-back."""

    key: str
    label: str
    rootfs: str
    quiet: Series = field(default_factory=Series)
    again: Series = field(default_factory=Series)
    failed: str = ""


#: Measures one run into the given series.
Runner = Callable[[Series], Awaitable[None]]


# --- stackd ------------------------------------------------------------------------------------------


class StackdBench:
    """stackd's side: one launcher; services prepared once ("launch") or in every run ("cycle")."""

    def __init__(self, workdir: Path, project: str, rootfs: Path) -> None:
        self.project = project
        self.paths = StackPaths(project, state_root=workdir / "state", log_root=workdir / "log")
        self.services: dict[str, Service] = {}
        for name, root in (
            ("launch-busybox", str(rootfs)),
            ("launch-host", "host"),
            ("cycle-busybox", str(rootfs)),
            ("cycle-host", "host"),
        ):
            text = _STACK.format(name=name, rootfs=root)
            self.services[name] = parse_stack(text, file=workdir / "stack.toml", project=project)[name]
        self.facts: HostFacts | None = None
        self.instances: list[Instance] = []  # everything prepared and not yet disposed
        self.devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.launcher: Launcher | None = None

    def prepare(self, name: str) -> Instance:
        assert self.facts is not None
        instance = prepare(self.services[name], project=self.project, paths=self.paths, facts=self.facts)
        self.instances.append(instance)
        return instance

    def dispose(self, instance: Instance) -> None:
        self.instances.remove(instance)
        instance.dispose()

    def close(self) -> list[str]:
        """Dispose of whatever is still prepared; return the errors (clean-up goes on past them)."""
        errors = []
        while self.instances:
            instance = self.instances.pop()
            try:
                instance.dispose()
            except Exception as error:  # keep cleaning up
                errors.append(f"dispose {instance.service.name}: {error}")
        shutil.rmtree(self.paths.state, ignore_errors=True)
        os.close(self.devnull)
        return errors

    async def launch_to_exit(self, instance: Instance) -> tuple[int, int]:
        """One launch of a prepared instance: (ns to launch() returning, i.e. exec'd; ns to exit)."""
        assert self.launcher is not None
        start = time.perf_counter_ns()
        pid = await self.launcher.launch(instance.plan, stdout=self.devnull, stderr=self.devnull)
        started = time.perf_counter_ns()
        exit = await self.launcher.wait(pid)
        ended = time.perf_counter_ns()
        if exit.code != 0:
            raise RuntimeError(f"stackd: {instance.service.name}: `true` {exit}")
        return started - start, ended - start

    def launch(self, instance: Instance) -> Runner:
        async def run(series: Series) -> None:
            to_exec, to_exit = await self.launch_to_exit(instance)
            series.add(to_exit, **{"to exec (launch() returned)": to_exec, "then to exit": to_exit - to_exec})

        return run

    def cycle(self, name: str) -> Runner:
        async def run(series: Series) -> None:
            start = time.perf_counter_ns()
            instance = self.prepare(name)
            prepared = time.perf_counter_ns()
            try:
                await self.launch_to_exit(instance)
            finally:
                launched = time.perf_counter_ns()
                self.dispose(instance)
            ended = time.perf_counter_ns()
            series.add(
                ended - start,
                **{"prepare": prepared - start, "launch to exit": launched - prepared, "dispose": ended - launched},
            )

        return run


def peer_runner(peer: Peer, reaper: Reaper) -> Runner:
    count = iter(range(1 << 30))  # a unique run number (container id) per run, warm-up included

    async def run(series: Series) -> None:
        series.add(peer.run(next(count)))  # blocks the loop for one run: nothing else is going on
        # Untimed: wait for what the peer left running after it returned (podman's conmon), so that
        # it cannot slow down the next row.
        reaper.settle()

    return run


# --- the run -------------------------------------------------------------------------------------------


@dataclass
class Result:
    rows: list[Row]
    runs: int
    quiet_ms: float
    launcher_startup_ms: float
    host_facts_ms: float
    remarks: list[str]
    started: datetime.datetime
    seconds: float


async def bench(
    workdir: Path,
    project: str,
    rootfs: Path,
    *,
    runs: int,
    warmup: int,
    quiet_ms: float,
    only: set[str],
    log: Callable[[str], None],
) -> Result:
    started = datetime.datetime.now(datetime.UTC)
    began = time.monotonic()
    sd = StackdBench(workdir, project, rootfs)
    peers = default_peers(rootfs, workdir / "peers", prefix=project, limits=LIMITS)
    reaper = Reaper()
    shuffle = random.Random(3).shuffle  # a fixed seed: the same orders in every run of the benchmark
    remarks: list[str] = []

    def wanted(key: str) -> bool:
        return not only or key in only or key == "stackd-launch"

    try:
        t0 = time.perf_counter_ns()
        sd.facts = HostFacts.gather()
        facts_ms = (time.perf_counter_ns() - t0) / 1e6

        table: list[Row] = []
        rotation: list[tuple[Row, Runner]] = []
        for rootfs_name, suffix in (("busybox", ""), ("host", "-host")):
            if wanted(f"stackd-launch{suffix}"):
                row = Row(f"stackd-launch{suffix}", "stackd launch", rootfs_name)
                table.append(row)
                rotation.append((row, sd.launch(sd.prepare(f"launch-{rootfs_name}"))))
        for rootfs_name, suffix in (("busybox", ""), ("host", "-host")):
            if wanted(f"stackd-cycle{suffix}"):
                row = Row(f"stackd-cycle{suffix}", "stackd prepare+launch+dispose", rootfs_name)
                table.append(row)
                rotation.append((row, sd.cycle(f"cycle-{rootfs_name}")))
        for peer in peers:
            if not wanted(peer.name):
                continue
            row = Row(peer.name, peer.name, "host" if peer.name == "unshare" else "busybox")
            table.append(row)
            log(f"checking {peer.name} ...")
            failure = peer.prepare()
            if failure is not None:
                row.failed = f"skipped: {failure}"
                log(f"  {row.failed}")
                continue
            if peer.remark:
                remarks.append(peer.remark)
            rotation.append((row, peer_runner(peer, reaper)))

        t0 = time.perf_counter_ns()
        async with Launcher.open() as launcher:
            await launcher.ping()  # the launcher has started and answers
            startup_ms = (time.perf_counter_ns() - t0) / 1e6
            sd.launcher = launcher
            reaper.baseline()  # the launcher stays
            log(
                f"launcher up in {startup_ms:.1f} ms; {warmup} warm-up and {runs} measured rounds of "
                f"{len(rotation)} rows, each run {quiet_ms:g} ms after the last launch and then again at once"
            )
            for round_number in range(-warmup, runs):
                shuffle(rotation)  # no row always runs right after the same other row
                for row, run in rotation:
                    if row.failed:
                        continue
                    await anyio.sleep(quiet_ms / 1000)
                    try:
                        await run(row.quiet)
                        await run(row.again)
                    except PeerFailed as error:
                        row.failed = f"stopped after {len(row.quiet.samples)} runs: {error}"
                        log(f"  {row.key}: {row.failed}")
                if round_number == -1:  # end of the warm-up: forget it
                    for row in table:
                        row.quiet.clear()
                        row.again.clear()
                elif round_number >= 0 and (round_number + 1) % 10 == 0:
                    log(f"  {round_number + 1}/{runs} rounds")
            sd.launcher = None
        return Result(
            rows=table,
            runs=runs,
            quiet_ms=quiet_ms,
            launcher_startup_ms=startup_ms,
            host_facts_ms=facts_ms,
            remarks=remarks,
            started=started,
            seconds=time.monotonic() - began,
        )
    finally:
        with anyio.CancelScope(shield=True):
            errors = sd.close()
            for peer in peers:
                try:
                    peer.close()
                except Exception as error:  # keep cleaning up
                    errors.append(f"close {peer.name}: {error}")
            for problem in errors:
                log(f"clean-up: {problem}")


# --- the report ----------------------------------------------------------------------------------------


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


CONDITIONS = (("quiet", "quiet host"), ("again", "back-to-back"))


def reference(result: Result, condition: str) -> float | None:
    """stackd's launch median (busybox rootfs) in `condition`: the row the ratios are relative to."""
    row = next((row for row in result.rows if row.key == "stackd-launch"), None)
    stats = getattr(row, condition).stats() if row else None
    return stats["median"] if stats else None


def verdict(median: float) -> str:
    return "PASS" if median <= TARGET_MS else "MISS"


def to_json(result: Result) -> dict[str, Any]:
    rows = []
    for row in result.rows:
        entry: dict[str, Any] = {"key": row.key, "label": row.label, "rootfs": row.rootfs}
        for attribute, name in CONDITIONS:
            series: Series = getattr(row, attribute)
            stats = series.stats()
            if stats:
                ref = reference(result, attribute)
                entry[name.replace(" ", "_").replace("-", "_")] = {
                    "median_ms": stats["median"],
                    "min_ms": stats["min"],
                    "max_ms": stats["max"],
                    "n": stats["n"],
                    "ratio_to_stackd_launch": stats["median"] / ref if ref else None,
                    "phases_median_ms": series.phase_medians(),
                }
        if row.failed:
            entry["note"] = row.failed
        rows.append(entry)
    quiet, again = reference(result, "quiet"), reference(result, "again")
    return {
        "date": result.started.isoformat(timespec="seconds"),
        "machine": machine(),
        "runs": result.runs,
        "quiet_ms": result.quiet_ms,
        "seconds": round(result.seconds, 1),
        "launcher_startup_ms": result.launcher_startup_ms,
        "host_facts_ms": result.host_facts_ms,
        "target_ms": TARGET_MS,
        "verdict": {
            "quiet_host": verdict(quiet) if quiet else None,
            "back_to_back": verdict(again) if again else None,
        },
        "rows": rows,
        "remarks": result.remarks,
    }


def print_table(result: Result) -> None:
    info = machine()
    print(
        f"\nstackd launch benchmark, {result.started:%Y-%m-%d %H:%M} UTC, Linux {info['kernel']}, "
        f"{info['cpus']} CPUs, Python {info['python']}: `true` from the request to its exit, "
        f"{result.runs} runs a row and condition; ms\n"
    )
    group = f"{'median':>7} {'min':>6} {'max':>6} {'ratio':>5}"
    header = f"{'row':<30} {'rootfs':<8} | {group} | {group}"
    width = len(group)
    print(f"{'':<30} {'':<8} | {'quiet host':^{width}} | {'back-to-back':^{width}}")
    print(header)
    print("-" * len(header))
    for row in result.rows:
        cells = []
        for attribute, _ in CONDITIONS:
            stats = getattr(row, attribute).stats()
            ref = reference(result, attribute)
            if stats is None:
                cells.append(f"{'skipped':>{width}}")
                continue
            ratio = f"{stats['median'] / ref:.1f}x" if ref else ""
            cells.append(f"{stats['median']:>7.2f} {stats['min']:>6.2f} {stats['max']:>6.2f} {ratio:>5}")
        print(f"{row.label:<30} {row.rootfs:<8} | " + " | ".join(cells) + ("  (stopped early)" if row.failed else ""))
    print(
        f"\nquiet host: the run starts {result.quiet_ms:g} ms after the last launch of anything; back-to-back: "
        "right after the quiet run of the same row. ratio: median / stackd launch's (busybox) median."
    )
    print(
        f"launcher start-up (Popen -> first pong), once: {result.launcher_startup_ms:.1f} ms; "
        f"HostFacts.gather(), once: {result.host_facts_ms:.1f} ms"
    )
    for row in result.rows:
        for attribute, name in CONDITIONS:
            phases = getattr(row, attribute).phase_medians()
            if phases:
                text = ", ".join(f"{phase} {value:.2f}" for phase, value in phases.items())
                print(f"  {row.label} ({row.rootfs}, {name}) medians: {text}")
    print()
    for attribute, name in CONDITIONS:
        ref = reference(result, attribute)
        if not ref:
            continue
        parts = []
        for row in result.rows:
            stats = getattr(row, attribute).stats()
            if stats and not row.key.startswith("stackd"):
                parts.append(f"{row.label} {stats['median']:.1f} ms ({stats['median'] / ref:.1f}x stackd)")
        print(f"{name}: stackd launch {ref:.1f} ms; " + "; ".join(parts))
    for attribute, name in CONDITIONS:
        ref = reference(result, attribute)
        if ref:
            print(f"{verdict(ref)}: stackd launch median {ref:.2f} ms ({name}, busybox), target {TARGET_MS:g} ms")
    for row in result.rows:
        if row.failed:
            print(f"note: {row.label}: {row.failed}")
    for remark in result.remarks:
        print(f"note: {remark}")
    print(f"({result.seconds:.0f} s in all)")


# --- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="stackd's launch benchmark against unshare, bwrap, runc, podman")
    parser.add_argument("--runs", type=int, default=50, help="measured runs per row (default 50)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument(
        "--quiet-ms", type=float, default=100, help="pause with nothing launched before each run (default 100)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON (progress goes to stderr)")
    parser.add_argument(
        "--only",
        default="",
        metavar="ROW,...",
        help="run only these rows (stackd-launch always runs): " + ",".join(ROW_KEYS),
    )
    args = parser.parse_args(argv)
    only = {name for name in args.only.split(",") if name}
    if args.runs < 1 or args.warmup < 0 or args.quiet_ms < 0:
        parser.error("--runs must be >= 1, --warmup and --quiet-ms >= 0")
    if only - set(ROW_KEYS):
        parser.error(f"--only: unknown rows {', '.join(sorted(only - set(ROW_KEYS)))}")
    if os.geteuid() != 0:
        print("launch.py: run as root (namespaces, cgroups, mounts)", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    project = f"bench-{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"stackd-{project}-"))
    try:
        rootfs = make_busybox_rootfs(workdir / "rootfs")
        log(f"project {project}, work directory {workdir}")
        result = anyio.run(
            lambda: bench(
                workdir, project, rootfs, runs=args.runs, warmup=args.warmup, quiet_ms=args.quiet_ms, only=only, log=log
            )
        )
    except KeyboardInterrupt:
        log("interrupted: cleaned up")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
