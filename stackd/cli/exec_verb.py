"""`stackd exec SERVICE CMD...`: run a command inside a running service; its exit code comes back.

The supervisor is not in the data path: without -t this process's own stdin (with -i; else /dev/null),
stdout and stderr are passed to the supervisor over the control socket (SCM_RIGHTS), and from it to the
launcher, whose child hands them to the command. With -t the command gets a pseudo-terminal made in the
service's own devpts; its master comes back here, and this process relays its terminal to it (raw
mode) and forwards window-size changes (TIOCSWINSZ on the master).

Signals this process gets (Ctrl-C without -t, SIGTERM, SIGHUP, ...) are forwarded to the command; if
this process goes away the command is hung up on (SIGHUP), as an ssh session would be.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import termios
import tty
from typing import Any

from stackd._sys.pty import set_window_size
from stackd.cli.remote import UsageError, connect
from stackd.supervisor.control import ControlClient, checked

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def register(verbs: Any, stack_options: argparse.ArgumentParser) -> None:
    parser = verbs.add_parser(
        "exec",
        parents=[stack_options],
        help="run a command in a running service",
        description="Run a command inside a running service: its namespaces, cgroup, user, capabilities, "
        "no_new_privs and seccomp filter. Exits with the command's exit code (126: it could not be run, "
        "127: not found).",
    )
    parser.add_argument("-i", "--interactive", action="store_true", help="pass standard input to the command")
    parser.add_argument("-t", "--tty", action="store_true", help="give the command a pseudo-terminal")
    parser.add_argument("-u", "--user", metavar="USER[:GROUP]", help="run as this user (default: the service's)")
    parser.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside the service")
    parser.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable (KEY alone: take its value from here)",
    )
    parser.add_argument("service", metavar="SERVICE")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND")
    parser.set_defaults(run=run_exec)


def _environment(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key:
            raise UsageError(f"-e {pair!r}: expected KEY=VALUE")
        if not sep:
            if key not in os.environ:
                continue  # as docker does: an unset variable is left out
            value = os.environ[key]
        env[key] = value
    return env


def run_exec(args: argparse.Namespace) -> int:
    if not args.command:
        raise UsageError("exec: a command is required: stackd exec SERVICE COMMAND [ARG...]")
    fields: dict[str, Any] = {
        "service": args.service,
        "argv": list(args.command),
        "user": args.user,
        "working_dir": args.workdir,
        "env": _environment(args.env),
    }
    with connect(args) as client:
        if args.tty:
            return _with_terminal(client, fields, interactive=args.interactive)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            client.send("exec", fds=[0 if args.interactive else null, 1, 2], **fields)
        finally:
            os.close(null)
        started, extra = client.receive()
        for fd in extra:
            os.close(fd)
        checked(started)
        previous = {sig: signal.signal(sig, lambda number, _frame: _forward(client, number)) for sig in _FORWARDED}
        try:
            return _exit_code(client)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _forward(client: ControlClient, number: int) -> None:
    with contextlib.suppress(Exception):
        client.send("signal", signal=signal.Signals(number).name)


def _exit_code(client: ControlClient) -> int:
    while True:
        message, extra = client.receive()
        for fd in extra:
            os.close(fd)
        checked(message)
        if message.get("exited"):
            if message.get("code") is not None:
                return int(message["code"])
            return 128 + int(message.get("signal") or 0)


def _terminal_size() -> tuple[int, int]:
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return 24, 80


def _with_terminal(client: ControlClient, fields: dict[str, Any], *, interactive: bool) -> int:
    rows, cols = _terminal_size()
    client.send("exec", tty=True, size=[rows, cols], **fields)
    started, fds = client.receive()
    try:
        checked(started)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise UsageError("exec -t: the supervisor sent no terminal")
    master = fds[0]
    stdin_tty = interactive and os.isatty(0)
    saved = termios.tcgetattr(0) if stdin_tty else None

    def resized(_number: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            set_window_size(master, *_terminal_size())

    previous_winch = signal.signal(signal.SIGWINCH, resized)
    forwarded = {sig: signal.signal(sig, lambda number, _frame: _forward(client, number)) for sig in _FORWARDED}
    try:
        if saved is not None:
            tty.setraw(0)  # keys (Ctrl-C too) go to the command's terminal, which interprets them
        return _relay(client, master, interactive=interactive)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSAFLUSH, saved)
        signal.signal(signal.SIGWINCH, previous_winch)
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        os.close(master)


def _relay(client: ControlClient, master: int, *, interactive: bool) -> int:
    """Copy stdin -> master and master -> stdout until the command exits; then its exit code."""
    reading_stdin = interactive
    code: int | None = None
    master_open = True
    while master_open:
        watched: list[int] = [master, client.sock.fileno()] if code is None else [master]
        if reading_stdin and code is None:
            watched.append(0)
        # Once the exit is known, what is left in the terminal is read for a moment (a background
        # process of the command may hold the terminal open: it is not waited for).
        ready, _, _ = select.select(watched, [], [], None if code is None else 0.2)
        if not ready:
            break
        if master in ready:
            try:
                data = os.read(master, 65536)
            except OSError as error:
                if error.errno != errno.EIO:  # EIO: every slave is closed
                    raise
                data = b""
            if data:
                _write_all(1, data)
            else:
                master_open = False
        if 0 in ready:
            data = os.read(0, 65536)
            if data:
                _write_all(master, data)
            else:
                reading_stdin = False
                if not os.isatty(0):
                    _write_all(master, b"\x04")  # end of input: ^D to the terminal
        if client.sock.fileno() in ready and code is None:
            code = _exit_code(client)
    if code is None:
        code = _exit_code(client)
    return code


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
