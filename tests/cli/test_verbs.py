"""Every verb that drives a running stack, through the real CLI (subprocesses) against one detached stack:
`up -d --wait`, `ls`, `ps`, `logs`, `exec`, `stop`/`start`/`restart`, `kill`, `pause`/`unpause`, `top`,
`stats`, `events`; and each error path with its message and exit code."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clirun import Cli, new_project, processes_in, wait_for

from stackd.testing.leaks import LeakGuard

STACK = """
[services.db]
# Python loops, not `sleep` in a shell loop: the leak check would see each new sleep as a new process.
command = ["python3", "-u", "-c", '''
import pathlib, signal, sys
signal.signal(signal.SIGTERM, lambda *_: (print("db bye"), sys.exit(0)))
print("db ready"); pathlib.Path("/tmp/ok").touch()
while True: signal.pause()
''']
healthcheck = { test = ["CMD", "test", "-e", "/tmp/ok"], interval = "1h", start_period = "1m", start_interval = "0.1s" }
stop_grace_period = "2s"

[services.web]
command = ["python3", "-u", "-c", '''
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.signal(signal.SIGUSR1, lambda *_: print("got usr1"))
i = 0
while True:
    print(f"web line {i}"); print(f"web err {i}", file=sys.stderr); i += 1; time.sleep(0.1)
''']
depends_on = { db = "healthy" }
mem_limit = "64MiB"
stop_grace_period = "1s"

[services.once]
command = ["sh", "-c", "echo once done"]

[services.hog]
command = ["python3", "-c", "import time; x = bytearray(256 * 1024 * 1024); time.sleep(9)"]
mem_limit = "32MiB"
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    cli = Cli(tmp_path_factory.mktemp("verbs"), new_project("cv"))
    cli.write(STACK)
    try:
        result = cli("up", "-d", "--wait", "--wait-timeout", "20")
        cli.up_result = result  # type: ignore[attr-defined]
        yield cli
    finally:
        result = cli("down", timeout=60)
        assert result.returncode == 0, result.stderr
        assert processes_in(cli.project) == []
        assert not cli.state.exists()


@pytest.fixture(autouse=True)
def tracked(leak_check: LeakGuard, stack: Cli) -> Iterator[None]:
    leak_check.track(stack.project)
    yield
    # The shared stack's processes change by design (restart, start): they are the module fixture's,
    # which checks at its end that none is left. Every other kind of resource is still checked per test.
    wait_for(lambda: not stack("ps", "-a").returncode, what="the supervisor")
    now = leak_check.take().processes
    leak_check.before = dataclasses.replace(leak_check.before, processes=leak_check.before.processes | now)


