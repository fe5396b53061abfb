"""The `cli` fixture: a leak-tracked project whose stack is brought down after the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clirun import Cli, new_project

from stackd.testing.leaks import LeakGuard


@pytest.fixture
def cli(tmp_path: Path, leak_check: LeakGuard) -> Iterator[Cli]:
    project = new_project()
    leak_check.track(project)
    runner = Cli(tmp_path, project)
    try:
        yield runner
    finally:
        if runner.supervisor_pid() is not None or runner.state.exists():
            runner.down()
