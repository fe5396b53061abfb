"""What both cgroup drivers share: limits, stats, file I/O with precise errors, and `ServiceCgroup`.

A service's cgroup is one directory per hierarchy, always at `<hierarchy root>/stackd/<project>/<service>`:
on a pure cgroup v2 host that is one directory; on a v1 (legacy or hybrid) host it is one directory per
mounted v1 hierarchy, plus one in the cgroup2 ("unified") hierarchy when that is mounted, which gives
`cgroup.kill` and `cgroup.events` even though no controller is enabled there.

`ServiceCgroup` works the same way for both layouts: it knows which directory is the unified one and
which directory holds each v1 controller, and picks the right file for each operation.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import math
import os
import re
import select
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stackd.errors import CgroupError

__all__ = [
    "CPU_PERIOD_US",
    "DEFAULT_DEVICE_RULES",
    "PARENT",
    "CgroupDriver",
    "CgroupFileError",
    "CgroupFs",
    "CgroupLimits",
    "CgroupStats",
    "ServiceCgroup",
    "remove_cgroup_paths",
]

#: The directory under every hierarchy root that holds all of stackd's cgroups.
PARENT = "stackd"
#: The CFS period stackd uses for a `cpus` limit (the kernel's and Docker's default), in microseconds.
CPU_PERIOD_US = 100_000
#: The smallest CFS quota the kernel accepts, in microseconds.
MIN_CPU_QUOTA_US = 1_000

#: The v1 device-cgroup rules written after `devices.deny a`: runc's (and so Docker's) default allowlist.
#: mknod of any node is allowed (Docker keeps CAP_MKNOD), but only these devices may be opened.
DEFAULT_DEVICE_RULES: tuple[str, ...] = (
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",  # /dev/null
    "c 1:5 rwm",  # /dev/zero
    "c 1:7 rwm",  # /dev/full
    "c 1:8 rwm",  # /dev/random
    "c 1:9 rwm",  # /dev/urandom
    "c 5:0 rwm",  # /dev/tty
    "c 5:2 rwm",  # /dev/ptmx
    "c 136:* rwm",  # /dev/pts/*
)

#: v1 memory.limit_in_bytes reads back as PAGE_COUNTER_MAX * PAGE_SIZE when unlimited; anything this big
#: means "no limit".
_V1_UNLIMITED_THRESHOLD = 1 << 62

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

#: Controllers a v1 hierarchy can carry, by the prefix of their interface files.
V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)


# ---------------------------------------------------------------------------------------------------------
# Errors and file I/O


def _errno_text(err: int) -> str:
    return f"{errno_module.errorcode.get(err, str(err))} ({os.strerror(err)})"


class CgroupFileError(CgroupError):
    """A cgroup file or directory operation failed: which operation, on which path, which value, which errno.

    The message reads e.g.
    ``cgroup: write "50000 100000" to /sys/fs/cgroup/stackd/p/web/cpu.max: EINVAL (Invalid argument)``.
    """

    def __init__(self, op: str, path: Path, err: int, *, value: str | None = None, hint: str | None = None) -> None:
        self.op = op
        self.path = path
        self.errno = err
        self.value = value
        self.hint = hint
        target = f'"{value}" to {path}' if value is not None else str(path)
        message = f"cgroup: {op} {target}: {_errno_text(err)}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


def _oserror_errno(exc: OSError) -> int:
    return exc.errno if exc.errno is not None else errno_module.EIO


def write_file(path: Path, value: str, *, hint: str | None = None) -> None:
    """Write `value` to an existing cgroup interface file, in one write(2), never creating the file.

    O_TRUNC is what a shell's ``echo v > file`` does; cgroupfs ignores it, and it keeps a fake tree (plain
    files) faithful.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupFileError("write", path, _oserror_errno(exc), value=value, hint=hint) from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupFileError("write", path, _oserror_errno(exc), value=value, hint=hint) from exc
    finally:
        os.close(fd)


