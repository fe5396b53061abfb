"""The control socket of a running stack: `stackd ps`, `exec`, `stop`, `events` ... talk to the supervisor here.

    hub = EventHub()                                       # emit() publishes every event to it
    async with ControlServer.serve(supervisor, hub) as server:
        ...                                                # <state>/<project>/control.sock accepts clients

    client = ControlClient.connect(paths)                  # the CLI, the Python API (blocking)
    services = client.call("ps")["services"]

The protocol (docs/control-protocol.md): JSON lines over an AF_UNIX stream socket, one request a line,
each with the protocol version ``"v": 1``; file descriptors (exec's stdio, a pseudo-terminal's master)
travel as SCM_RIGHTS with the line they belong to. The socket is mode 0600 (root only), or 0660 with
a group the admin names; every peer is checked with SO_PEERCRED.

The supervisor never waits for a client: each connection has its own task; a streaming connection
(events) reads from a bounded queue and is closed when it falls too far behind; a client that
disconnects only ends its own task.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from stackd.errors import LaunchError, StackdError
from stackd.runtime.paths import StackPaths
from stackd.runtime.plan import exec_plan
from stackd.spec.graph import needs, with_dependencies
from stackd.spec.signals import normalise_signal, signal_number
from stackd.supervisor.state import StateRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from stackd.supervisor.runner import ServiceRunner
    from stackd.supervisor.stack import StackSupervisor

__all__ = [
    "PROTOCOL_VERSION",
    "Closed",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "EventHub",
    "NotUp",
    "SupervisorGone",
    "readiness",
    "socket_path",
    "wait_ready",
]

PROTOCOL_VERSION = 1
#: stackd's version (the package is imported before any of its modules; not imported here: layering)
__version__ = str(getattr(sys.modules.get("stackd"), "__version__", "unknown"))
MAX_LINE = 1 << 20  # a request (an `up` carries the resolved stack file)
MAX_CONNECTIONS = 256
PS_CACHE = 0.1  # seconds a `ps` answer may be reused (see ControlServer._ps_cache)
EVENT_QUEUE = 1000  # events a streaming client may fall behind before it is disconnected
_PEERCRED = struct.Struct("3i")


def socket_path(paths: StackPaths) -> Path:
    return paths.state / "control.sock"


class ControlError(StackdError):
    """An error answered by the supervisor (or a failure to reach it), with a stable `code`."""

    def __init__(self, code: str, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self), "exit_code": self.exit_code}


class NotUp(ControlError):
    """The project has no state record: it is not up."""


class SupervisorGone(ControlError):
    """The project's supervisor died (its record is still there): `stackd down` cleans up."""


class Closed(ControlError):
    """The supervisor closed the connection (the stack is going down, or it dropped a slow stream)."""


# --- events ------------------------------------------------------------------------------------------


class EventSubscription:
    """A bounded queue of one client's events; `overflowed` once it fell more than `max_items` behind."""

    def __init__(self, hub: EventHub, services: frozenset[str] | None, max_items: int) -> None:
        self._hub = hub
        self.services = services
        self.max_items = max_items
        self.queue: deque[dict[str, Any]] = deque()
        self.overflowed = False
        self.closed = False
        self._wakeup = anyio.Event()
        #: set at overflow: the sender may be blocked on a client that does not read; this cuts it off
        self.cut_off = anyio.Event()

    def offer(self, event: dict[str, Any]) -> None:
        if self.closed or self.overflowed:
            return
        if self.services is not None and event.get("service") not in self.services:
            return
        if len(self.queue) >= self.max_items:
            self.overflowed = True
            self.queue.clear()
            self.cut_off.set()
        else:
            self.queue.append(event)
        self._wakeup.set()

    async def receive(self) -> list[dict[str, Any]]:
        """What is queued (waits for at least one event). Raises anyio.EndOfStream once closed."""
        while not self.queue:
            if self.closed or self.overflowed:
                raise anyio.EndOfStream
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
        items = list(self.queue)
        self.queue.clear()
        return items

    def close(self) -> None:
        self.closed = True
        self._hub._subs.discard(self)
        self._wakeup.set()


