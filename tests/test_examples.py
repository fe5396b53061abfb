"""The runnable examples run: each is copied to a temporary directory and brought up for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from stackd.testing.leaks import LeakGuard

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_pipeline_example_moves_jobs_and_stops_cleanly(tmp_path: Path, leak_check: LeakGuard) -> None:
    leak_check.track("pipeline")
    example = shutil.copytree(EXAMPLES / "pipeline", tmp_path / "pipeline")
    env = {**os.environ, "STACKD_STATE_DIR": str(tmp_path / "run"), "STACKD_LOG_DIR": str(tmp_path / "log")}
    process = subprocess.Popen(
        [sys.executable, "-m", "stackd", "-f", str(example / "stack.toml"), "up", "--log-format", "json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        log = tmp_path / "log" / "pipeline" / "consumer.log"
        while not (log.exists() and b"job 2" in log.read_bytes()):
            assert time.monotonic() < deadline and process.poll() is None, "no job reached the consumer"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "prepare  | prepared the queue" in out
    assert "consumer | job 1" in out
    assert '"event": "healthy"' in err and '"service": "producer"' in err


def test_the_redis_app_example_suite_passes(tmp_path: Path, leak_check: LeakGuard) -> None:
    """examples/redis-app: an async application's own tests, a real redis-server per test (the plugin)."""
    prefix = f"exredis{os.getpid()}"
    leak_check.track(prefix)
    assert shutil.which("redis-server"), "redis-server is missing: run ./scripts/install-system-deps"
    example = EXAMPLES / "redis-app"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            f"stackd_project_prefix={prefix}",
            "--stackd-state-dir",
            str(tmp_path / "run"),
            "--stackd-log-dir",
            str(tmp_path / "log"),
            "--stackd-leak-check",
            "--basetemp",
            str(tmp_path / "basetemp"),
        ],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout


def test_the_hello_example_serves_its_page_by_name_and_on_the_host(tmp_path: Path, leak_check: LeakGuard) -> None:
    """examples/hello: `up -d --wait`, the client fetches from `web` by name, the host from the published
    port (moved to a free one here, so that the test never collides with a stack of the machine)."""
    import socket
    import urllib.request

    leak_check.track("hello")
    example = shutil.copytree(EXAMPLES / "hello", tmp_path / "hello")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stack = example / "stack.toml"
    stack.write_text(stack.read_text().replace("127.0.0.1:28080:8000", f"127.0.0.1:{port}:8000"))
    env = {**os.environ, "STACKD_STATE_DIR": str(tmp_path / "run"), "STACKD_LOG_DIR": str(tmp_path / "log")}

    def stackd(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "stackd", "-f", str(stack), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    try:
        up = stackd("up", "-d", "--wait")
        assert up.returncode == 0, up.stderr
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy
        with direct.open(f"http://127.0.0.1:{port}/", timeout=5) as page:
            assert page.read().decode().strip() == "hello from stackd"
        ps = stackd("ps")
        assert f"127.0.0.1:{port}->8000/tcp" in ps.stdout, ps.stdout
        log = tmp_path / "log" / "hello" / "client.log"
        deadline = time.monotonic() + 15
        while not (log.exists() and b"hello from stackd" in log.read_bytes()):
            assert time.monotonic() < deadline, "the client never fetched the page from web"
            time.sleep(0.1)
    finally:
        down = stackd("down")
    assert down.returncode == 0, down.stderr
