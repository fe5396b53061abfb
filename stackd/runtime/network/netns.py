"""Network namespaces pinned under the stack's state directory, made without forking.

`setns(CLONE_NEWNET)` and `unshare(CLONE_NEWNET)` act on the calling THREAD only. So a short-lived
thread of ours (never a pooled one: it would stay in the last namespace) unshares a new network
namespace, bind-mounts /proc/thread-self/ns/net onto the pin file, opens an rtnetlink socket there
(a socket stays in the namespace it was made in, whatever its owner does later) and moves on to the
next one; at the end it returns to the host's namespace. The sockets are handed to pyroute2
(`AsyncIPRoute(fileno=...)`) to configure the namespaces from the event loop.

Measured here (docs/networking.md): 0.4-0.5 ms a namespace, where pyroute2's `netns.create()`, which
forks a helper process, takes 2.4-2.6 ms; and 0.35-0.4 ms to open and use the socket inside, where
`AsyncIPRoute(netns=...)`, which forks another helper, takes 3.2-3.5 ms.

The pins' directory is bind-mounted on itself with shared propagation, as iproute2 does for
/run/netns: a mount namespace made later as a slave of the host's (a systemd service's, say) then
sees the pins go when they are unpinned, instead of keeping the namespaces alive with its copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stackd._sys import linux
from stackd.errors import NetworkError

#: ioctl(2) on a namespace file: its CLONE_NEW* type.
_NS_GET_NSTYPE = 0xB703

__all__ = [
    "NamespacePinner",
    "PinnedNamespace",
    "create_namespaces",
    "detach_pin_dir",
    "find_holders",
    "namespace_inode",
    "prepare_pin_dir",
    "release_pin_dir",
    "unpin",
]


@dataclass
class PinnedNamespace:
    """A network namespace pinned at `path`, with an rtnetlink socket opened inside it (until taken)
    and the interface index its first new link may take (`free_index`)."""

    path: Path
    inode: int
    socket: socket.socket | None = field(default=None, repr=False)
    free_index: int = 2

    def take_socket(self) -> int:
        """The socket's fd, for `AsyncIPRoute(fileno=...)`, which owns it from now on."""
        if self.socket is None:
            raise ValueError(f"netns {self.path}: its socket was taken already")
        sock, self.socket = self.socket, None
        return sock.detach()

    def close(self) -> None:
        """Close the socket if it was not taken (an open socket keeps the namespace alive)."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def prepare_pin_dir(directory: Path) -> None:
    """Create the pins' directory and make it a shared mount of its own (once; idempotent)."""
    directory.mkdir(parents=True, exist_ok=True)
    if _is_mount_point(directory):
        return
    try:
        linux.mount(directory, directory, None, linux.MS_BIND)
        linux.mount(None, directory, None, linux.MS_SHARED)
    except OSError as error:
        raise NetworkError(f"netns directory {directory}: {error.strerror}") from None


def detach_pin_dir(directory: Path) -> None:
    """Unmount the pins' directory with every pin in it, in one system call (so one RCU grace period,
    where unmounting 50 pins one by one costs about 15 ms). The pin files stay, unmounted."""
    try:
        while _is_mount_point(directory):
            linux.umount2(directory, linux.MNT_DETACH)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOENT):
            raise NetworkError(f"netns directory {directory}: unmount: {error.strerror}") from None


def release_pin_dir(directory: Path) -> None:
    """Unmount the pins' directory (and any pin left in it) and remove it; tolerant of "already gone"."""
    detach_pin_dir(directory)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory):
            unpin(directory / entry)
        with contextlib.suppress(OSError):
            directory.rmdir()


