"""The LaunchPlan: everything the launcher needs to start one service, as plain, serialisable data.

`build_plan` is a pure function of the validated service and the host facts the runtime gathered
(cgroup files, namespace paths, the compiled seccomp filter). Think OCI config.json: the launcher
executes a plan without knowing anything about stacks.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from stackd.runtime.cgroups import CgroupMounts
from stackd.runtime.paths import StackPaths, short_hash
from stackd.spec.capabilities import CAPABILITIES, effective_capabilities
from stackd.spec.models import Service

__all__ = [
    "DEFAULT_PATH",
    "MASKED_PATHS",
    "READONLY_PATHS",
    "LaunchPlan",
    "Mount",
    "build_plan",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Docker's masked paths: files get /dev/null over them, directories an empty read-only tmpfs.
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
#: Docker's read-only paths, made read-only after the service's sysctls are written.
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger", "/sys/fs/cgroup")

#: Device nodes bound from the host into the service's /dev (the same set as Docker's).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

#: What a service on the host's root must not read (docs/security.md): replaced by empty tmpfs.
HOST_HIDDEN_DIRS = ("/root", "/home", "/run", "/tmp", "/var/tmp")
#: The hidden directories everyone may write to, as on any Linux host.
_STICKY = {"/tmp": "1777", "/var/tmp": "1777"}
#: Files replaced by /dev/null on the host's root.
HOST_HIDDEN_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-")

#: Docker's defaults in a private network namespace: bind low ports and ping without privileges.
NETNS_DEFAULT_SYSCTLS = (
    ("net/ipv4/ip_unprivileged_port_start", "0"),
    ("net/ipv4/ping_group_range", "0 2147483647"),
)

#: Linux RLIMIT_* numbers (asm-generic/resource.h; Python's resource module lacks some).
_RLIMITS = {
    "cpu": 0, "fsize": 1, "data": 2, "stack": 3, "core": 4, "rss": 5, "nproc": 6, "nofile": 7,
    "memlock": 8, "as": 9, "locks": 10, "sigpending": 11, "msgqueue": 12, "nice": 13, "rtprio": 14, "rttime": 15,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount inside the service's new root. `target` is absolute inside that root.

    fstype "bind" binds `source` (a host path, opened before the root changes); other types mount a
    fresh filesystem of that type with `data`. `create` says what to make at the target when missing
    ("auto": a file or a directory, like the bind source; "none": skip the mount when the target is missing).
    `flags` are names: ro, nosuid, nodev, noexec, rec (recursive bind), strictatime, relatime.
    """

    target: str
    fstype: str
    source: str = ""
    flags: tuple[str, ...] = ()
    data: str = ""
    create: Literal["dir", "file", "none", "auto"] = "dir"


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """One service, ready to launch. Paths outside the new root are host paths."""

    project: str
    service: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    working_dir: str
    hostname: str
    #: Namespaces to create: "mount", "uts", "ipc", "pid", "net", "cgroup" (and "user", "time").
    namespaces: tuple[str, ...]
    #: A network namespace to join instead of creating one (a pinned netns file), or None.
    join_netns: str | None
    #: The root: lower directories (top first), the writable layer (None: read-only) and mount point.
    rootfs_lower: tuple[str, ...]
    rootfs_upper: str | None
    rootfs_work: str | None
    rootfs_mountpoint: str
    mounts: tuple[Mount, ...]
    masked_paths: tuple[str, ...]
    readonly_paths: tuple[str, ...]
    #: (path under /proc/sys, value), written inside the service's namespaces.
    sysctls: tuple[tuple[str, str], ...]
    #: (RLIMIT_* number, soft, hard); -1 is unlimited.
    rlimits: tuple[tuple[int, int, int], ...]
    user: str | int | None
    group: str | int | None
    #: The bounding set, and what root keeps in permitted/effective.
    capabilities: tuple[int, ...]
    #: What a non-root user keeps across exec (ambient): only what cap_add granted explicitly.
    ambient_capabilities: tuple[int, ...]
    no_new_privileges: bool
    seccomp_bpf: bytes | None
    #: cgroup.procs files the process writes itself into before anything else (so before exec).
    cgroup_procs: tuple[str, ...]
    #: Host path of an init binary to run as pid 1 (bound at /dev/init), or None.
    init: str | None = None
    #: Written to /proc/self/timens_offsets of a new time namespace: ("monotonic", secs, nanosecs).
    time_offsets: tuple[tuple[str, int, int], ...] = ()
    #: A private user namespace: (inside, host, count) entries; the lower dir is idmapped to match and
    #: attached at rootfs_idmapped_lower.
    uid_map: tuple[tuple[int, int, int], ...] = ()
    gid_map: tuple[tuple[int, int, int], ...] = ()
    rootfs_idmapped_lower: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """A JSON-ready dict (bytes as base64) for the launcher process."""
        data = asdict(self)
        data["seccomp_bpf"] = base64.b64encode(self.seccomp_bpf).decode() if self.seccomp_bpf else None
        data["extra"] = dict(self.extra)
        return data


