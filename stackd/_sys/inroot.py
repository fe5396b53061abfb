"""Open paths inside a root directory so that no symlink or ".." can lead outside it.

Used by the launcher before pivot_root, when the service's root is still a subdirectory: a rootfs
whose /etc/hosts is a symlink to /etc/passwd must get the file mounted over its own /etc/passwd,
never the host's. openat2(2) with RESOLVE_IN_ROOT makes the kernel treat the root directory as "/"
for every component and symlink (what runc's securejoin emulates in userspace).
"""

from __future__ import annotations

import ctypes
import os
import stat

from stackd._sys.linux import ARCH

__all__ = ["open_in_root"]

_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64 (asm-generic)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    if ARCH not in ("x86_64", "aarch64"):
        raise OSError(38, f"openat2 is not wired for {ARCH}", path)
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), path.encode(), ctypes.byref(how), ctypes.c_size_t(24)
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def open_in_root(root_fd: int, path: str, *, create: str = "none", mode: int = 0o755, _depth: int = 0) -> int | None:
    """An O_PATH fd of `path` resolved inside the directory `root_fd`.

    create: "dir" makes missing directories, "file" missing parents and an empty file at the end,
    "none" returns None when the path does not exist. Symlinks are followed, but inside the root.
    """
    try:
        return _openat2(root_fd, path, os.O_PATH)
    except FileNotFoundError:
        if create == "none":
            return None
    # Create what is missing one component at a time, each resolved from the root again, so that a
    # symlink met on the way is followed inside the root exactly as the kernel would.
    parts = [p for p in path.split("/") if p]
    parent = os.dup(root_fd)
    try:
        for index, part in enumerate(parts):
            prefix = "/".join(parts[: index + 1])
            try:
                current = _openat2(root_fd, prefix, os.O_PATH)
            except FileNotFoundError:
                link = _dangling_link(parent, part)
                if link is not None:
                    # Create what a dangling symlink points to, resolved inside the root.
                    if _depth > 40:
                        raise OSError(40, os.strerror(40), path) from None
                    base = "/" if link.startswith("/") else "/" + "/".join(parts[:index])
                    rest = "/".join(parts[index + 1 :])
                    target = os.path.join(base, link, rest) if rest else os.path.join(base, link)
                    os.close(parent)
                    parent = -1
                    return open_in_root(root_fd, target, create=create, mode=mode, _depth=_depth + 1)
                if index == len(parts) - 1 and create == "file":
                    os.close(_openat2(parent, part, os.O_CREAT | os.O_WRONLY, 0o644))
                else:
                    os.mkdir(part, mode, dir_fd=parent)
                current = _openat2(root_fd, prefix, os.O_PATH)
            if index < len(parts) - 1 and not stat.S_ISDIR(os.fstat(current).st_mode):
                os.close(current)
                raise NotADirectoryError(20, os.strerror(20), path)
            os.close(parent)
            parent = current
        return parent
    except BaseException:
        if parent >= 0:
            os.close(parent)
        raise


def _dangling_link(dir_fd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None
