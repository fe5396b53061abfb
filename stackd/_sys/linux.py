"""Linux system calls and constants the launcher needs that Python 3.11's `os` lacks.

Standard library only, no threads, cheap to import: this module is imported by the pre-started,
single-threaded launcher that forks the namespaced services (design.md §3). `ctypes` is its one
costly import (about 2.5 ms); everything else is constants and a handful of function pointers.

Errors: every failing call raises ``OSError(errno, strerror, filename[, filename2])`` with the errno
of the failed call (``ctypes.get_errno()``), ``filename`` the path the call acted on (a mount's
target, pivot_root's new root, a namespace file...) and ``filename2`` the second path if there is one
(a mount's source, pivot_root's put_old). ``strerror`` is ``os.strerror(errno)``, followed by a short
hint in parentheses where the kernel's word alone would mislead. Because errno is set, the raised
object is the usual subclass (FileNotFoundError, PermissionError...) and callers can render it as
``service web: pivot_root: EINVAL (Invalid argument) on /run/stackd/shop/web/rootfs``.

System calls that glibc does not wrap in every version we may meet are made through syscall(2) by
number; the table is chosen by ``os.uname().machine`` (x86_64 and aarch64). On other architectures
those calls raise ``OSError(ENOSYS)`` that names the architecture; the glibc-wrapped calls still work.

Not wrapped here because Python 3.11 already has them: ``os.pidfd_open``,
``signal.pidfd_send_signal``, ``os.waitid(P_PIDFD, ...)``, ``os.closerange``, ``os.setgroups``,
``os.setresgid``, ``os.setresuid``, ``os.sched_setaffinity``, ``resource.setrlimit``.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # no `typing` at run time: it costs more than this whole module
    from typing import TypeAlias

    _Path: TypeAlias = str | bytes | os.PathLike[str] | os.PathLike[bytes]

__all__ = [
    "ARCH",
    "AT_EMPTY_PATH",
    "AT_FDCWD",
    "AT_NO_AUTOMOUNT",
    "AT_RECURSIVE",
    "AT_SYMLINK_NOFOLLOW",
    "AUDIT_ARCH_AARCH64",
    "AUDIT_ARCH_X86_64",
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWTIME",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "CLOSE_RANGE_CLOEXEC",
    "CLOSE_RANGE_UNSHARE",
    "FSCONFIG_CMD_CREATE",
    "FSCONFIG_SET_FLAG",
    "FSCONFIG_SET_STRING",
    "FSMOUNT_CLOEXEC",
    "FSOPEN_CLOEXEC",
    "MNT_DETACH",
    "MNT_EXPIRE",
    "MNT_FORCE",
    "MOUNT_ATTR_IDMAP",
    "MOUNT_ATTR_NOATIME",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NODIRATIME",
    "MOUNT_ATTR_NOEXEC",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_NOSYMFOLLOW",
    "MOUNT_ATTR_RDONLY",
    "MOUNT_ATTR_RELATIME",
    "MOUNT_ATTR_STRICTATIME",
    "MOUNT_ATTR__ATIME",
    "MOVE_MOUNT_F_AUTOMOUNTS",
    "MOVE_MOUNT_F_EMPTY_PATH",
    "MOVE_MOUNT_F_SYMLINKS",
    "MOVE_MOUNT_T_AUTOMOUNTS",
    "MOVE_MOUNT_T_EMPTY_PATH",
    "MOVE_MOUNT_T_SYMLINKS",
    "MS_BIND",
    "MS_DIRSYNC",
    "MS_LAZYTIME",
    "MS_MANDLOCK",
    "MS_MOVE",
    "MS_NOATIME",
    "MS_NODEV",
    "MS_NODIRATIME",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_NOSYMFOLLOW",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_RELATIME",
    "MS_REMOUNT",
    "MS_SHARED",
    "MS_SILENT",
    "MS_SLAVE",
    "MS_STRICTATIME",
    "MS_SYNCHRONOUS",
    "MS_UNBINDABLE",
    "OPEN_TREE_CLOEXEC",
    "OPEN_TREE_CLONE",
    "PR_CAPBSET_DROP",
    "PR_CAPBSET_READ",
    "PR_CAP_AMBIENT",
    "PR_CAP_AMBIENT_CLEAR_ALL",
    "PR_CAP_AMBIENT_IS_SET",
    "PR_CAP_AMBIENT_LOWER",
    "PR_CAP_AMBIENT_RAISE",
    "PR_GET_CHILD_SUBREAPER",
    "PR_GET_DUMPABLE",
    "PR_GET_KEEPCAPS",
    "PR_GET_NO_NEW_PRIVS",
    "PR_GET_PDEATHSIG",
    "PR_GET_SECCOMP",
    "PR_GET_SECUREBITS",
    "PR_SET_CHILD_SUBREAPER",
    "PR_SET_DUMPABLE",
    "PR_SET_KEEPCAPS",
    "PR_SET_NAME",
    "PR_SET_NO_NEW_PRIVS",
    "PR_SET_PDEATHSIG",
    "PR_SET_SECCOMP",
    "PR_SET_SECUREBITS",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_NEW_LISTENER",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_MODE_DISABLED",
    "SECCOMP_MODE_FILTER",
    "SECCOMP_MODE_STRICT",
    "SECCOMP_RET_ALLOW",
    "SECCOMP_RET_DATA",
    "SECCOMP_RET_ERRNO",
    "SECCOMP_RET_KILL_PROCESS",
    "SECCOMP_RET_KILL_THREAD",
    "SECCOMP_RET_LOG",
    "SECCOMP_RET_TRACE",
    "SECCOMP_RET_TRAP",
    "SECCOMP_RET_USER_NOTIF",
    "SECCOMP_SET_MODE_FILTER",
    "SECCOMP_SET_MODE_STRICT",
    "attach_mount",
    "audit_arch",
    "close_range",
    "fsconfig",
    "fsmount",
    "fsopen",
    "get_child_subreaper",
    "get_keepcaps",
    "get_no_new_privs",
    "get_pdeathsig",
    "get_seccomp_mode",
    "load_seccomp_bpf",
    "make_readonly_recursive",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "pivot_root",
    "prctl",
    "set_child_subreaper",
    "set_dumpable",
    "set_keepcaps",
    "set_no_new_privs",
    "set_pdeathsig",
    "setdomainname",
    "sethostname",
    "setns",
    "setns_path",
    "umount2",
    "unshare",
    "write_file",
]

# ---------------------------------------------------------------------------------------------------
# Constants (values from the kernel's uapi headers; identical on x86_64 and aarch64)

# <linux/sched.h>: namespaces for unshare(2), setns(2), clone(2)
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>: mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 1 << 1
MS_NODEV = 1 << 2
MS_NOEXEC = 1 << 3
MS_SYNCHRONOUS = 1 << 4
MS_REMOUNT = 1 << 5
MS_MANDLOCK = 1 << 6
MS_DIRSYNC = 1 << 7
MS_NOSYMFOLLOW = 1 << 8
MS_NOATIME = 1 << 10
MS_NODIRATIME = 1 << 11
MS_BIND = 1 << 12
MS_MOVE = 1 << 13
MS_REC = 1 << 14
MS_SILENT = 1 << 15
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# umount2(2) flags
MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4

# <linux/mount.h>: mount_setattr(2) attributes (struct mount_attr.attr_set / attr_clr)
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_NOEXEC = 0x00000008
MOUNT_ATTR__ATIME = 0x00000070  # the atime bits, to clear before setting one of the three below
MOUNT_ATTR_RELATIME = 0x00000000
MOUNT_ATTR_NOATIME = 0x00000010
MOUNT_ATTR_STRICTATIME = 0x00000020
MOUNT_ATTR_NODIRATIME = 0x00000080
MOUNT_ATTR_IDMAP = 0x00100000
MOUNT_ATTR_NOSYMFOLLOW = 0x00200000

# <linux/fcntl.h>: *at() flags
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

# open_tree(2) and move_mount(2)
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_SYMLINKS = 0x01
MOVE_MOUNT_F_AUTOMOUNTS = 0x02
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_SYMLINKS = 0x10
MOVE_MOUNT_T_AUTOMOUNTS = 0x20
MOVE_MOUNT_T_EMPTY_PATH = 0x40

# <linux/mount.h>: the filesystem context API, fsopen(2) -> fsconfig(2) -> fsmount(2)
FSOPEN_CLOEXEC = 0x00000001
FSMOUNT_CLOEXEC = 0x00000001
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

# <linux/close_range.h>
CLOSE_RANGE_UNSHARE = 1 << 1
CLOSE_RANGE_CLOEXEC = 1 << 2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_GET_KEEPCAPS = 7
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3
PR_CAP_AMBIENT_CLEAR_ALL = 4

# <linux/seccomp.h>
SECCOMP_MODE_DISABLED = 0
SECCOMP_MODE_STRICT = 1
SECCOMP_MODE_FILTER = 2
SECCOMP_SET_MODE_STRICT = 0
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_LOG = 1 << 1
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF

# <linux/audit.h>: the value of seccomp_data.arch for a native system call
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7

_BPF_MAXINSNS = 4096
_UINT_MAX = 0xFFFFFFFF

#: The machine name from uname(2), which picks the system call table.
ARCH: str = os.uname().machine

# Only the calls made through syscall(2) by number. Since Linux 5.1 (424 and up) new system calls have
# one number on every architecture; older ones differ: aarch64 uses the asm-generic table.
_SYSCALL_TABLES: dict[str, dict[str, int]] = {
    "x86_64": {
        "pivot_root": 155,
        "seccomp": 317,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "close_range": 436,
        "mount_setattr": 442,
    },
    "aarch64": {
        "pivot_root": 41,
        "seccomp": 277,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "close_range": 436,
        "mount_setattr": 442,
    },
}
_AUDIT_ARCHES = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}
_NR: dict[str, int] | None = _SYSCALL_TABLES.get(ARCH)

# ---------------------------------------------------------------------------------------------------
# libc

_libc = ctypes.CDLL(None, use_errno=True)

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_prctl = _libc.prctl  # variadic: arguments are passed as explicit c_ulong
_prctl.restype = ctypes.c_int

_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int

_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_setns.restype = ctypes.c_int

_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_mount.restype = ctypes.c_int

_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int

_sethostname = _libc.sethostname
_sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_sethostname.restype = ctypes.c_int

_setdomainname = _libc.setdomainname
_setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_setdomainname.restype = ctypes.c_int


def _error(err: int, path: _Path | None = None, path2: _Path | None = None, hint: str = "") -> OSError:
    """OSError(err, strerror, path[, path2]) with the paths shown as text."""
    message = os.strerror(err)
    if hint:
        message = f"{message} ({hint})"
    name = None if path is None else os.fsdecode(path)
    name2 = None if path2 is None else os.fsdecode(path2)
    return OSError(err, message, name, None, name2)


def _nr(name: str) -> int:
    if _NR is None:
        raise OSError(
            _errno.ENOSYS,
            f"{os.strerror(_errno.ENOSYS)} (stackd knows the number of {name}(2) on x86_64 and aarch64 only,"
            f" this machine is {ARCH})",
        )
    return _NR[name]


def _raw_syscall(name: str, *args: object) -> int:
    """syscall(2) by number; returns the result, or -1 with ctypes' errno set."""
    return int(_syscall(ctypes.c_long(_nr(name)), *args))


