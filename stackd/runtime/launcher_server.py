"""The launcher process: a small, single-threaded program that forks namespaced services on request.

It imports only the standard library and stackd._sys, starts no thread, and is started once per
supervisor (design.md §3): forking from it is safe, where forking from the asyncio supervisor is not.
It is the subreaper of every service it starts, reaps them, and reports each exit at once.

Protocol, over one AF_UNIX SOCK_SEQPACKET socket (one JSON object a message):
  -> {"op": "launch", "id": N, "plan": {...LaunchPlan.to_wire()...}}  with fds [stdout, stderr] attached
  <- {"op": "started", "id": N, "pid": P}
  <- {"op": "failed", "id": N, "step": "...", "errno": E|null, "path": "...", "detail": "..."}
  <- {"op": "exited", "pid": P, "code": C|null, "signal": S|null}
  -> {"op": "exec", "id": N, "plan": {...exec_plan()...}}  with fds [stdin, stdout, stderr] attached
  <- "started" / "failed" as for a launch, then "exited" for the exec'd process
     With "tty": [rows, cols] in the plan, no fds are sent: the process gets a pseudo-terminal made in
     the service's own devpts, and "started" carries its master fd (the caller relays it).
  -> {"op": "ping", "id": N}   <- {"op": "pong", "id": N}
The launcher exits when the socket closes; the services it started keep running (`stackd down`
kills them through their cgroups).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import resource
import selectors
import signal
import socket
import stat
import sys

from stackd._sys import caps, linux, netdev, pty
from stackd._sys.inroot import open_in_root

TYPE_CHECKING = False
if TYPE_CHECKING:  # no `typing` at run time: the launcher keeps its imports few
    from typing import Any

MAX_MESSAGE = 1 << 20

_NAMESPACE_FLAGS = {
    "mount": linux.CLONE_NEWNS,
    "uts": linux.CLONE_NEWUTS,
    "ipc": linux.CLONE_NEWIPC,
    "pid": linux.CLONE_NEWPID,
    "net": linux.CLONE_NEWNET,
    "cgroup": linux.CLONE_NEWCGROUP,
    "time": linux.CLONE_NEWTIME,
}
#: The same names as MOUNT_ATTR_* bits, for the detached mounts made before the namespaces.
_MOUNT_ATTRS = {
    "ro": linux.MOUNT_ATTR_RDONLY,
    "nosuid": linux.MOUNT_ATTR_NOSUID,
    "nodev": linux.MOUNT_ATTR_NODEV,
    "noexec": linux.MOUNT_ATTR_NOEXEC,
    "strictatime": linux.MOUNT_ATTR_STRICTATIME,
    "relatime": linux.MOUNT_ATTR_RELATIME,
    "noatime": linux.MOUNT_ATTR_NOATIME,
}
_MOUNT_FLAGS = {
    "ro": linux.MS_RDONLY,
    "nosuid": linux.MS_NOSUID,
    "nodev": linux.MS_NODEV,
    "noexec": linux.MS_NOEXEC,
    "rec": linux.MS_REC,
    "strictatime": linux.MS_STRICTATIME,
    "relatime": linux.MS_RELATIME,
    "noatime": linux.MS_NOATIME,
}


class StepError(Exception):
    """A launch step failed: which step, on which path, with which errno."""

    def __init__(self, step: str, error: BaseException | None = None, path: str = "", detail: str = "") -> None:
        self.step = step
        self.errno = getattr(error, "errno", None)
        self.path = path or (getattr(error, "filename", None) or "")
        strerror = getattr(error, "strerror", None) or ""
        if self.errno is not None and strerror == os.strerror(self.errno):
            strerror = ""  # the errno already says it
        self.detail = detail or strerror or (str(error) if error is not None and self.errno is None else "")
        super().__init__(step)

    def to_message(self) -> dict[str, object]:
        return {"step": self.step, "errno": self.errno, "path": str(self.path), "detail": self.detail}


class _Step:
    """`with _Step("mount /proc", path):` turns any OSError inside into a StepError for that step."""

    def __init__(self, name: str, path: str = "") -> None:
        self.name, self.path = name, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        if isinstance(error, OSError):
            raise StepError(self.name, error, self.path or (error.filename or "")) from None


# --- inside the new process -----------------------------------------------------------------------


def _stage_one(plan: dict[str, Any], status_fd: int, stdout_fd: int, stderr_fd: int) -> None:
    """In the first child, still in the host's namespaces: cgroup, namespaces, then fork pid 1.

    Joining the cgroup first costs an RCU grace period when no task changed cgroup for a while (5-15 ms
    on a quiet host, in the kernel's cgroup_threadgroup_rwsem). Moving pid 1 from here while it builds
    its root was measured slower (19-24 ms against 16.5 ms median): the grace period then waits for the
    busy CPU. clone3(CLONE_INTO_CGROUP) avoids the move on cgroup v2 hosts (not done yet).
    """
    os.setsid()
    for procs in plan["cgroup_procs"]:
        with _Step("join cgroup", procs):
            linux.write_file(procs, "0")
    if plan["join_netns"]:
        with _Step("join network namespace", plan["join_netns"]):
            linux.setns_path(plan["join_netns"], linux.CLONE_NEWNET)
    private_users = plan.get("_userns_fd") is not None
    # Still host root in the host's namespaces: copy what the service binds from the host now.
    plan = {**plan, "_trees": _detached_mounts(plan, private_users)}
    if private_users and plan["join_netns"]:
        # A joined network namespace belongs to another user namespace: root inside could not write
        # its sysctls, so they are written here, in it, before the user namespace is joined.
        for key, value in plan["sysctls"]:
            if key.startswith("net/"):
                with _Step(f"sysctl {key.replace('/', '.')}", "/proc/sys/" + key):
                    linux.write_file("/proc/sys/" + key, value)
        plan["sysctls"] = [(key, value) for key, value in plan["sysctls"] if not key.startswith("net/")]
    if private_users:
        # The other namespaces are created from inside it, so that they belong to it.
        with _Step("join user namespace"):
            linux.setns(plan["_userns_fd"], linux.CLONE_NEWUSER)
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
    flags = 0
    for name in plan["namespaces"]:
        if name != "user":
            flags |= _NAMESPACE_FLAGS[name]
    with _Step("unshare"):
        linux.unshare(flags)
    if "net" in plan["namespaces"]:
        with _Step("loopback up", "lo"):
            netdev.set_link_up("lo")
    if plan["time_offsets"]:
        # The offsets of a new time namespace must be written before any process enters it (the fork).
        offsets = "".join(f"{clock} {secs} {nanos}\n" for clock, secs, nanos in plan["time_offsets"])
        with _Step("time offsets", "/proc/self/timens_offsets"):
            linux.write_file("/proc/self/timens_offsets", offsets)
    pid = os.fork()
    if pid:
        os.write(status_fd, json.dumps({"pid": pid}).encode() + b"\n")
        os._exit(0)
    _stage_two(plan, stdout_fd, stderr_fd)


#: The order runc's nsenter joins namespaces in: the user namespace first (it grants the rest).
_JOIN_ORDER = ("user", "ipc", "uts", "net", "pid", "mnt", "cgroup", "time")


def _exec_stage_one(plan: dict[str, Any], status_fd: int, fds: list[int]) -> None:
    """`exec` into a running service: its cgroup, its namespaces, then fork (the pid namespace applies
    to children) and become the service's user with its confinement."""
    os.setsid()
    for procs in plan["cgroup_procs"]:
        with _Step("join cgroup", procs):
            linux.write_file(procs, "0")
    target = plan["target_pid"]
    namespaces = []
    for name in _JOIN_ORDER:  # open them all first: joining the mount namespace changes /proc
        if name in plan["join"]:
            path = f"/proc/{target}/ns/{name}"
            with _Step("open namespace", path):
                namespaces.append((path, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
    for path, fd in namespaces:
        with _Step("setns", path):
            linux.setns(fd, 0)
        os.close(fd)
    pid = os.fork()
    if pid:
        os.write(status_fd, json.dumps({"pid": pid}).encode() + b"\n")
        os._exit(0)
    os.chdir("/")  # the root of the service's mount namespace
    if plan.get("tty"):
        fds = _service_terminal(plan, status_fd)
    _become_service(plan, fds[0], fds[1], fds[2])


def _service_terminal(plan: dict[str, Any], status_fd: int) -> list[int]:
    """A pseudo-terminal of the service's devpts (its mount namespace is joined): the slave becomes the
    controlling terminal and stdio of this process; the master goes to the launcher (SCM_RIGHTS)."""
    with _Step("open pseudo-terminal", "/dev/pts/ptmx"):
        master, slave = pty.open_pty("/dev/pts/ptmx")
        rows, cols = plan["tty"]
        pty.set_window_size(slave, rows, cols)
    with _Step("send pseudo-terminal"):
        channel = socket.socket(fileno=status_fd)
        try:
            socket.send_fds(channel, [b'{"tty": 1}\n'], [master])
        finally:
            channel.detach()
        os.close(master)
    with _Step("controlling terminal"):
        pty.make_controlling(slave)
    return [slave, slave, slave]


def _stage_two(plan: dict[str, Any], stdout_fd: int, stderr_fd: int) -> None:
    """Pid 1 of the new pid namespace: build the root, confine, exec. Never returns."""
    with _Step("make mounts private", "/"):
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    root = plan["rootfs_mountpoint"]
    _mount_rootfs(plan, root)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for mount, tree in zip(plan["mounts"], plan["_trees"], strict=True):
        _mount_one(root_fd, root, mount, tree)
    for path in plan["masked_paths"]:
        _mask(root_fd, path)
    os.close(root_fd)
    with _Step("pivot_root", root):
        os.chdir(root)
        linux.pivot_root(".", ".")
        linux.umount2(".", linux.MNT_DETACH)
        os.chdir("/")
    with _Step("sethostname"):
        linux.sethostname(plan["hostname"])
    for key, value in plan["sysctls"]:
        with _Step(f"sysctl {key.replace('/', '.')}", "/proc/sys/" + key):
            linux.write_file("/proc/sys/" + key, value)
    for path in plan["readonly_paths"]:
        _remount_readonly(path, recursive=True)
    if plan["rootfs_upper"] is None:
        _remount_readonly("/", recursive=False)
    _become_service(plan, -1, stdout_fd, stderr_fd)


def _become_service(plan: dict[str, Any], stdin_fd: int, stdout_fd: int, stderr_fd: int) -> None:
    """The last steps of a launch, shared with exec: rlimits, user, stdio, working directory,
    capabilities, no_new_privs, seccomp, exec. Never returns."""
    for number, soft, hard in plan["rlimits"]:
        with _Step("setrlimit", str(number)):
            inf = resource.RLIM_INFINITY
            try:
                resource.setrlimit(number, (inf if soft == -1 else soft, inf if hard == -1 else hard))
            except ValueError as error:  # Python's word for EPERM ("not allowed to raise") and EINVAL
                code = errno.EPERM if "not allowed" in str(error) else errno.EINVAL
                raise StepError("setrlimit", OSError(code, os.strerror(code)), str(number), str(error)) from None
    uid, gid, groups, home = _resolve_user(plan["user"], plan["group"])
    env = dict(plan["env"])
    env.setdefault("HOME", home)
    if plan.get("tty"):
        env.setdefault("TERM", "xterm")
        with _Step("chown terminal"):
            os.fchown(stdin_fd, uid, -1)  # as a login gives it: the user owns its terminal
    _set_stdio(stdin_fd, stdout_fd, stderr_fd)
    workdir = plan["working_dir"]
    with _Step("chdir", workdir):
        if not os.path.isdir(workdir) and plan["rootfs_upper"] is not None:
            os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
        try:
            cwd = os.getcwd()  # glibc: ENOENT for a directory outside the root; the kernel: "(unreachable)/..."
        except FileNotFoundError:
            cwd = ""
        if not cwd.startswith("/"):  # CVE-2024-21626
            raise StepError("chdir", None, workdir, "the working directory resolves outside the root")
    seccomp = base64.b64decode(plan["seccomp_bpf"]) if plan["seccomp_bpf"] else None
    if seccomp and not plan["no_new_privileges"]:
        # Without no_new_privs, loading a filter needs CAP_SYS_ADMIN, which the service may be about to
        # lose: load it while we still hold it (runc does the same). The profile allows what follows.
        with _Step("seccomp"):
            linux.load_seccomp_bpf(seccomp)
            seccomp = None
    with _Step("switch user", str(plan["user"])):
        linux.set_keepcaps(True)
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    with _Step("capabilities"):
        if uid == 0:
            caps.apply_capabilities(plan["capabilities"], ambient=False)
        else:
            # Docker: a non-root user has no capabilities; stackd also keeps what cap_add asked for.
            caps.apply_capabilities(plan["ambient_capabilities"], ambient=True, bounding=plan["capabilities"])
    if plan["no_new_privileges"]:
        with _Step("no_new_privs"):
            linux.set_no_new_privs()
    argv = list(plan["argv"])
    if plan["init"]:
        argv = ["/dev/init", "-g", "--", *argv]
    program = _find_program(argv[0], env.get("PATH", ""))
    if seccomp:
        with _Step("seccomp"):
            linux.load_seccomp_bpf(seccomp)
    with _Step("exec", argv[0]):
        os.execve(program, argv, env)


def _mount_rootfs(plan: dict[str, Any], root: str) -> None:
    lower, upper, work = plan["rootfs_lower"], plan["rootfs_upper"], plan["rootfs_work"]
    if plan.get("_lower_fd") is not None:
        where = plan["rootfs_idmapped_lower"]
        with _Step("attach idmapped lower", where):
            linux.attach_mount(plan["_lower_fd"], where)
        lower = (where,)
    with _Step("mount rootfs", root):
        if upper is None:
            # Read-only: a bind of the lower directory (not recursive: no host submounts), then ro.
            linux.mount(lower[0], root, None, linux.MS_BIND)
            linux.mount(None, root, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NODEV)
        else:
            data = f"lowerdir={':'.join(lower)},upperdir={upper},workdir={work}"
            linux.mount("overlay", root, "overlay", linux.MS_NODEV, data)


def _detached_mounts(plan: dict[str, Any], private_users: bool) -> list[int | None]:
    """Detached mounts, one per entry of plan["mounts"] (None where pid 1 mounts a new filesystem itself).

    Made in stage one, as host root in the host's user and mount namespaces, for what must come from
    there: every bind (open_tree clone of the source, so that root of a private user namespace may bind
    a file below a directory it could not search, and with its flags and private propagation already
    set), and, in a private user namespace that does not own the network namespace (network_mode host, a
    joined namespace), a sysfs, which only an owner of the network namespace may mount. Pid 1 attaches
    them with move_mount; they are close-on-exec.
    """
    own_net = "net" in plan["namespaces"]
    trees: list[int | None] = []
    for mount in plan["mounts"]:
        target, fstype, source = mount["target"], mount["fstype"], mount["source"]
        attrs = 0
        for name in mount["flags"]:
            attrs |= _MOUNT_ATTRS.get(name, 0)
        clear = linux.MOUNT_ATTR__ATIME if {"strictatime", "relatime", "noatime"} & set(mount["flags"]) else 0
        tree = None
        if fstype == "bind":
            with _Step(f"mount {target}", target):
                if not os.path.exists(source):
                    raise StepError(
                        f"mount {target}",
                        FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)),
                        target,
                        f"the bind source {source} does not exist",
                    )
                recursive = linux.AT_RECURSIVE if "rec" in mount["flags"] else 0
                tree = linux.open_tree(source, linux.OPEN_TREE_CLONE | linux.OPEN_TREE_CLOEXEC | recursive)
                # A clone of a shared mount stays its peer: make it private, as the rest of the service's mounts.
                linux.mount_setattr("", attrs, clear, linux.MS_PRIVATE, flags=linux.AT_EMPTY_PATH | recursive, dfd=tree)
        elif fstype == "sysfs" and private_users and not own_net:
            with _Step(f"mount {target}", target):
                context = linux.fsopen("sysfs")
                try:
                    linux.fsconfig(context, linux.FSCONFIG_CMD_CREATE)
                    tree = linux.fsmount(context, linux.FSMOUNT_CLOEXEC, attrs)
                finally:
                    os.close(context)
        trees.append(tree)
    return trees


def _mount_one(root_fd: int, root: str, mount: dict[str, Any], tree: int | None) -> None:
    target, fstype, source = mount["target"], mount["fstype"], mount["source"]
    flags = 0
    for name in mount["flags"]:
        flags |= _MOUNT_FLAGS[name]
    create = mount["create"]
    if create == "auto":
        create = "dir" if tree is not None and stat.S_ISDIR(os.fstat(tree).st_mode) else "file"
    with _Step(f"mount {target}", target):
        fd = open_in_root(root_fd, target, create=create)
        if fd is None:
            if tree is not None:
                os.close(tree)
            return
        where = f"/proc/self/fd/{fd}"
        try:
            if tree is not None:
                # A bind (or sysfs) made in stage one, flags set: attach it. Then the mount lives on alone.
                linux.move_mount(tree, "", fd, "", linux.MOVE_MOUNT_F_EMPTY_PATH | linux.MOVE_MOUNT_T_EMPTY_PATH)
                os.close(tree)
            else:
                linux.mount(source or fstype, where, fstype, flags, mount["data"] or None)
        finally:
            os.close(fd)
    if target == "/dev/pts":
        _dev_links(root_fd)


def _dev_links(root_fd: int) -> None:
    """/dev/ptmx and the stdio links, as every container runtime makes them."""
    dev = open_in_root(root_fd, "/dev")
    assert dev is not None
    try:
        for name, target in (
            ("ptmx", "pts/ptmx"),
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            with _Step(f"symlink /dev/{name}"):
                os.symlink(target, name, dir_fd=dev)
    finally:
        os.close(dev)


def _mask(root_fd: int, path: str) -> None:
    with _Step(f"mask {path}", path):
        fd = open_in_root(root_fd, path)
        if fd is None:
            return
        try:
            where = f"/proc/self/fd/{fd}"
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                linux.mount("tmpfs", where, "tmpfs", linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV, "size=0")
            else:
                linux.mount("/dev/null", where, None, linux.MS_BIND)
        finally:
            os.close(fd)


def _remount_readonly(path: str, *, recursive: bool) -> None:
    if not os.path.lexists(path):
        return
    with _Step(f"read-only {path}", path):
        rec = linux.MS_REC if recursive else 0
        if path != "/":
            linux.mount(path, path, None, linux.MS_BIND | rec)
        keep = os.statvfs(path).f_flag & (linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        linux.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | rec | keep)
        if recursive:
            # A remount ignores MS_REC: only mount_setattr reaches the mounts below (/sys/fs/cgroup/*).
            linux.make_readonly_recursive(path)


def _resolve_user(user: str | int | None, group: str | int | None) -> tuple[int, int, list[int], str]:
    """uid, gid, supplementary groups and home, read from the service's own /etc/passwd and /etc/group."""
    if user is None:
        user = 0
    passwd = _read_db("/etc/passwd")
    entry = None
    if isinstance(user, int) or str(user).isdigit():
        uid = int(user)
        entry = next((e for e in passwd if e[2].isdigit() and int(e[2]) == uid), None)
    else:
        entry = next((e for e in passwd if e[0] == user), None)
        if entry is None:
            raise StepError("resolve user", None, "/etc/passwd", f'no user "{user}" in the service\'s /etc/passwd')
        uid = int(entry[2])
    gid = int(entry[3]) if entry else 0
    home = entry[5] if entry and len(entry) > 5 and entry[5] else "/"
    groups_db = _read_db("/etc/group")
    if group is not None:
        if isinstance(group, int) or str(group).isdigit():
            gid = int(group)
        else:
            found = next((g for g in groups_db if g[0] == group), None)
            if found is None:
                raise StepError("resolve group", None, "/etc/group", f'no group "{group}" in the service\'s /etc/group')
            gid = int(found[2])
    name = entry[0] if entry else None
    extra = [int(g[2]) for g in groups_db if name and len(g) > 3 and name in g[3].split(",") and g[2].isdigit()]
    return uid, gid, sorted({gid, *extra}), home


def _read_db(path: str) -> list[list[str]]:
    """The entries of a passwd or group file; lines with fewer than 4 fields (NIS "+@netgroup", junk) are skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            entries = [line.rstrip("\n").split(":") for line in handle if not line.startswith("#")]
    except OSError:
        return []
    return [entry for entry in entries if len(entry) >= 4]


def _set_stdio(stdin_fd: int, stdout_fd: int, stderr_fd: int) -> None:
    with _Step("stdio"):
        os.dup2(stdin_fd if stdin_fd >= 0 else os.open("/dev/null", os.O_RDONLY), 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        # Only 0-2 reach the service: every other fd is closed or close-on-exec (the status pipe).
        linux.close_range(3, flags=linux.CLOSE_RANGE_CLOEXEC)


def _find_program(name: str, path: str) -> str:
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise StepError("exec", None, name, f"{name}: not found in PATH {path}")


def _child(op: str, plan: dict[str, Any], status_fd: int, fds: list[int]) -> None:
    """Run a launch or an exec; on any failure report it through the status pipe and exit 127."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        if op == "exec":
            _exec_stage_one(plan, status_fd, fds)
        else:
            _stage_one(plan, status_fd, fds[0], fds[1])
    except StepError as error:
        message = error.to_message()
    except BaseException as error:  # whatever happens, the caller must hear of it
        message = StepError("launch", error if isinstance(error, OSError) else None, "", repr(error)).to_message()
    try:
        os.write(status_fd, json.dumps(message).encode() + b"\n")
    finally:
        os._exit(127)


# --- the launcher's own loop ----------------------------------------------------------------------


class Launcher:
    """The event loop: requests on the control socket, launch status pipes, and SIGCHLD."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.selector = selectors.DefaultSelector()
        self.pending: dict[int, dict[str, Any]] = {}  # status pipe fd -> {"id", "pid", "buffer", "guard"}
        self.first_children: set[int] = set()
        self.launching: dict[int, int] = {}  # service pid -> status fd, until its launch is settled
        self.held_exits: dict[int, int] = {}  # exits of pids whose launch is not settled yet
        self.sigchld_r, sigchld_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sigchld_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        linux.set_child_subreaper(True)
        self.selector.register(control, selectors.EVENT_READ, self._on_request)
        self.selector.register(self.sigchld_r, selectors.EVENT_READ, self._on_sigchld)

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.data(key.fileobj) is False:
                    return

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        try:
            if fds:
                socket.send_fds(self.control, [json.dumps(message).encode()], fds)
            else:
                self.control.send(json.dumps(message).encode())
        except OSError:
            pass  # the supervisor is gone; services keep running

    def _on_request(self, _: object) -> bool:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, 8)
        except OSError:
            return False
        if not data:
            return False
        request = json.loads(data)
        if request["op"] in ("launch", "exec"):
            self._launch(request, fds)
        else:
            for fd in fds:
                os.close(fd)
            if request["op"] == "ping":
                self.send({"op": "pong", "id": request.get("id")})
        return True

    def _launch(self, request: dict[str, Any], fds: list[int]) -> None:
        plan = request["plan"]
        guard = _read_host_sysctls(plan) if request["op"] == "launch" else {}
        channel: socket.socket | None = None
        if request["op"] == "exec" and plan.get("tty"):
            # A socket instead of a pipe: the child sends the terminal's master fd through it.
            channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            status_r, status_w = channel.fileno(), theirs.detach()
        else:
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
        userns: tuple[int, int] | None = None
        if request["op"] == "launch" and plan.get("uid_map"):
            try:
                userns = _user_namespace(plan)
            except StepError as error:
                os.close(status_r)
                os.close(status_w)
                channel = None
                for fd in fds:
                    os.close(fd)
                self.send({"op": "failed", "id": request["id"], **error.to_message()})
                return
            plan = {**plan, "_userns_fd": userns[0], "_lower_fd": userns[1]}
        pid = os.fork()
        if pid == 0:
            os.close(status_r)
            _child(request["op"], plan, status_w, fds)
        os.close(status_w)
        for fd in [*fds, *(userns or ())]:
            os.close(fd)
        self.first_children.add(pid)
        os.set_blocking(status_r, False)
        self.pending[status_r] = {"id": request["id"], "pid": None, "buffer": b"", "guard": guard, "channel": channel}
        self.selector.register(status_r, selectors.EVENT_READ, self._on_status)

    def _on_status(self, fd: int) -> bool:
        state = self.pending[fd]
        channel = state["channel"]
        if channel is None:
            chunk = os.read(fd, 65536)
        else:
            chunk, fds, _flags, _addr = socket.recv_fds(channel, 65536, 1)
            state.setdefault("fds", []).extend(fds)
        if chunk:
            state["buffer"] += chunk
            lines = state["buffer"].split(b"\n")
            for line in lines[:-1]:
                message = json.loads(line)
                if "pid" in message:
                    state["pid"] = message["pid"]
                    self.launching[message["pid"]] = fd
                elif "tty" in message:
                    pass  # the master fd came with it
                else:
                    state.setdefault("error", message)  # the first failure is the cause
            state["buffer"] = lines[-1]
            return True
        # EOF: the service exec'd (the pipe is close-on-exec) or failed after reporting why.
        self.selector.unregister(fd)
        if channel is None:
            os.close(fd)
        else:
            channel.close()
        del self.pending[fd]
        passed = state.get("fds", [])
        pid = state["pid"]
        error = state.get("error")
        if error is None and pid is None:
            error = StepError("launch", None, "", "the launch process died before starting the service").to_message()
        if error is None:
            changed = _sysctl_guard(state["guard"])
            if changed:
                os.kill(pid, signal.SIGKILL)
                error = StepError(
                    "sysctl guard", None, changed, "the host's value changed: launch aborted"
                ).to_message()
        if pid is not None:
            self.launching.pop(pid, None)
        if error is not None:
            for passed_fd in passed:
                os.close(passed_fd)
            self.send({"op": "failed", "id": state["id"], **error})
            if pid is not None and pid in self.held_exits:
                del self.held_exits[pid]
            elif pid is not None:
                self.held_exits[pid] = -1  # swallow its exit: the caller heard "failed"
            return True
        self.send({"op": "started", "id": state["id"], "pid": pid}, passed)
        for passed_fd in passed:
            os.close(passed_fd)
        if pid in self.held_exits:
            self._report_exit(pid, self.held_exits.pop(pid))
        return True

    def _on_sigchld(self, fd: int) -> bool:
        try:
            os.read(fd, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return True
            if pid in self.first_children:
                self.first_children.discard(pid)
            elif pid in self.launching:
                self.held_exits[pid] = status
            elif self.held_exits.get(pid) == -1:
                del self.held_exits[pid]
            else:
                self._report_exit(pid, status)

    def _report_exit(self, pid: int, status: int) -> None:
        if os.WIFSIGNALED(status):
            self.send({"op": "exited", "pid": pid, "code": None, "signal": os.WTERMSIG(status)})
        else:
            self.send({"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status), "signal": None})


def _user_namespace(plan: dict[str, Any]) -> tuple[int, int]:
    """A user namespace with the plan's maps, and an idmapped clone of the lower directory for it.

    A short-lived child (the holder) creates the namespace and waits; the launcher, which holds
    CAP_SETUID/CAP_SETGID and CAP_SYS_ADMIN in the initial user namespace, writes its maps and makes the
    idmapped mount: only a process privileged over the filesystem's own user namespace may idmap a
    mount, so root of the new namespace could not. The service's first child then joins the namespace
    (setns) before it creates the others, so that they belong to it, and pid 1 attaches the mount as its
    overlay's lower layer: root inside owns what host root owns and writes through the overlay.
    """
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    holder = os.fork()
    if holder == 0:  # holds the namespace until the launcher has a descriptor of it
        try:
            os.close(hold_w)
            os.close(ready_r)
            try:
                linux.unshare(linux.CLONE_NEWUSER)
            except OSError as error:
                os.write(ready_w, str(error.errno or errno.EINVAL).encode())
            else:
                os.write(ready_w, b"u")
                os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    userns_fd = tree = -1
    try:
        answer = os.read(ready_r, 16)
        if answer != b"u":
            code = int(answer) if answer.isdigit() else errno.EIO
            raise StepError("create user namespace", OSError(code, os.strerror(code)))
        for name, entries in (("uid_map", plan["uid_map"]), ("gid_map", plan["gid_map"])):
            with _Step(f"write {name}", f"/proc/{holder}/{name}"):
                linux.write_file(f"/proc/{holder}/{name}", "".join(f"{a} {b} {c}\n" for a, b, c in entries))
        with _Step("open user namespace", f"/proc/{holder}/ns/user"):
            userns_fd = os.open(f"/proc/{holder}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        lower = plan["rootfs_lower"][0]
        with _Step("idmapped mount", lower):
            tree = linux.open_tree(lower, linux.OPEN_TREE_CLONE | linux.OPEN_TREE_CLOEXEC)
            linux.mount_setattr(
                "",
                linux.MOUNT_ATTR_IDMAP,
                propagation=linux.MS_PRIVATE,  # a clone of a shared mount ("/" under systemd) stays its peer
                flags=linux.AT_EMPTY_PATH,
                dfd=tree,
                userns_fd=userns_fd,
            )
        return userns_fd, tree
    except BaseException:
        for fd in (userns_fd, tree):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        os.close(ready_r)
        os.close(hold_w)  # the holder exits; the namespace lives on through userns_fd
        os.waitpid(holder, 0)


def _read_host_sysctls(plan: dict[str, Any]) -> dict[str, str | None]:
    """The host's values of the keys the service will set, to check afterwards that they held."""
    values: dict[str, str | None] = {}
    for key, _ in plan["sysctls"]:
        try:
            with open("/proc/sys/" + key) as handle:
                values[key] = handle.read()
        except OSError:
            values[key] = None
    return values


def _sysctl_guard(before: dict[str, str | None]) -> str:
    """The first key whose host value changed since the launch began, or ''."""
    after: dict[str, str | None] = {key: None for key in before}
    for key in before:
        try:
            with open("/proc/sys/" + key) as handle:
                after[key] = handle.read()
        except OSError:
            after[key] = None
        if after[key] != before[key]:
            return "/proc/sys/" + key
    return ""


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    Launcher(control).run()


if __name__ == "__main__":
    main()
