"""open_stack brings a stack up for a block and always tears it down; the Stack drives it meanwhile."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import stackd
from stackd.api.stack import supervisor_alive
from stackd.api.types import parse_published_ports
from stackd.runtime.paths import StackPaths

SPEC: dict[str, Any] = {
    "services": {
        "db": {
            "command": [
                "sh",
                "-c",
                "echo db ready; echo to stderr >&2; trap 'exit 0' TERM; while :; do sleep 0.05; done",
            ],
            "environment": {"ROLE": "database"},
            "healthcheck": {"test": ["CMD", "true"], "interval": "20ms", "retries": 1},
        },
        "web": {"command": ["sleep", "60"], "depends_on": {"db": "healthy"}},
    }
}


async def test_a_stack_comes_up_healthy_and_runs_commands_inside(project: str, roots: dict[str, Any]) -> None:
    async with stackd.open_stack(SPEC, project=project, **roots) as stack:
        assert stack.project == project and list(stack.services) == ["db", "web"] and "db" in stack
        assert stack["db"].health == "healthy" and stack["web"].status.state == "running"
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", stack["db"].address or "")
        assert stack["db"].address != stack["web"].address
        result = await stack["db"].exec(["sh", "-c", 'echo "$ROLE $EXTRA"; echo oops >&2; exit 3'], env={"EXTRA": "x"})
        assert result == stackd.ExecResult(3, b"database x\n", b"oops\n") and not result.ok
        assert (await stack.exec("db", "cat", input="from stdin")).stdout == b"from stdin"
        assert (await stack["db"].exec(["id", "-un"], user="nobody")).text == "nobody"
        with pytest.raises(stackd.ExecError, match="exited with code 1") as failed:
            await stack["db"].exec(["false"], check=True)
        assert failed.value.result is not None and failed.value.result.exit_code == 1
        with pytest.raises(stackd.ExecError, match="cannot run no-such-command"):
            await stack["db"].exec(["no-such-command"])
        with pytest.raises(TimeoutError, match=r"did not finish within 0\.2s"):
            await stack["db"].exec(["sleep", "5"], timeout=0.2)
        line = await stack["db"].wait_for_log(re.compile(r"db \w+"), timeout=5)
        assert line.text == "db ready" and line.stream == "stdout" and line.service == "db"
        assert [(ln.stream, ln.text) async for ln in stack.logs("db")] == [
            ("stdout", "db ready"),
            ("stderr", "to stderr"),
        ]
        assert stack.log_text() == "db  | db ready\ndb  | to stderr\n"
        assert stack["db"].stats() is not None and stack["db"].pid
        assert [e.name for e in stack.history][:3] == ["network", "started", "healthy"]
        with pytest.raises(KeyError, match="no such service: nope"):
            stack["nope"]
    assert stack.closed and not (roots["state_dir"] / project).exists()
    assert "db ready" in (roots["log_dir"] / project / "db.log").read_text()  # logs outlive the stack
    with pytest.raises(stackd.StackdError, match="is closed"):
        await stack.restart("web")


async def test_operations_and_the_events_they_cause(project: str, roots: dict[str, Any]) -> None:
    async with stackd.open_stack(SPEC, project=project, **roots) as stack:
        events = stack.events("web")
        web = stack["web"]
        first = web.pid
        await web.restart(timeout=1)
        assert web.pid != first and web.status.state == "running"
        await web.stop()
        assert web.status.state == "stopped"
        await web.start()
        await stack.pause("web")
        assert web.status.state == "paused"
        await stack.unpause()
        await web.kill("TERM")  # sleep is pid 1 without a handler: the kernel drops TERM; KILL works
        await web.kill()
        seen = []
        with anyio.fail_after(5):
            async for event in events:
                seen.append(event.name)
                if seen.count("exited") == 3:
                    break
        assert seen[:4] == ["stopping", "killing", "exited", "started"] or "started" in seen
        assert {"paused", "unpaused"} <= set(seen)
        following = stack.logs("db", follow=True)
    # The block ended: a followed log and the events end with it.
    assert [line.text async for line in following] == []


async def test_a_failing_service_is_reported_with_its_log(project: str, roots: dict[str, Any]) -> None:
    spec = {
        "services": {
            "bad": {"command": ["sh", "-c", "echo cannot bind; exit 1"], "healthcheck": {"test": ["CMD", "true"]}},
            "ok": {"command": ["sleep", "9"]},
        }
    }
    with pytest.raises(stackd.NotReadyError) as caught:
        async with stackd.open_stack(spec, project=project, **roots):
            pytest.fail("the block must not run")
    assert caught.value.services == {"bad": "exited with code 1"}
    assert "cannot bind" in str(caught.value)
    assert not (roots["state_dir"] / project).exists()
    # A health check that never passes: a timeout, naming what it waits for.
    slow = {
        "services": {"db": {"command": ["sleep", "9"], "healthcheck": {"test": ["CMD", "false"], "interval": "1s"}}}
    }
    with pytest.raises(stackd.NotReadyError, match=r"not healthy after 0.3s: db \(health: starting\)"):
        async with stackd.open_stack(slow, project=project, timeout=0.3, **roots):
            pass
    async with stackd.open_stack(slow, project=project, wait="started", **roots) as stack:
        assert stack["db"].health == "starting"


class Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["exception", "keyboard-interrupt", "cancelled", "cancelled-while-starting"])
async def test_the_stack_is_always_torn_down(project: str, roots: dict[str, Any], how: str) -> None:
    slow_health = {"services": {"a": {"command": ["sleep", "30"], "healthcheck": {"test": ["CMD", "false"]}}}}
    spec = slow_health if how == "cancelled-while-starting" else SPEC
    pids: list[int] = []

    async def run() -> None:
        async with stackd.open_stack(spec, project=project, wait="healthy", **roots) as stack:
            pids.extend(s.pid for s in stack.status() if s.pid)
            if how == "exception":
                raise Boom
            if how == "keyboard-interrupt":
                raise KeyboardInterrupt
            await anyio.sleep(30)

    if how == "exception":
        with pytest.raises(Boom):
            await run()
    elif how == "keyboard-interrupt":
        with pytest.raises(KeyboardInterrupt):
            await run()
    else:
        with anyio.move_on_after(0.3) as scope:
            await run()
        assert scope.cancelled_caught
    assert not (roots["state_dir"] / project).exists()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    # the autouse leak check verifies cgroups, namespaces, links and mounts at teardown


async def test_one_project_runs_once_at_a_time(project: str, roots: dict[str, Any]) -> None:
    async with stackd.open_stack(SPEC, project=project, wait=None, **roots):
        assert supervisor_alive(StackPaths(project, roots["state_dir"], roots["log_dir"]))
        with pytest.raises(stackd.StackdError, match=f"project {project} is already up"):
            async with stackd.open_stack(SPEC, project=project, **roots):
                pass
    assert supervisor_alive(StackPaths(project, roots["state_dir"], roots["log_dir"])) is None


async def test_published_ports(project: str, roots: dict[str, Any]) -> None:
    assert parse_published_ports(["127.0.0.1:8080->80/tcp", "[::1]:9000-9001->90-91/udp", "junk"]) == (
        stackd.PublishedPort("127.0.0.1", 8080, 80),
        stackd.PublishedPort("::1", 9000, 90, "udp"),
        stackd.PublishedPort("::1", 9001, 91, "udp"),
    )
    spec = {
        "services": {
            "web": {
                "command": ["python3", "-c", SERVE_HELLO],
                "ports": ["8000"],  # any free host port, on 127.0.0.1
                "healthcheck": {"test": ["CMD", "python3", "-c", PROBE_8000], "interval": "50ms"},
            }
        }
    }
    async with stackd.open_stack(spec, project=project, **roots) as stack:
        host, port = stack["web"].port(8000)
        assert host == "127.0.0.1" and port > 0
        assert [str(p) for p in stack["web"].ports] == [f"127.0.0.1:{port}->8000/tcp"]
        async with await anyio.connect_tcp(host, port) as conn:  # through the supervisor's proxy
            assert await conn.receive(10) == b"hello"
        with pytest.raises(
            stackd.StackdError, match=rf"port 81/tcp is not published \(published: 127.0.0.1:{port}->8000/tcp\)"
        ):
            stack["web"].port(81)


SERVE_HELLO = """
import socket
server = socket.create_server(("0.0.0.0", 8000))
while True:
    conn, _ = server.accept(); conn.sendall(b"hello"); conn.close()
