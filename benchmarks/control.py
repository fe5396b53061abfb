"""Does anyone watching a stack slow it down? The log pipeline with and without 20 `stackd logs -f`
followers and a flood of `ps` requests, and the latency of `ps` itself.

    python3 benchmarks/control.py [--mbytes 200] [--rounds 3] [--followers 20] [--ps-clients 4]

A detached stack (`stackd up -d`, real CLI) has a service `burst` that, when triggered, writes
`--mbytes` MB of 100-byte lines as fast as `yes` can. One round: trigger it and time until its `exited`
event, which the supervisor sends only once every byte is in the log file: MB/s through the
supervisor to disk. Scenarios: nobody watching; then 20 `stackd logs -f burst` processes (stdout to
/dev/null) and `--ps-clients` threads calling `ps` over the control socket in a loop. Prints medians and
the ratio, and `ps` latencies (idle, and under the burst with the followers).

On a machine with few cores the watchers mostly take CPU away from the service and the supervisor;
`--nice 19` runs them at the lowest priority, so that the ratio shows what they do to the supervisor
itself; `--follower tail` replaces the followers with `tail -F` on the log file (no stackd at all).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stackd.runtime.paths import StackPaths
from stackd.supervisor.control import ControlClient

STACK = """
name = "{project}"
[services.burst]
command = ["sh", "-c", '''while [ ! -e /t/go ]; do sleep 0.005; done; rm -f /t/go
yes "$$(printf '%099d' 0)" | head -c {size}''']
volumes = ["./t:/t"]
[services.idle]
command = ["sleep", "3600"]
init = true
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mbytes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--followers", type=int, default=20)
    parser.add_argument("--ps-clients", type=int, default=4)
    parser.add_argument(
        "--follower", choices=("stackd", "tail"), default="stackd", help="tail: `tail -F` instead (a C baseline)"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the followers and the ps threads at this niceness (19: they take only the CPU the "
        "service and the supervisor leave, so what remains is their effect on the supervisor)",
    )
    options = parser.parse_args()
    global NICE
    NICE = options.nice

    root = Path(tempfile.mkdtemp(prefix="stackd-bench-control-"))
    project = f"bc-{secrets.token_hex(3)}"
    env = {**os.environ, "STACKD_STATE_DIR": str(root / "run"), "STACKD_LOG_DIR": str(root / "log")}
    os.environ.update(STACKD_STATE_DIR=env["STACKD_STATE_DIR"], STACKD_LOG_DIR=env["STACKD_LOG_DIR"])
    (root / "t").mkdir()
    (root / "stack.toml").write_text(STACK.format(project=project, size=options.mbytes * 1_000_000))

    def stackd(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # type: ignore[call-overload,no-any-return]
            [sys.executable, "-m", "stackd", *args], cwd=root, env=env, text=True, capture_output=True, **kwargs
        )

    up = stackd("up", "-d")
    if up.returncode != 0:
        sys.exit(f"up -d failed: {up.stderr}")
    paths = StackPaths(project, state_root=root / "run", log_root=root / "log")
    followers: list[subprocess.Popen[bytes]] = []
    try:
        idle_ps = ps_latencies(paths, seconds=1.0, clients=1)
        quiet = [burst(paths, root) for _ in range(options.rounds)]
        for _ in range(options.followers):
            command = [sys.executable, "-m", "stackd", "-p", project, "logs", "-f", "--tail", "0", "burst"]
            if options.follower == "tail":
                command = ["tail", "-F", "-n", "0", str(root / "log" / project / "burst.log")]
            followers.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=(lambda: os.nice(options.nice)) if options.nice else None,
                )
            )
        time.sleep(1.5)  # the followers are following
        busy: list[float] = []
        loaded_ps: list[float] = []
        for _ in range(options.rounds):
            stop = threading.Event()
            latencies: list[float] = []
            threads = [threading.Thread(target=flood, args=(paths, stop, latencies)) for _ in range(options.ps_clients)]
            for thread in threads:
                thread.start()
            busy.append(burst(paths, root, "watched"))
            stop.set()
            for thread in threads:
                thread.join()
            loaded_ps += latencies
    finally:
        for process in followers:
            process.terminate()
        for process in followers:
            process.wait()
        stackd("down")
        if os.environ.get("KEEP") is None:
            subprocess.run(["rm", "-rf", str(root)], check=False)

    size = options.mbytes
    q, b = statistics.median(quiet), statistics.median(busy)
    print(f"log pipeline, {size} MB of 100-byte lines through the supervisor to disk (median of {options.rounds}):")
    print(f"  nobody watching:                     {size / q:7.1f} MB/s  ({q:.3f} s)")
    print(
        f"  {options.followers} `logs -f` + {options.ps_clients} ps floods:       "
        f"{size / b:7.1f} MB/s  ({b:.3f} s)   ratio {q / b:.2f}"
    )
    for scenario in ("quiet", "watched"):
        spent = statistics.median(c for s, c in CPU_SPENT if s == scenario)
        print(f"  the supervisor's CPU per burst, {scenario:>7}: {spent:.3f} s ({spent / size * 1000:.2f} ms per MB)")
    print(f"  ps requests answered during the loaded bursts: {len(loaded_ps)}")
    for name, values in (("idle", idle_ps), ("under load", loaded_ps)):
        if not values:
            continue
        values = sorted(values)
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"  ps latency {name:>10}: median {statistics.median(values) * 1000:6.2f} ms, p99 {p99 * 1000:6.2f} ms")


CPU_SPENT: list[tuple[str, float]] = []  # (scenario, the supervisor's CPU seconds during one burst)


def supervisor_cpu(paths: StackPaths) -> float:
    """CPU seconds (user + system) the supervisor process has used so far."""
    pid = json.loads((paths.state / "state.json").read_text())["supervisor_pid"]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burst(paths: StackPaths, root: Path, scenario: str = "quiet") -> float:
    """Start `burst` (it waits for the trigger), trigger it, time until its exit is told."""
    with ControlClient.connect(paths) as control, ControlClient.connect(paths) as events:
        control.call("start", services=["burst"])
        events.send("events", services=["burst"])
        events.receive()
        cpu = supervisor_cpu(paths)
        started = time.perf_counter()
        (root / "t" / "go").touch()
        while True:
            message, _ = events.receive()
            event = message.get("event", {})
            if event.get("event") == "exited":
                if event.get("code") != 0:
                    raise SystemExit(f"burst failed: {json.dumps(event)}")
                elapsed = time.perf_counter() - started
                CPU_SPENT.append((scenario, supervisor_cpu(paths) - cpu))
                return elapsed


def ps_latencies(paths: StackPaths, *, seconds: float, clients: int) -> list[float]:
    stop = threading.Event()
    latencies: list[float] = []
    threads = [threading.Thread(target=flood, args=(paths, stop, latencies)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return latencies


NICE = 0


def flood(paths: StackPaths, stop: threading.Event, latencies: list[float]) -> None:
    if NICE:  # niceness is per thread on Linux
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    with ControlClient.connect(paths) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.call("ps")
            latencies.append(time.perf_counter() - started)


if __name__ == "__main__":
    main()
