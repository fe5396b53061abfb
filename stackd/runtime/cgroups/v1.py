"""The cgroup v1 driver, for legacy and hybrid hosts.

Each mounted v1 hierarchy (one controller each, or several co-mounted such as `cpu,cpuacct`) gets
`<mount>/stackd/<project>/<service>`; named hierarchies (`name=systemd`) are left alone. When a cgroup2
hierarchy is mounted too (hybrid mode, usually at /sys/fs/cgroup/unified, with no controllers), the
service also gets a directory there: no limits, but `cgroup.kill` and an inotify-able `cgroup.events`.

Limits, written before any process enters:

- cpus        -> cpu.cfs_period_us 100000, cpu.cfs_quota_us <quota>
- memory      -> memory.limit_in_bytes
- memory_swap -> memory.memsw.limit_in_bytes (the total, as Docker; -1 unlimited), only when swap
                 accounting is on (the file exists); asking for a finite one without it is an error
- pids        -> pids.max ("max" for -1)
- devices     -> devices.deny "a", then devices.allow each of DEFAULT_DEVICE_RULES

A new cpuset cgroup starts with empty cpuset.cpus/mems (no task may join it), so those are copied from
the parent as each directory is made.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path

from stackd.errors import CgroupError

from .base import (
    CPU_PERIOD_US,
    DEFAULT_DEVICE_RULES,
    PARENT,
    REAL_FS,
    CgroupDriver,
    CgroupFileError,
    CgroupFs,
    CgroupLimits,
    ServiceCgroup,
    check_name,
    read_file,
    write_file,
)

__all__ = ["CgroupV1Driver"]


class CgroupV1Driver(CgroupDriver):
    """Services' cgroups in every mounted v1 hierarchy, plus the unified one when present.

    `hierarchies` maps each v1 controller to the mount point of its hierarchy (co-mounted controllers
    share one); `unified` is the cgroup2 mount point, or None on a legacy host.
    """

    version = 1

    def __init__(
        self,
        hierarchies: Mapping[str, Path | str],
        unified: Path | str | None = None,
        *,
        fs: CgroupFs = REAL_FS,
    ) -> None:
        super().__init__(fs=fs)
        self.hierarchies: dict[str, Path] = {name: Path(path) for name, path in hierarchies.items()}
        self.unified = Path(unified) if unified is not None else None
        # mount point -> its controllers, in a stable order
        self._mounts: dict[Path, tuple[str, ...]] = {}
        for name, path in sorted(self.hierarchies.items()):
            self._mounts[path] = (*self._mounts.get(path, ()), name)

    def __repr__(self) -> str:
        return f"CgroupV1Driver({ {k: str(v) for k, v in self.hierarchies.items()} }, unified={self.unified})"

    def hierarchy_roots(self) -> tuple[Path, ...]:
        return (*self._mounts, *([self.unified] if self.unified is not None else []))

    def create(self, project: str, service: str, limits: CgroupLimits) -> ServiceCgroup:
        check_name("project", project)
        check_name("service", service)
        self._preflight(limits)
        made: list[Path] = []
        leaves: dict[str, Path] = {}
        unified_leaf: Path | None = None
        try:
            for mount, controllers in self._mounts.items():
                cpuset = "cpuset" in controllers
                for path in (mount / PARENT, mount / PARENT / project):
                    self._ensure_dir(path, made)
                    if cpuset:
                        self._init_cpuset(path)
                leaf = mount / PARENT / project / service
                self._fresh_leaf(leaf, made)
                if cpuset:
                    self._init_cpuset(leaf)
                for name in controllers:
                    leaves[name] = leaf
            if self.unified is not None:
                try:
                    self._ensure_dir(self.unified / PARENT, made)
                    self._ensure_dir(self.unified / PARENT / project, made)
                    unified_leaf = self.unified / PARENT / project / service
                    self._fresh_leaf(unified_leaf, made)
                except CgroupFileError as exc:
                    # Only a convenience here (cgroup.kill, cgroup.events): a read-only or foreign-owned
                    # unified mount (e.g. inside a container) just means doing without.
                    if exc.op != "mkdir" or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                        raise
                    unified_leaf = None
            self._write_limits(leaves, limits)
        except BaseException:
            self._rollback(made)
            raise
        return ServiceCgroup(
            project,
            service,
            unified=unified_leaf,
            v1=leaves,
            devices_enforced=limits.devices_allowlist and "devices" in leaves,
            fs=self._fs,
        )

    def attach(self, project: str, service: str) -> ServiceCgroup:
        check_name("project", project)
        check_name("service", service)
        leaves: dict[str, Path] = {}
        for mount, controllers in self._mounts.items():
            leaf = mount / PARENT / project / service
            if leaf.is_dir():
                for name in controllers:
                    leaves[name] = leaf
        unified_leaf = self.unified / PARENT / project / service if self.unified is not None else None
        if unified_leaf is not None and not unified_leaf.is_dir():
            unified_leaf = None
        if not leaves and unified_leaf is None:
            raise CgroupError(f"cgroup: no cgroup of service {service} of project {project} on this host")
        enforced = "devices" in leaves and "a *:* rwm" not in read_file(leaves["devices"] / "devices.list")
        return ServiceCgroup(project, service, unified=unified_leaf, v1=leaves, devices_enforced=enforced, fs=self._fs)

    # -- internals

    def _preflight(self, limits: CgroupLimits) -> None:
        """Refuse limits this host cannot enforce before making anything."""
        need: list[tuple[str, str]] = []
        if limits.cpus is not None:
            need.append(("cpu", "cpus"))
        if limits.memory is not None:
            need.append(("memory", "memory"))
        if limits.pids is not None:
            need.append(("pids", "pids"))
        for controller, key in need:
            if controller not in self.hierarchies:
                raise CgroupError(
                    f"cgroup: {key} limit asked but the {controller} controller is not mounted on this host"
                )
        if limits.memory_swap is not None and limits.memory_swap != -1:
            memsw = self.hierarchies["memory"] / "memory.memsw.limit_in_bytes"
            if not memsw.exists():
                raise CgroupError(
                    f"cgroup: memory_swap asked but {memsw} does not exist: swap accounting is off on this "
                    "kernel (boot with swapaccount=1, or drop memory_swap)"
                )

    def _init_cpuset(self, path: Path) -> None:
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not read_file(path / name).strip():
                write_file(path / name, read_file(path.parent / name).strip())

    def _write_limits(self, leaves: Mapping[str, Path], limits: CgroupLimits) -> None:
        quota = limits.cpu_quota_us
        if quota is not None:
            write_file(leaves["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            write_file(leaves["cpu"] / "cpu.cfs_quota_us", str(quota))
        if limits.memory is not None:
            # A fresh cgroup has both limits unlimited, so memory first then memory+swap keeps the kernel's
            # rule memsw >= memory true at every step.
            write_file(leaves["memory"] / "memory.limit_in_bytes", str(limits.memory))
            memsw = leaves["memory"] / "memory.memsw.limit_in_bytes"
            if limits.memory_swap is not None and memsw.exists():
                write_file(memsw, str(limits.memory_swap))
        if limits.pids is not None:
            write_file(leaves["pids"] / "pids.max", "max" if limits.pids == -1 else str(limits.pids))
        if limits.devices_allowlist and "devices" in leaves:
            devices = leaves["devices"]
            write_file(devices / "devices.deny", "a")
            for rule in DEFAULT_DEVICE_RULES:
                write_file(devices / "devices.allow", rule)
