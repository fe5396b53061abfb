"""The cgroup v2 driver: one unified hierarchy with the cpu, memory and pids controllers.

Layout: `<root>/stackd/<project>/<service>`. The controllers are enabled in `cgroup.subtree_control` of
every ancestor of the service's directory (the hierarchy root only when they are not already on there, as
systemd usually has them), then the limits are written to the leaf before any process enters it:

- cpus      -> cpu.max          "<quota> 100000"
- memory    -> memory.max       bytes
- swap      -> memory.swap.max  memory_swap - memory, or "max" for -1 (absent without swap accounting)
- pids      -> pids.max         n, or "max" for -1

A device allowlist would need an eBPF program on v2; this driver does not attach one and reports
`ServiceCgroup.devices_enforced = False`, so the launcher must rely on `nodev` mounts.
"""

from __future__ import annotations

from pathlib import Path

from stackd.errors import CgroupError

from .base import (
    CPU_PERIOD_US,
    PARENT,
    REAL_FS,
    CgroupDriver,
    CgroupFs,
    CgroupLimits,
    ServiceCgroup,
    check_name,
    read_file,
    write_file,
)

__all__ = ["REQUIRED_CONTROLLERS", "CgroupV2Driver"]

#: The controllers stackd enables on the path to every service (detection requires them available).
REQUIRED_CONTROLLERS: tuple[str, ...] = ("cpu", "memory", "pids")


def _controller_set(text: str) -> set[str]:
    # The kernel lists enabled controllers as "cpu memory pids"; tolerate "+cpu" as a fake tree may hold
    # what was written.
    return {word.lstrip("+") for word in text.split() if not word.startswith("-")}


def _max(value: int) -> str:
    return "max" if value == -1 else str(value)


class CgroupV2Driver(CgroupDriver):
    """Services' cgroups on a pure cgroup v2 host (cgroup2 mounted at `root`, normally /sys/fs/cgroup)."""

    version = 2

    def __init__(self, root: Path | str, *, fs: CgroupFs = REAL_FS) -> None:
        super().__init__(fs=fs)
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"CgroupV2Driver({str(self.root)!r})"

    def hierarchy_roots(self) -> tuple[Path, ...]:
        return (self.root,)

    def available_controllers(self) -> set[str]:
        return _controller_set(read_file(self.root / "cgroup.controllers"))

    def create(self, project: str, service: str, limits: CgroupLimits) -> ServiceCgroup:
        check_name("project", project)
        check_name("service", service)
        available = self.available_controllers()
        missing = [name for name in REQUIRED_CONTROLLERS if name not in available]
        if missing:
            raise CgroupError(
                f"cgroup: controller(s) {' '.join(missing)} not available in {self.root}/cgroup.controllers "
                f"(has: {' '.join(sorted(available)) or 'none'})"
            )
        parent = self.root / PARENT
        project_dir = parent / project
        leaf = project_dir / service
        made: list[Path] = []
        try:
            self._enable_controllers(self.root)
            self._ensure_dir(parent, made)
            self._enable_controllers(parent)
            self._ensure_dir(project_dir, made)
            self._enable_controllers(project_dir)
            self._fresh_leaf(leaf, made)
            self._write_limits(leaf, limits)
        except BaseException:
            self._rollback(made)
            raise
        return ServiceCgroup(project, service, unified=leaf, v1={}, devices_enforced=False, fs=self._fs)

    def attach(self, project: str, service: str) -> ServiceCgroup:
        (leaf,) = self.service_paths(project, service)
        if not leaf.is_dir():
            raise CgroupError(f"cgroup: {leaf} does not exist (service {service} of project {project})")
        return ServiceCgroup(project, service, unified=leaf, v1={}, devices_enforced=False, fs=self._fs)

    def _enable_controllers(self, path: Path) -> None:
        control = path / "cgroup.subtree_control"
        enabled = _controller_set(read_file(control))
        wanted = [name for name in REQUIRED_CONTROLLERS if name not in enabled]
        if wanted:
            write_file(
                control,
                " ".join(f"+{name}" for name in wanted),
                hint="a cgroup with processes of its own cannot enable controllers for its children"
                if path != self.root
                else None,
            )

    def _write_limits(self, leaf: Path, limits: CgroupLimits) -> None:
        quota = limits.cpu_quota_us
        if quota is not None:
            write_file(leaf / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        if limits.memory is not None:
            write_file(leaf / "memory.max", str(limits.memory))
        swap = limits.swap_only
        if swap is not None:
            swap_file = leaf / "memory.swap.max"
            if swap_file.exists():
                write_file(swap_file, _max(swap))
            elif swap != -1:
                raise CgroupError(
                    f"cgroup: memory_swap asked but {swap_file} does not exist: swap accounting is off on "
                    "this kernel (boot with swapaccount=1, or drop memory_swap)"
                )
        if limits.pids is not None:
            write_file(leaf / "pids.max", _max(limits.pids))
