"""Published ports benchmark: TCP through stackd's userspace proxy (stackd/runtime/network/publish.py)
beside the same traffic sent directly to the service's address, and through Docker's docker-proxy.

    python benchmarks/publish.py [--runs 5] [--megabytes 200] [--requests 500] [--no-docker-proxy]
                                 [--chunk KIB]

One stack network (a bridge and one service's namespace, named pb-<hex>, in 10.242.0.0/16), a server in
the namespace, and per run, for each path (direct to the service's address, through stackd's proxy on
127.0.0.1, through docker-proxy on 127.0.0.1 if /usr/sbin/docker-proxy or `docker-proxy` is found):
  upload     the client sends --megabytes MB (1 MiB sendall calls), the server counts them and answers
             with the count; timed from connect to the answer;
  download   the server sends --megabytes MB; timed from connect to the end of file;
  latency    --requests times: connect, send 64 bytes, receive the 64-byte reply; each timed; the
             run's median.
The client is a separate process (python3 -I), so the client, the proxy and the server each have a
process of their own (on 2 cores, the proxy competes with them as it would on a real host). stackd's
proxy runs in this process's asyncio loop, as it does in the supervisor's. Paths are measured in a
rotating order each run. Prints medians over the runs, the ratios to direct, and the proxies' CPU time
(stackd: this process's getrusage; docker-proxy: its /proc/PID/stat).

Everything is named after a unique prefix and removed at the end, also on an error or Ctrl-C; the server
and docker-proxy processes are ended by their PID. Root only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import anyio

from stackd.runtime.network import (
    StackNetwork,
    assign_addresses,
    create_network,
    endpoint,
    pick_subnet,
    read_host_networks,
    teardown_network,
)
from stackd.runtime.network import publish as publish
from stackd.runtime.network.publish import PortPublisher
from stackd.runtime.paths import StackPaths
from stackd.spec.models import PortMapping

POOL = (IPv4Network("10.242.0.0/16"),)
PREFIX = f"pb-{secrets.token_hex(2)}"
PORTS = {"upload": 5001, "download": 5002, "latency": 5003}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SERVER = """
import socket, sys, threading

def sink(conn):
    with conn:
        buf, total = bytearray(1 << 20), 0
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(b"%d" % total)

def source(conn):
    with conn:
        left = int(conn.makefile("rb").readline())
        chunk = memoryview(bytes(1 << 20))
        while left:
            conn.sendall(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))

def threaded(listener, handle):
    while True:
        threading.Thread(target=handle, args=(listener.accept()[0],), daemon=True).start()

def replies(listener):  # one connection at a time, as the client makes them
    reply = b"r" * 64
    while True:
        conn = listener.accept()[0]
        with conn:
            got = 0
            while got < 64 and (data := conn.recv(64 - got)):
                got += len(data)
            conn.sendall(reply)

