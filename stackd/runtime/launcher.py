"""The supervisor's side of the launcher: start the launcher process, send it plans, hear of exits.

    async with Launcher.open() as launcher:
        pid = await launcher.launch(plan, stdout=w1, stderr=w2)
        exit = await launcher.wait(pid)

See stackd.runtime.launcher_server for the process itself and its protocol.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio

from stackd.errors import LaunchError
from stackd.runtime.plan import LaunchPlan

__all__ = ["Exit", "Launcher"]

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[2]); from stackd.runtime.launcher_server import main; main()"


@dataclass(frozen=True, slots=True)
class Exit:
    """How a service's process ended: an exit code, or the signal that killed it."""

    pid: int
    code: int | None
    signal: int | None

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with code {self.code}"


class Launcher:
    """A running launcher process and the one connection to it."""

    def __init__(self, sock: socket.socket, process: subprocess.Popen[bytes]) -> None:
        self._sock = sock
        self._process = process
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[anyio.Event, list[dict[str, Any]]]] = {}
        self._exits: dict[int, Exit] = {}
        self._exit_events: dict[int, anyio.Event] = {}
        self._listeners: list[Callable[[Exit], None]] = []
        self._closed = False
        self._send_lock = anyio.Lock()
        # The read loop is shielded from the caller's cancellation: a supervisor that is cancelled still
        # needs the exits of the services it stops. Only leaving open() ends it.
        self._read_scope = anyio.CancelScope(shield=True)

    @classmethod
    @asynccontextmanager
    async def open(cls) -> AsyncIterator[Launcher]:
        """Start a launcher process; stop it (not the services) on exit."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, str(theirs.fileno()), _PACKAGE_PARENT],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                close_fds=True,
                # Its own session: a Ctrl-C on the supervisor's terminal must not kill the launcher;
                # the supervisor decides what stops, and in which order.
                start_new_session=True,
            )
        finally:
            theirs.close()
        launcher = cls(ours, process)
        failure: BaseException | None = None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(launcher._read_until_closed)
                try:
                    yield launcher
                except BaseException as error:  # re-raised below, unwrapped from the task group
                    failure = error
                finally:
                    launcher._read_scope.cancel()
            if failure is not None:
                raise failure
        finally:
            with anyio.CancelScope(shield=True):
                await launcher._shutdown()

    def on_exit(self, listener: Callable[[Exit], None]) -> None:
        """Call `listener` for every service exit, as soon as the launcher reports it."""
        self._listeners.append(listener)

    async def launch(self, plan: LaunchPlan, *, stdout: int, stderr: int) -> int:
        """Start the service of `plan` with the given output fds; return its pid once it has exec'd.

        Raises LaunchError naming the step that failed.
        """
        reply = await self._request({"op": "launch", "plan": plan.to_wire()}, fds=[stdout, stderr])
        if reply["op"] == "failed":
            raise LaunchError(
                plan.service, reply["step"], errno=reply["errno"], path=reply["path"] or None, detail=reply["detail"]
            )
        return int(reply["pid"])

    async def exec(self, wire_plan: dict[str, Any], *, stdin: int = -1, stdout: int, stderr: int) -> int:
        """Start a process inside a running service (see plan.exec_plan); return its pid once it exec'd.

        Raises LaunchError naming the step that failed. Its exit is reported like a service's (wait()).
        """
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) if stdin < 0 else -1
        try:
            fds = [stdin if stdin >= 0 else null, stdout, stderr]
            reply = await self._request({"op": "exec", "plan": wire_plan}, fds=fds)
        finally:
            if null >= 0:
                os.close(null)
        if reply["op"] == "failed":
            raise LaunchError(
                str(wire_plan.get("service")),
                f"exec {reply['step']}",
                errno=reply["errno"],
                path=reply["path"] or None,
                detail=reply["detail"],
            )
        return int(reply["pid"])

    async def exec_tty(self, wire_plan: dict[str, Any], *, rows: int = 24, cols: int = 80) -> tuple[int, int]:
        """Like exec(), on a pseudo-terminal made inside the service's own devpts (its controlling
        terminal and stdio); returns (pid, the terminal's master fd), which the caller owns and relays."""
        reply = await self._request({"op": "exec", "plan": {**wire_plan, "tty": [rows, cols]}})
        fds = reply.pop("_fds", [])
        if reply["op"] == "failed" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise LaunchError(
                str(wire_plan.get("service")),
                f"exec {reply.get('step', 'tty')}",
                errno=reply.get("errno"),
                path=reply.get("path") or None,
                detail=reply.get("detail") or "no terminal came back",
            )
        return int(reply["pid"]), fds[0]

    async def wait(self, pid: int) -> Exit:
        """Wait for the service process `pid` to end."""
        if pid not in self._exits:
            event = self._exit_events.setdefault(pid, anyio.Event())
            await event.wait()
        return self._exits[pid]

    def exited(self, pid: int) -> Exit | None:
        """The exit of `pid` if the launcher has reported it."""
        return self._exits.get(pid)

    async def ping(self) -> None:
        await self._request({"op": "ping"})

    async def _request(self, message: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        if self._closed:
            service = str(message.get("plan", {}).get("service", "?"))
            raise LaunchError(service, "launcher", detail="the launcher process died")
        request_id = next(self._ids)
        event, box = anyio.Event(), cast(list[dict[str, Any]], [])
        self._replies[request_id] = (event, box)
        data = json.dumps({**message, "id": request_id}).encode()
        async with self._send_lock:  # one writer at a time: many tasks launch concurrently
            await self._send(request_id, message, data, fds or [])
        await event.wait()
        return box[0]

    async def _send(self, request_id: int, message: dict[str, Any], data: bytes, fds: list[int]) -> None:
        while True:
            try:
                socket.send_fds(self._sock, [data], fds)
                return
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
            except OSError as error:  # EPIPE, ECONNRESET: the launcher died
                self._replies.pop(request_id, None)
                self._closed = True
                service = str(message.get("plan", {}).get("service", "?"))
                raise LaunchError(service, "launcher", errno=error.errno, detail="the launcher process died") from None

    async def _read_until_closed(self) -> None:
        with self._read_scope:
            await self._read_loop()

    async def _read_loop(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, 1 << 20, 4)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError:  # ECONNRESET and the like: the launcher died
                data = b""
            if not data:
                self._closed = True
                for event, box in self._replies.values():
                    box.append(
                        {"op": "failed", "step": "launcher", "errno": None, "path": "", "detail": "launcher died"}
                    )
                    event.set()
                return
            message = json.loads(data)
            if fds:
                message["_fds"] = fds  # a terminal's master (exec_tty)
            if message["op"] == "exited":
                self._record_exit(Exit(message["pid"], message["code"], message["signal"]))
            else:
                waiting = self._replies.pop(message["id"], None)
                if waiting is None:  # its caller was cancelled meanwhile
                    for fd in message.get("_fds", []):
                        os.close(fd)
                    continue
                event, box = waiting
                box.append(message)
                event.set()

    def _record_exit(self, exit: Exit) -> None:
        self._exits[exit.pid] = exit
        event = self._exit_events.pop(exit.pid, None)
        if event is not None:
            event.set()
        for listener in self._listeners:
            listener(exit)

    def begin_close(self) -> None:
        """Tell the launcher process to end (it sees the end of its socket) without waiting for it;
        leaving open() waits. Nothing can be launched after this."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    async def _shutdown(self) -> None:
        self._closed = True
        self._sock.close()
        try:
            await anyio.to_thread.run_sync(self._process.wait, 5)
        except subprocess.TimeoutExpired:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()
