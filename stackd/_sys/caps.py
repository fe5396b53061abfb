"""Capability sets of the calling process, by capability NUMBER (bit n of a mask is capability n).

Names and Docker's default set live in `stackd.spec.capabilities`; this module only moves bits.
Standard library only and cheap to import, like `stackd._sys.linux`.

Which sets a service gets (the choice behind `apply_capabilities(..., ambient=...)`):

- Docker (moby + runc) puts the service's capabilities in the bounding, permitted and effective
  sets, leaves the inheritable set empty (since 20.10.14, CVE-2022-24769) and never sets ambient
  capabilities (tried in 1.13 and reverted; moby#8460, moby#50083). A root service keeps them across
  exec; a service with a non-root `user` loses permitted and effective at its exec and can use the
  capabilities only through setuid or file-capability binaries, so `cap_add: [NET_BIND_SERVICE]` with
  `user: "1000"` does not let an ordinary binary bind port 80 under Docker.
- Podman (containers/podman#8217) also raises the capabilities in the ambient (and inheritable) sets
  when the user is not root, so they survive exec into an ordinary binary.

stackd follows Podman for non-root users: the launcher passes ``ambient=(uid != 0)``, which is what a
Compose user who writes `cap_add` next to `user` expects. (Podman grants a non-root user only the
capabilities it was explicitly given and keeps the rest in the bounding set; the `bounding` argument
allows that policy too.) With ``ambient=False`` the inheritable set stays empty as in Docker, so a
binary with inheritable file capabilities cannot pick up extra capabilities.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os

from stackd._sys import linux as _linux

TYPE_CHECKING = False
if TYPE_CHECKING:  # no `typing` / `collections.abc` at run time: they cost more than this module
    from collections.abc import Iterable

__all__ = [
    "LAST_CAP",
    "CapSets",
    "apply_capabilities",
    "capget",
    "caps_from_mask",
    "capset",
    "last_cap",
    "mask_of",
    "read_status_caps",
]

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_SETPCAP = 8
_STATUS_KEYS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

#: The highest capability number the running kernel knows (40 on Linux 5.9+). Read on first use from
#: /proc/sys/kernel/cap_last_cap (or probed with PR_CAPBSET_READ when /proc is not mounted) and
#: cached, so a launcher that touches it once before forking spares its children the read.
LAST_CAP: int  # bound lazily by __getattr__ below

_last_cap: int | None = None


def last_cap() -> int:
    """The highest capability number of the running kernel (see LAST_CAP)."""
    global _last_cap
    if _last_cap is None:
        try:
            fd = os.open("/proc/sys/kernel/cap_last_cap", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _last_cap = int(os.read(fd, 32))
            finally:
                os.close(fd)
        except (OSError, ValueError):
            _last_cap = _probe_last_cap()
    return _last_cap


def _probe_last_cap() -> int:
    """The first capability PR_CAPBSET_READ rejects with EINVAL, minus one."""
    cap = 0
    while cap < 64:
        try:
            _linux.prctl(_linux.PR_CAPBSET_READ, cap)
        except OSError as exc:
            if exc.errno == _errno.EINVAL:
                break
            raise
        cap += 1
    return cap - 1


if not TYPE_CHECKING:

    def __getattr__(name: str) -> int:
        if name == "LAST_CAP":
            return last_cap()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mask_of(caps: Iterable[int]) -> int:
    """The bit mask of capability numbers `caps`; ValueError for a number the kernel does not know."""
    top = last_cap()
    mask = 0
    for cap in caps:
        if not 0 <= cap <= top:
            raise ValueError(f"capability number {cap} is out of range (this kernel knows 0 to {top})")
        mask |= 1 << cap
    return mask


def caps_from_mask(mask: int) -> frozenset[int]:
    """The capability numbers whose bits are set in `mask`."""
    return frozenset(bit for bit in range(mask.bit_length()) if mask >> bit & 1)


def _bits(mask: int) -> str:
    return ", ".join(str(cap) for cap in sorted(caps_from_mask(mask)))


class CapSets:
    """The three sets capget(2) reports for a thread, as bit masks."""

    __slots__ = ("effective", "inheritable", "permitted")

    def __init__(self, effective: int, permitted: int, inheritable: int) -> None:
        self.effective = effective
        self.permitted = permitted
        self.inheritable = inheritable

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CapSets):
            return NotImplemented
        return (self.effective, self.permitted, self.inheritable) == (
            other.effective,
            other.permitted,
            other.inheritable,
        )

    def __hash__(self) -> int:
        return hash((self.effective, self.permitted, self.inheritable))

    def __repr__(self) -> str:
        return (
            f"CapSets(effective={self.effective:#x}, permitted={self.permitted:#x}, inheritable={self.inheritable:#x})"
        )


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_CapDataV3 = _CapData * 2  # version 3: two 32-bit words per set, low word first

_capget = _linux._libc.capget
_capget.restype = ctypes.c_int
_capset = _linux._libc.capset
_capset.restype = ctypes.c_int


def capget(pid: int = 0) -> CapSets:
    """capget(2) with _LINUX_CAPABILITY_VERSION_3: the sets of `pid` (0: the calling thread)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
    data = _CapDataV3()
    if _capget(ctypes.byref(header), ctypes.byref(data)) != 0:
        raise _linux._error(ctypes.get_errno(), hint=f"capget of pid {pid}")
    low, high = data[0], data[1]
    return CapSets(
        effective=low.effective | high.effective << 32,
        permitted=low.permitted | high.permitted << 32,
        inheritable=low.inheritable | high.inheritable << 32,
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) with _LINUX_CAPABILITY_VERSION_3 on the calling thread.

    The kernel's rules: permitted may only shrink, effective must be a subset of permitted, and
    inheritable may only gain capabilities that are in the bounding set (and, without CAP_SETPCAP
    in effective, in the permitted set)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataV3()
    for word in (0, 1):
        shift = 32 * word
        data[word].effective = effective >> shift & 0xFFFFFFFF
        data[word].permitted = permitted >> shift & 0xFFFFFFFF
        data[word].inheritable = inheritable >> shift & 0xFFFFFFFF
    if _capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        raise _linux._error(
            ctypes.get_errno(),
            hint=(f"capset effective={effective:#x} permitted={permitted:#x} inheritable={inheritable:#x}"),
        )