class NamespacePinner:
    """Pins a namespace at each path, in a short-lived thread of our own (never a pooled one: it
    changes namespaces), and hands them over as they are made, so the caller can configure the first
    while the thread makes the next:

        pinner = NamespacePinner(paths)
        try:
            async for pinned in pinner: ...
        except BaseException:
            pinner.abandon()      # unpins every namespace it made, now or when the thread is done
            raise

    A path that is pinned already (by a run that died) is unpinned first when `replace`, else that is
    an error. The thread's error is raised by the iteration."""

    def __init__(self, paths: Sequence[Path], *, replace: bool = True) -> None:
        self.paths = [Path(p) for p in paths]
        self.replace = replace
        self.made: list[PinnedNamespace] = []
        self._queue: asyncio.Queue[PinnedNamespace | BaseException | None] = asyncio.Queue()
        self._lock = threading.Lock()
        self._finished = False
        self._abandoned = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, name="stackd-netns", daemon=True).start()

    def __aiter__(self) -> NamespacePinner:
        if self._loop is None:
            self.start()
        return self

    async def __anext__(self) -> PinnedNamespace:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def abandon(self) -> None:
        """Close and unpin every namespace made, now or as soon as the thread is done."""
        with self._lock:
            now = self._finished or self._loop is None
            self._abandoned = not now
        if now:
            _undo(self.made)

    def _run(self) -> None:
        assert self._loop is not None
        put = self._queue.put_nowait
        host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for path in self.paths:
                pinned = _pin_one(path, replace=self.replace)
                self.made.append(pinned)
                self._loop.call_soon_threadsafe(put, pinned)
            self._loop.call_soon_threadsafe(put, None)
        except BaseException as failure:  # reported to the iterating task
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self._loop.call_soon_threadsafe(put, failure)
        finally:
            try:
                linux.setns(host, linux.CLONE_NEWNET)
            finally:
                os.close(host)
                with self._lock:
                    self._finished = True
                    abandoned = self._abandoned
                if abandoned:
                    _undo(self.made)


async def create_namespaces(paths: Sequence[Path], *, replace: bool = True) -> list[PinnedNamespace]:
    """Pin a new network namespace at each path, with an rtnetlink socket inside each (see
    NamespacePinner). On failure or cancellation every namespace made here is unpinned again."""
    pinner = NamespacePinner(paths, replace=replace)
    try:
        return [pinned async for pinned in pinner]
    except BaseException:
        pinner.abandon()
        raise


def _undo(made: list[PinnedNamespace]) -> None:
    for pinned in made:
        pinned.close()
        with contextlib.suppress(NetworkError):
            unpin(pinned.path)


def _pin_one(path: Path, *, replace: bool) -> PinnedNamespace:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    except FileExistsError:
        if not replace:
            raise NetworkError(f"netns {path}: exists") from None
        unpin(path)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    except OSError as error:
        raise NetworkError(f"netns {path}: create the pin: {error.strerror}") from None
    os.close(fd)
    try:
        linux.unshare(linux.CLONE_NEWNET)
        linux.mount("/proc/thread-self/ns/net", path, None, linux.MS_BIND)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise NetworkError(f"netns {path}: {error.strerror}") from None
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            # A new namespace has lo, and on some hosts fallback tunnel devices (sit0, tunl0...) too.
            free_index = max(index for index, _ in socket.if_nameindex()) + 1
            return PinnedNamespace(path, os.stat(path).st_ino, sock, free_index)
        except BaseException:
            sock.close()
            raise
    except BaseException as error:
        with contextlib.suppress(NetworkError):
            unpin(path)
        if isinstance(error, OSError):
            raise NetworkError(f"netns {path}: rtnetlink socket: {error.strerror}") from None
        raise


def unpin(path: Path | str) -> bool:
    """Unmount and remove a pin; True when a namespace was pinned there. Tolerant of a pin that is
    gone, or a file that was never mounted (a half-made pin). The namespace itself goes when nothing
    else holds it (a process in it, an open fd, a socket, another mount)."""
    unpinned = False
    try:
        linux.umount2(path, linux.MNT_DETACH)
        unpinned = True
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOENT):
            raise NetworkError(f"netns {path}: unmount: {error.strerror}") from None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise NetworkError(f"netns {path}: remove: {error.strerror}") from None
    return unpinned


def namespace_inode(path: Path | str) -> int | None:
    """The inode of the network namespace pinned at `path` (None when none is pinned there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if fcntl.ioctl(fd, _NS_GET_NSTYPE) != linux.CLONE_NEWNET:
            return None
        return os.fstat(fd).st_ino
    except OSError:  # ENOTTY: not a namespace file (a pin never mounted)
        return None
    finally:
        os.close(fd)


def find_holders(inodes: Iterable[int], *, proc: str = "/proc") -> dict[int, list[int]]:
    """The processes (any of whose threads) are in the network namespaces with these inodes."""
    wanted = set(inodes)
    found: dict[int, list[int]] = {}
    if not wanted:
        return found
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        for task in _tasks(proc, name):
            try:
                inode = os.stat(f"{proc}/{name}/task/{task}/ns/net").st_ino
            except OSError:
                continue
            if inode in wanted:
                found.setdefault(inode, []).append(int(name))
                break
    return found


def _tasks(proc: str, pid: str) -> list[str]:
    try:
        return os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return []


def _is_mount_point(path: Path) -> bool:
    """Whether `path` is a mount point (os.path.ismount misses a directory bound onto itself)."""
    wanted = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            point = line.split(" ", 5)[4]
            if "\\" in point:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
            if point == wanted:
                return True
    return False
