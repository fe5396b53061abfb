"""Tests of stackd._sys.linux on the real kernel, as root.

Everything that changes a process (namespaces, mounts, prctl flags, seccomp) happens in a forked child:
the child runs one function, sends its result (or its traceback) back through a pipe and leaves with
os._exit; the parent asserts. The test process itself is never changed. Host resources (a named netns)
are removed by finalizers registered before they are created; mounts only ever exist in the child's
private mount namespace, and the parent checks that its own mount table never shows them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from forkchild import CHILD_TIMEOUT, read_until_eof, run_in_child

from stackd._sys import linux

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and the real kernel"),
]

T = TypeVar("T")

_GETPPID_NR = {"x86_64": 110, "aarch64": 173}


# ---------------------------------------------------------------------------------------------------
# Helpers


def _error_info(exc: OSError) -> tuple[int | None, str | None, str | None, str]:
    return exc.errno, exc.filename, exc.filename2, str(exc)


def _private_mount_ns() -> None:
    """In the child: a new mount namespace whose mounts do not propagate back to the host."""
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)


def _host_mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line for line in mountinfo if str(path) in line]


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo]


@pytest.fixture
def no_host_mounts(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, and the promise that the test's mounts never show up in the host's mount table."""
    assert _host_mounts_under(tmp_path) == []
    yield tmp_path
    assert _host_mounts_under(tmp_path) == [], "a mount leaked into the host's mount namespace"


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> str:
    """A named network namespace (ip netns add), deleted at teardown."""
    name = f"sdsys-{os.getpid()}-{secrets.token_hex(3)}"
    request.addfinalizer(lambda: subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False))
    subprocess.run(["ip", "netns", "add", name], capture_output=True, check=True)
    return name


def _status_field(name: str, pid: int | str = "self") -> str:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


# ---------------------------------------------------------------------------------------------------
# UTS namespace


def test_unshare_uts_and_sethostname_change_only_the_child() -> None:
    host_name = os.uname().nodename
    with open("/proc/sys/kernel/domainname") as f:
        host_domain = f.read().strip()
    wanted = f"sdsys-{secrets.token_hex(4)}"

    def child() -> tuple[str, str, str]:
        linux.unshare(linux.CLONE_NEWUTS)
        linux.sethostname(wanted)
        linux.setdomainname(wanted + ".domain")
        with open("/proc/sys/kernel/domainname") as f:
            domain = f.read().strip()
        return os.uname().nodename, socket.gethostname(), domain

    nodename, gethostname, domain = run_in_child(child)
    assert nodename == gethostname == wanted
    assert domain == wanted + ".domain"
    assert os.uname().nodename == host_name != wanted
    with open("/proc/sys/kernel/domainname") as f:
        assert f.read().strip() == host_domain


def test_sethostname_too_long_is_einval_naming_the_value() -> None:
    def child() -> tuple[int | None, str | None, str | None, str]:
        linux.unshare(linux.CLONE_NEWUTS)
        try:
            linux.sethostname("x" * 65)
        except OSError as exc:
            return _error_info(exc)
        raise AssertionError("sethostname accepted 65 bytes")

    err, filename, _, text = run_in_child(child)
    assert err == errno.EINVAL
    assert filename == "x" * 65
    assert "Invalid argument" in text


def test_write_file_sets_a_namespaced_sysctl() -> None:
    host_name = os.uname().nodename

    def child() -> str:
        linux.unshare(linux.CLONE_NEWUTS)
        linux.write_file("/proc/sys/kernel/hostname", "via-proc-sys")
        return os.uname().nodename

    assert run_in_child(child) == "via-proc-sys"
    assert os.uname().nodename == host_name


def test_write_file_errors_carry_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError) as caught:
        linux.write_file(missing, "1")
    assert caught.value.filename == str(missing)

    def child() -> tuple[int | None, str | None, str | None, str]:
        try:
            linux.write_file("/proc/self/oom_score_adj", "not-a-number")
        except OSError as exc:
            return _error_info(exc)
        raise AssertionError("the kernel accepted a non-number")

    err, filename, _, text = run_in_child(child)
    assert err == errno.EINVAL
    assert filename == "/proc/self/oom_score_adj"
    assert "/proc/self/oom_score_adj" in text


def test_unshare_error() -> None:
    def child() -> tuple[int | None, str | None, str | None, str]:
        try:
            linux.unshare(0x1)  # a CSIGNAL bit: not a flag unshare accepts
        except OSError as exc:
            return _error_info(exc)
        raise AssertionError("unshare accepted a bad flag")

    err, _, _, text = run_in_child(child)
    assert err == errno.EINVAL
    assert "0x1" in text


