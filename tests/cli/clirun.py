"""Helpers of the CLI tests: run `stackd` as a subprocess with state and logs in a temporary directory."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def new_project(prefix: str = "cl") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def environment(root: Path) -> dict[str, str]:
    env = {**os.environ, "STACKD_STATE_DIR": str(root / "run"), "STACKD_LOG_DIR": str(root / "log")}
    for key in ("NOTIFY_SOCKET", "STACKD_GROUP", "STACKD_FILE", "STACKD_PROJECT_NAME", "NO_COLOR"):
        env.pop(key, None)
    return env


class Cli:
    """`stackd` run in `root` (its stack.toml) with its own state and log directories."""

    def __init__(self, root: Path, project: str) -> None:
        self.root = root
        self.project = project
        self.env = environment(root)

    def write(self, text: str) -> None:
        (self.root / "stack.toml").write_text(f'name = "{self.project}"\n' + text)

    def __call__(self, *args: str, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stackd", *args],
            cwd=self.root,
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen[str]:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            [sys.executable, "-m", "stackd", *args],
            cwd=self.root,
            env=self.env,
            text=True,
            **kwargs,
        )

    @property
    def state(self) -> Path:
        return self.root / "run" / self.project

    def supervisor_pid(self) -> int | None:
        import json

        try:
            return int(json.loads((self.state / "state.json").read_text())["supervisor_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def down(self) -> None:
        """`stackd down`; if that fails, kill what is left through the record (by pid and cgroup)."""
        result = self("down", timeout=60)
        if result.returncode != 0:
            pid = self.supervisor_pid()
            if pid:
                with_suppressed(lambda: os.kill(pid, 9))
            self("down", timeout=60)


def with_suppressed(action: Callable[[], object]) -> None:
    try:
        action()
    except OSError:
        pass


def processes_in(project: str) -> list[int]:
    pids: list[int] = []
    for parent in ("sys/fs/cgroup/pids/stackd", "sys/fs/cgroup/stackd"):
        for procs in Path("/").glob(f"{parent}/{project}/*/cgroup.procs"):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
