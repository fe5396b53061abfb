"""Resource limits of a launched service, read from its cgroup's own counters, and init = true."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time
from pathlib import Path

import anyio
import pytest
from launchkit import new_project, run_service, sh, stack_toml, started

from stackd.testing.leaks import LeakGuard

pytestmark = pytest.mark.root


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    """A unique project; the leak check reports what carries its name (others run benchmarks meanwhile)."""
    name = new_project()
    leak_check.track(name)
    return name


async def test_cpus_quarter_of_one_cpu(tmp_path: Path, project: str) -> None:
    toml = stack_toml(command=sh("while :; do :; done"), cpus=0.25)
    async with started(toml, tmp_path=tmp_path, project=project) as running:
        cgroup = running.instance.cgroup
        await anyio.sleep(0.3)  # past the start and the first periods
        usage0, time0 = cgroup.stats().cpu_usage_usec, time.monotonic()
        await anyio.sleep(2.0)
        usage1, time1 = cgroup.stats().cpu_usage_usec, time.monotonic()
        share = (usage1 - usage0) / 1e6 / (time1 - time0)
        assert 0.20 <= share <= 0.30, f"used {share:.1%} of one CPU, expected 25% +- 5 points"
        cgroup.kill()
        exit = await running.wait(5)
        assert exit.signal == signal.SIGKILL
        assert cgroup.pids() == []


async def test_memory_limit_oom_kill_is_reported(tmp_path: Path, project: str) -> None:
    toml = stack_toml(command=["python3", "-c", "b = b'x' * (64 << 20); print('survived', len(b))"], mem_limit="16MiB")
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert "survived" not in result.output
    assert result.exit.signal == signal.SIGKILL, result
    assert result.oom_killed
    assert result.reason.startswith("OOM-killed"), result.reason
    assert "16MiB" in result.reason


async def test_plain_sigkill_is_not_an_oom_kill(tmp_path: Path, project: str) -> None:
    toml = stack_toml(command=["sleep", "30"], mem_limit="16MiB")
    async with started(toml, tmp_path=tmp_path, project=project) as running:
        await anyio.sleep(0.1)
        running.instance.cgroup.kill()
        exit = await running.wait(5)
        assert exit.signal == signal.SIGKILL
        assert not running.instance.oom_killed(exit)
        assert running.instance.exit_reason(exit) == "killed by SIGKILL"


async def test_fork_bomb_is_contained_by_pids_limit(tmp_path: Path, project: str) -> None:
    # Every process forks two more that do the same, forever; the ones that cannot fork wait. The bomb
    # runs under a pid 1 that forks only once: a shell whose fork fails exits (code 2), and the test
    # wants the service alive until the cgroup is killed.
    bomb = "(b() { b & b & wait; sleep 1000; }; b) & wait; exec sleep 1000"
    # cpus and mem_limit are only a safety net for the host, should pids_limit not hold.
    toml = stack_toml(command=sh(bomb), pids_limit=32, cpus=1, mem_limit="256MiB")
    async with started(toml, tmp_path=tmp_path, project=project) as running:
        cgroup = running.instance.cgroup
        most = 0
        responsive: list[float] = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            most = max(most, len(cgroup.pids()), cgroup.stats().pids_current)
            started_at = time.monotonic()
            subprocess.run(["true"], check=True, timeout=1)
            responsive.append(time.monotonic() - started_at)
            await anyio.sleep(0.05)
        assert most <= 32, f"{most} tasks in a cgroup limited to 32"
        assert max(responsive) < 1.0, f"a host `true` took {max(responsive):.2f}s"
        # The kernel's own record: the most tasks there ever were, and how many forks it refused.
        directory = cgroup.v1.get("pids") or cgroup.unified
        assert directory is not None
        peak = int((directory / "pids.peak").read_text())
        refused = int((directory / "pids.events").read_text().split()[1])
        assert peak == 32, f"peak of {peak} tasks under pids_limit = 32"
        assert refused > 0, "no fork was refused: the bomb did not meet the limit"
        cgroup.kill()
        exit = await running.wait(5)
        assert exit.signal == signal.SIGKILL
        assert cgroup.pids() == []


async def test_init_reaps_orphaned_zombies(tmp_path: Path, project: str) -> None:
    script = """
        i=0
        while [ $i -lt 1000 ]; do (true &); i=$((i + 1)); done
        echo "started $i"
        n=1
        for try in $(seq 100); do
            n=$(cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == "Z"' | wc -l)
            [ "$n" -eq 0 ] && break
            sleep 0.05
        done
        echo "zombies $n"
        echo "pid1 $(readlink /proc/1/exe)"
        echo "me $$"
    """
    result = await run_service(stack_toml(command=sh(script), init=True), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert "started 1000" in result.lines
    assert "zombies 0" in result.lines, result.output
    assert "pid1 /dev/init" in result.lines
    assert "me 1" not in result.lines  # the service runs under init, not as pid 1


@pytest.mark.parametrize(("init", "expected"), [(True, 0), (False, 200)])
async def test_orphans_of_a_service_that_never_reaps(tmp_path: Path, project: str, init: bool, expected: int) -> None:
    """With init, orphans are reaped even when the service itself never waits for them; without it (the
    control for the test above) they stay zombies, and the count from inside sees them."""
    script = """
        import os, time
        for _ in range(200):
            child = os.fork()
            if child == 0:
                if os.fork() == 0:
                    os._exit(0)  # the grandchild: an orphan once its parent is gone
                os._exit(0)
            os.waitpid(child, 0)  # pid 1 reaps its own children, never the orphans
        time.sleep(0.3)
        zombies = 0
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    stat = open(f"/proc/{name}/stat").read()
                except OSError:
                    continue
                zombies += stat.rsplit(")", 1)[1].split()[0] == "Z"
        print("zombies", zombies)
    """
    toml = stack_toml(command=["python3", "-c", textwrap.dedent(script)], init=init)
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert result.lines[-1] == f"zombies {expected}", result.output