# ---------------------------------------------------------------------------------------------------
# PID namespace


def test_unshare_newpid_makes_the_next_child_pid_1() -> None:
    def child() -> tuple[int, int]:
        linux.unshare(linux.CLONE_NEWPID)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write_end, str(os.getpid()).encode())
            os._exit(0)
        os.close(write_end)
        seen = int(os.read(read_end, 32))
        os.waitpid(pid, 0)
        return os.getpid(), seen

    own, inner = run_in_child(child)
    assert inner == 1
    assert own != 1


# ---------------------------------------------------------------------------------------------------
# Mounts and pivot_root


def test_pivot_root_into_a_tmpfs_tree(no_host_mounts: Path) -> None:
    base = no_host_mounts / "base"
    base.mkdir()

    def child() -> tuple[list[str], str, list[str]]:
        _private_mount_ns()
        linux.mount("tmpfs", base, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=1m,mode=0755")
        root = base / "root"
        for sub in ("etc", "old", "srv/data"):
            (root / sub).mkdir(parents=True)
        (root / "etc" / "marker").write_text("inside\n")
        linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)
        linux.pivot_root(root, root / "old")
        os.chdir("/")
        linux.umount2("/old", linux.MNT_DETACH)
        os.rmdir("/old")
        with open("/etc/marker") as marker:
            text = marker.read().strip()
        return sorted(os.listdir("/")), text, sorted(os.listdir("/srv"))

    listing, marker, srv = run_in_child(child)
    assert listing == ["etc", "srv"]
    assert marker == "inside"
    assert srv == ["data"]
    assert list(base.iterdir()) == []  # the tmpfs existed only in the child's namespace


def test_pivot_root_on_a_non_mountpoint_is_einval_with_the_path(no_host_mounts: Path) -> None:
    """The launcher's likely slip: a rootfs directory that was not bind-mounted onto itself."""
    base = no_host_mounts / "base"
    base.mkdir()
    plain = base / "plain"

    def child() -> tuple[int | None, str | None, str | None, str]:
        _private_mount_ns()  # so that a pivot_root that wrongly succeeded could not hurt the host
        linux.mount("tmpfs", base, "tmpfs", 0, "size=1m")
        (plain / "old").mkdir(parents=True)
        try:
            linux.pivot_root(plain, plain / "old")
        except OSError as exc:
            return _error_info(exc)
        raise AssertionError("pivot_root succeeded on a plain directory")

    err, filename, filename2, text = run_in_child(child)
    assert err == errno.EINVAL
    assert filename == str(plain)
    assert filename2 == str(plain / "old")
    assert str(plain) in text
    assert "Invalid argument" in text
    assert "mount point" in text


def test_mount_and_umount2_errors_carry_the_paths(no_host_mounts: Path) -> None:
    missing = no_host_mounts / "missing"
    plain = no_host_mounts / "plain"
    plain.mkdir()

    def child() -> list[tuple[int | None, str | None, str | None, str]]:
        _private_mount_ns()
        found = []
        calls: list[Callable[[], None]] = [
            lambda: linux.mount("tmpfs", missing, "tmpfs"),
            lambda: linux.mount(missing, plain, None, linux.MS_BIND),
            lambda: linux.umount2(plain),
            lambda: linux.mount("none", plain, "no-such-filesystem-type"),
        ]
        for call in calls:
            try:
                call()
            except OSError as exc:
                found.append(_error_info(exc))
            else:
                raise AssertionError("expected an error")
        return found

    tmpfs_on_missing, bind_from_missing, umount_plain, bad_type = run_in_child(child)
    assert tmpfs_on_missing[:3] == (errno.ENOENT, str(missing), "tmpfs")
    assert bind_from_missing[:3] == (errno.ENOENT, str(plain), str(missing))
    assert umount_plain[:2] == (errno.EINVAL, str(plain))
    assert bad_type[:2] == (errno.ENODEV, str(plain))


def test_umount2_detach_removes_the_mount(no_host_mounts: Path) -> None:
    target = no_host_mounts / "target"
    target.mkdir()

    def child() -> tuple[bool, bool, bool]:
        _private_mount_ns()
        linux.mount("tmpfs", target, "tmpfs", 0, "size=1m")
        (target / "file").write_text("x")
        mounted = os.path.ismount(target)
        linux.umount2(target, linux.MNT_DETACH)
        return mounted, os.path.ismount(target), (target / "file").exists()

    assert run_in_child(child) == (True, False, False)


