"""The start-up progress line of `stackd up` on a terminal."""

from __future__ import annotations

import io
import os
import pty
import secrets
import select
import signal
import sys
import time
from pathlib import Path

from stackd.cli.progress import ProgressLine
from stackd.testing.leaks import LeakGuard


class FakeTerminal(io.StringIO):
    def fileno(self) -> int:
        raise OSError("not a real terminal")


def test_the_line_follows_the_services_and_ends_in_a_summary() -> None:
    terminal = FakeTerminal()
    line = ProgressLine(["db", "web", "migrate"], checked=["db"], stream=terminal)
    assert line.on_event("network", "", {"subnet": "10.213.7.0/24"})
    assert line.text() == "[+] up 0/3 · network 10.213.7.0/24 · db waiting · web waiting · migrate waiting"
    assert line.on_event("started", "db", {"pid": 1})
    assert line.on_event("starting", "db", {})
    assert line.on_event("started", "web", {"pid": 2})
    assert line.text() == "[+] up 1/3 · network 10.213.7.0/24 · db starting · migrate waiting"
    assert not line.on_event("exited", "migrate", {"code": 0})  # printed as well: it is news
    assert line.active
    assert line.on_event("healthy", "db", {})
    assert not line.active  # every service is ready: the summary replaced the line
    last = terminal.getvalue().rsplit("\r\x1b[K", 1)[-1]
    assert last.startswith("[+] up 3/3 in ") and last.endswith(" s\n")
    assert not line.on_event("started", "web", {})  # after the summary every event is printed


def test_a_failed_service_settles_the_line_without_counting_as_up() -> None:
    terminal = FakeTerminal()
    line = ProgressLine(["a", "b"], stream=terminal)
    line.on_event("started", "a", {})
    line.on_event("failed", "b", {"error": "no such file"})
    assert not line.active
    assert terminal.getvalue().endswith("[+] up 1/2 in " + terminal.getvalue().rsplit(" in ", 1)[1])


def test_up_on_a_terminal_draws_the_line_and_prints_no_started_events(tmp_path: Path, leak_check: LeakGuard) -> None:
    project = f"pg-{secrets.token_hex(3)}"
    leak_check.track(project)
    (tmp_path / "stack.toml").write_text(
        f'name = "{project}"\n[services.a]\ncommand = ["sh", "-c", "echo hello; sleep 30"]\ninit = true\n'
        '[services.b]\ncommand = ["sleep", "30"]\ninit = true\n'
    )
    env = {**os.environ, "STACKD_STATE_DIR": str(tmp_path / "run"), "STACKD_LOG_DIR": str(tmp_path / "log")}
    pid, fd = pty.fork()
    if pid == 0:  # the child: stackd up on the pty
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, "-m", "stackd", "up"], env)
    output = b""
    try:
        deadline = time.monotonic() + 20
        while b"[+] up 2/2 in" not in output or b"hello" not in output:
            assert time.monotonic() < deadline, output
            if select.select([fd], [], [], 0.1)[0]:
                output += os.read(fd, 65536)
        os.kill(pid, signal.SIGINT)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the pty closes when stackd is gone
                break
            if not chunk:
                break
            output += chunk
    finally:
        _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "[+] up 0/2" in text and "network 10.213." in text
    assert " started " not in text  # the line showed it instead
    assert "stopping" in text  # events after start-up are printed as usual
