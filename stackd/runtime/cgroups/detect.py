"""Find the cgroup hierarchies from /proc/self/mountinfo and pick the driver for this host.

Never assumes paths: controllers may be mounted one per hierarchy (`cpu` and `cpuacct` apart) or
co-mounted (`cpu,cpuacct`), anywhere. Both the mountinfo file and a root prefixed to every mount point
are injectable, so tests can describe a host that is not this one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stackd.errors import CgroupError

from .base import REAL_FS, V1_CONTROLLERS, CgroupDriver, CgroupFileError, CgroupFs, read_file
from .v1 import CgroupV1Driver
from .v2 import REQUIRED_CONTROLLERS, CgroupV2Driver

__all__ = ["MOUNTINFO", "CgroupMounts", "detect_driver", "parse_mountinfo", "read_cgroup_mounts"]

MOUNTINFO = Path("/proc/self/mountinfo")

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash in paths as \\ooo."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field_text)


@dataclass(frozen=True)
class CgroupMounts:
    """Where the cgroup hierarchies of a host are mounted."""

    #: The cgroup2 mount point, or None.
    unified: Path | None = None
    #: v1 controller -> the mount point of its hierarchy (co-mounted controllers share one).
    v1: Mapping[str, Path] = field(default_factory=dict)
    #: Named v1 hierarchies without controllers, e.g. {"systemd": /sys/fs/cgroup/systemd}.
    named: Mapping[str, Path] = field(default_factory=dict)


def parse_mountinfo(text: str, *, root: Path | str | None = None) -> CgroupMounts:
    """Parse mountinfo text (proc(5)); with `root`, every mount point is taken relative to it.

    The first mount of a hierarchy wins; among several cgroup2 mounts, /sys/fs/cgroup or
    /sys/fs/cgroup/unified is preferred, else the first.
    """
    prefix = Path(root) if root is not None else None
    unified_candidates: list[Path] = []
    v1: dict[str, Path] = {}
    named: dict[str, Path] = {}
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        mount_point = _unescape(fields[4])
        fstype = fields[sep + 1]
        super_options = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype not in ("cgroup", "cgroup2"):
            continue
        path = prefix / mount_point.lstrip("/") if prefix is not None else Path(mount_point)
        if fstype == "cgroup2":
            unified_candidates.append(Path(mount_point) if prefix is None else path)
            continue
        controllers = [opt for opt in super_options if opt in V1_CONTROLLERS]
        for controller in controllers:
            v1.setdefault(controller, path)
        if not controllers:
            for opt in super_options:
                if opt.startswith("name="):
                    named.setdefault(opt[len("name=") :], path)
    unified: Path | None = None
    if unified_candidates:
        preferred = [Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")]
        if prefix is not None:
            preferred = [prefix / p.relative_to("/") for p in preferred]
        unified = next((p for p in preferred if p in unified_candidates), unified_candidates[0])
    return CgroupMounts(unified=unified, v1=v1, named=named)


def read_cgroup_mounts(mountinfo: Path | str = MOUNTINFO, *, root: Path | str | None = None) -> CgroupMounts:
    """The cgroup mounts listed in a mountinfo file (by default this process's)."""
    try:
        text = Path(mountinfo).read_text()
    except OSError as exc:
        raise CgroupError(f"cgroup: cannot read {mountinfo}: {exc.strerror}") from exc
    return parse_mountinfo(text, root=root)


def _v2_controllers(unified: Path) -> set[str]:
    try:
        return set(read_file(unified / "cgroup.controllers").split())
    except CgroupFileError:
        return set()


def detect_driver(
    mountinfo: Path | str = MOUNTINFO, *, root: Path | str | None = None, fs: CgroupFs = REAL_FS
) -> CgroupDriver:
    """The driver for this host (or the host `mountinfo` and `root` describe).

    cgroup v2 when the cgroup2 mount offers cpu, memory and pids (a pure v2 host); otherwise v1 over the
    mounted v1 hierarchies, plus the cgroup2 mount if any (hybrid). CgroupError if no cgroup is mounted.
    """
    mounts = read_cgroup_mounts(mountinfo, root=root)
    if mounts.unified is not None and set(REQUIRED_CONTROLLERS) <= _v2_controllers(mounts.unified):
        return CgroupV2Driver(mounts.unified, fs=fs)
    if mounts.v1 or mounts.unified is not None:
        return CgroupV1Driver(mounts.v1, mounts.unified, fs=fs)
    raise CgroupError(f"cgroup: no cgroup hierarchy is mounted (read {mountinfo}); mount cgroup2 at /sys/fs/cgroup")