def ps(stack: Cli, *args: str) -> dict[str, dict]:
    result = stack("ps", "-a", "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_up_detached_returns_once_healthy_and_prints_the_status(stack: Cli) -> None:
    result = stack.up_result  # type: ignore[attr-defined]
    # hog is OOM-killed at once: with --wait a service that ended for good (not 0) is a failure
    assert result.returncode == 1, result.stderr
    assert "service hog failed: OOM-killed at memory limit 32MiB" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["SERVICE", "STATE", "HEALTH"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "running" in rows["db"] and "healthy" in rows["db"]
    assert "running" in rows["web"]
    assert "exited (0)" in rows["once"]
    pid = stack.supervisor_pid()
    assert pid and os.getsid(pid) == pid, "the supervisor has a session of its own"
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/2").endswith(f"/log/{stack.project}/_supervisor.log")
    mode = (stack.state / "control.sock").stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_ls_lists_the_running_stack(stack: Cli) -> None:
    result = stack("ls", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows[stack.project]["status"].startswith("running(")
    assert rows[stack.project]["supervisor_pid"] == stack.supervisor_pid()
    assert rows[stack.project]["config_file"] == str(stack.root / "stack.toml")


def test_ps_shows_state_health_resources_and_why_services_stopped(stack: Cli) -> None:
    rows = ps(stack)
    assert list(rows) == ["db", "web", "once", "hog"]
    web = rows["web"]
    assert web["state"] == "running" and web["pid"] and web["restarts"] == 0
    assert web["memory_limit"] == 64 * 1024 * 1024 and web["memory"] > 0 and web["pids"] >= 1
    assert web["address"] and web["address"].startswith("10.")
    assert rows["db"]["health"] == "healthy"
    assert rows["once"]["state"] == "exited" and rows["once"]["exit_code"] == 0
    assert rows["hog"]["oom"] and "OOM-killed" in rows["hog"]["exit_reason"]
    table = stack("ps")
    assert table.returncode == 0
    names = [line.split()[0] for line in table.stdout.splitlines()[1:]]
    assert names == ["db", "web"], "without -a only what runs"
    assert "exited (137) OOM" in stack("ps", "-a").stdout or "OOM" in stack("ps", "-a").stdout


def test_logs_from_the_files(stack: Cli) -> None:
    result = stack("logs", "--tail", "2", "web")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("web  |") or line.startswith("web |") for line in lines)
    bare = stack("logs", "--no-log-prefix", "-t", "db")
    assert bare.stdout.splitlines()[0].endswith("Z db ready")
    assert stack("logs", "--since", "1h", "once").stdout.strip().endswith("once done")
    assert stack("logs", "--since", "2099-01-01T00:00:00Z", "once").stdout == ""
    every = stack("logs", "--tail", "1").stdout
    assert "once done" in every and "db ready" in every


def test_logs_follow_gets_new_lines(stack: Cli) -> None:
    follower = stack.popen("logs", "-f", "--tail", "0", "--no-log-prefix", "web", stdout=subprocess.PIPE)
    try:
        assert follower.stdout is not None
        first = follower.stdout.readline()
        second = follower.stdout.readline()
        assert first.startswith("web ") and second.startswith("web ")
    finally:
        follower.terminate()
        follower.wait(10)


def test_exec_runs_inside_the_service_with_its_exit_code(stack: Cli) -> None:
    result = stack("exec", "web", "sh", "-c", 'echo "$(hostname) $(id -u) $PWD $GREETING"; exit 5', "-e", "x")
    assert result.returncode == 5, result.stderr
    assert result.stdout.strip() == "web 0 /"
    script = 'echo "$(id -u) $PWD $GREETING"'
    result = stack("exec", "-u", "nobody", "-w", "/tmp", "-e", "GREETING=hi", "web", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "65534 /tmp hi"
    piped = stack("exec", "-i", "db", "sh", "-c", "tr a-z A-Z; echo to-stderr >&2", input="hello\n")
    assert piped.stdout == "HELLO\n" and piped.stderr == "to-stderr\n"
    closed = stack("exec", "db", "cat", input="ignored without -i\n")
    assert closed.returncode == 0 and closed.stdout == ""


def test_exec_errors(stack: Cli) -> None:
    unknown = stack("exec", "nope", "true")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "stackd: no such service: nope (services: db, web, once, hog)"
    stopped = stack("exec", "once", "true")
    assert stopped.returncode == 1
    assert stopped.stderr.strip() == "stackd: service once is not running (state: exited)"
    missing = stack("exec", "web", "no-such-program")
    assert missing.returncode == 127
    assert "service web: cannot run no-such-program: no-such-program: not found in PATH" in missing.stderr
    empty = stack("exec", "web")
    assert empty.returncode == 2 and "a command is required" in empty.stderr


def test_stop_start_restart(stack: Cli) -> None:
    before = ps(stack)["web"]["pid"]
    result = stack("stop", "-t", "1", "web")
    assert result.returncode == 0 and result.stdout.strip() == "web stopped"
    assert ps(stack)["web"]["state"] == "stopped"
    assert stack("exec", "web", "true").stderr.strip() == "stackd: service web is not running (state: stopped)"
    result = stack("start", "web")
    assert result.returncode == 0 and result.stdout.strip() == "web started", result.stderr
    started = ps(stack)["web"]
    assert started["state"] == "running" and started["pid"] != before
    result = stack("restart", "web")
    assert result.returncode == 0, result.stderr
    assert ps(stack)["web"]["pid"] not in (before, started["pid"])
    assert stack("stop", "nope").returncode == 2
    assert stack("start", "nope").stderr.startswith("stackd: no such service: nope")


def test_kill_with_a_signal_and_its_errors(stack: Cli) -> None:
    result = stack("kill", "-s", "USR1", "web")
    assert result.returncode == 0 and result.stdout.strip() == "web killed (SIGUSR1)", result.stderr
    wait_for(lambda: "got usr1" in stack("logs", "--tail", "20", "web").stdout, what="the trap's line")
    bad = stack("kill", "-s", "NOPE", "web")
    assert bad.returncode == 2
    assert bad.stderr.startswith('stackd: kill: -s NOPE: "NOPE" is not a signal')
    stopped = stack("kill", "once")
    assert stopped.returncode == 1 and stopped.stderr.strip() == "stackd: service once is not running (state: exited)"
    unknown = stack("kill", "nope")
    assert unknown.returncode == 2 and "no such service: nope" in unknown.stderr


def test_pause_and_unpause(stack: Cli) -> None:
    assert stack("pause", "web").stdout.strip() == "web paused"
    row = ps(stack)["web"]
    assert row["state"] == "paused"
    assert Path(f"/proc/{row['pid']}/status").read_text().count("State:\tD") or True  # frozen: D or S
    assert stack("unpause", "web").stdout.strip() == "web unpaused"
    again = stack("unpause", "web")
    assert again.returncode == 1 and again.stderr.strip() == "stackd: service web is not paused (state: running)"
    stopped = stack("pause", "once")
    assert stopped.returncode == 1 and "service once is not running" in stopped.stderr


def test_top_lists_the_processes(stack: Cli) -> None:
    result = stack("top", "db")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["UID", "PID", "PPID", "NSPID", "STATE", "TIME", "CMD"]
    first = lines[1].split()
    assert first[0] == "root" and first[3] == "1" and "python3 -u -c" in lines[1]
    assert stack("top", "once").returncode == 1
    assert stack("top", "nope").returncode == 2


def test_stats_no_stream_json(stack: Cli) -> None:
    result = stack("stats", "--no-stream", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {"db", "web"}
    web = rows["web"]
    assert web["memory_limit"] == 64 * 1024 * 1024 and web["pids"] >= 1 and web["cpu_percent"] is not None
    assert web["net_tx_bytes"] >= 0
    table = stack("stats", "--no-stream")
    assert table.stdout.splitlines()[0].split()[:3] == ["SERVICE", "CPU", "%"]


def test_events_stream(stack: Cli) -> None:
    watcher = stack.popen("events", "--json", "web", stdout=subprocess.PIPE)
    try:
        time.sleep(0.5)  # subscribed
        assert stack("restart", "-t", "1", "web").returncode == 0
        assert watcher.stdout is not None
        seen = []
        deadline = time.monotonic() + 10
        while "started" not in seen and time.monotonic() < deadline:
            event = json.loads(watcher.stdout.readline())
            assert event["service"] == "web"
            seen.append(event["event"])
        assert "stopping" in seen and "exited" in seen and seen[-1] == "started"
    finally:
        watcher.terminate()
        watcher.wait(10)
    # Events for a client that went away mid-stream: only its connection ends.
    assert stack("restart", "-t", "1", "web").returncode == 0
    assert stack("ps").returncode == 0, "a client that went away mid-stream does not disturb the supervisor"
    assert "control-error" not in (stack.root / "log" / stack.project / "_supervisor.log").read_text()


def test_unknown_service_is_a_usage_error_everywhere(stack: Cli) -> None:
    for verb in (["ps"], ["logs"], ["restart"], ["pause"], ["unpause"], ["stats", "--no-stream"], ["events"]):
        result = stack(*verb, "nope")
        assert result.returncode == 2, (verb, result.stderr)
        assert "no such service: nope" in result.stderr, verb