def read_file(path: Path) -> str:
    """Read a whole cgroup interface file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupFileError("read", path, _oserror_errno(exc)) from exc
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        raise CgroupFileError("read", path, _oserror_errno(exc)) from exc
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def read_int(path: Path) -> int:
    text = read_file(path).strip()
    try:
        return int(text)
    except ValueError:
        raise CgroupError(f"cgroup: read {path}: {text!r} is not an integer") from None


def read_keyed(path: Path) -> dict[str, int]:
    """Parse a flat-keyed file (``key value`` per line) such as memory.events, cpu.stat, cgroup.events."""
    values: dict[str, int] = {}
    for line in read_file(path).splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def read_pids(procs: Path) -> list[int]:
    """The pids listed in a cgroup.procs file; a cgroup that is gone has none."""
    try:
        text = read_file(procs)
    except CgroupFileError as exc:
        if exc.errno in (errno_module.ENOENT, errno_module.ENODEV):
            return []
        raise
    return [int(word) for word in text.split()]


def check_name(kind: str, name: str) -> None:
    """Project and service names become directory names: one safe path component each."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CgroupError(
            f"cgroup: {kind} name {name!r} cannot be a cgroup directory name "
            "(use letters, digits, '_', '.', '-', starting with a letter or digit, at most 128 characters)"
        )


class CgroupFs:
    """How the drivers make and remove cgroup directories.

    On the real kernel mkdir(2) also creates the interface files and rmdir(2) removes a cgroup that still
    holds them. A fake tree for unit tests substitutes its own `mkdir`/`rmdir` that do the same to plain
    files; nothing else in the drivers differs between the two.
    """

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)


REAL_FS = CgroupFs()


