"""`stackd up` and `stackd down` through the real CLI: Ctrl-C, and down after the supervisor was SIGKILLed."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stackd.testing.leaks import LeakGuard

STACK = """
name = "{project}"
[services.db]
# db daemonises a grandchild: `down` must kill it through the cgroup.
command = ["sh", "-c", '''echo db ready; trap 'echo db bye; exit 0' TERM
sh -c 'sleep 300' & while :; do sleep 0.05; done''']
[services.web]
command = ["sh", "-c", "echo web ready; exec sleep 300"]
depends_on = ["db"]
stop_grace_period = "200ms"
"""


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    name = f"cu-{secrets.token_hex(3)}"
    leak_check.track(name)
    return name


def start_up(tmp_path: Path, project: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    (tmp_path / "stack.toml").write_text(STACK.format(project=project))
    env = {**os.environ, "STACKD_STATE_DIR": str(tmp_path / "run"), "STACKD_LOG_DIR": str(tmp_path / "log")}
    process = subprocess.Popen(
        [sys.executable, "-m", "stackd", "up", "--log-format", "json"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, env


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def processes_in(project: str) -> list[int]:
    pids: list[int] = []
    for procs in Path("/sys/fs/cgroup/pids/stackd", project).glob("*/cgroup.procs"):
        pids += [int(p) for p in procs.read_text().split()]
    return pids


def test_ctrl_c_stops_in_reverse_order_and_removes_everything(tmp_path: Path, project: str) -> None:
    process, _ = start_up(tmp_path, project)
    try:
        wait_for(lambda: len(processes_in(project)) >= 4)
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "db    | db ready" in out or "db  | db ready" in out
    assert out.rstrip().endswith("db bye")
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    exits = [e["service"] for e in events if e["event"] == "exited"]
    assert exits == ["web", "db"], "web depends on db: it must stop first"
    assert not (tmp_path / "run" / project).exists()
    assert processes_in(project) == []


def test_down_after_the_supervisor_was_sigkilled_leaves_nothing(tmp_path: Path, project: str) -> None:
    process, env = start_up(tmp_path, project)
    try:
        wait_for(lambda: len(processes_in(project)) >= 4)
        record = json.loads((tmp_path / "run" / project / "state.json").read_text())
        assert record["supervisor_pid"] == process.pid
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]
    assert processes_in(project), "the services outlive their supervisor until `down`"
    result = subprocess.run(
        [sys.executable, "-m", "stackd", "down", "-p", project], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert processes_in(project) == []
    assert not (tmp_path / "run" / project).exists()
    # And the project can come up again at once.
    again, _ = start_up(tmp_path, project)
    try:
        wait_for(lambda: len(processes_in(project)) >= 4)
        again.send_signal(signal.SIGTERM)
        _, err = again.communicate(timeout=20)
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()
    assert again.returncode == 0, err
    assert processes_in(project) == []


def test_exit_code_from_a_service_stops_the_stack_and_returns_its_code(tmp_path: Path, project: str) -> None:
    (tmp_path / "stack.toml").write_text(
        f"""
name = "{project}"
[services.server]
command = ["sleep", "300"]
stop_grace_period = "100ms"
[services.tests]
command = ["sh", "-c", "echo running tests; exit 3"]
depends_on = ["server"]
"""
    )
    env = {**os.environ, "STACKD_STATE_DIR": str(tmp_path / "run"), "STACKD_LOG_DIR": str(tmp_path / "log")}
    result = subprocess.run(
        [sys.executable, "-m", "stackd", "up", "--exit-code-from", "tests"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3, result.stderr
    assert "running tests" in result.stdout
    assert processes_in(project) == []
    bad = subprocess.run(
        [sys.executable, "-m", "stackd", "up", "--exit-code-from", "nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "no such service: nope" in bad.stderr


def test_down_after_the_supervisor_was_sigkilled_while_coming_up(tmp_path: Path, project: str) -> None:
    """Killed while web still waits for db to become healthy: `down` removes what was made so far."""
    (tmp_path / "stack.toml").write_text(
        f"""
name = "{project}"
[services.db]
command = ["sh", "-c", "sleep 1.5; touch /tmp/ready; exec sleep 300"]
healthcheck = {{ test = ["CMD", "test", "-e", "/tmp/ready"], interval = "100ms" }}
[services.web]
command = ["sleep", "300"]
depends_on = {{ db = "healthy" }}
"""
    )
    env = {**os.environ, "STACKD_STATE_DIR": str(tmp_path / "run"), "STACKD_LOG_DIR": str(tmp_path / "log")}
    process = subprocess.Popen(
        [sys.executable, "-m", "stackd", "up"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: len(processes_in(project)) >= 1)
        state = json.loads((tmp_path / "run" / project / "state.json").read_text())
        assert "web" not in state["resources"].get("cgroup", {}), "web started before db was healthy"
        assert state["resources"]["endpoint"].keys() == {"db", "web"}
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()  # type: ignore[union-attr]
    result = subprocess.run(
        [sys.executable, "-m", "stackd", "down", "-p", project], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert processes_in(project) == []
    assert not (tmp_path / "run" / project).exists()