def build_plan(
    service: Service,
    *,
    project: str,
    paths: StackPaths,
    cgroup_procs: Sequence[str | os.PathLike[str]] = (),
    cgroup_mounts: Sequence[Mount] = (),
    join_netns: str | None = None,
    seccomp_bpf: bytes | None = None,
    init_binary: str | None = None,
    host_secret_files: Sequence[str] = (),
    extra_binds: Sequence[Mount] = (),
) -> LaunchPlan:
    """The LaunchPlan of `service`. Pure: every host fact comes in as an argument.

    `cgroup_mounts` describe what to mount at /sys/fs/cgroup (from the cgroup driver);
    `host_secret_files` are more host files to hide on a host rootfs (SSH host keys);
    `extra_binds` are files stackd keeps for the service (/etc/hosts, /etc/resolv.conf, ...).
    """
    namespaces = ["mount", "uts", "ipc", "pid", "cgroup"]
    private_users = service.userns_mode == "private"
    if private_users:
        namespaces.insert(0, "user")
    if service.time_offsets:
        namespaces.append("time")
    mode = service.network_mode.kind
    if mode in ("bridge", "none") and join_netns is None:
        namespaces.append("net")
    elif mode == "service" and join_netns is None:
        raise ValueError(f"service {service.name}: network_mode {service.network_mode} needs a namespace to join")

    on_host_root = service.rootfs.kind == "host"
    lower = ("/",) if on_host_root else (str(service.rootfs.path),)
    upper = None if service.read_only else str(paths.upper(service.name))
    work = None if service.read_only else str(paths.work(service.name))

    mounts: list[Mount] = []
    if on_host_root:
        mounts += _host_privacy_mounts(paths, host_secret_files)
    mounts += _kernel_mounts(cgroup_mounts)
    if init_binary:
        mounts.append(Mount("/dev/init", "bind", init_binary, ("ro", "nosuid", "nodev"), create="file"))
    mounts += _volume_mounts(service)
    mounts += extra_binds

    sysctls: list[tuple[str, str]] = []
    if mode in ("bridge", "none"):
        user_keys = {"/".join(s.parts) for s in service.sysctls}
        defaults = dict(NETNS_DEFAULT_SYSCTLS)
        if private_users:  # the group range must be mapped in the service's user namespace
            defaults["net/ipv4/ping_group_range"] = f"0 {USERNS_SIZE - 1}"
        sysctls += [(key, value) for key, value in defaults.items() if key not in user_keys]
    sysctls += [("/".join(s.parts), s.value) for s in service.sysctls]

    env = {"PATH": DEFAULT_PATH, "HOSTNAME": service.hostname}
    env.update(service.environment)
    caps = effective_capabilities(service.cap_add, service.cap_drop)
    return LaunchPlan(
        project=project,
        service=service.name,
        argv=service.argv,
        env=tuple(env.items()),
        working_dir=service.working_dir or "/",
        hostname=service.hostname,
        namespaces=tuple(namespaces),
        join_netns=join_netns,
        rootfs_lower=lower,
        rootfs_upper=upper,
        rootfs_work=work,
        rootfs_mountpoint=str(paths.root(service.name)),
        mounts=tuple(mounts),
        masked_paths=MASKED_PATHS,
        readonly_paths=READONLY_PATHS,
        sysctls=tuple(sysctls),
        rlimits=tuple((_RLIMITS[name], u.soft, u.hard) for name, u in service.ulimits.items()),
        user=service.user.user if service.user else None,
        group=service.user.group if service.user else None,
        capabilities=tuple(sorted(CAPABILITIES[name] for name in caps)),
        ambient_capabilities=tuple(
            sorted(CAPABILITIES[name] for name in caps if name in service.cap_add or "ALL" in service.cap_add)
        ),
        no_new_privileges=service.security_opt.no_new_privileges,
        seccomp_bpf=seccomp_bpf,
        cgroup_procs=tuple(str(path) for path in cgroup_procs),
        init=init_binary if service.init else None,
        time_offsets=tuple(_split_seconds(clock, seconds) for clock, seconds in service.time_offsets.items()),
        uid_map=((0, userns_base(project, service.name), USERNS_SIZE),) if private_users else (),
        gid_map=((0, userns_base(project, service.name), USERNS_SIZE),) if private_users else (),
        rootfs_idmapped_lower=str(paths.service(service.name) / "lower") if private_users else None,
    )


USERNS_SIZE = 65536


def userns_base(project: str, service: str) -> int:
    """The first host uid/gid of a service's private user namespace: stable for (project, service), so
    the owners of files in its writable layer survive restarts; far above ordinary and subuid ranges."""
    return 1_000_000_000 + int(short_hash(project, service), 16) % 32768 * USERNS_SIZE