# ---------------------------------------------------------------------------------------------------------
# Limits and stats


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    """The resource limits of one service, in the units the stack file resolves to.

    - `cpus`: CPUs' worth of time per period (0.25 = a quarter of one CPU); None = no limit.
    - `memory`: bytes; None = no limit.
    - `memory_swap`: Docker's ``--memory-swap``: the total of memory and swap, in bytes; -1 = unlimited swap;
      None = leave the kernel's default (unlimited). Needs `memory`, and must be >= it.
    - `pids`: maximum number of tasks; -1 = unlimited; None = leave the default (unlimited).
    - `devices_allowlist`: deny every device but `DEFAULT_DEVICE_RULES` (v1 device cgroup; see
      `ServiceCgroup.devices_enforced` for hosts where the cgroup cannot do it).
    """

    cpus: float | None = None
    memory: int | None = None
    memory_swap: int | None = None
    pids: int | None = None
    devices_allowlist: bool = False

    def __post_init__(self) -> None:
        if self.cpus is not None:
            if isinstance(self.cpus, bool) or not isinstance(self.cpus, int | float):
                raise CgroupError(f"cgroup: cpus {self.cpus!r} is not a number")
            if not math.isfinite(self.cpus) or self.cpus <= 0:
                raise CgroupError(f"cgroup: cpus {self.cpus!r} must be a positive number, e.g. 0.5")
            if round(self.cpus * CPU_PERIOD_US) < MIN_CPU_QUOTA_US:
                raise CgroupError(
                    f"cgroup: cpus {self.cpus!r} is below the kernel's minimum of "
                    f"{MIN_CPU_QUOTA_US / CPU_PERIOD_US} (a 1 ms quota per 100 ms period)"
                )
        for key, value in (("memory", self.memory), ("memory_swap", self.memory_swap), ("pids", self.pids)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise CgroupError(f"cgroup: {key} {value!r} is not an integer")
        if self.memory is not None and self.memory <= 0:
            raise CgroupError(f"cgroup: memory {self.memory} must be a positive number of bytes")
        if self.memory_swap is not None:
            if self.memory is None:
                raise CgroupError("cgroup: memory_swap needs memory (it is the total of memory and swap)")
            if self.memory_swap != -1 and self.memory_swap < self.memory:
                raise CgroupError(
                    f"cgroup: memory_swap {self.memory_swap} is smaller than memory {self.memory} "
                    "(memory_swap is the total of memory and swap; use -1 for unlimited swap)"
                )
        if self.pids is not None and self.pids != -1 and self.pids <= 0:
            raise CgroupError(f"cgroup: pids {self.pids} must be a positive number, or -1 for unlimited")

    @property
    def cpu_quota_us(self) -> int | None:
        """The CFS quota for `cpus` per `CPU_PERIOD_US`, in microseconds."""
        return None if self.cpus is None else round(self.cpus * CPU_PERIOD_US)

    @property
    def swap_only(self) -> int | None:
        """Swap alone (cgroup v2 `memory.swap.max`): memory_swap - memory; -1 = unlimited."""
        if self.memory_swap is None or self.memory is None:
            return None
        if self.memory_swap == -1:
            return -1
        return self.memory_swap - self.memory


@dataclass(frozen=True, slots=True)
class CgroupStats:
    """A snapshot of a service's resource use."""

    #: CPU time used by every task that ever ran in the cgroup, in microseconds.
    cpu_usage_usec: int
    #: Memory charged to the cgroup now, in bytes.
    memory_current: int
    #: The memory limit in bytes; None when there is none.
    memory_limit: int | None
    #: Tasks (threads) in the cgroup now.
    pids_current: int


# ---------------------------------------------------------------------------------------------------------
# One service's cgroup


def _service_of(path: Path) -> tuple[str, str]:
    """(project, service) of `<root>/stackd/<project>/<service>`; refuses any other shape."""
    if path.parent.parent.name != PARENT:
        raise CgroupError(f"cgroup: {path} is not a stackd service cgroup (<root>/{PARENT}/<project>/<service>)")
    project, service = path.parent.name, path.name
    check_name("project", project)
    check_name("service", service)
    return project, service


def _classify(path: Path) -> tuple[bool, set[str]]:
    """(is_unified, v1 controllers) of an existing cgroup directory, from the interface files it has."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return False, set()
    except OSError as exc:
        raise CgroupFileError("list", path, _oserror_errno(exc)) from exc
    if "cgroup.type" in names:  # every non-root cgroup2 directory has it; v1 has no such file
        return True, set()
    return False, {name.split(".", 1)[0] for name in names} & V1_CONTROLLERS


def _events_wait(events: Path, key: str, want: int, deadline: float) -> bool:
    """Wait until `key` in a cgroup.events file reads `want`, or `deadline` (time.monotonic) passes.

    cgroupfs signals a change of cgroup.events with POLLPRI on an open descriptor, so this sleeps in
    poll(2) rather than polling the file. (The poll timeout is capped so a fake tree of plain files, which
    never signals, still ends.)
    """
    try:
        fd = os.open(events, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return want == 0 and key == "populated"
    except OSError as exc:
        raise CgroupFileError("read", events, _oserror_errno(exc)) from exc
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 4096).decode()
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == key and parts[1] == str(want):
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(min(remaining, 0.25) * 1000)
    except OSError as exc:
        raise CgroupFileError("read", events, _oserror_errno(exc)) from exc
    finally:
        os.close(fd)


class ServiceCgroup:
    """The cgroup(s) of one service, in every hierarchy it lives in.

    Made by `CgroupDriver.create` (or `.attach`, or `from_paths` for recorded paths). Every method reads or
    writes the kernel directly: there is no cached state but the paths.
    """

    def __init__(
        self,
        project: str,
        service: str,
        *,
        unified: Path | None,
        v1: Mapping[str, Path],
        extra: Iterable[Path] = (),
        devices_enforced: bool = False,
        fs: CgroupFs = REAL_FS,
    ) -> None:
        self.project = project
        self.service = service
        #: The cgroup2 directory (pure v2 host, or the unified hierarchy of a hybrid host), if any.
        self.unified = unified
        #: v1 controller -> the directory of this service in that controller's hierarchy.
        self.v1: dict[str, Path] = dict(v1)
        #: True when the device allowlist is enforced by this cgroup (v1 devices controller). When False
        #: (cgroup v2, where it would take an eBPF program), the launcher must mount everything but the
        #: bound device nodes `nodev`.
        self.devices_enforced = devices_enforced
        self._fs = fs
        seen: list[Path] = []
        for path in [*self.v1.values(), *extra, *([unified] if unified else [])]:
            if path not in seen:
                seen.append(path)
        self._paths = tuple(seen)

    def __repr__(self) -> str:
        return f"ServiceCgroup({self.project!r}, {self.service!r}, paths={[str(p) for p in self._paths]})"

    # -- what to record and what the launcher needs

    @property
    def version(self) -> int:
        """2 on a pure cgroup v2 host, 1 on a legacy or hybrid host."""
        return 1 if self.v1 else 2

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every directory of this service's cgroup, one per hierarchy, for the stack's state record."""
        return self._paths

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """The cgroup.procs files a new process must be written into before it execs.

        From inside the child, write "0" (meaning "the writing process", whatever its pid namespace) to each;
        `join()` does exactly that.
        """
        return tuple(path / "cgroup.procs" for path in self._paths)

    @classmethod
    def from_paths(cls, paths: Iterable[Path | str], *, fs: CgroupFs = REAL_FS) -> ServiceCgroup:
        """Rebuild a service's cgroup from recorded paths (e.g. after the supervisor died by SIGKILL).

        Every path must be `<root>/stackd/<project>/<service>` for one project and service. Which is the
        unified one and which v1 controllers each holds is read from the interface files; paths that no
        longer exist are kept (removing them is then a no-op).
        """
        dirs = [Path(p) for p in paths]
        if not dirs:
            raise CgroupError("cgroup: no paths given")
        owners = {_service_of(path) for path in dirs}
        if len(owners) != 1:
            raise CgroupError(f"cgroup: paths belong to several services: {sorted(owners)}")
        ((project, service),) = owners
        unified: Path | None = None
        v1: dict[str, Path] = {}
        extra: list[Path] = []
        for path in dirs:
            is_unified, controllers = _classify(path)
            if is_unified and unified is None:
                unified = path
            elif controllers:
                for controller in controllers:
                    v1.setdefault(controller, path)
            else:
                extra.append(path)
        return cls(project, service, unified=unified, v1=v1, extra=extra, fs=fs)

    # -- processes

    def add_pid(self, pid: int) -> None:
        """Move a process (all its threads) into this service's cgroup in every hierarchy."""
        for procs in self.procs_files:
            write_file(procs, str(pid))

    def join(self) -> None:
        """Move the calling process into this cgroup (for the launcher's child, before exec)."""
        self.add_pid(0)

    def pids(self) -> list[int]:
        """Every process in the cgroup, in any of its hierarchies, nested cgroups included, sorted."""
        found: set[int] = set()
        for path in self._paths:
            for directory in _tree(path):
                found.update(read_pids(directory / "cgroup.procs"))
        return sorted(found)

    def populated(self) -> bool:
        """Whether any live process is in the cgroup (zombies do not count)."""
        if self.unified is not None and (self.unified / "cgroup.events").exists():
            if read_keyed(self.unified / "cgroup.events").get("populated", 0):
                return True
            if not self.v1:
                return False
        return any(read_pids(d / "cgroup.procs") for path in self.v1.values() for d in _tree(path))

    def events_path(self) -> Path | None:
        """cgroup.events (``populated 0|1``, ``frozen 0|1``) to watch with inotify or poll(POLLPRI).

        None when the host has no cgroup2 hierarchy (pure v1): then only `pids()` tells.
        """
        if self.unified is None:
            return None
        return self.unified / "cgroup.events"

    def wait_empty(self, timeout: float) -> bool:
        """Wait until no process is left, up to `timeout` seconds; True if it became empty."""
        deadline = time.monotonic() + timeout
        events = self.events_path()
        if events is not None and events.exists():
            if not _events_wait(events, "populated", 0, deadline):
                return False
            if not self.v1:
                return True
        delay = 0.001
        while self.pids():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        return True

    def kill(self, sig: int = signal.SIGKILL, *, timeout: float = 5.0) -> None:
        """Signal every process of the service, daemonised grandchildren included.

        SIGKILL uses cgroup.kill when the kernel has it (v2, or the unified hierarchy of a hybrid host) and
        waits until the cgroup is empty; otherwise (and for any other signal) the cgroup is frozen, every pid
        in it signalled, then thawed, so nothing can fork away in between. For SIGKILL that repeats until
        the cgroup is empty; CgroupError if it is not within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        kill_file = self.unified / "cgroup.kill" if self.unified is not None else None
        if sig == signal.SIGKILL and kill_file is not None and kill_file.exists():
            write_file(kill_file, "1")
            # A task frozen by the v1 freezer cannot die until thawed.
            if "freezer" in self.v1:
                self._thaw_v1()
            _events_wait(kill_file.parent / "cgroup.events", "populated", 0, deadline)
            if not self.pids():
                return
            # Something is left that cgroup.kill did not reach (a pid written only to a v1 hierarchy): go on
            # the slow way.
        delay = 0.001
        while True:
            if not self.pids():
                return
            self._signal_all(sig, deadline)
            if sig != signal.SIGKILL:
                return
            if self.wait_empty(min(delay, max(0.0, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                left = self.pids()
                raise CgroupError(
                    f"cgroup: {len(left)} process(es) {left[:10]} still in {self._paths[0]} {timeout:g}s after SIGKILL"
                )
            delay = min(delay * 2, 0.05)

    def _signal_all(self, sig: int, deadline: float) -> None:
        # Freeze so nothing forks away between reading the pids and signalling them; a paused service stays
        # paused (unless it is being SIGKILLed: a task frozen by the v1 freezer cannot die until thawed).
        was_frozen = self.frozen()
        froze = False
        if not was_frozen:
            try:
                self.freeze(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
                froze = True
            except CgroupError:
                pass  # best effort, as runc: signal anyway
        try:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        finally:
            if froze or (was_frozen and sig == signal.SIGKILL):
                self.thaw()

    # -- pause / unpause

    def freeze(self, *, timeout: float = 5.0) -> None:
        """Freeze every process (``stackd pause``): the v1 freezer, or cgroup.freeze on cgroup2."""
        deadline = time.monotonic() + timeout
        if "freezer" in self.v1:
            self._freeze_v1(self.v1["freezer"], deadline, timeout)
            return
        if self.unified is not None and (self.unified / "cgroup.freeze").exists():
            write_file(self.unified / "cgroup.freeze", "1")
            if not _events_wait(self.unified / "cgroup.events", "frozen", 1, deadline):
                write_file(self.unified / "cgroup.freeze", "0")
                raise CgroupError(f"cgroup: {self.unified} did not freeze within {timeout:g}s")
            return
        raise CgroupError(f"cgroup: no freezer for service {self.service} (neither a v1 freezer nor cgroup.freeze)")

    def frozen(self) -> bool:
        """Whether the service is frozen (paused)."""
        if "freezer" in self.v1:
            state = self.v1["freezer"] / "freezer.state"
            return state.exists() and read_file(state).strip() != "THAWED"
        if self.unified is not None and (self.unified / "cgroup.freeze").exists():
            return read_file(self.unified / "cgroup.freeze").strip() == "1"
        return False

    def thaw(self) -> None:
        """Undo `freeze` (``stackd unpause``)."""
        if "freezer" in self.v1:
            self._thaw_v1()
        elif self.unified is not None and (self.unified / "cgroup.freeze").exists():
            write_file(self.unified / "cgroup.freeze", "0")

    def _thaw_v1(self) -> None:
        try:
            write_file(self.v1["freezer"] / "freezer.state", "THAWED")
        except CgroupFileError as exc:
            if exc.errno != errno_module.ENOENT:
                raise

    def _freeze_v1(self, path: Path, deadline: float, timeout: float) -> None:
        # The v1 freezer can sit in FREEZING while tasks fork; like runc, rewrite FROZEN and now and then
        # thaw briefly to let it settle.
        state_file = path / "freezer.state"
        attempt = 0
        while True:
            if attempt % 50 == 49:
                write_file(state_file, "THAWED")
                time.sleep(0.005)
            write_file(state_file, "FROZEN")
            state = read_file(state_file).strip()
            if state == "FROZEN":
                return
            if state != "FREEZING":
                write_file(state_file, "THAWED")
                raise CgroupError(f"cgroup: {state_file}: unexpected state {state!r} while freezing")
            if time.monotonic() >= deadline:
                write_file(state_file, "THAWED")
                raise CgroupError(f"cgroup: {state_file}: still FREEZING after {timeout:g}s; thawed it again")
            attempt += 1
            time.sleep(0.0005 if attempt < 20 else 0.002)

    # -- accounting

    def oom_kill_count(self) -> int:
        """How many processes of the service the OOM killer has killed (0 without a memory controller)."""
        if "memory" in self.v1:
            return read_keyed(self.v1["memory"] / "memory.oom_control").get("oom_kill", 0)
        if self.unified is not None and (self.unified / "memory.events").exists():
            return read_keyed(self.unified / "memory.events").get("oom_kill", 0)
        return 0

    def stats(self) -> CgroupStats:
        """CPU time, memory use and limit, and task count, read from whichever hierarchy has them."""
        cpu_usec = 0
        if "cpuacct" in self.v1:
            cpu_usec = read_int(self.v1["cpuacct"] / "cpuacct.usage") // 1000
        elif self.unified is not None and (self.unified / "cpu.stat").exists():
            cpu_usec = read_keyed(self.unified / "cpu.stat").get("usage_usec", 0)

        memory_current = 0
        memory_limit: int | None = None
        if "memory" in self.v1:
            memory_current = read_int(self.v1["memory"] / "memory.usage_in_bytes")
            limit = read_int(self.v1["memory"] / "memory.limit_in_bytes")
            memory_limit = None if limit >= _V1_UNLIMITED_THRESHOLD else limit
        elif self.unified is not None and (self.unified / "memory.current").exists():
            memory_current = read_int(self.unified / "memory.current")
            text = read_file(self.unified / "memory.max").strip()
            memory_limit = None if text == "max" else int(text)

        pids_current = 0
        if "pids" in self.v1:
            pids_current = read_int(self.v1["pids"] / "pids.current")
        elif self.unified is not None and (self.unified / "pids.current").exists():
            pids_current = read_int(self.unified / "pids.current")
        return CgroupStats(cpu_usec, memory_current, memory_limit, pids_current)

    # -- teardown

    def remove(self, *, timeout: float = 5.0) -> None:
        """Kill what is left, remove this service's directories, then its project's if now empty.

        Tolerates directories already gone; retries EBUSY (a cgroup whose last task is still exiting)
        until `timeout`. Never removes the `stackd` directory itself.
        """
        deadline = time.monotonic() + timeout
        if any(path.exists() for path in self._paths) and self.pids():
            self.kill(signal.SIGKILL, timeout=timeout)
        for path in self._paths:
            for directory in reversed(_tree(path)):  # nested cgroups the service made, leaf-first
                _rmdir_leaf(self._fs, directory, deadline)
        for project_dir in dict.fromkeys(path.parent for path in self._paths):
            _rmdir_project(self._fs, project_dir, deadline)


def _tree(path: Path) -> list[Path]:
    """`path` and every cgroup directory below it, parents before children; [] if it is gone."""
    if not path.is_dir():
        return []
    found = [path]
    for top, dirs, _ in os.walk(path):
        found.extend(Path(top) / name for name in sorted(dirs))
    return found


def _rmdir_leaf(fs: CgroupFs, path: Path, deadline: float) -> None:
    delay = 0.001
    while True:
        try:
            fs.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            err = _oserror_errno(exc)
            if err != errno_module.EBUSY or time.monotonic() >= deadline:
                hint = "it still has processes or child cgroups" if err == errno_module.EBUSY else None
                raise CgroupFileError("rmdir", path, err, hint=hint) from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _has_subdirs(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return any(entry.is_dir(follow_symlinks=False) for entry in entries)
    except FileNotFoundError:
        return False


def _rmdir_project(fs: CgroupFs, path: Path, deadline: float) -> None:
    """Remove `<root>/stackd/<project>` unless other services still have cgroups in it."""
    if path.parent.name != PARENT or path.name == PARENT:
        raise CgroupError(f"cgroup: refusing to remove {path}: not a <root>/{PARENT}/<project> directory")
    delay = 0.001
    while True:
        if _has_subdirs(path):
            return  # other services of the project still live here
        try:
            fs.rmdir(path)
            _rmdir_parent_if_unused(fs, path.parent)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            err = _oserror_errno(exc)
            if err not in (errno_module.EBUSY, errno_module.ENOTEMPTY) or time.monotonic() >= deadline:
                raise CgroupFileError("rmdir", path, err) from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _rmdir_parent_if_unused(fs: CgroupFs, parent: Path) -> None:
    """Remove `<root>/stackd` once no project is left in it, so a host without stacks shows no trace.

    Best effort: another project's cgroup (or one being created) keeps it, and the kernel refuses."""
    if parent.name != PARENT or _has_subdirs(parent):
        return
    try:
        fs.rmdir(parent)
    except OSError:
        pass  # in use again, or already gone


def remove_cgroup_paths(paths: Iterable[Path | str], *, timeout: float = 5.0, fs: CgroupFs = REAL_FS) -> None:
    """Tear down recorded cgroups: for `stackd down` after the supervisor died by SIGKILL.

    `paths` may mix service directories (`<root>/stackd/<project>/<service>`, any hierarchy, any services)
    and project directories (`<root>/stackd/<project>`). Every service's processes are killed, its
    directories removed, then each project directory once empty. Anything of another shape is refused
    before anything is touched; paths already gone are fine.
    """
    deadline = time.monotonic() + timeout
    by_service: dict[tuple[str, str], list[Path]] = {}
    project_dirs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.parent.name == PARENT and path.name != PARENT:
            check_name("project", path.name)
            project_dirs.append(path)
        else:
            by_service.setdefault(_service_of(path), []).append(path)
    errors: list[str] = []
    for service_paths in by_service.values():
        try:
            group = ServiceCgroup.from_paths(service_paths, fs=fs)
            group.remove(timeout=max(0.0, deadline - time.monotonic()))
        except CgroupError as exc:
            errors.append(str(exc))
    for path in dict.fromkeys(project_dirs):
        try:
            _rmdir_project(fs, path, deadline)
        except CgroupError as exc:
            errors.append(str(exc))
    if errors:
        raise CgroupError("\n".join(errors))


# ---------------------------------------------------------------------------------------------------------
# The driver interface


class CgroupDriver(ABC):
    """Creates services' cgroups on one host layout. Get one from `detect_driver()`."""

    version: ClassVar[int]

    def __init__(self, *, fs: CgroupFs = REAL_FS) -> None:
        self._fs = fs

    @abstractmethod
    def hierarchy_roots(self) -> tuple[Path, ...]:
        """The root of every hierarchy this driver makes cgroups in."""

    def service_paths(self, project: str, service: str) -> tuple[Path, ...]:
        """Where `create` will make the service's directories: record these before calling it."""
        check_name("project", project)
        check_name("service", service)
        return tuple(root / PARENT / project / service for root in self.hierarchy_roots())

    @abstractmethod
    def create(self, project: str, service: str, limits: CgroupLimits) -> ServiceCgroup:
        """Make the service's cgroup with `limits` written, before any process is in it."""

    @abstractmethod
    def attach(self, project: str, service: str) -> ServiceCgroup:
        """The existing cgroup of a service (e.g. for `stackd stats` from another process)."""

    def project_paths(self, project: str) -> tuple[Path, ...]:
        """Every existing `<root>/stackd/<project>` directory."""
        check_name("project", project)
        return tuple(root / PARENT / project for root in self.hierarchy_roots() if (root / PARENT / project).is_dir())

    def remove_project(self, project: str, *, timeout: float = 5.0) -> None:
        """Kill and remove every service cgroup of `project` found on the host, then the project dirs."""
        found: list[Path] = []
        for project_dir in self.project_paths(project):
            with os.scandir(project_dir) as entries:
                found.extend(Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False))
            found.append(project_dir)
        remove_cgroup_paths(found, timeout=timeout, fs=self._fs)

    # -- helpers for the drivers

    def _ensure_dir(self, path: Path, made: list[Path]) -> None:
        """mkdir if missing; appends what it made to `made` for rollback."""
        try:
            self._fs.mkdir(path)
        except FileExistsError:
            return
        except OSError as exc:
            raise CgroupFileError("mkdir", path, _oserror_errno(exc)) from exc
        made.append(path)

    def _fresh_leaf(self, path: Path, made: list[Path]) -> None:
        """mkdir the service's directory; an empty leftover from an earlier run is replaced."""
        try:
            self._fs.mkdir(path)
        except FileExistsError:
            left = read_pids(path / "cgroup.procs")
            if left:
                project, service = path.parent.name, path.name
                raise CgroupError(
                    f"cgroup: {path} already exists with processes {left[:10]}: service {service} of "
                    f"project {project} is still running (stop it, or run `stackd down -p {project}`)"
                ) from None
            try:
                self._fs.rmdir(path)
                self._fs.mkdir(path)
            except OSError as exc:
                raise CgroupFileError(
                    "recreate", path, _oserror_errno(exc), hint="a leftover cgroup from an earlier run"
                ) from exc
        except OSError as exc:
            raise CgroupFileError("mkdir", path, _oserror_errno(exc)) from exc
        made.append(path)

    def _rollback(self, made: list[Path]) -> None:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                self._fs.rmdir(path)