"""
PROBE_8000 = "import socket; socket.create_connection(('127.0.0.1', 8000), timeout=1).recv(5)"


def test_a_stack_in_a_thread_serves_plain_code_and_other_event_loops(project: str, roots: dict[str, Any]) -> None:
    with stackd.open_stack_in_thread(SPEC, project=project, **roots) as stack:
        assert stack["db"].health == "healthy" and stack["web"].address

        async def from_another_loop() -> None:
            assert (await stack["db"].exec(["echo", "hi"])).stdout == b"hi\n"
            line = await stack["db"].wait_for_log("db ready", timeout=5)
            assert line.text == "db ready"
            with anyio.move_on_after(0.2) as scope:  # cancelling the caller cancels the call
                await stack["db"].exec(["sleep", "5"])
            assert scope.cancelled_caught
            await stack.restart("web")

        anyio.run(from_another_loop)
        assert stack["web"].status.restarts == 0 and stack["web"].status.state == "running"
    assert stack.closed and not (roots["state_dir"] / project).exists()


def test_a_deferred_cleanup_returns_once_the_services_are_stopped(project: str, roots: dict[str, Any]) -> None:
    finishes: list[Callable[[], None]] = []
    with stackd.open_stack_in_thread(SPEC, project=project, defer_cleanup=finishes.append, **roots) as stack:
        pids = [stack[name].pid for name in ("db", "web")]
        assert all(pids)
    assert len(finishes) == 1, "the rest is handed over, not done"
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids), "the services are stopped already"
    finishes[0]()  # waits for the network, cgroups and state to go
    assert stack.closed and not (roots["state_dir"] / project).exists()


SCRIPT = """
import asyncio, sys
import stackd