listeners = [socket.create_server(("0.0.0.0", port), backlog=1024) for port in (5001, 5002, 5003)]
threading.Thread(target=threaded, args=(listeners[0], sink), daemon=True).start()
threading.Thread(target=threaded, args=(listeners[1], source), daemon=True).start()
threading.Thread(target=replies, args=(listeners[2],), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = """
import json, socket, sys, time
mode, host, port, amount = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "upload":
    chunk = memoryview(bytes(1 << 20))
    started = time.perf_counter()
    with socket.create_connection((host, port)) as conn:
        left = amount
        while left:
            conn.sendall(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        conn.shutdown(socket.SHUT_WR)
        answer = conn.recv(64)
    seconds = time.perf_counter() - started
    assert int(answer) == amount, answer
    print(json.dumps([seconds]))
elif mode == "download":
    buf, got = bytearray(1 << 20), 0
    started = time.perf_counter()
    with socket.create_connection((host, port)) as conn:
        conn.sendall(b"%d\\n" % amount)
        while n := conn.recv_into(buf):
            got += n
    seconds = time.perf_counter() - started
    assert got == amount, got
    print(json.dumps([seconds]))
else:
    request, times = b"q" * 64, []
    for _ in range(amount):
        started = time.perf_counter()
        with socket.create_connection((host, port)) as conn:
            conn.sendall(request)
            got = 0
            while got < 64 and (data := conn.recv(64 - got)):
                got += len(data)
        times.append(time.perf_counter() - started)
        assert got == 64, got
    print(json.dumps(times))
"""


class CpuClock:
    """CPU seconds (user + system) used so far by a proxy."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def __call__(self) -> float:
        if self.pid is None:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return usage.ru_utime + usage.ru_stime
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Way:
    """One way to the server: the host and ports (per mode) the client connects to, and per mode the
    CPU clock of the proxy that serves it (none for direct)."""

    name: str
    host: str
    ports: dict[str, int]
    clocks: dict[str, CpuClock] = field(default_factory=dict)
    results: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)


async def client(mode: str, host: str, port: int, amount: int) -> list[float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-c", textwrap.dedent(CLIENT), mode, host, str(port), str(amount),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"client {mode} {host}:{port} failed ({process.returncode})")
    return [float(t) for t in json.loads(out)]


@contextlib.contextmanager
def server_in(pin: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        ["nsenter", f"--net={pin}", sys.executable, "-I", "-c", textwrap.dedent(SERVER)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready", "the server did not start"
        yield process
    finally:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def docker_proxies(binary: str, address: str) -> Iterator[tuple[dict[str, int], list[int]]]:
    """One docker-proxy per port, on 127.0.0.1; each reports its start on fd 3 ("0\\n"), made the pipe by
    bash (dash cannot redirect an fd above 9)."""
    processes: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    try:
        for mode, container_port in PORTS.items():
            ports[mode] = free_port()
            ready, signal = os.pipe()
            argv = ["-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", str(ports[mode])]
            argv += ["-container-ip", address, "-container-port", str(container_port)]
            shell = f'exec "$0" "$@" 3>&{signal} {signal}>&-'
            processes.append(subprocess.Popen(["bash", "-c", shell, binary, *argv], pass_fds=(signal,)))
            os.close(signal)
            with os.fdopen(ready, "rb") as status:
                answer = status.readline()
            if not answer.startswith(b"0"):
                raise RuntimeError(f"docker-proxy failed: {answer.decode(errors='replace').strip()}")
        yield ports, [p.pid for p in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def stack_network(workdir: Path) -> AsyncIterator[tuple[str, Path]]:
    """A bridge and one service's namespace; its address and pin. Torn down at the end."""
    facts = await read_host_networks()
    subnet = pick_subnet(PREFIX, host_networks=facts.blocked(), pool=POOL)
    network = StackNetwork.for_project(PREFIX, subnet)
    paths = StackPaths(PREFIX, state_root=workdir / "state", log_root=workdir / "log")
    (address,) = assign_addresses(subnet, ["svc"]).values()
    point = endpoint(network, paths, "svc", address)
    try:
        await create_network(network, paths, [point])
        yield str(address), point.netns
    finally:
        with anyio.CancelScope(shield=True):  # also after Ctrl-C
            await teardown_network(network, paths, [point], timeout=2)


def show(value: float, mode: str) -> str:
    return f"{value * 1000:.3f} ms" if mode == "latency" else f"{value:.0f} MB/s"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=200, help="MB (10^6 bytes) per throughput run")
    parser.add_argument("--requests", type=int, default=500, help="connections per latency run")
    parser.add_argument("--no-docker-proxy", action="store_true")
    parser.add_argument("--chunk", type=int, help=f"KiB read at a time (default {publish.TCP_CHUNK // 1024})")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/publish.py needs root")
    if args.chunk:
        publish.TCP_CHUNK = args.chunk * 1024
    amount = args.megabytes * 1_000_000
    search = "/usr/sbin:/usr/bin:/usr/local/bin:/usr/libexec/docker"
    docker_proxy = None if args.no_docker_proxy else shutil.which("docker-proxy", path=search)

    with tempfile.TemporaryDirectory(prefix="stackd-publishbench-") as tmp:
        async with stack_network(Path(tmp)) as (address, pin), PortPublisher() as publisher:
            with server_in(pin), contextlib.ExitStack() as stack:
                mappings = [PortMapping(port, port, "127.0.0.1") for port in PORTS.values()]
                published = await publisher.publish("svc", mappings, IPv4Address(address))
                ours = CpuClock(None)
                ways = [
                    Way("direct", address, dict(PORTS)),
                    Way("stackd", "127.0.0.1", {m: p.host_port for m, p in zip(PORTS, published, strict=True)},
                        dict.fromkeys(PORTS, ours)),
                ]  # fmt: skip
                if docker_proxy:
                    ports, pids = stack.enter_context(docker_proxies(docker_proxy, address))
                    clocks = {mode: CpuClock(pid) for mode, pid in zip(PORTS, pids, strict=True)}
                    ways.append(Way("docker-proxy", "127.0.0.1", ports, clocks))
                await measure(ways, args.runs, amount, args.requests)
    report(ways, args)


async def measure(ways: list[Way], runs: int, amount: int, requests: int) -> None:
    for mode in PORTS:  # warm-up, not counted
        for way in ways:
            await client(mode, way.host, way.ports[mode], min(amount, 20_000_000) if mode != "latency" else 50)
    for run in range(runs):
        shift = run % len(ways)
        for way in ways[shift:] + ways[:shift]:
            for mode in PORTS:
                clock = way.clocks.get(mode)
                before = clock() if clock else 0.0
                times = await client(mode, way.host, way.ports[mode], requests if mode == "latency" else amount)
                if clock:
                    way.cpu_seconds.setdefault(mode, []).append(clock() - before)
                value = statistics.median(times) if mode == "latency" else amount / 1e6 / times[0]
                way.results.setdefault(mode, []).append(value)
            print(f"  run {run + 1}/{runs} {way.name:<12} "
                  + "  ".join(f"{m} {show(way.results[m][-1], m)}" for m in PORTS), file=sys.stderr)  # fmt: skip


def report(ways: list[Way], args: argparse.Namespace) -> None:
    print(f"\nTCP through published ports, {args.runs} runs, medians; ratio = path / direct")
    print(f"upload and download: {args.megabytes} MB each (MB/s); latency: connect + 64-byte request + 64-byte reply, "
          f"median of {args.requests} (ms)")  # fmt: skip
    header = (
        f"{'':<10}"
        + "".join(f"{way.name:>16}" for way in ways)
        + "".join(f"{way.name + '/direct':>22}" for way in ways[1:])
    )
    print(header)
    for mode in PORTS:
        medians = [statistics.median(way.results[mode]) for way in ways]
        cells = "".join(f"{show(m, mode):>16}" for m in medians)
        ratios = "".join(f"{m / medians[0]:>22.2f}" for m in medians[1:])
        print(f"{mode:<10}{cells}{ratios}")
    print("\nproxy CPU time (user + system), medians:")
    for way in ways[1:]:
        per_mb = [statistics.median(way.cpu_seconds[m]) / (args.megabytes / 100) * 1000 for m in ("upload", "download")]
        per_conn = statistics.median(way.cpu_seconds["latency"]) / args.requests * 1e6
        print(f"  {way.name:<14} upload {per_mb[0]:.0f} ms per 100 MB, download {per_mb[1]:.0f} ms per 100 MB, "
              f"{per_conn:.0f} us per connection")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