class EventHub:
    """Fans the supervisor's events out to control clients; never blocks the caller of publish()."""

    def __init__(self) -> None:
        self._subs: set[EventSubscription] = set()
        self._changed = anyio.Event()

    def publish(self, event: str, service: str | None, fields: dict[str, Any]) -> None:
        record = {
            "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "event": event,
            "service": service or None,
            **{key: _plain(value) for key, value in fields.items()},
        }
        for sub in list(self._subs):
            sub.offer(record)
        self._changed.set()
        self._changed = anyio.Event()

    def subscribe(self, services: Iterable[str] | None = None, max_items: int = EVENT_QUEUE) -> EventSubscription:
        sub = EventSubscription(self, None if services is None else frozenset(services), max_items)
        self._subs.add(sub)
        return sub

    def next_event(self) -> anyio.Event:
        """An Event set by the next publish(): take it before looking at the state it may change."""
        return self._changed

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


# --- readiness (up -d, up -d --wait, sd_notify READY=1) ------------------------------------------------


def readiness(runner: ServiceRunner, *, healthy: bool) -> tuple[str, str]:
    """("ready" | "waiting" | "failed", why) of one service.

    Ready: running (and healthy, when `healthy` and the service has a health check), or completed with
    code 0. Failed: ended for good otherwise (could not start, a dependency failed, exited non-zero and
    not restarted), or unhealthy when `healthy` is asked for.
    """
    exit = runner.last_exit
    if runner.finished.is_set() or (not runner.active and runner.state in ("exited", "stopped")):
        if runner.state == "exited" and exit is not None and exit.code == 0 and runner.last_reason in ("", str(exit)):
            return "ready", "completed"
        if runner.state == "created":
            return ("failed", _DEPENDENCY_FAILED) if runner.finished.is_set() else ("waiting", "created")
        if not healthy and exit is not None and runner.started.is_set():
            return "ready", f"started, then {runner.last_reason or exit}"  # it ran: "started" is all -d promises
        reason = runner.last_reason or runner.state
        return "failed", reason
    if runner.state == "running":
        if healthy and runner.service.healthcheck is not None:
            if runner.health == "healthy":
                return "ready", "healthy"
            if runner.health == "unhealthy":
                return "failed", "unhealthy"
            return "waiting", "health: starting"
        return "ready", "running"
    if runner.state == "restarting":
        return "waiting", f"restarting ({runner.last_reason})" if runner.last_reason else "restarting"
    return "waiting", runner.state


_DEPENDENCY_FAILED = "not started: a dependency failed"


