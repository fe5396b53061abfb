"""`stackd exec -it`: a pseudo-terminal made in the service's own devpts, relayed by the CLI, with resize.
The CLI itself runs on a terminal made by Python's pty module."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import time

from clirun import Cli


def read_until(fd: int, token: bytes, seen: bytearray, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while token not in seen:
        assert time.monotonic() < deadline, f"no {token!r} in {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # EIO: the other side is closed
                assert token in seen, f"no {token!r} in {bytes(seen)!r}"


def test_exec_with_a_terminal_inside_the_service(cli: Cli) -> None:
    cli.write('[services.shell]\ncommand = ["sleep", "300"]\ninit = true\nuser = "nobody"\n')
    assert cli("up", "-d").returncode == 0
    script = 'tty; stty size; ls -l "$(tty)"; echo ready; read answer; stty size; echo "got $answer"; exit 3'
    pid, master = pty.fork()
    if pid == 0:  # the CLI, on a terminal of its own
        os.chdir(cli.root)
        os.execve(sys.executable, [sys.executable, "-m", "stackd", "exec", "-it", "shell", "sh", "-c", script], cli.env)
    try:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        seen = bytearray()
        read_until(master, b"ready", seen)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))  # the CLI gets SIGWINCH
        time.sleep(0.2)
        os.write(master, b"hello\r")  # the terminal is raw here: the service's terminal makes the newline
        read_until(master, b"got hello", seen)
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)
    lines = bytes(seen).decode().replace("\r", "").splitlines()
    assert os.waitstatus_to_exitcode(status) == 3
    assert lines[0] == "/dev/pts/0", "a pty of the service's own devpts instance"
    assert lines[1] == "40 120"
    assert " nobody " in lines[2], "the terminal belongs to the user the command runs as"
    assert "50 132" in lines and "got hello" in lines
