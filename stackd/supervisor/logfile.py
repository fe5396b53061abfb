"""A service's log file: the on-disk format, the writer (with rotation by size) and the readers.

One record per line (docs/logs.md), greppable and byte-exact::

    2026-11-22T09:40:00.123456Z stdout F GET /index.html 200
    |-- time (UTC, µs, 27 B) --| stream flag the line's bytes as written, without its newline

- time: when the supervisor read the bytes from the service's pipe (one read can hold many lines);
- stream: ``stdout`` or ``stderr`` (both streams of a service share its file, in the order they were read);
- flag: ``F`` full (the line ended with a newline), ``P`` partial (the line goes on in the next record
  of the same stream: long lines are split into bounded records, as Docker's partial flag does), ``E``
  ended (the stream closed before a newline: the service exited mid-line; no newline followed).

So a stream's exact output is the concatenation of its records' bytes, each ``F`` record followed by a
newline (:meth:`LogLine.raw`). The file of service ``web`` is ``web.log``; when a write would take it past
:attr:`Rotation.max_bytes` it becomes ``web.log.1`` (the older ones shift to ``.2`` ...) and the oldest beyond
:attr:`Rotation.max_files` is deleted. Rotation happens between whole records, never inside one.

Readers: :func:`read_log` (what is on disk now, with ``tail``, ``since`` and ``until``) and
:func:`follow_log` (the same, then every new line as it is written, across rotations, woken by inotify).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import struct
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import anyio
import anyio.lowlevel

__all__ = [
    "HEADER_LEN",
    "LogLine",
    "LogWriter",
    "Rotation",
    "follow_log",
    "format_stamp",
    "log_files",
    "log_path",
    "read_log",
]

#: ``2026-11-22T09:40:00.123456Z``: fixed width, so stamps compare as bytes in time order.
STAMP_LEN = 27
#: Bytes before a record's data: stamp, space, stream (6), space, flag, space.
HEADER_LEN = STAMP_LEN + 10
FULL, PARTIAL, ENDED = b"F", b"P", b"E"
_STREAMS = {b"stdout": "stdout", b"stderr": "stderr"}
_F, _P, _E = FULL[0], PARTIAL[0], ENDED[0]
_SPACE = 32
_BLOCK = 1 << 20  # reader block size
_FILE_MODE = 0o640


@dataclass(frozen=True, slots=True)
class Rotation:
    """When a service's log file is rotated, and how many files are kept.

    The defaults bound a service's logs to about 50 MiB on disk (5 files of 10 MiB: ``web.log`` and
    ``web.log.1`` to ``web.log.4``), unlike Docker's json-file driver, which keeps everything by default.
    ``max_files = 1`` keeps only the current file (it is started afresh when full).
    """

    max_bytes: int = 10 * 1024 * 1024
    max_files: int = 5

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"Rotation.max_bytes must be positive, not {self.max_bytes}")
        if self.max_files < 1:
            raise ValueError(f"Rotation.max_files must be at least 1, not {self.max_files}")


def log_path(directory: str | os.PathLike[str], service: str) -> Path:
    """The current log file of ``service`` in a stack's log directory (``StackPaths.logs``)."""
    return Path(directory) / f"{service}.log"


@lru_cache(maxsize=4)
def _second(sec: int) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()


