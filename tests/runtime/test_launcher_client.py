"""The supervisor's side of the launcher: its process, and what a caller hears when it dies."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from launchkit import new_project, service_of, stack_toml

from stackd.errors import LaunchError
from stackd.runtime.instance import HostFacts, prepare
from stackd.runtime.launcher import Launcher
from stackd.runtime.paths import StackPaths


async def test_the_launcher_runs_in_its_own_session_and_answers() -> None:
    async with Launcher.open() as launcher:
        await launcher.ping()
        pid = launcher._process.pid
        assert os.getsid(pid) == pid, "a Ctrl-C on the supervisor's terminal would reach the launcher"


async def test_a_dead_launcher_is_a_launch_error_not_a_crash(tmp_path: Path) -> None:
    project = new_project()
    service = service_of(stack_toml(command=["true"]), tmp_path=tmp_path, project=project)
    instance = prepare(
        service,
        project=project,
        paths=StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log"),
        facts=HostFacts.gather(),
    )
    try:
        async with Launcher.open() as launcher:
            await launcher.ping()
            os.kill(launcher._process.pid, signal.SIGKILL)
            read, write = os.pipe()
            try:
                with pytest.raises(LaunchError, match="launcher"):
                    await launcher.launch(instance.plan, stdout=write, stderr=write)
            finally:
                os.close(read)
                os.close(write)
    finally:
        instance.dispose()


def test_the_launcher_process_imports_nothing_that_could_start_a_thread() -> None:
    # Forking is safe only from a single-threaded process (design.md §3): the launcher's imports are the
    # standard library and stackd._sys, never asyncio, anyio, pyroute2, structlog or threading.
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys; sys.path.insert(0, {root!r}); import stackd.runtime.launcher_server; "
        "print(' '.join(sorted(sys.modules)))"
    )
    modules = set(
        subprocess.run(
            [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "stackd.runtime.launcher_server" in modules
    assert not modules & {"asyncio", "anyio", "pyroute2", "structlog", "threading", "stackd.supervisor"}