def exec_plan(
    plan: LaunchPlan,
    target_pid: int,
    argv: Sequence[str],
    *,
    user: str | int | None = None,
    env: Mapping[str, str] | None = None,
    working_dir: str | None = None,
) -> dict[str, Any]:
    """What the launcher needs to run `argv` inside a running service (pid `target_pid`, as the host
    sees it): its cgroup, all its namespaces, its user (unless `user`), capabilities, no_new_privs and
    seccomp. For health checks and `stackd exec`."""
    wire = plan.to_wire()
    names = {"mount": "mnt"}
    join = [names.get(name, name) for name in plan.namespaces] + ["net"]
    wire.update(
        target_pid=target_pid,
        join=sorted(set(join)),
        argv=list(argv),
        init=None,
        env=[*plan.env, *(env or {}).items()],
        working_dir=working_dir or plan.working_dir,
    )
    if user is not None:
        text = str(user)
        name, _, group = text.partition(":")
        wire["user"], wire["group"] = name, group or None
    return wire


def _split_seconds(clock: str, seconds: float) -> tuple[str, int, int]:
    """(clock, whole seconds, nanoseconds) as timens_offsets wants them (nanoseconds 0..999999999)."""
    total = round(seconds * 1_000_000_000)
    whole, nanos = divmod(total, 1_000_000_000)
    return clock, whole, nanos


def cgroup_view(mounts: CgroupMounts) -> tuple[Mount, ...]:
    """What to mount at the service's /sys/fs/cgroup, read-only, so it sees its own cgroup as the root.

    On a cgroup v2 host: cgroup2 itself. On a v1 (or hybrid) host: a tmpfs holding each v1 hierarchy
    with the host's exact controller combination (else the kernel refuses), and cgroup2 at "unified".
    The cgroup namespace created after the process joined its cgroup makes each root the service's own.
    """
    flags = ("nosuid", "nodev", "noexec")
    if not mounts.v1:
        return (Mount("/sys/fs/cgroup", "cgroup2", "cgroup2", flags),) if mounts.unified else ()
    view = [Mount("/sys/fs/cgroup", "tmpfs", "tmpfs", flags, "mode=755,size=64k")]
    hierarchies: dict[Path, list[str]] = {}
    for controller, path in mounts.v1.items():
        hierarchies.setdefault(path, []).append(controller)
    for path, controllers in hierarchies.items():
        view.append(Mount(f"/sys/fs/cgroup/{path.name}", "cgroup", "cgroup", flags, ",".join(sorted(controllers))))
    if mounts.unified is not None:
        view.append(Mount("/sys/fs/cgroup/unified", "cgroup2", "cgroup2", flags))
    return tuple(view)


def _host_privacy_mounts(paths: StackPaths, secret_files: Sequence[str]) -> list[Mount]:
    hidden_dirs = [*HOST_HIDDEN_DIRS, str(paths.state_root), str(paths.log_root)]
    mounts = [
        Mount(d, "tmpfs", "tmpfs", ("nosuid", "nodev"), f"mode={_STICKY.get(d, '755')},size=65536k", create="none")
        for d in dict.fromkeys(hidden_dirs)
        if not any(d != other and d.startswith(other + "/") for other in hidden_dirs)
    ]
    mounts += [Mount(f, "bind", "/dev/null", ("ro",), create="none") for f in (*HOST_HIDDEN_FILES, *secret_files)]
    return mounts


def _kernel_mounts(cgroup_mounts: Sequence[Mount]) -> list[Mount]:
    """/proc, a minimal /dev, /sys read-only and the service's cgroups."""
    secure = ("nosuid", "nodev", "noexec")
    mounts = [
        Mount("/proc", "proc", "proc", secure),
        Mount("/dev", "tmpfs", "tmpfs", ("nosuid", "nodev", "strictatime"), "mode=755,size=65536k"),
    ]
    mounts += [Mount(f"/dev/{name}", "bind", f"/dev/{name}", ("nosuid", "noexec"), create="file") for name in DEVICES]
    mounts += [
        Mount("/dev/pts", "devpts", "devpts", ("nosuid", "noexec"), "newinstance,ptmxmode=0666,mode=0620,gid=5"),
        Mount("/dev/shm", "tmpfs", "shm", secure, "mode=1777,size=65536k"),
        Mount("/dev/mqueue", "mqueue", "mqueue", secure),
        Mount("/sys", "sysfs", "sysfs", (*secure, "ro")),
    ]
    mounts += cgroup_mounts
    return mounts


def _volume_mounts(service: Service) -> list[Mount]:
    mounts: list[Mount] = []
    for volume in service.volumes:
        flags = ("rec", "nodev", *(("ro",) if volume.read_only else ()))
        mounts.append(Mount(volume.target, "bind", str(volume.source), flags, create="auto"))
    for tmpfs in service.tmpfs:
        data = []
        if tmpfs.size is not None:
            data.append(f"size={tmpfs.size}")
        if tmpfs.mode is not None:
            data.append(f"mode={tmpfs.mode:o}")
        tmpfs_flags = {"nosuid", "nodev"}
        for option in tmpfs.options:
            if option in ("suid", "dev", "exec", "rw"):
                tmpfs_flags.discard("no" + option)
            else:
                tmpfs_flags.add(option)
        mounts.append(Mount(tmpfs.target, "tmpfs", "tmpfs", tuple(sorted(tmpfs_flags)), ",".join(data)))
    return mounts
