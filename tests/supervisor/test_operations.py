"""Operations on the services of a running stack: start, stop, restart, kill, pause, status, stats."""

from __future__ import annotations

import secrets
import signal
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from stackd.errors import StackdError
from stackd.runtime.paths import StackPaths
from stackd.spec import parse_stack
from stackd.supervisor.router import LogRouter
from stackd.supervisor.stack import StackSupervisor
from stackd.testing.leaks import LeakGuard

STACK = """
    [services.db]
    command = ["sleep", "60"]
    init = true
    [services.web]
    command = ["sh", "-c", "while :; do sleep 0.05; done"]
    init = true
    depends_on = ["db"]
    restart = "always"
    mem_limit = "64MiB"
"""


@asynccontextmanager
async def up(tmp_path: Path, leak_check: LeakGuard) -> AsyncIterator[StackSupervisor]:
    project = f"op-{secrets.token_hex(3)}"
    leak_check.track(project)
    stack = parse_stack(textwrap.dedent(STACK), file=tmp_path / "stack.toml", project=project)
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    async with (
        LogRouter(paths.logs) as router,
        StackSupervisor.open(stack, emit=lambda *a, **k: None, output=router, paths=paths) as supervisor,
        anyio.create_task_group() as group,
    ):
        group.start_soon(supervisor.up)
        for runner in supervisor.runners.values():
            await runner.started.wait()
        yield supervisor
        group.cancel_scope.cancel()


def state_of(supervisor: StackSupervisor, name: str) -> str:
    return next(s.state for s in supervisor.status() if s.name == name)


async def test_stop_start_and_restart_a_service(tmp_path: Path, leak_check: LeakGuard) -> None:
    async with up(tmp_path, leak_check) as supervisor:
        web = supervisor.runners["web"]
        first_pid = web.pid
        await supervisor.stop_service("web", grace=1)
        assert state_of(supervisor, "web") == "stopped" and web.finished.is_set()
        assert not Path(f"/proc/{first_pid}").exists()
        await supervisor.start_service("web")
        with anyio.fail_after(5):
            while state_of(supervisor, "web") != "running":
                await anyio.sleep(0.01)
        second_pid = web.pid
        assert second_pid != first_pid and Path(f"/proc/{second_pid}").exists()
        await supervisor.restart_service("web", grace=1)
        with anyio.fail_after(5):
            while web.pid == second_pid or state_of(supervisor, "web") != "running":
                await anyio.sleep(0.01)
        status = {s.name: s for s in supervisor.status()}
        assert status["web"].address and status["web"].address != status["db"].address
        assert status["db"].state == "running" and status["db"].pid == supervisor.runners["db"].pid


async def test_kill_applies_the_restart_policy(tmp_path: Path, leak_check: LeakGuard) -> None:
    async with up(tmp_path, leak_check) as supervisor:
        web = supervisor.runners["web"]
        before = web.pid
        supervisor.kill_service("web", signal.SIGKILL)
        with anyio.fail_after(5):
            while web.pid == before or state_of(supervisor, "web") != "running":
                await anyio.sleep(0.01)
        assert web.restart.restarts == 1
        await supervisor.stop_service("db", grace=1)
        with pytest.raises(StackdError, match="service db is not running"):
            supervisor.kill_service("db", signal.SIGTERM)
        with pytest.raises(StackdError, match=r"no such service: nope \(services: db, web\)"):
            supervisor.kill_service("nope")


async def test_pause_freezes_every_process_and_stats_read_the_cgroup(tmp_path: Path, leak_check: LeakGuard) -> None:
    async with up(tmp_path, leak_check) as supervisor:
        await anyio.sleep(0.3)
        (first,) = [s for s in supervisor.stats() if s.name == "web"]
        await supervisor.pause_service("web")
        assert state_of(supervisor, "web") == "paused"
        pids = supervisor.runners["web"].instance.cgroup.pids()  # type: ignore[union-attr]
        await anyio.sleep(0.2)
        states = {Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] for pid in pids}
        assert states <= {"D", "S"}  # frozen tasks sleep in the freezer, none runs
        (paused,) = [s for s in supervisor.stats() if s.name == "web"]
        await anyio.sleep(0.3)
        (still,) = [s for s in supervisor.stats() if s.name == "web"]
        assert still.cpu_usage_usec == paused.cpu_usage_usec  # no CPU while frozen
        await supervisor.unpause_service("web")
        assert state_of(supervisor, "web") == "running"
        assert paused.cpu_usage_usec > first.cpu_usage_usec and paused.memory_limit == 64 << 20
        assert 0 < paused.memory < 64 << 20 and paused.pids >= 2
        with pytest.raises(StackdError, match="service web is not paused"):
            await supervisor.unpause_service("web")
        await supervisor.pause_service("web")  # a paused service still stops at down


async def test_unless_stopped_restarts_after_any_exit_until_the_user_stops_it(
    tmp_path: Path, leak_check: LeakGuard
) -> None:
    project = f"op-{secrets.token_hex(3)}"
    leak_check.track(project)
    toml = """
        [services.job]
        command = ["sh", "-c", "sleep 0.05; exit 0"]
        restart = "unless-stopped"
        restart_backoff = { initial = "10ms", maximum = "10ms" }
    """
    stack = parse_stack(textwrap.dedent(toml), file=tmp_path / "stack.toml", project=project)
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    async with (
        LogRouter(paths.logs) as router,
        StackSupervisor.open(stack, emit=lambda *a, **k: None, output=router, paths=paths) as supervisor,
        anyio.create_task_group() as group,
    ):
        group.start_soon(supervisor.up)
        job = supervisor.runners["job"]
        with anyio.fail_after(10):
            while job.restart.restarts < 3:  # a clean exit restarts it too
                await anyio.sleep(0.01)
        await supervisor.stop_service("job", grace=1)
        restarts = job.restart.restarts
        await anyio.sleep(0.3)
        assert job.restart.restarts == restarts and state_of(supervisor, "job") == "stopped"