def _cpath(path: _Path) -> bytes:
    return os.fsencode(path)


def _fd_description(fd: int) -> str:
    try:
        return f"fd {fd} ({os.readlink(f'/proc/self/fd/{fd}')})"
    except OSError:
        return f"fd {fd}"


def audit_arch() -> int:
    """The AUDIT_ARCH_* value that seccomp_data.arch holds for a native system call on this machine."""
    try:
        return _AUDIT_ARCHES[ARCH]
    except KeyError:
        raise OSError(_errno.ENOSYS, f"{os.strerror(_errno.ENOSYS)} (no seccomp arch value known for {ARCH})") from None


# ---------------------------------------------------------------------------------------------------
# Namespaces


def unshare(flags: int) -> None:
    """unshare(2): move the calling process into new namespaces (CLONE_NEW* flags, or'ed).

    CLONE_NEWPID and CLONE_NEWTIME apply to the children forked afterwards, not to the caller;
    CLONE_NEWUSER needs a single-threaded caller."""
    if _unshare(flags) != 0:
        raise _error(ctypes.get_errno(), hint=f"unshare flags {flags:#x}")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace that `fd` (an open /proc/<pid>/ns/* or /run/netns/* file, or a
    pidfd) refers to. `nstype` 0 accepts any type; a CLONE_NEW* value makes the kernel check it."""
    if _setns(fd, nstype) != 0:
        raise _error(ctypes.get_errno(), _fd_description(fd))


def setns_path(path: _Path, nstype: int = 0) -> None:
    """Open `path` (e.g. /run/netns/<name>, /proc/<pid>/ns/net), setns(2) into it, close it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _setns(fd, nstype) != 0:
            raise _error(ctypes.get_errno(), path)
    finally:
        os.close(fd)


def sethostname(name: str) -> None:
    """sethostname(2) in the caller's UTS namespace (at most 64 bytes)."""
    raw = name.encode()
    if _sethostname(raw, len(raw)) != 0:
        raise _error(ctypes.get_errno(), name)


def setdomainname(name: str) -> None:
    """setdomainname(2) (the NIS domain name) in the caller's UTS namespace (at most 64 bytes)."""
    raw = name.encode()
    if _setdomainname(raw, len(raw)) != 0:
        raise _error(ctypes.get_errno(), name)


# ---------------------------------------------------------------------------------------------------
# Mounts


def mount(
    source: _Path | None,
    target: _Path,
    fstype: str | None = None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    """mount(2). Errors carry `target` as filename and `source` as filename2."""
    src = None if source is None else _cpath(source)
    fs = None if fstype is None else fstype.encode()
    opts = data.encode() if isinstance(data, str) else data
    if _mount(src, _cpath(target), fs, flags, opts) != 0:
        raise _error(ctypes.get_errno(), target, source)


def umount2(target: _Path, flags: int = 0) -> None:
    """umount2(2), e.g. ``umount2(old_root, MNT_DETACH)``."""
    if _umount2(_cpath(target), flags) != 0:
        raise _error(ctypes.get_errno(), target)


def pivot_root(new_root: _Path, put_old: _Path) -> None:
    """pivot_root(2): make the mount at `new_root` the caller's root and move the old root to
    `put_old` (which must be at or under `new_root`; ``pivot_root(".", ".")`` also works).

    `new_root` must be a mount point (bind-mount a directory onto itself first) and neither the old
    root nor `new_root` may have shared propagation: make "/" MS_REC|MS_PRIVATE first. Afterwards
    chdir("/") and ``umount2(put_old, MNT_DETACH)``."""
    if _raw_syscall("pivot_root", _cpath(new_root), _cpath(put_old)) != 0:
        err = ctypes.get_errno()
        hint = ""
        if err == _errno.EINVAL:
            hint = "new_root must be a mount point, put_old at or under it, no shared propagation"
        elif err == _errno.EBUSY:
            hint = "new_root or put_old is on the current root's mount: bind-mount new_root onto itself first"
        raise _error(err, new_root, put_old, hint)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(
    path: _Path,
    attr_set: int = 0,
    attr_clr: int = 0,
    propagation: int = 0,
    *,
    flags: int = AT_RECURSIVE,
    dfd: int = AT_FDCWD,
    userns_fd: int = 0,
) -> None:
    """mount_setattr(2) (Linux 5.12+): change MOUNT_ATTR_* flags and/or the propagation (MS_PRIVATE,
    MS_SLAVE, MS_SHARED, MS_UNBINDABLE) of the mount at `path`, and by default (AT_RECURSIVE) of every
    mount below it, in one atomic call. With MOUNT_ATTR_IDMAP, `userns_fd` names the user namespace whose
    mapping the (detached) mount takes."""
    attr = _MountAttr(attr_set, attr_clr, propagation, userns_fd)
    ret = _raw_syscall(
        "mount_setattr",
        ctypes.c_long(dfd),
        _cpath(path),
        ctypes.c_ulong(flags),
        ctypes.c_void_p(ctypes.addressof(attr)),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if ret != 0:
        raise _error(ctypes.get_errno(), path)


def make_readonly_recursive(path: _Path) -> None:
    """Make the mount at `path` and every mount below it read-only (mount_setattr, AT_RECURSIVE)."""
    mount_setattr(path, MOUNT_ATTR_RDONLY, flags=AT_RECURSIVE)


def open_tree(path: _Path, flags: int = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC, *, dfd: int = AT_FDCWD) -> int:
    """open_tree(2) (Linux 5.2+): a file descriptor for the mount at `path`; with OPEN_TREE_CLONE a
    detached copy (a bind mount not yet attached anywhere; add AT_RECURSIVE for the whole subtree)."""
    fd = _raw_syscall("open_tree", ctypes.c_long(dfd), _cpath(path), ctypes.c_ulong(flags))
    if fd < 0:
        raise _error(ctypes.get_errno(), path)
    return fd


def move_mount(from_dfd: int, from_path: _Path, to_dfd: int, to_path: _Path, flags: int = 0) -> None:
    """move_mount(2) (Linux 5.2+). Errors carry `to_path` as filename and `from_path` as filename2."""
    ret = _raw_syscall(
        "move_mount",
        ctypes.c_long(from_dfd),
        _cpath(from_path),
        ctypes.c_long(to_dfd),
        _cpath(to_path),
        ctypes.c_ulong(flags),
    )
    if ret != 0:
        raise _error(ctypes.get_errno(), to_path, from_path or _fd_description(from_dfd))


def attach_mount(fd: int, target: _Path) -> None:
    """Attach the detached mount `fd` (from open_tree with OPEN_TREE_CLONE) at `target`."""
    move_mount(fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    """fsopen(2) (Linux 5.2+): a filesystem context for a new superblock of `fstype`, to configure with
    fsconfig() and turn into a detached mount with fsmount()."""
    fd = _raw_syscall("fsopen", fstype.encode(), ctypes.c_uint(flags))
    if fd < 0:
        raise _error(ctypes.get_errno(), hint=f"fsopen {fstype}")
    return fd


def fsconfig(fd: int, cmd: int, key: str | None = None, value: str | None = None, aux: int = 0) -> None:
    """fsconfig(2): set a parameter of the filesystem context `fd` (FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING)
    or create its superblock (FSCONFIG_CMD_CREATE)."""
    ret = _raw_syscall(
        "fsconfig",
        ctypes.c_int(fd),
        ctypes.c_uint(cmd),
        None if key is None else key.encode(),
        None if value is None else value.encode(),
        ctypes.c_int(aux),
    )
    if ret != 0:
        raise _error(ctypes.get_errno(), hint=f"fsconfig {key or cmd}")


def fsmount(fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    """fsmount(2): a detached mount (MOUNT_ATTR_* `attr_flags`) of the superblock created in the
    filesystem context `fd`; attach it with attach_mount()."""
    mount_fd = _raw_syscall("fsmount", ctypes.c_int(fd), ctypes.c_uint(flags), ctypes.c_uint(attr_flags))
    if mount_fd < 0:
        raise _error(ctypes.get_errno(), hint="fsmount")
    return mount_fd


# ---------------------------------------------------------------------------------------------------
# prctl


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) with integer (or address) arguments; returns the call's non-negative result."""
    ret = _prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(arg3),
        ctypes.c_ulong(arg4),
        ctypes.c_ulong(arg5),
    )
    if ret < 0:
        raise _error(ctypes.get_errno(), hint=f"prctl option {option}")
    return int(ret)


def _prctl_get_int(option: int) -> int:
    value = ctypes.c_int(0)
    prctl(option, ctypes.addressof(value))
    return value.value


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: execve can no longer grant privileges (setuid bits, file capabilities).
    It cannot be undone and is inherited; it also lets an unprivileged process load seccomp filters."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def get_no_new_privs() -> bool:
    return prctl(PR_GET_NO_NEW_PRIVS) == 1


def set_child_subreaper(enable: bool = True) -> None:
    """PR_SET_CHILD_SUBREAPER: orphaned descendants are re-parented to the caller instead of init."""
    prctl(PR_SET_CHILD_SUBREAPER, int(enable))


def get_child_subreaper() -> bool:
    return _prctl_get_int(PR_GET_CHILD_SUBREAPER) != 0


def set_pdeathsig(sig: int) -> None:
    """PR_SET_PDEATHSIG: receive `sig` when the parent *thread* exits (0 clears it). Cleared by a
    setuid exec and across fork. The parent may already be gone: compare os.getppid() afterwards."""
    prctl(PR_SET_PDEATHSIG, sig)


def get_pdeathsig() -> int:
    return _prctl_get_int(PR_GET_PDEATHSIG)


def set_keepcaps(enable: bool) -> None:
    """PR_SET_KEEPCAPS: keep the permitted capabilities across a switch of all uids away from 0
    (the effective set is still cleared). Reset by execve."""
    prctl(PR_SET_KEEPCAPS, int(enable))


def get_keepcaps() -> bool:
    return prctl(PR_GET_KEEPCAPS) == 1


def set_dumpable(enable: bool) -> None:
    """PR_SET_DUMPABLE: whether the process may dump core and be ptrace-attached by its own uid, and
    whether its /proc/<pid> files belong to it or to root."""
    prctl(PR_SET_DUMPABLE, int(enable))


def get_seccomp_mode() -> int:
    """SECCOMP_MODE_DISABLED (0) or SECCOMP_MODE_FILTER (2) for the calling thread."""
    return prctl(PR_GET_SECCOMP)


# ---------------------------------------------------------------------------------------------------
# Seccomp


class _SockFprog(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_ushort),
        ("filter", ctypes.c_void_p),
    ]


def load_seccomp_bpf(prog: bytes, *, flags: int = 0) -> None:
    """Install a classic-BPF seccomp filter on the calling thread.

    `prog` is an array of 8-byte ``struct sock_filter`` in native byte order, as written by
    libseccomp's ``seccomp_export_bpf``. The filter is added with seccomp(2)
    SECCOMP_SET_MODE_FILTER and `flags` (falling back to prctl(PR_SET_SECCOMP) when flags is 0 and
    seccomp(2) is missing). Every later system call of this process and its children is filtered.

    Loading needs no_new_privs or CAP_SYS_ADMIN in the effective set (else EACCES). So, as runc does:
    with no_new_privs, load it last, just before exec; without it, load it *before* the user switch
    and apply_capabilities (while CAP_SYS_ADMIN is still effective), and the filter must then allow
    the calls that follow (setgroups, setresuid, capset, prctl, execve).
    """
    if not prog or len(prog) % 8:
        raise ValueError(f"a seccomp BPF program is a non-empty multiple of 8 bytes, not {len(prog)} bytes")
    count = len(prog) // 8
    if count > _BPF_MAXINSNS:
        raise ValueError(f"a seccomp BPF program has at most {_BPF_MAXINSNS} instructions, not {count}")
    buffer = ctypes.create_string_buffer(bytes(prog), len(prog))
    fprog = _SockFprog(count, ctypes.addressof(buffer))
    address = ctypes.c_void_p(ctypes.addressof(fprog))
    ret = _raw_syscall("seccomp", ctypes.c_ulong(SECCOMP_SET_MODE_FILTER), ctypes.c_ulong(flags), address)
    err = ctypes.get_errno() if ret < 0 else 0
    if ret < 0 and err == _errno.ENOSYS and flags == 0:
        ret = _prctl(
            ctypes.c_int(PR_SET_SECCOMP),
            ctypes.c_ulong(SECCOMP_MODE_FILTER),
            address,
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
        err = ctypes.get_errno() if ret < 0 else 0
    if ret < 0:
        hint = "seccomp filter"
        if err == _errno.EACCES:
            hint = "loading a seccomp filter without CAP_SYS_ADMIN needs no_new_privs set first"
        elif err == _errno.EINVAL:
            hint = "the kernel rejected the seccomp BPF program or flags"
        raise _error(err, hint=hint)


# ---------------------------------------------------------------------------------------------------
# Files and descriptors


def close_range(first: int, last: int = _UINT_MAX, flags: int = 0) -> None:
    """close_range(2) (Linux 5.9+; CLOSE_RANGE_CLOEXEC 5.11+): close, or with CLOSE_RANGE_CLOEXEC
    mark close-on-exec, every descriptor from `first` to `last` inclusive. Falls back to
    os.closerange / walking /proc/self/fd on kernels without it."""
    ret = _raw_syscall("close_range", ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(flags))
    if ret == 0:
        return
    err = ctypes.get_errno()
    if err not in (_errno.ENOSYS, _errno.EINVAL) or flags & ~CLOSE_RANGE_CLOEXEC:
        raise _error(err, hint=f"close_range({first}, {last}, {flags:#x})")
    if flags & CLOSE_RANGE_CLOEXEC:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if first <= fd <= last:
                try:
                    os.set_inheritable(fd, False)
                except OSError:  # the descriptor listdir itself used, closed by now
                    continue
    else:
        os.closerange(first, min(last, os.sysconf("SC_OPEN_MAX")) + 1)


def write_file(path: _Path, data: str | bytes) -> None:
    """Write `data` to `path` with a single write(2) (O_WRONLY|O_CLOEXEC, no O_CREAT, no truncation
    beyond what the file does itself): the way /proc and /sys files (uid_map, sysctls, cgroup files)
    want to be written. A short write is an error; every error carries `path`."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        try:
            written = os.write(fd, raw)
        except OSError as exc:
            raise _error(exc.errno or _errno.EIO, path) from None
        if written != len(raw):
            raise _error(_errno.EIO, path, hint=f"short write: {written} of {len(raw)} bytes")
    finally:
        os.close(fd)
