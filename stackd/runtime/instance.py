"""One service's host resources around a launch: state directories, cgroup, plan; and their removal.

    facts = HostFacts.gather()                       # once per supervisor
    instance = prepare(service, project="shop", paths=StackPaths("shop"), facts=facts)
    pid = await launcher.launch(instance.plan, stdout=w, stderr=w)
    ...
    instance.dispose()                               # kills what is left in the cgroup, removes all

Knows one service and nothing of the stack graph (design.md §2).
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import signal
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stackd.errors import LaunchError
from stackd.runtime.cgroups import CgroupDriver, CgroupLimits, ServiceCgroup, detect_driver, read_cgroup_mounts
from stackd.runtime.launcher import Exit
from stackd.runtime.paths import StackPaths
from stackd.runtime.plan import LaunchPlan, Mount, build_plan, cgroup_view, userns_base
from stackd.runtime.seccomp import compile_for_service
from stackd.spec.capabilities import effective_capabilities
from stackd.spec.models import Service
from stackd.spec.units import format_size

__all__ = ["HostFacts", "Instance", "cgroup_limits", "find_init", "prepare"]

#: Init binaries stackd can run as pid 1 with `init = true`, static ones first (they work in any rootfs).
INIT_CANDIDATES = ("/usr/bin/tini-static", "/usr/bin/catatonit", "/usr/libexec/podman/catatonit", "/usr/bin/tini")


def find_init() -> str | None:
    """The first init binary installed on the host, or None."""
    return next((path for path in INIT_CANDIDATES if Path(path).is_file()), None)


SeccompCompiler = Callable[[Service, frozenset[str]], "bytes | None"]


@dataclass(frozen=True)
class HostFacts:
    """What the runtime learns about the host once: the cgroup driver and layout, the init binary,
    host secrets to hide, and how to compile a service's seccomp filter."""

    driver: CgroupDriver
    cgroup_mounts: tuple[Mount, ...]
    init_binary: str | None
    secret_files: tuple[str, ...]
    compile_seccomp: SeccompCompiler | None = None

    @classmethod
    def gather(cls, *, compile_seccomp: SeccompCompiler | None = compile_for_service) -> HostFacts:
        """Look at this host once. `compile_seccomp=None` launches every service unconfined (tests)."""
        return cls(
            driver=detect_driver(),
            cgroup_mounts=cgroup_view(read_cgroup_mounts()),
            init_binary=find_init(),
            secret_files=tuple(sorted(glob.glob("/etc/ssh/ssh_host_*_key"))),
            compile_seccomp=compile_seccomp,
        )


def cgroup_limits(service: Service) -> CgroupLimits:
    """The cgroup limits of a service. Like Docker, a memory limit without memswap_limit allows as
    much swap as memory (memswap = 2 x memory); memswap_limit = -1 allows unlimited swap."""
    swap = service.memswap_limit
    if service.mem_limit is not None and swap is None:
        swap = 2 * service.mem_limit
    return CgroupLimits(
        cpus=service.cpus,
        memory=service.mem_limit,
        memory_swap=swap,
        pids=service.pids_limit,
        devices_allowlist=True,
    )


@dataclass
class Instance:
    """A prepared service: its plan, its cgroup and its state directory."""

    service: Service
    project: str
    paths: StackPaths
    cgroup: ServiceCgroup
    plan: LaunchPlan
    state_dir: Path = field(init=False)
    oom_kills_at_start: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.state_dir = self.paths.service(self.service.name)

    def mark_started(self) -> None:
        """Remember the cgroup's OOM-kill count when a process starts, to tell OOM kills apart later."""
        self.oom_kills_at_start = self.cgroup.oom_kill_count()

    def exit_reason(self, exit: Exit) -> str:
        """Why the process ended, as the supervisor reports it: "exited with code 1", "killed by
        SIGTERM", or "OOM-killed at memory limit 32MiB" when the kernel's OOM killer did it."""
        if exit.signal == signal.SIGKILL and self.cgroup.oom_kill_count() > self.oom_kills_at_start:
            limit = self.service.mem_limit
            return f"OOM-killed at memory limit {format_size(limit)}" if limit else "OOM-killed"
        return str(exit)

    def oom_killed(self, exit: Exit) -> bool:
        """Whether the kernel's OOM killer ended this process (not some other SIGKILL)."""
        return self.exit_reason(exit).startswith("OOM-killed")

    def dispose(self, *, keep_state: bool = False) -> None:
        """Kill whatever still runs in the cgroup, remove it, and (unless keep_state) the state dir."""
        self.cgroup.remove()
        if not keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _let_mapped_root_search(service: str, paths: StackPaths) -> None:
    """Root of a private user namespace (an unprivileged host uid) mounts the service's root itself, so
    it must be able to search every directory above the writable layer, as runc requires of a bundle.
    stackd's own directories (the state directory and below) get search permission for others (never
    read); a directory above them that denies it is an error that says which, before anything starts."""
    own = paths.service(service)
    for directory in (own, own.parent, paths.state, paths.state_root):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    for directory in paths.state_root.parents:
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise LaunchError(
                service,
                "user namespace",
                errno=errno.EACCES,
                path=str(directory),
                detail='userns_mode = "private" needs the state directory\'s parents searchable by others'
                " (chmod o+x), so that root of the service's user namespace can reach its writable layer",
            )


def prepare(
    service: Service,
    *,
    project: str,
    paths: StackPaths,
    facts: HostFacts,
    join_netns: str | None = None,
    extra_binds: Sequence[Mount] = (),
) -> Instance:
    """Create the service's state directories and cgroup, and build its plan. On failure, undo."""
    if service.init and facts.init_binary is None:
        raise LaunchError(
            service.name, "init", detail="init = true needs tini or catatonit on the host (apt-get install tini)"
        )
    directories = [paths.upper(service.name), paths.work(service.name), paths.root(service.name)]
    if service.userns_mode == "private":
        directories.append(paths.service(service.name) / "lower")  # where the idmapped root is attached
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        if service.userns_mode == "private":  # root of the user namespace owns its writable layer
            base = userns_base(project, service.name)
            os.chown(directory, base, base)
    if service.userns_mode == "private":
        try:
            _let_mapped_root_search(service.name, paths)
        except BaseException:
            shutil.rmtree(paths.service(service.name), ignore_errors=True)
            raise
    cgroup = facts.driver.create(project, service.name, cgroup_limits(service))
    try:
        bpf = None
        if facts.compile_seccomp is not None and service.security_opt.seccomp != "unconfined":
            bpf = facts.compile_seccomp(service, effective_capabilities(service.cap_add, service.cap_drop))
        plan = build_plan(
            service,
            project=project,
            paths=paths,
            cgroup_procs=cgroup.procs_files,
            cgroup_mounts=facts.cgroup_mounts,
            join_netns=join_netns,
            seccomp_bpf=bpf,
            init_binary=facts.init_binary if service.init else None,
            host_secret_files=facts.secret_files,
            extra_binds=extra_binds,
        )
    except BaseException:
        cgroup.remove()
        shutil.rmtree(paths.service(service.name), ignore_errors=True)
        raise
    return Instance(service, project, paths, cgroup, plan)