def apply_capabilities(keep: Iterable[int], *, ambient: bool, bounding: Iterable[int] | None = None) -> None:
    """Leave the calling thread with exactly the capabilities `keep` (numbers), ready for exec.

    In this order:

    1. effective := permitted, so that CAP_SETPCAP (needed for step 2) is usable again after a
       setresuid that cleared the effective set;
    2. drop from the bounding set every capability not in `bounding` (default: `keep`) with
       PR_CAPBSET_DROP; this is what stops a later exec of a setuid-root or file-capability binary
       from regaining a dropped capability;
    3. clear the ambient set, then set permitted = effective = `keep`, and inheritable = `keep` when
       `ambient` else empty (Docker's choice since CVE-2022-24769);
    4. with `ambient`, raise every capability of `keep` in the ambient set (PR_CAP_AMBIENT_RAISE), so
       a non-root user keeps them in permitted and effective across execve of a binary without file
       capabilities (see the module docstring for why stackd does this and Docker does not);
    5. clear PR_SET_KEEPCAPS (execve would reset it anyway).

    What the caller must do, in this order (runc and crun do the same):

    - while still uid 0 with full capabilities: mounts, pivot_root, hostname, sysctls, rlimits;
    - ``linux.set_keepcaps(True)``, then ``os.setgroups(gids)``, ``os.setresgid(g, g, g)``,
      ``os.setresuid(u, u, u)`` (groups before uids: setgroups and setresgid need CAP_SETGID and the
      uid switch would clear the effective set). Without keepcaps, a switch of all uids away from 0
      empties the permitted set and this function fails with EPERM;
    - ``apply_capabilities(keep, ambient=(u != 0))``;
    - ``linux.set_no_new_privs()``, ``linux.load_seccomp_bpf(...)`` last, then exec (a filter loaded
      without no_new_privs needs CAP_SYS_ADMIN, so then load it before the user switch instead).

    `keep` must be a subset of `bounding` and of the current permitted set (ValueError / EPERM).
    Raises OSError(errno, "... (what failed)") with the capability number in the message.
    """
    keep_mask = mask_of(keep)
    bound_mask = keep_mask if bounding is None else mask_of(bounding)
    if keep_mask & ~bound_mask:
        raise ValueError(
            f"capabilities to keep must also be in the bounding set; not in it: {_bits(keep_mask & ~bound_mask)}"
        )
    current = capget()
    missing = keep_mask & ~current.permitted
    if missing:
        raise _linux._error(
            _errno.EPERM,
            hint=(
                f"capabilities {_bits(missing)} are not in the permitted set; after a uid switch they"
                " survive only if PR_SET_KEEPCAPS was set before setresuid"
            ),
        )

    # 1. Make the permitted capabilities effective again (CAP_SETPCAP for the bounding set).
    if current.effective != current.permitted:
        capset(current.permitted, current.permitted, current.inheritable)

    # 2. Bounding set.
    prctl = _linux.prctl
    for cap in range(last_cap() + 1):
        if bound_mask >> cap & 1 or prctl(_linux.PR_CAPBSET_READ, cap) != 1:
            continue
        try:
            prctl(_linux.PR_CAPBSET_DROP, cap)
        except OSError as exc:
            raise _linux._error(
                exc.errno or _errno.EPERM,
                hint=f"dropping capability {cap} from the bounding set (needs CAP_SETPCAP, number {_CAP_SETPCAP})",
            ) from None

    # 3. Ambient cleared, then permitted / effective / inheritable.
    try:
        prctl(_linux.PR_CAP_AMBIENT, _linux.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        raise _linux._error(exc.errno or _errno.EINVAL, hint="clearing the ambient capability set") from None
    capset(keep_mask, keep_mask, keep_mask if ambient else 0)

    # 4. Ambient set.
    if ambient:
        for cap in sorted(caps_from_mask(keep_mask)):
            try:
                prctl(_linux.PR_CAP_AMBIENT, _linux.PR_CAP_AMBIENT_RAISE, cap)
            except OSError as exc:
                raise _linux._error(
                    exc.errno or _errno.EPERM,
                    hint=f"raising capability {cap} in the ambient set (is SECBIT_NO_CAP_AMBIENT_RAISE set?)",
                ) from None

    # 5. Keepcaps has done its job.
    prctl(_linux.PR_SET_KEEPCAPS, 0)


def read_status_caps(pid: int | str = "self") -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd and CapAmb of /proc/<pid>/status, as integer bit masks."""
    path = f"/proc/{pid}/status"
    with open(path, encoding="ascii", errors="replace") as status:
        text = status.read()
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_KEYS:
            found[key] = int(value.strip(), 16)
    missing = [key for key in _STATUS_KEYS if key not in found]
    if missing:
        raise _linux._error(_errno.EINVAL, path, hint=f"no {', '.join(missing)} line")
    return found
