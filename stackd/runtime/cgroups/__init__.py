"""cgroups for services: a v2 and a v1 driver behind one interface, chosen by detecting the host.

Every service's cgroup lives at `<hierarchy root>/stackd/<project>/<service>` in each hierarchy.

    driver = detect_driver()
    paths = driver.service_paths("shop", "db")        # record these in the state file first
    cg = driver.create("shop", "db", CgroupLimits(cpus=0.5, memory=256 << 20, pids=128))
    # in the launcher's child, before exec: cg.join()  (writes "0" to each of cg.procs_files)
    cg.kill()                                         # cgroup.kill, or freeze / signal all / thaw
    cg.remove()

After a supervisor died by SIGKILL, `remove_cgroup_paths(recorded_paths)` tears down what it left.
"""

from .base import (
    CPU_PERIOD_US,
    DEFAULT_DEVICE_RULES,
    PARENT,
    CgroupDriver,
    CgroupFileError,
    CgroupFs,
    CgroupLimits,
    CgroupStats,
    ServiceCgroup,
    remove_cgroup_paths,
)
from .detect import MOUNTINFO, CgroupMounts, detect_driver, parse_mountinfo, read_cgroup_mounts
from .v1 import CgroupV1Driver
from .v2 import REQUIRED_CONTROLLERS, CgroupV2Driver

__all__ = [
    "CPU_PERIOD_US",
    "DEFAULT_DEVICE_RULES",
    "MOUNTINFO",
    "PARENT",
    "REQUIRED_CONTROLLERS",
    "CgroupDriver",
    "CgroupFileError",
    "CgroupFs",
    "CgroupLimits",
    "CgroupMounts",
    "CgroupStats",
    "CgroupV1Driver",
    "CgroupV2Driver",
    "ServiceCgroup",
    "detect_driver",
    "parse_mountinfo",
    "read_cgroup_mounts",
    "remove_cgroup_paths",
]