async def wait_ready(
    supervisor: StackSupervisor,
    names: Sequence[str],
    hub: EventHub,
    *,
    healthy: bool,
    timeout: float | None = None,
) -> dict[str, tuple[str, str]]:
    """Until every service of `names` is ready or failed (or `timeout` passed): each one's readiness.
    Woken by the supervisor's events and the runners' ends, not by polling."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        changed = hub.next_event()  # before looking: an event from now on wakes us
        runners = supervisor.runners
        states = {name: readiness(runners[name], healthy=healthy) for name in names if name in runners}
        for name, (state, detail) in states.items():
            if detail == _DEPENDENCY_FAILED:
                failed = [d for d in needs(runners[name].service) if d in runners and not runners[d].active]
                states[name] = (state, f"not started: {', '.join(failed)} failed" if failed else detail)
        waiting = [name for name, (state, _) in states.items() if state == "waiting"]
        if not waiting:
            return states
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return states
        with anyio.move_on_after(left):
            async with anyio.create_task_group() as group:

                async def woken(event_wait: Callable[[], Any], group: anyio.abc.TaskGroup = group) -> None:
                    await event_wait()
                    group.cancel_scope.cancel()

                group.start_soon(woken, changed.wait)
                for name in waiting:
                    group.start_soon(woken, supervisor.runners[name].finished.wait)


# --- the server -----------------------------------------------------------------------------------------


@dataclass
class _Peer:
    pid: int
    uid: int
    gid: int


class _Connection:
    """One client: JSON lines in (with the fds that came along), JSON lines out."""

    def __init__(self, sock: socket.socket, peer: _Peer) -> None:
        self.sock = sock
        self.peer = peer
        self._buffer = b""
        self._fds: list[int] = []
        self.closed = False

    async def read_request(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next request and the fds received with it; None at the end of the connection."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise ControlError("too-long", f"request longer than {MAX_LINE} bytes")
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 16)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            except OSError:
                data, fds = b"", []
            self._fds += fds
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        fds, self._fds = self._fds, []
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as error:
            _close_all(fds)
            raise ControlError("bad-request", f"a request is one JSON object a line: {error}", 2) from None
        return request, fds

    @staticmethod
    def encode(message: dict[str, Any]) -> bytes:
        return json.dumps({"v": PROTOCOL_VERSION, **message}, default=str).encode() + b"\n"

    async def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        await self.send_raw(self.encode(message), fds)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(data)
        first = True
        while view:
            try:
                sent = socket.send_fds(self.sock, [view], list(fds)) if first and fds else self.sock.send(view)
                first = False
                view = view[sent:]
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
            except OSError as error:  # the client went away
                raise _Gone from error

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _close_all(self._fds)
            self.sock.close()


class _Gone(Exception):
    """The client disconnected."""


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _group_id(group: str | int | None) -> int | None:
    if group is None or group == "":
        return None
    if isinstance(group, int) or str(group).isdigit():
        return int(group)
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise StackdError(f"STACKD_GROUP: no such group: {group}") from None


def _supplementary_groups(pid: int) -> set[int]:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    return set()


class ControlServer:
    """Serves the control protocol for one supervisor (see the module's docstring)."""

    def __init__(
        self,
        supervisor: StackSupervisor,
        hub: EventHub,
        listener: socket.socket,
        path: Path,
        *,
        group: int | None,
        on_down: Callable[[float | None], None] | None,
    ) -> None:
        self.supervisor = supervisor
        self.hub = hub
        self.path = path
        self.group = group
        self._listener = listener
        self._on_down = on_down
        self._connections: set[_Connection] = set()
        self._last_cpu: dict[tuple[str, int], tuple[float, int]] = {}  # (service, pid) -> (time, cpu usec) at a ps
        self.requests = 0
        # `ps` answers, reused for PS_CACHE seconds while no event happened and no operation ran: a flood
        # of `ps` then costs the supervisor's loop a lookup and a send each, not a look at every cgroup.
        self._ps_cache: dict[tuple[str, ...], tuple[float, anyio.Event, bytes]] = {}

    @classmethod
    @asynccontextmanager
    async def serve(
        cls,
        supervisor: StackSupervisor,
        hub: EventHub,
        *,
        group: str | int | None = None,
        on_down: Callable[[float | None], None] | None = None,
    ) -> AsyncIterator[ControlServer]:
        """Listen on `<state>/<project>/control.sock` until the block ends (then close every connection)."""
        gid = _group_id(group if group is not None else os.environ.get("STACKD_GROUP"))
        path = socket_path(supervisor.paths)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead supervisor's (open() refuses a live one before we get here)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        old = os.umask(0o177)  # born 0600: no moment when others could connect
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        listener.listen(64)
        server = cls(supervisor, hub, listener, path, group=gid, on_down=on_down)
        try:
            async with anyio.create_task_group() as group_:
                group_.start_soon(server._accept_loop, group_)
                try:
                    yield server
                finally:
                    group_.cancel_scope.cancel()
        finally:
            listener.close()
            for connection in list(server._connections):
                connection.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _accept_loop(self, group: anyio.abc.TaskGroup) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                await anyio.wait_readable(self._listener)
                continue
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await anyio.sleep(0.1)  # out of descriptors: let connections end
                    continue
                raise
            sock.setblocking(False)
            pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            connection = _Connection(sock, _Peer(pid, uid, gid))
            if len(self._connections) >= MAX_CONNECTIONS:
                group.start_soon(self._refuse, connection, ControlError("busy", "too many control connections"))
            elif not self._allowed(connection.peer):
                group.start_soon(
                    self._refuse,
                    connection,
                    ControlError("forbidden", f"uid {uid} may not control this stack", 1),
                )
            else:
                self._connections.add(connection)
                group.start_soon(self._serve_connection, connection)

    def _allowed(self, peer: _Peer) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        if self.group is None:
            return False
        return peer.gid == self.group or self.group in _supplementary_groups(peer.pid)

    async def _refuse(self, connection: _Connection, error: ControlError) -> None:
        with contextlib.suppress(_Gone), anyio.move_on_after(1):
            await connection.send({"ok": False, "error": error.to_wire()})
        connection.close()

    async def _serve_connection(self, connection: _Connection) -> None:
        try:
            while True:
                try:
                    received = await connection.read_request()
                except ControlError as error:
                    await connection.send({"ok": False, "error": error.to_wire()})
                    return
                if received is None:
                    return
                request, fds = received
                self.requests += 1
                mutating = request.get("op") not in _READ_ONLY
                if mutating:
                    self._ps_cache.clear()
                try:
                    try:
                        await self._dispatch(connection, request, fds)
                    finally:
                        if mutating:
                            self._ps_cache.clear()
                except ControlError as error:
                    _close_all(fds)
                    await connection.send({"ok": False, "error": error.to_wire()})
                except StackdError as error:
                    _close_all(fds)
                    code = "no-such-service" if str(error).startswith("no such service") else "failed"
                    exit_code = 2 if code == "no-such-service" else error.exit_code
                    await connection.send(
                        {"ok": False, "error": {"code": code, "message": str(error), "exit_code": exit_code}}
                    )
                except (_Gone, anyio.get_cancelled_exc_class()):
                    raise
                except Exception as error:  # a bug here must not take the supervisor down: tell, log, go on
                    _close_all(fds)
                    _log_failure(request, error)
                    message = f"internal error in {request.get('op')!r}: {type(error).__name__}: {error}"
                    await connection.send(
                        {"ok": False, "error": {"code": "failed", "message": message, "exit_code": 1}}
                    )
        except _Gone:
            pass
        finally:
            self._connections.discard(connection)
            connection.close()

    async def _dispatch(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        version = request.get("v")
        if version != PROTOCOL_VERSION:
            raise ControlError(
                "version",
                f"protocol version {version!r} is not spoken here (this supervisor speaks {PROTOCOL_VERSION}: "
                f"use the same stackd version as the supervisor, stackd {__version__})",
                2,
            )
        op = request.get("op")
        handler = _OPS.get(str(op))
        if handler is None:
            raise ControlError("unknown-op", f"unknown operation {op!r} (operations: {', '.join(sorted(_OPS))})", 2)
        if op != "exec":
            _close_all(fds)
            fds = []
        await handler(self, connection, request, fds)

    # -- helpers ---------------------------------------------------------------------------------

    def _names(self, request: dict[str, Any], *, default_all: bool = True) -> list[str]:
        names = request.get("services") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ControlError("bad-request", '"services" is a list of service names', 2)
        services = self.supervisor.stack.services
        unknown = [n for n in names if n not in services]
        if unknown:
            raise ControlError(
                "no-such-service", f"no such service: {', '.join(unknown)} (services: {', '.join(services)})", 2
            )
        if not names and default_all:
            return list(services)
        return list(dict.fromkeys(names))

    def _running(self, name: str) -> ServiceRunner:
        runner = self.supervisor.runners.get(name)
        if runner is None:
            services = ", ".join(self.supervisor.stack.services)
            raise ControlError("no-such-service", f"no such service: {name} (services: {services})", 2)
        if not (runner.active and runner.state == "running" and runner.pid is not None and runner.instance):
            raise ControlError("not-running", f"service {name} is not running (state: {_state_of(runner)})")
        return runner

    # -- operations ------------------------------------------------------------------------------

    async def op_hello(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        supervisor = self.supervisor
        await connection.send(
            {
                "ok": True,
                "protocol": PROTOCOL_VERSION,
                "stackd": __version__,
                "project": supervisor.stack.name,
                "pid": os.getpid(),
                "stack_file": str(supervisor.stack.source) if supervisor.stack.source else None,
                "state_dir": str(supervisor.paths.state),
                "log_dir": str(supervisor.paths.logs),
                "services": list(supervisor.stack.services),
            }
        )

    async def op_ps(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        key = tuple(self._names(request))
        now = time.monotonic()
        cached = self._ps_cache.get(key)
        if cached is not None and now - cached[0] < PS_CACHE and not cached[1].is_set():
            await connection.send_raw(cached[2])
            return
        changed = self.hub.next_event()
        rows = self._ps_rows(set(key), now)
        data = connection.encode({"ok": True, "services": rows})
        if len(self._ps_cache) > 64:
            self._ps_cache.clear()
        self._ps_cache[key] = (now, changed, data)
        await connection.send_raw(data)

    def _ps_rows(self, names: set[str], now: float) -> list[dict[str, Any]]:
        rows = []
        for status in self.supervisor.status():
            if status.name not in names:
                continue
            row = status.to_dict()
            runner = self.supervisor.runners[status.name]
            row.update(cpu_percent=None, memory=None, memory_limit=None, pids=None)
            if runner.instance is not None and status.pid is not None:
                with contextlib.suppress(Exception):
                    stats = runner.instance.cgroup.stats()
                    row.update(memory=stats.memory_current, memory_limit=stats.memory_limit, pids=stats.pids_current)
                    key = (status.name, status.pid)
                    row["cpu_percent"] = self._cpu_percent(key, now, stats.cpu_usage_usec, status.uptime)
            row["oom"] = "oom" in (status.exit_reason or "").lower() or "out of memory" in (status.exit_reason or "")
            row["healthcheck"] = runner.service.healthcheck is not None
            rows.append(row)
        return rows

    def _cpu_percent(self, key: tuple[str, int], now: float, usage: int, uptime: float | None) -> float | None:
        """CPU % since the previous `ps` (when it was at least 0.5 s ago), else since the start."""
        if len(self._last_cpu) > 4 * len(self.supervisor.runners) + 16:
            self._last_cpu.clear()  # pids of earlier runs
        last = self._last_cpu.get(key)
        if last is not None and now - last[0] >= 0.5 and usage >= last[1]:
            percent = (usage - last[1]) / 1e6 / (now - last[0]) * 100
        elif uptime and uptime >= 1:
            percent = usage / 1e6 / uptime * 100
        else:
            percent = None
        if last is None or now - last[0] >= 0.5:
            self._last_cpu[key] = (now, usage)
        return None if percent is None else round(percent, 2)

    async def op_stats(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = set(self._names(request))
        rows = []
        for stats in self.supervisor.stats():
            if stats.name in names:
                row = stats.to_dict()
                row["running"] = self.supervisor.runners[stats.name].active
                rows.append(row)
        await connection.send({"ok": True, "stats": rows})

    async def op_top(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = self._names(request, default_all=False)
        if len(names) != 1:
            raise ControlError("bad-request", "top: name one service", 2)
        runner = self._running(names[0])
        assert runner.instance is not None
        pids = sorted(runner.instance.cgroup.pids())
        await connection.send({"ok": True, "titles": list(_TOP_TITLES), "processes": [_process_row(p) for p in pids]})

    async def op_start(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = self._names(request)
        for name in names:
            await self.supervisor.start_service(name)
        states = await wait_ready(self.supervisor, names, self.hub, healthy=False, timeout=_timeout(request, 60))
        await connection.send({"ok": True, "services": _readiness_rows(states)})

    async def op_stop(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = self._names(request)
        grace = request.get("timeout")
        await self._stop_in_order(names, None if grace is None else float(grace))
        await connection.send({"ok": True, "stopped": names})

    async def _stop_in_order(self, names: list[str], grace: float | None) -> None:
        """Stop `names` concurrently, each after the services of `names` that depend on it."""
        stopped = {name: anyio.Event() for name in names}
        runners = self.supervisor.runners

        async def stop(name: str) -> None:
            try:
                for other in names:
                    if other != name and name in needs(runners[other].service):
                        await stopped[other].wait()
                await self.supervisor.stop_service(name, grace=grace)
            finally:
                stopped[name].set()

        async with anyio.create_task_group() as group:
            for name in names:
                group.start_soon(stop, name)

    async def op_restart(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = self._names(request)
        grace = request.get("timeout")
        await self._stop_in_order(names, None if grace is None else float(grace))
        for name in names:
            self.supervisor.runners[name].rearm()
        for name in names:
            await self.supervisor.start_service(name)
        states = await wait_ready(self.supervisor, names, self.hub, healthy=False, timeout=_timeout(request, 60))
        await connection.send({"ok": True, "services": _readiness_rows(states)})

    async def op_kill(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        try:
            sig = signal_number(normalise_signal(request.get("signal", "SIGKILL")))
        except Exception as error:  # spec.problems.Invalid
            raise ControlError("bad-signal", f"kill: {getattr(error, 'message', error)}", 2) from None
        explicit = bool(request.get("services"))
        names = self._names(request)
        killed = []
        for name in names:
            runner = self.supervisor.runners[name]
            if not explicit and not runner.active:
                continue
            if explicit:
                self._running(name)
            self.supervisor.kill_service(name, sig)
            killed.append(name)
        await connection.send({"ok": True, "killed": killed, "signal": signal.Signals(sig).name})

    async def op_pause(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = self._names(request)
        explicit = bool(request.get("services"))
        done = []
        for name in names:
            runner = self.supervisor.runners[name]
            if runner.paused:
                continue
            if not explicit and not runner.active:
                continue
            self._running(name)
            await self.supervisor.pause_service(name)
            done.append(name)
        await connection.send({"ok": True, "paused": done})

    async def op_unpause(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = self._names(request)
        explicit = bool(request.get("services"))
        done = []
        for name in names:
            runner = self.supervisor.runners[name]
            if not runner.paused:
                if explicit:
                    raise ControlError("not-paused", f"service {name} is not paused (state: {_state_of(runner)})")
                continue
            await self.supervisor.unpause_service(name)
            done.append(name)
        await connection.send({"ok": True, "unpaused": done})

    async def op_wait(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = with_dependencies(self.supervisor.stack, self._names(request))
        healthy = request.get("condition", "started") == "healthy"
        states = await wait_ready(self.supervisor, names, self.hub, healthy=healthy, timeout=_timeout(request, None))
        await connection.send(
            {"ok": True, "ready": all(s == "ready" for s, _ in states.values()), "services": _readiness_rows(states)}
        )

    async def op_up(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        from stackd.spec import parse_stack

        text, file = request.get("stack"), request.get("file")
        if not isinstance(text, str) or not isinstance(file, str):
            raise ControlError("bad-request", 'up: "stack" (the resolved stack file, TOML) and "file" are required', 2)
        stack = parse_stack(text, file=Path(file), project=self.supervisor.stack.name)
        services = request.get("services") or None
        changes = await self.supervisor.apply(stack, services)
        await connection.send({"ok": True, **changes.to_dict()})

    async def op_events(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = self._names(request, default_all=False)
        sub = self.hub.subscribe(names or None)
        try:
            await self._stream_events(connection, sub)
        except* _Gone:  # the client went away: only this connection ends
            raise _Gone from None
        finally:
            sub.close()

    async def _stream_events(self, connection: _Connection, sub: EventSubscription) -> None:
        async with anyio.create_task_group() as group:

            async def cut_off() -> None:
                await sub.cut_off.wait()
                group.cancel_scope.cancel()  # also when blocked sending to a client that does not read

            group.start_soon(cut_off)
            await connection.send({"ok": True, "streaming": True})
            while True:
                try:
                    events = await sub.receive()
                except anyio.EndOfStream:
                    break
                for event in events:
                    await connection.send({"event": event})
            group.cancel_scope.cancel()
        if sub.overflowed:
            error = ControlError("overflow", f"events: the client fell more than {sub.max_items} events behind")
            with anyio.move_on_after(1):  # it may not fit: the client is not reading
                await connection.send({"ok": False, "error": error.to_wire()})
            raise _Gone

    async def op_down(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        if self._on_down is None:
            raise ControlError("unsupported", "this supervisor cannot be stopped through its socket: use SIGTERM")
        grace = request.get("timeout")
        self._on_down(None if grace is None else float(grace))
        await connection.send({"ok": True, "stopping": True, "pid": os.getpid()})

    async def op_exec(self, connection: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        names = self._names({"services": [request.get("service")]} if request.get("service") else {}, default_all=False)
        if len(names) != 1:
            raise ControlError("bad-request", 'exec: "service" is required', 2)
        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ControlError("bad-request", 'exec: "argv" is a non-empty list of strings', 2)
        runner = self._running(names[0])
        assert runner.instance is not None and runner.pid is not None
        env = request.get("env") or {}
        plan = exec_plan(
            runner.instance.plan,
            runner.pid,
            argv,
            user=request.get("user") or None,
            env={str(k): str(v) for k, v in env.items()},
            working_dir=request.get("working_dir") or None,
        )
        launcher = self.supervisor.launcher
        master = -1
        try:
            if request.get("tty"):
                rows, cols = (request.get("size") or [24, 80])[:2]
                pid, master = await launcher.exec_tty(plan, rows=int(rows), cols=int(cols))
            else:
                if len(fds) != 3:
                    raise ControlError("bad-request", "exec: send stdin, stdout and stderr (SCM_RIGHTS)", 2)
                pid = await launcher.exec(plan, stdin=fds[0], stdout=fds[1], stderr=fds[2])
        except LaunchError as error:
            missing = "not found" in str(error.detail or "") or error.errno == errno.ENOENT
            why = error.detail or str(error)
            raise ControlError(
                "exec-failed", f"service {names[0]}: cannot run {argv[0]}: {why}", 127 if missing else 126
            ) from None
        finally:
            _close_all(fds)
        try:
            await connection.send({"ok": True, "started": True, "pid": pid}, fds=[master] if master >= 0 else [])
        finally:
            if master >= 0:
                os.close(master)
        async with anyio.create_task_group() as group:

            async def listen() -> None:
                """Signals the client forwards; its going away hangs the command up (SIGHUP)."""
                try:
                    while True:
                        received = await connection.read_request()
                        if received is None:
                            break
                        message, extra = received
                        _close_all(extra)
                        if message.get("op") == "signal":
                            with contextlib.suppress(Exception):
                                os.kill(pid, signal_number(normalise_signal(message.get("signal"))))
                except ControlError:
                    pass
                if launcher.exited(pid) is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)
                await anyio.sleep_forever()

            group.start_soon(listen)
            exit = await launcher.wait(pid)
            group.cancel_scope.cancel()
        await connection.send({"ok": True, "exited": True, "code": exit.code, "signal": exit.signal})


def _log_failure(request: dict[str, Any], error: BaseException) -> None:
    import traceback

    import structlog

    structlog.get_logger("stackd").error(
        "control-error", op=request.get("op"), error=repr(error), traceback=traceback.format_exc()
    )


def _timeout(request: dict[str, Any], default: float | None) -> float | None:
    value = request.get("timeout", default)
    return None if value is None else float(value)


def _state_of(runner: ServiceRunner) -> str:
    if runner.paused and runner.active:
        return "paused"
    return runner.state


def _readiness_rows(states: dict[str, tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": name, "readiness": state, "detail": detail} for name, (state, detail) in states.items()]


_TOP_TITLES = ("UID", "PID", "PPID", "NSPID", "STATE", "TIME", "CMD")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_row(pid: int) -> list[str]:
    """One line of `top`, from /proc (the host's view; NSPID is the pid inside the service)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ["?", str(pid), "?", "?", "gone", "", ""]
    comm_end = stat.rfind(")")
    fields = stat[comm_end + 2 :].split()
    state, ppid = fields[0], fields[1]
    ticks = int(fields[11]) + int(fields[12])
    seconds = ticks // _CLOCK_TICKS
    keyed = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uid = int(keyed.get("Uid", "0").split()[0])
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    nspid = keyed.get("NSpid", str(pid)).split()[-1]
    command = (
        " ".join(a.decode(errors="replace") for a in cmdline.split(b"\0") if a)
        or f"[{stat[stat.find('(') + 1 : comm_end]}]"
    )
    return [
        user,
        str(pid),
        ppid,
        nspid,
        state,
        f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}",
        command,
    ]


_READ_ONLY = frozenset({"hello", "ps", "stats", "top", "events", "wait"})

_OPS: dict[str, Callable[..., Any]] = {
    "hello": ControlServer.op_hello,
    "ps": ControlServer.op_ps,
    "stats": ControlServer.op_stats,
    "top": ControlServer.op_top,
    "start": ControlServer.op_start,
    "stop": ControlServer.op_stop,
    "restart": ControlServer.op_restart,
    "kill": ControlServer.op_kill,
    "pause": ControlServer.op_pause,
    "unpause": ControlServer.op_unpause,
    "wait": ControlServer.op_wait,
    "up": ControlServer.op_up,
    "events": ControlServer.op_events,
    "down": ControlServer.op_down,
    "exec": ControlServer.op_exec,
}


# --- the client -----------------------------------------------------------------------------------------


class ControlClient:
    """A blocking client of one supervisor's control socket (the CLI; tools in any language can do the same).

    `call()` sends a request and returns its answer, raising ControlError when the answer is an error;
    `send()` / `receive()` are the parts, for streams and exec.
    """

    def __init__(self, sock: socket.socket, paths: StackPaths) -> None:
        self.sock = sock
        self.paths = paths
        self._buffer = b""
        self._fds: list[int] = []

    @classmethod
    def connect(cls, paths: StackPaths, *, timeout: float = 3.0) -> ControlClient:
        """Connect to the project's supervisor; NotUp / SupervisorGone / ControlError say why not."""
        path = socket_path(paths)
        project = paths.project
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(path))
                return cls(sock, paths)
            except PermissionError:
                sock.close()
                raise ControlError(
                    "forbidden",
                    f"permission denied on {path}: run as root, or as a member of the group the stack's "
                    "supervisor was given (STACKD_GROUP)",
                ) from None
            except (FileNotFoundError, ConnectionRefusedError) as error:
                sock.close()
                record = StateRecord.load(paths)
                if record is None:
                    raise NotUp("not-up", f"project {project} is not up (nothing recorded in {paths.state})") from None
                if not record.supervisor_alive():
                    raise SupervisorGone(
                        "supervisor-gone",
                        f"project {project}: its supervisor (pid {record.supervisor_pid}) is gone; run "
                        f"`stackd down -p {project}` to stop what is left of it and clean up",
                    ) from None
                if time.monotonic() >= deadline:  # alive, but not listening (yet)
                    raise ControlError(
                        "unreachable",
                        f"project {project}: its supervisor (pid {record.supervisor_pid}) does not answer on "
                        f"{path}: {error.strerror}",
                    ) from None
                time.sleep(0.05)

    def close(self) -> None:
        _close_all(self._fds)
        self._fds = []
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, op: str, *, fds: Sequence[int] = (), **fields: Any) -> None:
        data = json.dumps({"v": PROTOCOL_VERSION, "op": op, **fields}).encode() + b"\n"
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                data = data[sent:]
            self.sock.sendall(data)
        except OSError as error:
            raise self._lost(error) from None

    def receive(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the fds that came with it. Raises ControlError when the connection ends."""
        while b"\n" not in self._buffer:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 16)
            except OSError as error:
                raise self._lost(error) from None
            self._fds += fds
            if not data:
                raise self._lost(None)
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        fds, self._fds = self._fds, []
        return json.loads(line), fds

    def _lost(self, error: OSError | None) -> ControlError:
        record = StateRecord.load(self.paths)
        project = self.paths.project
        if record is not None and not record.supervisor_alive():
            return SupervisorGone(
                "supervisor-gone",
                f"project {project}: its supervisor (pid {record.supervisor_pid}) is gone; run "
                f"`stackd down -p {project}` to stop what is left of it and clean up",
            )
        if record is None:
            return NotUp("stopped", f"project {project} stopped")
        detail = f": {error.strerror}" if error is not None and error.strerror else ""
        return Closed("disconnected", f"project {project}: the supervisor closed the connection{detail}")

    def call(self, op: str, *, fds: Sequence[int] = (), **fields: Any) -> dict[str, Any]:
        self.send(op, fds=fds, **fields)
        message, extra = self.receive()
        _close_all(extra)
        return checked(message)

    def stream(self, op: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Send a streaming request; yield each message after the first (which says it started)."""
        checked(self.call(op, **fields))
        while True:
            try:
                message, extra = self.receive()
            except (NotUp, Closed):  # the stack went down: the end of the stream
                return
            _close_all(extra)
            yield checked(message)


def checked(message: dict[str, Any]) -> dict[str, Any]:
    """`message`, or the ControlError it carries."""
    if message.get("ok") is False:
        error = message.get("error") or {}
        raise ControlError(
            str(error.get("code", "failed")), str(error.get("message", "failed")), int(error.get("exit_code", 1))
        )
    return message
