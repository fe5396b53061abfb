"""The log router: every service's stdout and stderr pipes -> its log file, and the terminal.

    async with anyio.create_task_group() as tg:             # outside the router: the printer
        async with LogRouter(paths.logs) as router:          #   finishes what is queued after it
            printer = TerminalPrinter(stack.service_names, timestamps=args.timestamps)
            tg.start_soon(printer.run, router.subscribe())
            out = router.attach("web")                       # new pipes for one run of the service
            pid = await launcher.launch(plan, stdout=out.stdout, stderr=out.stderr)
            out.close_write_ends()                           # the service holds its own copies
            ...
            await out.wait()                                 # after its exit: all its output is on disk

Per run of a service, two pipes (``pipe2(O_CLOEXEC)``; their read ends stay here, non-blocking; enlarged
to 256 KiB with ``F_SETPIPE_SZ``: with 64 KiB pipes the same work took 35% longer). One task per pipe
reads 256 KiB at a time and, per read, with one timestamp and C-speed bytes operations only (``rfind``,
``replace``; no Python loop per line):

- writes its whole lines as records to the service's file (:mod:`stackd.supervisor.logfile`) with one
  ``writev``; the unfinished last line is carried to the next read, and written as a ``P`` record once it
  reaches ``max_line`` bytes (16 KiB), so memory stays bounded for a line that never ends;
- hands the same lines to each :class:`Subscription` (the terminal; later ``logs -f`` over the control
  socket). A subscription holds at most ``max_bytes``; when its reader falls behind, what does not fit is
  dropped *for that subscriber only* and counted, and it gets a :class:`Skipped` marker instead. The disk
  never waits for a subscriber. Disk writes may block the reading task of that pipe, which then blocks the
  service's writes: backpressure to the service, never memory.

Nothing that reached a pipe is lost: each task reads to EOF (the service and everything that inherited
its stdout are gone), and at the router's close or on cancellation reads what is left in the pipe,
writes a line cut short as an ``E`` record, and closes. The reading tasks are shielded from outside
cancellation: a Ctrl-C that cancels the supervisor's scope does not stop them while the services write
their last words; only the router's close does, after ``drain_timeout`` seconds at most.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from stackd.supervisor.logfile import HEADER_LEN, LogWriter, Rotation, format_stamp, log_path

__all__ = [
    "DEFAULT_MAX_LINE",
    "DEFAULT_PIPE_SIZE",
    "DEFAULT_READ_SIZE",
    "DEFAULT_SUBSCRIBER_BYTES",
    "LogChunk",
    "LogRouter",
    "LogStats",
    "ServiceOutput",
    "Skipped",
    "Subscription",
    "TerminalPrinter",
    "use_color",
]

DEFAULT_READ_SIZE = 256 * 1024
DEFAULT_PIPE_SIZE = 256 * 1024
DEFAULT_MAX_LINE = 16 * 1024
DEFAULT_SUBSCRIBER_BYTES = 1024 * 1024

Stream = Literal["stdout", "stderr"]
#: What a queued chunk costs beyond its data (the objects), so that many tiny chunks are bounded too.
_ITEM_COST = 256


@dataclass(frozen=True, slots=True)
class LogChunk:
    """What one read of a pipe gave a subscriber: whole lines, or a piece of a long or last line.

    ``data`` holds lines, each with its newline, except that the last one has none when ``partial``
    (a piece of a line longer than ``max_line``, continued in a later chunk of the same stream; or, with
    ``eof``, the end of a line the stream never finished). ``eof``: the stream (this run's pipe) ended
    after this chunk; ``data`` may then be empty.
    """

    service: str
    stream: Stream
    stamp: bytes
    data: bytes
    partial: bool = False
    eof: bool = False


@dataclass(frozen=True, slots=True)
class Skipped:
    """``nbytes`` of ``service``'s output were dropped for this subscriber (they are in the log file)."""

    service: str
    nbytes: int


@dataclass(slots=True)
class LogStats:
    """Counters of one service's output, over all its runs."""

    bytes: int = 0
    """Bytes read from its pipes."""
    lines: int = 0
    """Lines ended (by a newline, or by the end of the stream)."""
    written: int = 0
    """Bytes of records written to its log files (headers included)."""
    lost: int = 0
    """Bytes of records the disk refused (ENOSPC, EIO...); they still went to the subscribers."""


class Subscription:
    """A bounded queue of one consumer's log chunks (:meth:`LogRouter.subscribe`).

    Iterate it (``async for item in sub``) or take everything queued at once with :meth:`receive_batch`;
    items are :class:`LogChunk` and :class:`Skipped`. It ends (``EndOfStream`` / the loop finishes) after
    the router closed and the queue is empty. The router never waits for it: a chunk that would take the
    queue past ``max_bytes`` (and the queue is not empty) is dropped and counted, and a :class:`Skipped`
    marker comes before that service's next chunk, or at the end of the batch.
    """

    def __init__(self, router: LogRouter | None, services: Iterable[str] | None, max_bytes: int) -> None:
        self._router = router
        self.services = None if services is None else frozenset(services)
        self.max_bytes = max_bytes
        self._queue: deque[LogChunk | Skipped] = deque()
        self._bytes = 0
        self._skipped: dict[str, int] = {}
        self._closed = False
        self._wakeup: anyio.Event | None = None
        self._ready: deque[LogChunk | Skipped] = deque()
        #: Bytes dropped for this subscriber so far.
        self.skipped = 0

    @property
    def queued(self) -> int:
        """Memory the queue holds: its chunks' bytes plus a fixed cost per chunk; at most ``max_bytes``
        plus one chunk (a chunk is always taken when the queue is empty)."""
        return self._bytes

    def offer(self, chunk: LogChunk) -> None:
        """Queue a chunk, or drop it if the consumer is too far behind; never blocks."""
        if self._closed or (self.services is not None and chunk.service not in self.services):
            return
        size = len(chunk.data)
        cost = size + _ITEM_COST
        if self._queue and self._bytes + cost > self.max_bytes:
            if size:
                self._skipped[chunk.service] = self._skipped.get(chunk.service, 0) + size
                self.skipped += size
            return
        dropped = self._skipped.pop(chunk.service, 0)
        if dropped:
            self._queue.append(Skipped(chunk.service, dropped))
        self._queue.append(chunk)
        self._bytes += cost
        if self._wakeup is not None:
            self._wakeup.set()

    async def receive_batch(self) -> list[LogChunk | Skipped]:
        """Everything queued (at least one item; waits for it). Raises ``anyio.EndOfStream`` at the end."""
        while not self._queue and not self._skipped:
            if self._closed:
                raise anyio.EndOfStream
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
            self._wakeup = None
        items = list(self._queue)
        self._queue.clear()
        self._bytes = 0
        items += [Skipped(service, n) for service, n in self._skipped.items()]
        self._skipped.clear()
        return items

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> LogChunk | Skipped:
        if not self._ready:
            try:
                self._ready.extend(await self.receive_batch())
            except anyio.EndOfStream:
                raise StopAsyncIteration from None
        return self._ready.popleft()

    def end(self) -> None:
        """No more chunks will come; the consumer still gets what is queued, then the end."""
        self._closed = True
        if self._router is not None:
            self._router._unsubscribe(self)
            self._router = None
        if self._wakeup is not None:
            self._wakeup.set()

    def close(self) -> None:
        """Unsubscribe and drop what is queued (the consumer is gone)."""
        self.end()
        self._queue.clear()
        self._skipped.clear()
        self._bytes = 0

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServiceOutput:
    """The output pipes of one run of a service.

    Give :attr:`stdout` and :attr:`stderr` (write ends) to the launcher, then call
    :meth:`close_write_ends`: the service holds its own copies, and the pipes reach EOF only once every
    copy is closed. :meth:`wait` returns when both streams reached EOF and all of it is on disk.
    """

    def __init__(self, service: str, stdout: int, stderr: int) -> None:
        self.service = service
        self.stdout = stdout
        self.stderr = stderr
        self._streams = 2
        self._done = anyio.Event()

    def close_write_ends(self) -> None:
        """Close the supervisor's copies of the write ends (idempotent)."""
        fds = (self.stdout, self.stderr)
        self.stdout = self.stderr = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    @property
    def drained(self) -> bool:
        """Both streams ended and were written."""
        return self._done.is_set()

    async def wait(self) -> None:
        """Until both streams ended and everything read from them was written."""
        await self._done.wait()

    def _stream_done(self) -> None:
        self._streams -= 1
        if self._streams == 0:
            self._done.set()


class _Stream:
    """The reading state of one pipe: whose it is, the line carried between reads, its record tags."""

    __slots__ = ("chained", "name", "output", "pending", "service", "stats", "tag_e", "tag_f", "tag_p", "writer")

    def __init__(self, output: ServiceOutput, name: Stream, writer: LogWriter, stats: LogStats) -> None:
        self.output = output
        self.service = output.service
        self.name: Stream = name
        self.writer = writer
        self.stats = stats
        self.pending = b""  # the unfinished last line, shorter than max_line
        self.chained = False  # the last record written is a P record: the line goes on
        tag = b" " + name.encode() + b" "
        self.tag_f, self.tag_p, self.tag_e = tag + b"F ", tag + b"P ", tag + b"E "


ErrorHandler = Callable[[str, OSError], None]


def _default_on_error(service: str, error: OSError) -> None:
    import structlog

    structlog.get_logger("stackd").warning("log_write_failed", service=service, error=str(error))


class LogRouter:
    """Routes the output of a stack's services to their log files and to subscribers.

    ``directory`` is the stack's log directory (``StackPaths.logs``; created if missing); a service's file
    is ``<directory>/<service>.log``, rotated by ``rotation`` (default 10 MiB x 5 files). Use it as an
    async context manager; on exit it closes the write ends it still holds, waits up to ``drain_timeout``
    seconds for every pipe to reach EOF, then reads what is left in each pipe, writes it, and closes the
    files and subscriptions. ``on_error(service, error)`` hears of failed disk writes (default: a
    structlog warning); the router goes on reading, so a full disk never blocks a service.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        rotation: Rotation | None = None,
        read_size: int = DEFAULT_READ_SIZE,
        pipe_size: int = DEFAULT_PIPE_SIZE,
        max_line: int = DEFAULT_MAX_LINE,
        drain_timeout: float = 5.0,
        on_error: ErrorHandler | None = None,
    ) -> None:
        if read_size < 1 or max_line < 1:
            raise ValueError("read_size and max_line must be positive")
        self.directory = Path(directory)
        self.rotation = rotation or Rotation()
        self.read_size = read_size
        self.pipe_size = pipe_size
        self.max_line = max_line
        self.drain_timeout = drain_timeout
        self._on_error = on_error or _default_on_error
        self._writers: dict[str, LogWriter] = {}
        self._stats: dict[str, LogStats] = {}
        self._failing: set[str] = set()
        self._outputs: list[ServiceOutput] = []
        self._scopes: set[anyio.CancelScope] = set()
        self._subs: list[Subscription] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False

    # --- lifetime ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> LogRouter:
        self.directory.mkdir(parents=True, exist_ok=True)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tg is not None, "LogRouter was not entered"
        self._closing = True
        with anyio.CancelScope(shield=True):
            for output in self._outputs:
                output.close_write_ends()
            with anyio.move_on_after(self.drain_timeout):
                for output in list(self._outputs):
                    await output.wait()
        for scope in list(self._scopes):
            scope.cancel()  # a pipe someone else still holds open: read what is in it now, then stop
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = None
            for writer in self._writers.values():
                writer.close()
            for sub in list(self._subs):
                sub.end()

    # --- services ---------------------------------------------------------------------------------------

    def path(self, service: str) -> Path:
        """The current log file of ``service``."""
        return log_path(self.directory, service)

    def stats(self, service: str) -> LogStats:
        """The counters of ``service`` (zeros if it never ran)."""
        return self._stats.setdefault(service, LogStats())

    def attach(self, service: str) -> ServiceOutput:
        """New stdout and stderr pipes for one run of ``service``; their reading starts at once."""
        if self._tg is None or self._closing:
            raise RuntimeError("LogRouter.attach() outside its `async with` block")
        writer = self._writers.get(service)
        if writer is None:
            writer = self._writers[service] = LogWriter(self.path(service), self.rotation)
        fds: list[int] = []
        try:
            for _ in range(2):
                fds.extend(os.pipe2(os.O_CLOEXEC))
            for fd in (fds[0], fds[2]):
                os.set_blocking(fd, False)
                if self.pipe_size > 0:
                    with contextlib.suppress(OSError):  # EPERM past pipe-max-size or the user's pipe quota
                        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, self.pipe_size)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        output = ServiceOutput(service, fds[1], fds[3])
        self._outputs = [o for o in self._outputs if not o.drained]
        self._outputs.append(output)
        stats = self.stats(service)
        self._tg.start_soon(self._pump, _Stream(output, "stdout", writer, stats), fds[0])
        self._tg.start_soon(self._pump, _Stream(output, "stderr", writer, stats), fds[2])
        return output

    def subscribe(
        self, *, services: Iterable[str] | None = None, max_bytes: int = DEFAULT_SUBSCRIBER_BYTES
    ) -> Subscription:
        """A new subscriber of every service's output from now on (or of ``services`` only)."""
        sub = Subscription(self, services, max_bytes)
        if self._closing and self._tg is None:
            sub.end()
        else:
            self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    # --- the hot path -----------------------------------------------------------------------------------

    async def _pump(self, st: _Stream, fd: int) -> None:
        read, size, feed = os.read, self.read_size, self._feed
        with anyio.CancelScope(shield=True) as scope:
            self._scopes.add(scope)
            try:
                while True:
                    try:
                        chunk = read(fd, size)
                    except BlockingIOError:
                        await anyio.wait_readable(fd)
                        continue
                    except OSError as error:
                        self._on_error(st.service, error)
                        break
                    if not chunk:
                        break
                    feed(st, chunk)
                    await anyio.lowlevel.checkpoint()
            finally:
                self._drain(st, fd)
                self._scopes.discard(scope)

    def _drain(self, st: _Stream, fd: int) -> None:
        """Read what is in the pipe now (bounded, without waiting), end the stream, close the pipe."""
        try:
            budget = max(self.pipe_size, 65536) * 4
            while budget > 0:
                try:
                    chunk = os.read(fd, self.read_size)
                except OSError:  # BlockingIOError: empty; anything else: nothing more to read
                    break
                if not chunk:
                    break
                self._feed(st, chunk)
                budget -= len(chunk)
            stamp = format_stamp()
            if st.pending or st.chained:  # the stream ends mid-line: an E record ends it (maybe empty)
                line, st.pending, st.chained = st.pending, b"", False
                self._write(st, [stamp, st.tag_e, line, b"\n"], HEADER_LEN + len(line) + 1)
                st.stats.lines += 1
                self._publish(LogChunk(st.service, st.name, stamp, line, partial=True, eof=True))
            else:
                self._publish(LogChunk(st.service, st.name, stamp, b"", eof=True))
        finally:
            os.close(fd)
            st.output._stream_done()

    def _feed(self, st: _Stream, chunk: bytes) -> None:
        """Write one read's lines as records, and hand them to the subscribers; no loop per line."""
        stamp = format_stamp()
        st.stats.bytes += len(chunk)
        end = chunk.rfind(b"\n") + 1
        if not end:  # no newline: carry it, or write it as a P record once it is max_line long
            line = st.pending + chunk if st.pending else chunk
            if len(line) < self.max_line:
                st.pending = line
                return
            st.pending, st.chained = b"", True
            self._write(st, [stamp, st.tag_p, line, b"\n"], HEADER_LEN + len(line) + 1)
            if self._subs:
                self._publish(LogChunk(st.service, st.name, stamp, line, partial=True))
            return
        # One replace over the whole read: each newline gets the next record's header after it; the
        # records end at the last newline; the carried line goes in front as a buffer of its own. So
        # two big allocations per read (the read, the replace) and no slice of it copied: fresh 256 KiB
        # buffers cost page faults (glibc mmaps them), and four per read took 40% more time than two.
        prefix = stamp + st.tag_f
        body = chunk.replace(b"\n", b"\n" + prefix)
        rest = len(chunk) - end  # bytes after the last newline: the next unfinished line
        cut = len(body) - rest - len(prefix)
        pending = st.pending
        parts: list[bytes | memoryview] = (
            [prefix, pending, memoryview(body)[:cut]] if pending else [prefix, memoryview(body)[:cut]]
        )
        size = len(prefix) + len(pending) + cut
        st.stats.lines += (len(body) - len(chunk)) // len(prefix)
        st.chained = rest >= self.max_line
        if st.chained:
            tail: bytes | memoryview = memoryview(chunk)[end:]
            parts += (stamp, st.tag_p, tail, b"\n")
            size += HEADER_LEN + rest + 1
            st.pending = b""
        else:
            st.pending = chunk[end:] if rest else b""
        self._write(st, parts, size)
        if self._subs:
            lines = pending + chunk[:end] if pending else (chunk if not rest else chunk[:end])
            self._publish(LogChunk(st.service, st.name, stamp, lines))
            if st.chained:
                self._publish(LogChunk(st.service, st.name, stamp, chunk[end:], partial=True))

    def _write(self, st: _Stream, parts: list[bytes | memoryview], size: int) -> None:
        try:
            st.writer.write(parts, size)
        except OSError as error:
            st.stats.lost += size
            if st.service not in self._failing:
                self._failing.add(st.service)
                self._on_error(st.service, error)
        else:
            st.stats.written += size
            self._failing.discard(st.service)

    def _publish(self, chunk: LogChunk) -> None:
        for sub in self._subs:
            sub.offer(chunk)


# --- the terminal ---------------------------------------------------------------------------------------

#: Compose's order: cyan, yellow, green, magenta, blue, then their bright forms (red is for errors).
_PALETTE = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)
_RESET = b"\x1b[0m"
_DIM = b"\x1b[2m"