async def main():
    spec = {"services": {"a": {"command": ["sleep", "60"]}, "b": {"command": ["sleep", "60"], "depends_on": ["a"]}}}
    async with stackd.open_stack(spec, project=sys.argv[1], state_dir=sys.argv[2], log_dir=sys.argv[3]) as stack:
        print("up", *[s.pid for s in stack.status()], flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


def _start_script(tmp_path: Path, project: str, roots: dict[str, Any]) -> tuple[subprocess.Popen[str], list[int]]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), project, str(roots["state_dir"]), str(roots["log_dir"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    words = process.stdout.readline().split()
    assert words[:1] == ["up"], process.communicate(timeout=10)
    return process, [int(pid) for pid in words[1:]]


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_ctrl_c_under_asyncio_run_tears_the_stack_down(tmp_path: Path, project: str, roots: dict[str, Any]) -> None:
    process, pids = _start_script(tmp_path, project, roots)
    try:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert "KeyboardInterrupt" in err
    assert not (roots["state_dir"] / project).exists() and _gone(pids)


def test_after_a_sigkill_stackd_down_removes_everything(tmp_path: Path, project: str, roots: dict[str, Any]) -> None:
    process, pids = _start_script(tmp_path, project, roots)
    process.kill()
    process.communicate(timeout=10)
    assert (roots["state_dir"] / project / "state.json").exists() and all(Path(f"/proc/{p}").exists() for p in pids)
    assert supervisor_alive(StackPaths(project, roots["state_dir"], roots["log_dir"])) is None
    env = {**os.environ, "STACKD_STATE_DIR": str(roots["state_dir"]), "STACKD_LOG_DIR": str(roots["log_dir"])}
    command = [sys.executable, "-m", "stackd", "down", "-p", project]
    down = subprocess.run(command, env=env, capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not (roots["state_dir"] / project).exists() and _gone(pids)