def format_stamp(ns: int | None = None) -> bytes:
    """A record's time, ``2026-11-22T09:40:00.123456Z``, from nanoseconds since the epoch (default: now)."""
    if ns is None:
        ns = time.time_ns()
    sec, rest = divmod(ns, 1_000_000_000)
    return b"%s.%06dZ" % (_second(sec), rest // 1000)


def _stamp_of(when: datetime | float) -> bytes:
    """``since``/``until`` as a stamp; a naive datetime is local time, as Docker's ``--since`` has it."""
    if isinstance(when, datetime):
        when = when.astimezone(UTC).timestamp()
    return format_stamp(round(when * 1_000_000) * 1000)


# --- writer -------------------------------------------------------------------------------------------


def _write_all(fd: int, parts: Sequence[bytes | memoryview], size: int) -> None:
    """Write every byte of ``parts`` (whole records) at the end of ``fd``."""
    done = os.writev(fd, parts)
    if done == size:
        return
    rest = memoryview(b"".join(parts))[done:]  # a short write: disk full, quota; rare
    while rest:
        rest = rest[os.write(fd, rest) :]


class LogWriter:
    """Appends whole records to one service's log file and rotates it by size.

    Writes go straight to the file with ``writev`` (no buffer in this process: what was written is in the
    page cache, also if the supervisor dies by SIGKILL a moment later). A file that exists is appended
    to. One writer per file; not thread-safe (the router calls it from the event loop).
    """

    def __init__(self, path: str | os.PathLike[str], rotation: Rotation | None = None) -> None:
        self.path = Path(path)
        self.rotation = rotation or Rotation()
        self._name = os.fsencode(self.path)
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self.rotations = 0

    def _open(self) -> int:
        return os.open(self._name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)

    @property
    def size(self) -> int:
        """Bytes in the current file."""
        return self._size

    def write(self, parts: Sequence[bytes | memoryview], size: int) -> None:
        """Append ``parts``, which are whole records of ``size`` bytes in all, rotating as needed.

        A batch that does not fit is split at a record boundary: the records that fit end the current
        file, the rest start the next one. So a file never exceeds ``max_bytes``, unless a single record
        is bigger (it then has a file to itself). Raises OSError (e.g. ENOSPC); the router counts those
        bytes as lost and goes on.
        """
        if self._fd < 0:
            raise ValueError(f"log writer of {self.path} is closed")
        limit = self.rotation.max_bytes
        if self._size + size <= limit:
            _write_all(self._fd, parts, size)
            self._size += size
            return
        data = b"".join(parts)  # once per rotation: the copy does not matter
        view = memoryview(data)
        start = 0
        while start < size:
            room = limit - self._size
            if size - start <= room:
                cut = size
            elif room > 0 and (cut := data.rfind(b"\n", start, start + room) + 1) > start:
                pass  # the records that fit end this file
            elif self._size:
                self.rotate()  # not one more record fits: the next file
                continue
            else:
                cut = data.find(b"\n", start) + 1 or size  # one record longer than max_bytes: a file of its own
            _write_all(self._fd, [view[start:cut]], cut - start)
            self._size += cut - start
            start = cut
            if start < size:
                self.rotate()

    def rotate(self) -> None:
        """Shift ``web.log`` to ``web.log.1``, ``.1`` to ``.2`` ... (the oldest drops off); start a new ``web.log``."""
        keep = self.rotation.max_files
        # The oldest is unlinked first so that no rename replaces a file: on ext4 a rename over an
        # existing file forces the renamed file's delayed blocks to be written (auto_da_alloc), which
        # blocked every rotation here (200 MB through 10 MiB x 5 files: 30% slower).
        if keep == 1:
            os.unlink(self._name)
        else:
            last = 0  # web.log.1 ... web.log.<last> exist
            while last < keep - 1 and os.path.lexists(b"%s.%d" % (self._name, last + 1)):
                last += 1
            if last == keep - 1:
                os.unlink(b"%s.%d" % (self._name, last))
                last -= 1
            for i in range(last, 0, -1):
                os.rename(b"%s.%d" % (self._name, i), b"%s.%d" % (self._name, i + 1))
            os.rename(self._name, self._name + b".1")
        old, self._fd = self._fd, self._open()
        os.close(old)
        self._size = os.fstat(self._fd).st_size
        self.rotations += 1

    def close(self) -> None:
        """Close the file (nothing is buffered here, so nothing is flushed; no fsync, like Docker)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- reading records --------------------------------------------------------------------------------------


class LogLine(NamedTuple):
    """One line of a service's output, as :func:`read_log` and :func:`follow_log` yield it.

    ``complete`` is false for a line the service never ended with a newline: the stream closed mid-line
    (``E``), or the line is still being written (its ``P`` records are the last ones on disk).
    """

    stamp: bytes
    """When the supervisor read the line (of its first piece): ``b"2026-11-22T09:40:00.123456Z"``."""
    stream: str
    """``"stdout"`` or ``"stderr"``."""
    data: bytes
    """The line's bytes, without its newline."""
    complete: bool = True

    @property
    def time(self) -> datetime:
        """:attr:`stamp` as an aware UTC datetime."""
        return datetime.fromisoformat(self.stamp.decode())

    def raw(self) -> bytes:
        """The bytes the service wrote: the line and its newline, if it had one."""
        return self.data + b"\n" if self.complete else self.data


class _Assembler:
    """Records in, lines out: joins a stream's ``P`` records with the record that ends the line."""

    __slots__ = ("open", "since", "until")

    def __init__(self, since: bytes | None = None, until: bytes | None = None) -> None:
        self.open: dict[bytes, tuple[bytes, list[bytes]]] = {}
        self.since = since
        self.until = until

    def feed(self, records: list[bytes]) -> list[LogLine]:
        """Lines completed by ``records`` (whole records, without their newlines), in order."""
        out: list[LogLine] = []
        append = out.append
        opened = self.open
        since, until = self.since, self.until
        streams = _STREAMS
        for rec in records:
            if len(rec) < HEADER_LEN or rec[27] != _SPACE or rec[34] != _SPACE or rec[36] != _SPACE:
                continue  # not a record of ours (a hand edit, a torn file): skipped
            key = rec[28:34]
            stream = streams.get(key)
            if stream is None:
                continue
            flag = rec[35]
            if flag == _F and not opened:
                stamp, data, complete = rec[:STAMP_LEN], rec[HEADER_LEN:], True
            elif flag == _P:
                piece = opened.get(key)
                if piece is None:
                    opened[key] = (rec[:STAMP_LEN], [rec[HEADER_LEN:]])
                else:
                    piece[1].append(rec[HEADER_LEN:])
                continue
            elif flag in (_F, _E):
                piece = opened.pop(key, None)
                if piece is None:
                    stamp, data = rec[:STAMP_LEN], rec[HEADER_LEN:]
                else:
                    piece[1].append(rec[HEADER_LEN:])
                    stamp, data = piece[0], b"".join(piece[1])
                complete = flag == _F
            else:
                continue
            if (since is None or stamp >= since) and (until is None or stamp < until):
                append(LogLine(stamp, stream, data, complete))
        return out

    def unfinished(self) -> list[LogLine]:
        """The lines whose ``P`` records are the last of their stream, oldest first (``complete`` false)."""
        lines = [LogLine(s, _STREAMS[k], b"".join(p), False) for k, (s, p) in self.open.items()]
        self.open.clear()
        lines.sort(key=lambda line: line.stamp)
        return [
            line
            for line in lines
            if (self.since is None or line.stamp >= self.since) and (self.until is None or line.stamp < self.until)
        ]


def _rotated(path: Path) -> list[Path]:
    """``path``'s rotated files, oldest first (``web.log.4`` ... ``web.log.1``)."""
    pattern = re.compile(re.escape(path.name) + r"\.([1-9][0-9]*)")
    found: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(path.parent):
            m = pattern.fullmatch(entry.name)
            if m:
                found.append((int(m.group(1)), Path(entry.path)))
    return [p for _, p in sorted(found, reverse=True)]


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files of one service's log, oldest first: its rotated files, then ``path`` itself if it exists."""
    path = Path(path)
    files = _rotated(path)
    if path.exists():
        files.append(path)
    return files


def _ino(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _open_files(path: Path) -> list[tuple[int, int]]:
    """(fd, inode) of every file of the log, oldest first, as one consistent snapshot.

    The names are listed, opened, and checked again: a rotation in between (names shift) is retried.
    """
    for _ in range(20):
        opened: list[tuple[int, int]] = []
        names = log_files(path)
        try:
            for name in names:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
                opened.append((fd, os.fstat(fd).st_ino))
        except FileNotFoundError:
            pass
        else:
            if log_files(path) == names and [_ino(n) for n in names] == [ino for _, ino in opened]:
                return opened
        for fd, _ in opened:
            os.close(fd)
    raise OSError(errno.EAGAIN, "the log kept rotating while it was opened", str(path))


def _whole_end(fd: int, size: int) -> int:
    """The end of the last whole record at or before ``size`` (a record being written is left out)."""
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        i = os.pread(fd, pos - start, start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _records_backward(fd: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, header) of every record of ``fd[0:end]``, the last first (``end`` follows a newline)."""
    base, data, hi = end, b"", 0  # data is fd[base:base+len(data)]; data[:hi] not yet walked
    while base + hi > 0:
        i = data.rfind(b"\n", 0, hi - 1) if hi > 1 else -1
        while i < 0 and base > 0:
            start = max(0, base - 65536)
            data = os.pread(fd, base - start, start) + data[:hi]
            hi += base - start
            base = start
            i = data.rfind(b"\n", 0, hi - 1)
        yield base + i + 1, data[i + 1 : i + 1 + HEADER_LEN]
        hi = i + 1


def _tail_start(files: list[tuple[int, int]], ends: list[int], lines: int) -> tuple[int, int]:
    """Where to start reading (file index, offset) to get the last ``lines`` lines whole.

    Walks the records backwards, counting a line at each record that ends one (and at a stream's last
    record). Once enough are counted, it goes on backwards as long as a stream's earliest included
    record may continue an earlier ``P`` record, so that no line is cut at its start.
    """
    if lines <= 0:
        return len(files), 0
    count = 0
    seen: set[bytes] = set()
    pending: set[bytes] = set()  # streams whose record before the cut must still be looked at
    skipped: set[bytes] = set()  # streams of records walked past (after enough lines) but not included
    cut = (len(files), 0)
    for index in range(len(files) - 1, -1, -1):
        for offset, header in _records_backward(files[index][0], ends[index]):
            if len(header) < HEADER_LEN:
                continue
            key, flag = header[28:34], header[35]
            if count < lines:
                if flag != _P or key not in seen:
                    count += 1
                seen.add(key)
                pending.add(key)
                cut = (index, offset)
                continue
            if key in pending:
                if flag == _P:  # the line of an included record starts earlier: include up to here
                    pending |= skipped
                    skipped.clear()
                    cut = (index, offset)
                    continue
                pending.discard(key)
            skipped.add(key)
            if not pending:
                return cut
    return cut


def _read_records(fd: int, start: int, end: int) -> Iterator[list[bytes]]:
    """The records of ``fd[start:end]`` in blocks (``end`` follows a newline)."""
    carry = b""
    pos = start
    while pos < end:
        block = os.pread(fd, min(_BLOCK, end - pos), pos)
        if not block:
            break
        pos += len(block)
        records = (carry + block).split(b"\n") if carry else block.split(b"\n")
        carry = records.pop()
        yield records


def read_log(
    path: str | os.PathLike[str],
    *,
    tail: int | None = None,
    since: datetime | float | None = None,
    until: datetime | float | None = None,
) -> Iterator[LogLine]:
    """The lines of one service's log on disk now (``path`` is ``web.log``; rotated files come first).

    - ``tail``: only the last N lines (``since``/``until`` apply to those); found by reading the files
      backwards, so ``tail=10`` of a full 50 MiB log reads little.
    - ``since``/``until``: only lines read at or after ``since`` and before ``until`` (datetime, or
      seconds since the epoch; a naive datetime is local time, as with ``docker logs --since``).

    The files are opened as one snapshot, so a rotation while reading neither loses nor repeats a line.
    A line whose last records are ``P`` (still being written) comes last, with ``complete`` false.
    A missing log is empty.
    """
    files = _open_files(Path(path))
    try:
        ends = [_whole_end(fd, os.fstat(fd).st_size) for fd, _ in files]
        first, offset = (0, 0) if tail is None else _tail_start(files, ends, tail)
        asm = _Assembler(None if since is None else _stamp_of(since), None if until is None else _stamp_of(until))
        kept: deque[LogLine] | None = None if tail is None else deque(maxlen=max(tail, 0))
        for index in range(first, len(files)):
            for records in _read_records(files[index][0], offset if index == first else 0, ends[index]):
                if kept is None:
                    yield from asm.feed(records)
                else:
                    kept.extend(asm.feed(records))
        if kept is None:
            yield from asm.unfinished()
        else:
            kept.extend(asm.unfinished())
            yield from kept
    finally:
        for fd, _ in files:
            os.close(fd)


# --- following ------------------------------------------------------------------------------------------

_IN_MODIFY = 0x2
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
_DIR_EVENTS = _IN_CREATE | _IN_MOVED_TO | _IN_MOVED_FROM | _IN_DELETE
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


class _Watch:
    """Wakes a follower when its log may have changed: inotify on the directory (the file appears, is
    rotated) and on the followed file itself (it grows), through ctypes (the os module has no inotify).

    Without inotify (no libc symbol, a sandbox or filesystem that refuses it) it falls back to sleeping
    ``poll`` seconds between looks: still correct, since every wake-up reads to the end of the file and
    checks for a rotation; only later.
    """

    def __init__(self, path: Path, poll: float) -> None:
        self.name = os.fsencode(path.name)
        self.poll = poll
        self.fd = -1
        self.file_wd = -1
        if not path.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such log directory", str(path.parent))
        try:
            libc = _libc()
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd < 0:
            return
        if libc.inotify_add_watch(fd, os.fsencode(path.parent), _DIR_EVENTS) < 0:
            os.close(fd)
            return
        self.fd = fd

    def watch_file(self, fd: int) -> None:
        """Watch the file open as ``fd`` for growth (through /proc/self/fd: exactly that inode)."""
        if self.fd < 0:
            return
        libc = _libc()
        if self.file_wd >= 0:
            libc.inotify_rm_watch(self.fd, self.file_wd)
        self.file_wd = libc.inotify_add_watch(self.fd, b"/proc/self/fd/%d" % fd, _IN_MODIFY)

    def _relevant(self, events: bytes) -> bool:
        pos = 0
        while pos + _EVENT.size <= len(events):
            wd, mask, _cookie, length = _EVENT.unpack_from(events, pos)
            name = events[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            if mask & _IN_Q_OVERFLOW or (wd == self.file_wd and mask & _IN_MODIFY) or name == self.name:
                return True
        return False

    async def wait(self) -> None:
        """Until something happened to the log (or, without inotify, ``poll`` seconds passed)."""
        if self.fd < 0:
            await anyio.sleep(self.poll)
            return
        while True:
            try:
                events = os.read(self.fd, 65536)
            except BlockingIOError:
                await anyio.wait_readable(self.fd)
                continue
            if self._relevant(events):
                return

    def drain(self) -> None:
        """Forget the events queued so far (the follower is about to look at the files anyway)."""
        if self.fd < 0:
            return
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 65536):
                pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Held:
    """The file a follower reads: its descriptor, inode, read position and the record being carried."""

    def __init__(self, asm: _Assembler) -> None:
        self.asm = asm
        self.fd = -1
        self.ino = -1
        self.pos = 0
        self.carry = b""

    def hold(self, fd: int, ino: int, pos: int = 0) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.ino, self.pos, self.carry = fd, ino, pos, b""

    def read(self) -> Iterator[list[LogLine]]:
        """Lines completed by what was appended to the held file since the last read."""
        while self.fd >= 0:
            block = os.pread(self.fd, _BLOCK, self.pos)
            if not block:
                return
            self.pos += len(block)
            records = (self.carry + block).split(b"\n")
            self.carry = records.pop()
            yield self.asm.feed(records)

    def close(self) -> None:
        self.hold(-1, -1)


async def follow_log(
    path: str | os.PathLike[str],
    *,
    tail: int | None = None,
    since: datetime | float | None = None,
    poll: float = 0.25,
) -> AsyncGenerator[LogLine, None]:
    """The lines of a service's log, as :func:`read_log` gives them, then every new line as it is written.

    Follows the log across rotations: the file being read is read to its end before the next one is
    opened, the next one found by inode, so nothing is skipped or repeated (unless the follower falls
    more than ``max_files`` rotations behind: the files deleted meanwhile are gone). Waits for a log that
    does not exist yet (its directory must). A line is yielded once its ``F`` or ``E`` record is on
    disk. Woken by inotify; ``poll`` (seconds) is used only where inotify is not available.

    Runs until cancelled or closed: wrap it in ``contextlib.aclosing`` (or let ``async for`` finish it)
    so its file descriptors are closed at once.
    """
    path = Path(path)
    watch = _Watch(path, poll)  # before the files are opened: no change in between is missed
    asm = _Assembler(None if since is None else _stamp_of(since))
    held = _Held(asm)
    try:
        files = _open_files(path)
        try:
            ends = [_whole_end(fd, os.fstat(fd).st_size) for fd, _ in files]
            first, offset = (0, 0) if tail is None else _tail_start(files, ends, tail)
            kept: deque[LogLine] | None = None if tail is None else deque(maxlen=max(tail, 0))
            for index in range(first, len(files)):
                for records in _read_records(files[index][0], offset if index == first else 0, ends[index]):
                    lines = asm.feed(records)
                    if kept is not None:
                        kept.extend(lines)
                        continue
                    for line in lines:
                        yield line
                    await anyio.lowlevel.checkpoint()
            for line in kept or ():
                yield line
            if files:
                fd, ino = files.pop()
                held.hold(fd, ino, ends[-1])
                watch.watch_file(fd)
        finally:
            for fd, _ in files:
                os.close(fd)
        while True:
            watch.drain()
            for lines in held.read():
                for line in lines:
                    yield line
                await anyio.lowlevel.checkpoint()
            current = _ino(path)
            if current is None or current == held.ino:
                await watch.wait()
                continue
            # Rotated (or created): finish the held file, then read the files that came after it.
            for lines in held.read():
                for line in lines:
                    yield line
            newer = _open_files(path)
            inodes = [ino for _, ino in newer]
            after = inodes.index(held.ino) + 1 if held.ino in inodes else 0  # not there: all are newer
            for fd, _ in newer[:after]:
                os.close(fd)
            successors = deque(newer[after:])
            try:
                while successors:
                    fd, ino = successors.popleft()
                    held.hold(fd, ino)
                    watch.watch_file(fd)
                    for lines in held.read():
                        for line in lines:
                            yield line
                        await anyio.lowlevel.checkpoint()
            finally:
                for fd, _ in successors:
                    os.close(fd)
    finally:
        held.close()
        watch.close()