def test_make_readonly_recursive_covers_submounts(no_host_mounts: Path) -> None:
    top = no_host_mounts / "top"
    top.mkdir()

    def child() -> tuple[int | None, int | None, bool]:
        _private_mount_ns()
        linux.mount("tmpfs", top, "tmpfs", 0, "size=1m")
        (top / "sub").mkdir()
        linux.mount("tmpfs", top / "sub", "tmpfs", 0, "size=1m")
        linux.make_readonly_recursive(top)
        errors: list[int | None] = []
        for path in (top / "a", top / "sub" / "b"):
            try:
                path.write_text("x")
            except OSError as exc:
                errors.append(exc.errno)
            else:
                errors.append(None)
        # and back: clearing the flag recursively makes both writable again
        linux.mount_setattr(top, attr_clr=linux.MOUNT_ATTR_RDONLY)
        (top / "sub" / "c").write_text("x")
        return errors[0], errors[1], (top / "sub" / "c").exists()

    assert run_in_child(child) == (errno.EROFS, errno.EROFS, True)


def test_mount_setattr_error_carries_the_path(no_host_mounts: Path) -> None:
    missing = no_host_mounts / "missing"
    with pytest.raises(FileNotFoundError) as caught:  # fails in path lookup: nothing changes
        linux.mount_setattr(missing, linux.MOUNT_ATTR_RDONLY)
    assert caught.value.filename == str(missing)


def test_open_tree_clone_and_attach_mount(no_host_mounts: Path) -> None:
    source = no_host_mounts / "source"
    target = no_host_mounts / "target"
    source.mkdir()
    target.mkdir()
    (source / "hello").write_text("world")

    def child() -> tuple[str, bool, tuple[int | None, str | None, str | None, str]]:
        _private_mount_ns()
        fd = linux.open_tree(source)
        try:
            linux.attach_mount(fd, target)
            try:
                linux.attach_mount(fd, no_host_mounts / "missing")
            except OSError as exc:
                error = _error_info(exc)
            else:
                raise AssertionError("attached to a missing path")
        finally:
            os.close(fd)
        text = (target / "hello").read_text()
        mounted = str(target) in _mount_points()
        linux.umount2(target)
        return text, mounted, error

    text, mounted, error = run_in_child(child)
    assert (text, mounted) == ("world", True)
    assert error[0] == errno.ENOENT
    assert error[1] == str(no_host_mounts / "missing")


def test_open_tree_error_carries_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        linux.open_tree(tmp_path / "missing")
    assert caught.value.filename == str(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------
# setns


def test_setns_into_a_named_netns(netns: str) -> None:
    path = f"/run/netns/{netns}"
    expected = f"net:[{os.stat(path).st_ino}]"
    host_ns = os.readlink("/proc/self/ns/net")
    assert host_ns != expected

    def by_path() -> tuple[str, list[str]]:
        linux.setns_path(path, linux.CLONE_NEWNET)
        return os.readlink("/proc/self/ns/net"), [name for _, name in socket.if_nameindex()]

    def by_fd() -> tuple[str, tuple[int | None, str | None, str | None, str]]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, linux.CLONE_NEWUTS)
        except OSError as exc:
            wrong_type = _error_info(exc)
        else:
            raise AssertionError("setns accepted a netns fd as a UTS namespace")
        linux.setns(fd)
        os.close(fd)
        return os.readlink("/proc/self/ns/net"), wrong_type

    ns, links = run_in_child(by_path)
    assert ns == expected
    assert links == ["lo"]
    ns, wrong_type = run_in_child(by_fd)
    assert ns == expected
    assert wrong_type[0] == errno.EINVAL
    assert wrong_type[1] is not None
    assert path in wrong_type[1]
    assert os.readlink("/proc/self/ns/net") == host_ns