def use_color(fd: int) -> bool:
    """Colour for a terminal, unless ``NO_COLOR`` is set (not empty; no-color.org) or ``TERM=dumb``."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # someone made the terminal non-blocking
            select.select([], [fd], [])


class Overlay(Protocol):
    """Something drawn on the terminal below the services' lines (the start-up progress line): hidden
    before the printer writes and shown again after, from the printer's writing thread."""

    def hide(self) -> None: ...

    def show(self) -> None: ...


class TerminalPrinter:
    """Prints subscribed chunks as ``name | line``, the way ``docker compose up`` does.

    The prefix is padded to the longest of ``services`` (the stack's services; others are added as they
    come) and coloured per service, stably: the n-th service of ``services`` gets the n-th colour of
    Compose's palette (a service not listed gets one from a hash of its name). ``color=None`` decides by
    :func:`use_color`. ``no_prefix`` drops the prefix (``--no-log-prefix``); ``timestamps`` adds the
    time the line was read (``--timestamps``). A piece of a line longer than ``max_line`` continues the
    line on the terminal; a line another stream interrupts is ended there and goes on after a new prefix.
    Writes happen in a worker thread, so a slow or paused terminal never blocks the event loop; the
    subscription's bound then drops output for the terminal only, with a visible marker.
    """

    def __init__(
        self,
        services: Sequence[str] = (),
        *,
        fd: int = 1,
        color: bool | None = None,
        no_prefix: bool = False,
        timestamps: bool = False,
        overlay: Overlay | None = None,
    ) -> None:
        self.fd = fd
        self.overlay = overlay
        self.color = use_color(fd) if color is None else color
        self.no_prefix = no_prefix
        self.timestamps = timestamps
        self._order = {name: i for i, name in enumerate(dict.fromkeys(services))}
        self._width = max((len(name) for name in self._order), default=0)
        self._prefixes: dict[str, bytes] = {}
        self._open: tuple[str, str] | None = None  # the source whose line is unfinished on the terminal

    def _prefix(self, service: str) -> bytes:
        prefix = self._prefixes.get(service)
        if prefix is None:
            if len(service) > self._width:
                self._width = len(service)
                self._prefixes.clear()
            text = f"{service:<{self._width}} | ".encode()
            if self.color:
                index = self._order.get(service, zlib.crc32(service.encode()))
                text = b"\x1b[%dm%s%s" % (_PALETTE[index % len(_PALETTE)], text, _RESET)
            prefix = self._prefixes[service] = text
        return prefix

    def render(self, items: Iterable[LogChunk | Skipped]) -> bytes:
        """The terminal's bytes for ``items`` (keeps the unfinished-line state between calls)."""
        out: list[bytes | memoryview] = []
        for item in items:
            if isinstance(item, Skipped):
                if self._open is not None:
                    out.append(b"\n")
                    self._open = None
                note = (
                    f"... {item.nbytes} bytes of {item.service}'s output skipped on the terminal; "
                    "all of it is in the log file"
                ).encode()
                if self.color:
                    note = _DIM + note + _RESET
                out += (b"" if self.no_prefix else self._prefix(item.service), note, b"\n")
                continue
            source = (item.service, item.stream)
            if self._open is not None and self._open != source:
                out.append(b"\n")  # another stream interrupts an unfinished line: end it here
                self._open = None
            data = item.data
            if data:
                prefix = b"" if self.no_prefix else self._prefix(item.service)
                if self.timestamps:
                    prefix += item.stamp + b" "
                if self._open is None:
                    out.append(prefix)  # else the chunk continues the line on the terminal
                ended = data.endswith(b"\n")
                if not prefix:
                    out.append(data)
                elif ended:
                    body = data.replace(b"\n", b"\n" + prefix)
                    out.append(memoryview(body)[: len(body) - len(prefix)])
                else:
                    out.append(data.replace(b"\n", b"\n" + prefix))
                self._open = None if ended else source
            if item.eof and self._open == source:
                out.append(b"\n")
                self._open = None
        return b"".join(out)

    def _write(self, data: bytes) -> None:
        if self.overlay is None:
            _write_fully(self.fd, data)
            return
        self.overlay.hide()
        try:
            _write_fully(self.fd, data)
        finally:
            self.overlay.show()

    async def run(self, subscription: Subscription) -> None:
        """Print what ``subscription`` gives until it ends (then end an unfinished line).

        If the terminal goes away (EPIPE), the subscription is closed and printing stops; the log files
        still get everything.
        """
        try:
            while True:
                try:
                    batch = await subscription.receive_batch()
                except anyio.EndOfStream:
                    break
                data = self.render(batch)
                if data:
                    await anyio.to_thread.run_sync(self._write, data, abandon_on_cancel=True)
            if self._open is not None:
                self._open = None
                await anyio.to_thread.run_sync(self._write, b"\n", abandon_on_cancel=True)
        except BrokenPipeError:
            subscription.close()