def test_setns_path_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        linux.setns_path(tmp_path / "nope", linux.CLONE_NEWNET)
    assert caught.value.filename == str(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------
# prctl


def test_no_new_privs_in_child_only() -> None:
    assert _status_field("NoNewPrivs") == "0"
    assert linux.get_no_new_privs() is False

    def child() -> tuple[bool, str]:
        linux.set_no_new_privs()
        return linux.get_no_new_privs(), _status_field("NoNewPrivs")

    assert run_in_child(child) == (True, "1")
    assert _status_field("NoNewPrivs") == "0"


def test_keepcaps_dumpable_and_prctl_errors() -> None:
    def child() -> tuple[bool, bool, int, int | None, int | None]:
        linux.set_keepcaps(True)
        on = linux.get_keepcaps()
        linux.set_keepcaps(False)
        off = linux.get_keepcaps()
        linux.set_dumpable(False)
        dumpable = linux.prctl(linux.PR_GET_DUMPABLE)
        errors: list[int | None] = []
        for option, arg in ((linux.PR_CAPBSET_READ, 999), (0x7FFF_FFF0, 0)):
            try:
                linux.prctl(option, arg)
            except OSError as exc:
                errors.append(exc.errno)
        return on, off, dumpable, errors[0], errors[1]

    assert run_in_child(child) == (True, False, 0, errno.EINVAL, errno.EINVAL)


def test_pdeathsig_kills_the_orphan() -> None:
    """A sets up B with pdeathsig SIGKILL and exits; B must die with it."""
    read_end, write_end = os.pipe()
    a = os.fork()
    if a == 0:  # A
        code = 1
        try:
            os.close(read_end)
            ready_r, ready_w = os.pipe()
            a_pid = os.getpid()
            b = os.fork()
            if b == 0:  # B
                try:
                    os.close(write_end)  # so that the parent sees EOF once A is gone, whatever B does
                    linux.set_pdeathsig(signal.SIGKILL)
                    if os.getppid() != a_pid:  # A died before pdeathsig was armed: nothing to test
                        os._exit(3)
                    os.write(ready_w, str(linux.get_pdeathsig()).encode())
                    while True:
                        signal.pause()
                finally:
                    os._exit(2)
            os.close(ready_w)
            seen = os.read(ready_r, 32).decode()
            os.write(write_end, f"{b} {seen}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        reply = read_until_eof(read_end, a, CHILD_TIMEOUT).decode()
    finally:
        os.close(read_end)
    _, status = os.waitpid(a, 0)
    assert os.waitstatus_to_exitcode(status) == 0, reply
    b_text, seen = reply.split()
    try:
        pidfd: int | None = os.pidfd_open(int(b_text))
    except ProcessLookupError:
        pidfd = None  # already dead and reaped by init
    try:
        assert int(seen) == signal.SIGKILL
        if pidfd is not None:
            ready, _, _ = select.select([pidfd], [], [], 10)
            assert ready, "the orphan outlived its parent despite PR_SET_PDEATHSIG"
    finally:
        if pidfd is not None:
            if not select.select([pidfd], [], [], 0)[0]:  # B (ours) still alive: end it
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)


def test_child_subreaper_adopts_orphans() -> None:
    def child() -> tuple[bool, bool, int]:
        before = linux.get_child_subreaper()
        linux.set_child_subreaper()
        after = linux.get_child_subreaper()
        release_r, release_w = os.pipe()
        pid_r, pid_w = os.pipe()
        b = os.fork()
        if b == 0:  # B: starts C, reports its pid and exits, orphaning C
            try:
                c = os.fork()
                if c == 0:  # C: waits until released
                    try:
                        os.close(release_w)
                        os.read(release_r, 1)
                    finally:
                        os._exit(7)
                os.write(pid_w, str(c).encode())
            finally:
                os._exit(0)
        os.close(pid_w)
        c = int(os.read(pid_r, 32))
        os.waitpid(b, 0)
        os.write(release_w, b"x")
        _, status = os.waitpid(c, 0)  # ChildProcessError unless C was re-parented to us
        assert before is False
        return before, after, os.waitstatus_to_exitcode(status)

    assert run_in_child(child) == (False, True, 7)


# ---------------------------------------------------------------------------------------------------
# Seccomp


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K


def _deny_getppid_filter() -> bytes:
    """return ERRNO(EPERM) for getppid, allow every other native system call, kill on a foreign arch."""
    return b"".join(
        [
            _bpf(_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
            _bpf(_BPF_JEQ_K, 1, 0, linux.audit_arch()),
            _bpf(_BPF_RET_K, 0, 0, linux.SECCOMP_RET_KILL_PROCESS),
            _bpf(_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
            _bpf(_BPF_JEQ_K, 0, 1, _GETPPID_NR[linux.ARCH]),
            _bpf(_BPF_RET_K, 0, 0, linux.SECCOMP_RET_ERRNO | errno.EPERM),
            _bpf(_BPF_RET_K, 0, 0, linux.SECCOMP_RET_ALLOW),
        ]
    )


@pytest.mark.skipif(linux.ARCH not in _GETPPID_NR, reason="getppid number known for x86_64 and aarch64")
def test_load_seccomp_bpf_denies_getppid() -> None:
    prog = _deny_getppid_filter()

    def child() -> tuple[int, int, int, str, int, int]:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        before = int(libc.syscall(ctypes.c_long(_GETPPID_NR[linux.ARCH])))
        linux.set_no_new_privs()
        linux.load_seccomp_bpf(prog)
        ctypes.set_errno(0)
        after = int(libc.syscall(ctypes.c_long(_GETPPID_NR[linux.ARCH])))
        err = ctypes.get_errno()
        return before, after, err, _status_field("Seccomp"), linux.get_seccomp_mode(), os.getpid()

    parent_pid = os.getpid()
    before, after, err, seccomp, mode, child_pid = run_in_child(child)
    assert before == parent_pid
    assert (after, err) == (-1, errno.EPERM)
    assert seccomp == "2"
    assert mode == linux.SECCOMP_MODE_FILTER
    assert child_pid not in (0, -1, parent_pid)
    assert _status_field("Seccomp") == "0"


def test_load_seccomp_bpf_rejects_bad_programs() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        linux.load_seccomp_bpf(b"\0" * 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        linux.load_seccomp_bpf(b"")
    with pytest.raises(ValueError, match="at most 4096"):
        linux.load_seccomp_bpf(_bpf(_BPF_RET_K, 0, 0, linux.SECCOMP_RET_ALLOW) * 4097)

    def child() -> tuple[int | None, str, str]:
        linux.set_no_new_privs()
        try:
            linux.load_seccomp_bpf(_bpf(_BPF_LD_W_ABS, 0, 0, 0))  # no return instruction
        except OSError as exc:
            return exc.errno, str(exc), _status_field("Seccomp")
        raise AssertionError("the kernel accepted a program without a return")

    err, text, seccomp = run_in_child(child)
    assert err == errno.EINVAL
    assert "seccomp" in text
    assert seccomp == "0"


# ---------------------------------------------------------------------------------------------------
# close_range


def _close_range_check() -> tuple[list[bool], list[bool], list[int | None]]:
    fds = []
    for n in range(4):
        fd = os.open("/dev/null", os.O_RDONLY)
        fds.append(os.dup2(fd, 300 + n))
        os.close(fd)
    linux.close_range(300, 302, linux.CLOSE_RANGE_CLOEXEC)
    inheritable = [os.get_inheritable(fd) for fd in fds]
    linux.close_range(301, 302)
    closed: list[int | None] = []
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError as exc:
            closed.append(exc.errno)
        else:
            closed.append(None)
    linux.close_range(300)
    still_open = [os.get_inheritable(fd) for fd in (0, 1, 2)]  # EBADF here if fds below 300 were closed
    return inheritable, still_open, closed


def test_close_range_cloexec_and_close() -> None:
    inheritable, _, closed = run_in_child(_close_range_check)
    assert inheritable == [False, False, False, True]
    assert closed == [None, errno.EBADF, errno.EBADF, None]


def test_close_range_fallback_without_the_syscall() -> None:
    def child() -> tuple[list[bool], list[bool], list[int | None]]:
        def enosys(name: str, *args: Any) -> int:
            ctypes.set_errno(errno.ENOSYS)
            return -1

        linux._raw_syscall = enosys  # this child only
        return _close_range_check()

    inheritable, _, closed = run_in_child(child)
    assert inheritable == [False, False, False, True]
    assert closed == [None, errno.EBADF, errno.EBADF, None]


# ---------------------------------------------------------------------------------------------------
# Architecture table


def test_syscall_numbers_for_this_machine() -> None:
    assert os.uname().machine == linux.ARCH
    assert linux._NR is not None, "tests run on x86_64 or aarch64"
    assert linux._NR["pivot_root"] == {"x86_64": 155, "aarch64": 41}[linux.ARCH]
    assert linux.audit_arch() == {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[linux.ARCH]


def test_unknown_architecture_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linux, "ARCH", "riscv64")
    monkeypatch.setattr(linux, "_NR", None)
    # _nr() raises before any system call is made, so this is safe in the test process.
    with pytest.raises(OSError, match="riscv64") as caught:
        linux.pivot_root("/nonexistent", "/nonexistent/old")
    assert caught.value.errno == errno.ENOSYS
    assert "x86_64 and aarch64" in str(caught.value)
    with pytest.raises(OSError, match="riscv64"):
        linux.audit_arch()
