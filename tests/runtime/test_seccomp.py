"""Tests of stackd.runtime.seccomp: profiles compiled with libseccomp, loaded on the real kernel.

Every filter is loaded in a forked child (the test process itself is never filtered): the child runs
one function, sends its picklable result (or its traceback) through a pipe and leaves with os._exit;
the parent reaps it and asserts. Refused calls are made with arguments the kernel itself would reject
with another errno (a bad pointer, a bad flag, a missing path), and each is also made in an unfiltered
control child, so that EPERM can only come from the filter and nothing on the host changes if the
filter fails. Mounts only ever happen in a child's private mount namespace.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import mmap
import os
import pickle
import select
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from stackd.errors import LaunchError
from stackd.runtime import seccomp
from stackd.runtime.seccomp import (
    ALLOW,
    NEWER_X86_64_SYSCALLS,
    Action,
    ArgCondition,
    SeccompProfile,
    SyscallRule,
    compile_for_service,
    compile_profile,
    default_profile,
    errno_action,
    load_profile_file,
    resolve_syscall,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="system call numbers below are x86_64's"),
]

T = TypeVar("T")

_CHILD_TIMEOUT = 60.0
_DOCKER_CAPS = frozenset(
    "CAP_" + c
    for c in "CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP NET_BIND_SERVICE "
    "SYS_CHROOT KILL AUDIT_WRITE".split()
)

# --- running code in a child ------------------------------------------------------------------------


def _fork(fn: Callable[[], Any], timeout: float = _CHILD_TIMEOUT) -> tuple[int, bytes]:
    """Run `fn` in a forked child; (its wait status, the pickled ("ok", result) or ("error", tb))."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            try:
                payload = pickle.dumps(("ok", fn()))
            except BaseException:
                payload = pickle.dumps(("error", traceback.format_exc()))
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)  # our own child, by pid
                break
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    return status, b"".join(chunks)


def run_in_child(fn: Callable[[], T], timeout: float = _CHILD_TIMEOUT) -> T:
    """Run `fn` in a forked child and return its result; a failure there fails the test here."""
    status, data = _fork(fn, timeout)
    if not data:
        raise AssertionError(f"the child died without reporting (wait status {status:#x})")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"the child failed:\n{value}")
    assert os.waitstatus_to_exitcode(status) == 0
    result: T = value
    return result


# --- in the child: loading a filter and making raw system calls ------------------------------------

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    return libc


def load_filter(program: bytes) -> None:
    """The test's own loader: no_new_privs, then prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog)."""
    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


Arg = int | bytes | None


def syscall(number: int, *args: Arg) -> tuple[int, int]:
    """(return value, errno) of a raw system call; bytes become pointers to NUL-terminated copies."""
    libc = _libc()
    converted: list[Any] = []
    for arg in args:
        if isinstance(arg, bytes):
            converted.append(ctypes.c_char_p(arg))
        elif arg is None:
            converted.append(ctypes.c_void_p(None))
        else:
            converted.append(ctypes.c_long(arg) if arg < 1 << 63 else ctypes.c_ulong(arg))
    ctypes.set_errno(0)
    result = int(libc.syscall(ctypes.c_long(number), *converted))
    return result, (ctypes.get_errno() if result == -1 else 0)


def _status_field(name: str) -> str:
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    raise AssertionError(f"/proc/self/status has no {name}")


# x86_64 numbers, written out so that a wrong table in libseccomp or in stackd cannot hide here.
NR = {
    "socket": 41,
    "clone": 56,
    "mkdir": 83,
    "ptrace": 101,
    "syslog": 103,
    "personality": 135,
    "sysfs": 139,
    "pivot_root": 155,
    "chroot": 161,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "sethostname": 170,
    "iopl": 172,
    "ioperm": 173,
    "quotactl": 179,
    "clock_settime": 227,
    "mbind": 237,
    "set_mempolicy": 238,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "move_pages": 279,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "setns": 308,
    "kcmp": 312,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "clone3": 435,
    "mount_setattr": 442,
    "statmount": 457,
    "listmount": 458,
    "open_tree_attr": 467,
    "file_getattr": 468,
}
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_FS = 0x00000200  # with NEWNS or NEWUSER: EINVAL from the kernel, so nothing is created
_AF_ALG = 38
_AF_VSOCK = 40
_SOCK_SEQPACKET = 5
_NOPE = b"/nonexistent-stackd-seccomp-test/x"

#: (label, number, args, errno with the default profile). Without a filter each fails with another
#: errno (or succeeds harmlessly), which the control run checks.
REFUSED: list[tuple[str, int, tuple[Arg, ...], int]] = [
    ("mount", NR["mount"], (b"none", _NOPE, b"tmpfs", 0, None), errno.EPERM),
    ("umount2", NR["umount2"], (_NOPE, 0), errno.EPERM),
    ("pivot_root", NR["pivot_root"], (_NOPE, _NOPE), errno.EPERM),
    ("unshare(CLONE_NEWNS)", NR["unshare"], (_CLONE_NEWNS,), errno.EPERM),
    ("unshare(CLONE_NEWUSER)", NR["unshare"], (_CLONE_NEWUSER,), errno.EPERM),
    ("setns", NR["setns"], (-1, 0), errno.EPERM),
    ("clone(CLONE_NEWUSER)", NR["clone"], (_CLONE_NEWUSER | _CLONE_FS, 0, 0, 0, 0), errno.EPERM),
    ("clone(CLONE_NEWNS)", NR["clone"], (_CLONE_NEWNS | _CLONE_FS, 0, 0, 0, 0), errno.EPERM),
    ("clone3", NR["clone3"], (None, 0), errno.ENOSYS),
    ("keyctl", NR["keyctl"], (9999, 0, 0, 0, 0), errno.EPERM),
    ("add_key", NR["add_key"], (None, None, None, 0, 0), errno.EPERM),
    ("request_key", NR["request_key"], (None, None, None, 0), errno.EPERM),
    ("bpf", NR["bpf"], (9999, None, 0), errno.EPERM),
    ("perf_event_open", NR["perf_event_open"], (None, 0, -1, -1, 0), errno.EPERM),
    ("userfaultfd", NR["userfaultfd"], (0xFFFFFFFF,), errno.EPERM),
    ("io_uring_setup", NR["io_uring_setup"], (0, None), errno.EPERM),
    ("reboot", NR["reboot"], (0, 0, 0, None), errno.EPERM),
    ("swapon", NR["swapon"], (None, 0), errno.EPERM),
    ("swapoff", NR["swapoff"], (None,), errno.EPERM),
    ("acct", NR["acct"], (_NOPE,), errno.EPERM),
    ("settimeofday", NR["settimeofday"], (None, 1), errno.EPERM),
    ("clock_settime", NR["clock_settime"], (9999, None), errno.EPERM),
    ("syslog", NR["syslog"], (9999, None, 0), errno.EPERM),
    ("sethostname", NR["sethostname"], (b"x", 1000), errno.EPERM),
    ("iopl", NR["iopl"], (9999,), errno.EPERM),
    ("ioperm", NR["ioperm"], (0xFFFFFFFF, 1, 1), errno.EPERM),
    ("open_by_handle_at", NR["open_by_handle_at"], (-1, None, 0), errno.EPERM),
    ("quotactl", NR["quotactl"], (0, None, 0, None), errno.EPERM),
    ("sysfs", NR["sysfs"], (9999,), errno.EPERM),
    ("move_pages", NR["move_pages"], (0, 0, None, None, None, 0), errno.EPERM),
    ("mbind", NR["mbind"], (0, 0, 0, None, 0, 0), errno.EPERM),
    ("set_mempolicy", NR["set_mempolicy"], (9999, None, 0), errno.EPERM),
    ("fanotify_init", NR["fanotify_init"], (0xFFFFFFFF, 0), errno.EPERM),
    ("fsopen", NR["fsopen"], (None, 0), errno.EPERM),
    ("fsconfig", NR["fsconfig"], (-1, 0, None, None, 0), errno.EPERM),
    ("fsmount", NR["fsmount"], (-1, 0, 0), errno.EPERM),
    ("move_mount", NR["move_mount"], (-1, None, -1, None, 0), errno.EPERM),
    ("open_tree", NR["open_tree"], (-1, None, 0), errno.EPERM),
    ("mount_setattr", NR["mount_setattr"], (-1, None, 0, None, 0), errno.EPERM),
    ("chroot (no CAP_SYS_CHROOT)", NR["chroot"], (_NOPE,), errno.EPERM),
    ("kcmp", NR["kcmp"], (-1, -1, 9999, 0, 0), errno.EPERM),
    ("personality(ADDR_NO_RANDOMIZE)", NR["personality"], (0x0040000,), errno.EPERM),
    ("socket(AF_ALG)", NR["socket"], (_AF_ALG, _SOCK_SEQPACKET, 0), errno.EPERM),
    ("socket(AF_VSOCK)", NR["socket"], (_AF_VSOCK, socket.SOCK_STREAM, 0), errno.EPERM),
    # Docker's "family > AF_VSOCK" rule lets this through; the kernel truncates it to AF_ALG.
    ("socket(1 << 32 | AF_ALG)", NR["socket"], (1 << 32 | _AF_ALG, _SOCK_SEQPACKET, 0), errno.EPERM),
    # Newer than every call the default profile names: ENOSYS, so a libc falls back (as runc does).
    ("open_tree_attr (newer)", NR["open_tree_attr"], (-1, None, 0, None, 0), errno.ENOSYS),
    ("file_getattr (newer)", NR["file_getattr"], (-1, None, None, 0, 0), errno.ENOSYS),
]

#: Calls the default profile lets through, as Docker's does: their errno comes from the kernel.
LET_THROUGH: list[tuple[str, int, tuple[Arg, ...]]] = [
    ("ptrace (Docker allows it on kernels >= 4.8)", NR["ptrace"], (2, 1 << 30, 0, 0)),  # PEEKDATA: ESRCH
    ("name_to_handle_at", NR["name_to_handle_at"], (-1, None, None, None, 0)),
    ("clock_adjtime (reads need no capability)", NR["clock_adjtime"], (9999, None)),
    ("personality(query)", NR["personality"], (0xFFFFFFFF,)),
    ("statmount (newer than this libseccomp)", NR["statmount"], (None, None, 0, 0)),
    ("listmount (newer than this libseccomp)", NR["listmount"], (None, None, 0, 0)),
]


def _make_calls(calls: Sequence[tuple[str, int, tuple[Arg, ...]]]) -> dict[str, tuple[int, int]]:
    """In the child: each call in turn, (result, errno) by label."""
    results = {}
    for label, number, args in calls:
        result, err = syscall(number, *args)
        if result >= 0 and number == NR["socket"]:
            os.close(result)
        results[label] = (result, err)
    return results


def _control(calls: Sequence[tuple[str, int, tuple[Arg, ...]]]) -> dict[str, tuple[int, int]]:
    """What the kernel alone answers: each call in a fresh unfiltered child (one call's success, such
    as unshare(CLONE_NEWUSER), must not change the next one's answer)."""
    answers = {}
    for call in calls:
        answers[call[0]] = run_in_child(functools.partial(_make_one_call, call))
    return answers


def _make_one_call(call: tuple[str, int, tuple[Arg, ...]]) -> tuple[int, int]:
    return _make_calls([call])[call[0]]


def _ordinary_work(tmp: Path) -> dict[str, Any]:
    """What every service does: fork and exec, pipes, files, sockets, threads."""
    work: dict[str, Any] = {}
    work["true"] = subprocess.run(["/bin/true"], check=False).returncode
    shell = subprocess.run(["sh", "-c", "echo hi"], capture_output=True, check=False)
    work["echo"] = (shell.returncode, shell.stdout)
    path = tmp / "data.txt"
    with open(path, "w") as out:
        out.write("hello seccomp\n")
    work["file"] = path.read_text()
    os.unlink(path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        work["tcp"] = tcp.getsockname()[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
        work["unix"] = unix.family == socket.AF_UNIX
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(os.getpid()))  # clone3 -> ENOSYS -> clone
    thread.start()
    thread.join()
    work["thread"] = results == [os.getpid()]
    work["getpid"] = os.getpid()
    pid = os.fork()  # clone without namespace flags
    if pid == 0:
        os._exit(7)
    work["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return work


# --- the default profile on the kernel --------------------------------------------------------------


def test_default_profile_refuses_and_lets_ordinary_work_run(tmp_path: Path) -> None:
    program = compile_profile(default_profile())
    calls = [(label, number, args) for label, number, args, _ in REFUSED] + LET_THROUGH

    control = _control(calls)

    def child() -> tuple[dict[str, tuple[int, int]], dict[str, Any], str]:
        load_filter(program)
        return _make_calls(calls), _ordinary_work(tmp_path), _status_field("Seccomp")

    filtered, work, mode = run_in_child(child)
    assert mode == "2"
    assert _status_field("Seccomp") == "0", "the test process itself must stay unfiltered"
    for label, _, _, expected in REFUSED:
        assert control[label][1] != expected, f"{label}: the kernel alone gives {errno.errorcode[expected]}"
        assert filtered[label] == (-1, expected), f"{label}: {filtered[label]} (control {control[label]})"
    for label, _, _ in LET_THROUGH:
        assert filtered[label] == control[label], f"{label}: {filtered[label]} (control {control[label]})"
        assert filtered[label][1] != errno.EPERM, label
    assert work["true"] == 0
    assert work["echo"] == (0, b"hi\n")
    assert work["file"] == "hello seccomp\n"
    assert work["tcp"] == "127.0.0.1"
    assert work["unix"] and work["thread"]
    assert work["fork"] == 7
    assert work["getpid"] not in (os.getpid(), 0)


def test_default_profile_loads_through_the_launchers_loader() -> None:
    """The bytes are what stackd._sys.linux.load_seccomp_bpf (the launcher's loader) expects."""
    from stackd._sys import linux

    program = compile_profile(default_profile(_DOCKER_CAPS))

    def child() -> tuple[tuple[int, int], tuple[int, int], str]:
        linux.set_no_new_privs()
        linux.load_seccomp_bpf(program)
        return syscall(NR["unshare"], _CLONE_NEWNS), syscall(NR["chroot"], _NOPE), _status_field("Seccomp")

    unshare, chroot, mode = run_in_child(child)
    assert unshare == (-1, errno.EPERM)
    assert chroot == (-1, errno.ENOENT), "Docker's default capabilities include CAP_SYS_CHROOT"
    assert mode == "2"


def test_cap_sys_admin_allows_mount_in_a_private_namespace(tmp_path: Path) -> None:
    program = compile_profile(default_profile({"CAP_SYS_ADMIN"}))
    target = tmp_path / "mnt"
    target.mkdir()
    ms_rec, ms_private = 0x4000, 1 << 18

    def child() -> dict[str, Any]:
        load_filter(program)
        found: dict[str, Any] = {"unshare": syscall(NR["unshare"], _CLONE_NEWNS)}
        found["private"] = syscall(NR["mount"], None, b"/", None, ms_rec | ms_private, None)
        found["mount"] = syscall(NR["mount"], b"stackd-test", os.fsencode(target), b"tmpfs", 0, b"size=1m")
        with open("/proc/self/mountinfo") as mountinfo:
            found["mounted"] = any(f" {target} " in line and "tmpfs" in line for line in mountinfo)
        (target / "file").write_text("on tmpfs")
        found["umount"] = syscall(NR["umount2"], os.fsencode(target), 0)
        found["clone3"] = syscall(NR["clone3"], None, 0)
        found["keyctl"] = syscall(NR["keyctl"], 9999, 0, 0, 0, 0)
        return found

    found = run_in_child(child)
    assert found["unshare"] == (0, 0)
    assert found["private"] == (0, 0)
    assert found["mount"] == (0, 0)
    assert found["mounted"]
    assert found["umount"] == (0, 0)
    assert found["clone3"][1] not in (errno.ENOSYS, errno.EPERM), "with CAP_SYS_ADMIN clone3 reaches the kernel"
    assert found["keyctl"] == (-1, errno.EPERM), "keyrings stay refused whatever the capabilities"
    assert not (target / "file").exists(), "the tmpfs was only ever mounted in the child's namespace"
    with open("/proc/self/mountinfo") as mountinfo:
        assert str(target) not in mountinfo.read()


def test_capabilities_grant_their_calls_on_the_kernel() -> None:
    caps = {"CAP_SYS_PTRACE", "CAP_SYS_TIME", "CAP_SYSLOG", "CAP_BPF", "CAP_SYS_NICE", "CAP_SYS_CHROOT"}
    calls = [
        ("kcmp", NR["kcmp"], (-1, -1, 9999, 0, 0)),
        ("clock_settime", NR["clock_settime"], (9999, None)),
        ("syslog", NR["syslog"], (9999, None, 0)),
        ("bpf", NR["bpf"], (9999, None, 0)),
        ("set_mempolicy", NR["set_mempolicy"], (9999, None, 0)),
        ("chroot", NR["chroot"], (_NOPE,)),
        ("mount (no CAP_SYS_ADMIN)", NR["mount"], (b"none", _NOPE, b"tmpfs", 0, None)),
    ]
    program = compile_profile(default_profile(caps))
    control = _control(calls)

    def child() -> dict[str, tuple[int, int]]:
        load_filter(program)
        return _make_calls(calls)

    filtered = run_in_child(child)
    for label, _, _ in calls[:-1]:
        assert filtered[label] == control[label] != (-1, errno.EPERM), label
    assert filtered["mount (no CAP_SYS_ADMIN)"] == (-1, errno.EPERM)


_I386_GETPID = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20 (i386 getpid); int 0x80; ret


def _i386_getpid() -> int:
    """getpid through the i386 ABI (int 0x80) from this 64-bit process."""
    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(_I386_GETPID)
    address = ctypes.addressof(ctypes.c_char.from_buffer(code))
    return int(ctypes.CFUNCTYPE(ctypes.c_int)(address)())


def test_other_abis_are_killed_unless_a_profile_admits_them(tmp_path: Path) -> None:
    status, data = _fork(lambda: _i386_getpid() == os.getpid())
    if not data or not pickle.loads(data)[1]:
        pytest.skip(f"this kernel has no i386 emulation (control child: wait status {status:#x})")
    default = compile_profile(default_profile())

    def default_child() -> int:
        load_filter(default)
        return _i386_getpid()

    status, data = _fork(default_child)
    assert not data
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, f"wait status {status:#x}"

    path = tmp_path / "i386.json"
    archmap = [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}]
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "archMap": archmap, "syscalls": []}))
    profile = load_profile_file(path)
    assert profile.architectures == ("x32", "x86")
    admitting = compile_profile(profile)

    def admitting_child() -> bool:
        load_filter(admitting)
        return _i386_getpid() == os.getpid()

    assert run_in_child(admitting_child) is True


# --- Docker-format profile files --------------------------------------------------------------------


def _write(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document, indent=2))
    return path


def test_profile_file_denying_mkdir_with_eacces(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "seccomp.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {
                    "names": ["mkdir", "mkdirat", "no_such_call_stackd"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": errno.EACCES,
                    "comment": "unknown names are skipped, as Docker does",
                }
            ],
        },
    )
    program = compile_profile(load_profile_file(path))
    target = tmp_path / "newdir"

    def child() -> tuple[int | None, str, bool]:
        load_filter(program)
        code = None
        try:
            os.mkdir(target)
        except OSError as error:
            code = error.errno
        other = tmp_path / "other.txt"
        other.write_text("still works")
        return code, other.read_text(), target.exists()

    code, text, exists = run_in_child(child)
    assert code == errno.EACCES
    assert text == "still works"
    assert not exists
    os.mkdir(target)  # the test process is unfiltered


def test_profile_file_args_on_the_same_argument_are_alternatives(tmp_path: Path) -> None:
    """runc's reading: conditions on the same argument each make a rule of their own (any may hold)."""
    path = _write(
        tmp_path / "p.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {
                    "names": ["personality"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": errno.EACCES,
                    "args": [
                        {"index": 0, "value": 0x0040000, "op": "SCMP_CMP_EQ"},
                        {"index": 0, "value": 0x0020000, "op": "SCMP_CMP_EQ"},
                    ],
                },
                {
                    "names": ["sethostname"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": errno.EXDEV,
                    "args": [
                        {"index": 0, "value": 0, "op": "SCMP_CMP_NE"},
                        {"index": 1, "value": 0xFF, "valueTwo": 0x10, "op": "SCMP_CMP_MASKED_EQ"},
                    ],
                },
            ],
        },
    )
    program = compile_profile(load_profile_file(path))

    def child() -> list[tuple[int, int]]:
        load_filter(program)
        return [
            syscall(NR["personality"], 0x0040000),
            syscall(NR["personality"], 0x0020000),
            syscall(NR["personality"], 0xFFFFFFFF),
            syscall(NR["sethostname"], b"x", 0x1010),  # both conditions hold: EXDEV
            syscall(NR["sethostname"], b"x", 1000),  # len & 0xff != 0x10: the kernel's EINVAL
        ]

    results = run_in_child(child)
    assert results[0] == (-1, errno.EACCES)
    assert results[1] == (-1, errno.EACCES)
    assert results[2][0] >= 0
    assert results[3] == (-1, errno.EXDEV)
    assert results[4] == (-1, errno.EINVAL)


def test_profile_file_includes_and_excludes(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.json",
        {
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": errno.EPERM,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
            "flags": ["SECCOMP_FILTER_FLAG_TSYNC"],
            "syscalls": [
                {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                {
                    "names": ["chroot"],
                    "action": "SCMP_ACT_ALLOW",
                    "includes": {"caps": ["CAP_SYS_ADMIN", "SYS_CHROOT"]},
                },
                {
                    "names": ["clone3"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": 38,
                    "excludes": {"caps": ["CAP_SYS_ADMIN"]},
                },
                {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64", "x32"]}},
                {"names": ["cacheflush"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm64"]}},
                {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.8"}},
                {"names": ["kexec_load"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.0"}},
                {"name": "uname", "action": "SCMP_ACT_LOG", "excludes": {"minKernel": "99.0", "arches": ["s390x"]}},
            ],
        },
    )

    def names(profile: SeccompProfile) -> set[str]:
        return {name for rule in profile.rules for name in rule.names}

    plain = load_profile_file(path)
    assert plain.default_action == errno_action(errno.EPERM)
    assert plain.architectures == ()  # aarch64 is no ABI of this CPU; x86_64 is the native one
    assert names(plain) == {"read", "write", "clone3", "arch_prctl", "ptrace", "uname"}
    admin = load_profile_file(path, capabilities={"CAP_SYS_ADMIN"})
    assert names(admin) == {"read", "write", "mount", "arch_prctl", "ptrace", "uname"}
    both = load_profile_file(path, capabilities={"CAP_SYS_ADMIN", "CAP_SYS_CHROOT"})
    assert "chroot" in names(both)
    assert plain.source == str(path)
    assert [str(rule.action) for rule in plain.rules if rule.names == ("uname",)] == ["SCMP_ACT_LOG"]
    assert len(compile_profile(plain)) % 8 == 0


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "p.json: an array is not an object (expected {...})"),
        ({"syscalls": []}, "p.json: defaultAction: missing"),
        ({"defaultAction": "SCMP_ACT_FOO"}, 'p.json: defaultAction: "SCMP_ACT_FOO" is not an action'),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{}, {"names": ["mkdir"], "action": "SCMP_ACT_FOO"}]},
            "p.json: syscalls[0].names: missing",
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_FOO"}]},
            'p.json: syscalls[0].action: "SCMP_ACT_FOO" is not an action (allowed: SCMP_ACT_ALLOW, '
            "SCMP_ACT_ERRNO, SCMP_ACT_KILL, ",
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNOO"}]},
            'did you mean "SCMP_ACT_ERRNO"?',
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}],
            },
            "p.json: syscalls[0].errnoRet: only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take an errno, not SCMP_ACT_ALLOW",
        ),
        (
            {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 5000},
            "p.json: defaultErrnoRet: 5000 is not an errno (use an integer from 0 to 4095)",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "arg": []}],
            },
            'p.json: syscalls[0].arg: unknown key (did you mean "args"?)',
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["mkdir"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}],
                    }
                ],
            },
            "p.json: syscalls[0].args[0].index: 6 is not an argument index (use an integer from 0 to 5)",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["mkdir"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}],
                    }
                ],
            },
            "p.json: syscalls[0].args[0].value: -1 is not an argument value",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["mkdir"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQUAL"}],
                    }
                ],
            },
            'p.json: syscalls[0].args[0].op: "SCMP_CMP_EQUAL" is not a comparison',
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mk dir"], "action": "SCMP_ACT_ERRNO"}]},
            'p.json: syscalls[0].names[0]: "mk dir" is not a system call name',
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"name": "a", "names": ["b"], "action": "SCMP_ACT_ERRNO"}],
            },
            'p.json: syscalls[0].name: give either "name" or "names", not both',
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": "mkdir", "action": "SCMP_ACT_ERRNO"}]},
            'p.json: syscalls[0].names: "mkdir" is not an array',
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_65"]},
            'p.json: architectures[0]: "SCMP_ARCH_X86_65" is not an architecture (did you mean "SCMP_ARCH_X86_64"?)',
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86"],
                "archMap": [{"architecture": "SCMP_ARCH_X86_64"}],
            },
            'p.json: archMap: give either "architectures" or "archMap", not both',
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "archMap": [{"subArchitectures": []}]},
            "p.json: archMap[0].architecture: missing",
        ),
        (
            {"defaultAction": "SCMP_ACT_NOTIFY"},
            'p.json: defaultAction: "SCMP_ACT_NOTIFY" needs a seccomp agent, which stackd does not support',
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"},
            "p.json: listenerPath: seccomp notify agents are not supported by stackd",
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NOPE"]},
            'p.json: flags[0]: "SECCOMP_FILTER_FLAG_NOPE" is not a seccomp flag',
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "includes": {"minKernel": "4"}}],
            },
            'p.json: syscalls[0].includes.minKernel: "4" is not a kernel version (write "<kernel>.<major>"',
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "excludes": {"caps": "CAP_SYS_ADMIN"}}],
            },
            'p.json: syscalls[0].excludes.caps: "CAP_SYS_ADMIN" is not an array',
        ),
    ],
)
def test_malformed_profiles_name_the_json_path(tmp_path: Path, document: object, message: str) -> None:
    path = _write(tmp_path / "p.json", document)
    with pytest.raises(ValueError) as caught:
        load_profile_file(path)
    assert str(caught.value).startswith(str(path.parent) + "/"), str(caught.value)
    assert message in str(caught.value)


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{\n  "defaultAction": "SCMP_ACT_ALLOW"\n  "syscalls": []\n}\n')
    with pytest.raises(ValueError, match=r"p\.json: line 3, column 3: invalid JSON: Expecting ','"):
        load_profile_file(path)


def test_conflicting_rules_are_reported_as_libseccomp_resolves_them(tmp_path: Path) -> None:
    """Docker loads profiles whose rules contradict each other (podman's default has one) and
    libseccomp keeps one rule: find_conflicts says which, and the kernel agrees."""
    personality_if = {"index": 0, "value": 0x0040000, "op": "SCMP_CMP_EQ"}
    path = _write(
        tmp_path / "p.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES},
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV},
                {
                    "names": ["personality"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": errno.EACCES,
                    "args": [personality_if],
                },
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV},
                {"names": ["umask"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV},
                {"names": ["umask"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV},
            ],
        },
    )
    profile = load_profile_file(path)
    assert seccomp.find_conflicts(profile) == [
        f"{path}: syscalls[1]: mkdir: SCMP_ACT_ERRNO(EXDEV) is ignored: {path}: syscalls[0] gives it "
        "SCMP_ACT_ERRNO(EACCES)",
        f"{path}: syscalls[2]: personality: SCMP_ACT_ERRNO(EACCES) is ignored: {path}: syscalls[3] gives it "
        "SCMP_ACT_ERRNO(EXDEV)",
    ]
    program = compile_profile(profile)

    def child() -> tuple[tuple[int, int], tuple[int, int]]:
        load_filter(program)
        return syscall(NR["mkdir"], _NOPE, 0o700), syscall(NR["personality"], 0x0040000)

    assert run_in_child(child) == ((-1, errno.EACCES), (-1, errno.EXDEV))
    assert seccomp.find_conflicts(default_profile()) == []
    assert seccomp.find_conflicts(default_profile({"CAP_SYS_ADMIN", "CAP_SYS_PTRACE"})) == []


def test_contradicting_conditional_rules_are_refused_with_their_origin(tmp_path: Path) -> None:
    args = [{"index": 1, "value": 0o700, "op": "SCMP_CMP_EQ"}]
    path = _write(
        tmp_path / "p.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "args": args},
                {"names": ["mkdir"], "action": "SCMP_ACT_KILL_PROCESS", "args": args},
            ],
        },
    )
    with pytest.raises(ValueError, match=r"p\.json: syscalls\[1\]: mkdir: libseccomp refused the rule \(another rule"):
        compile_profile(load_profile_file(path))


# --- the model and the compiler, without loading ----------------------------------------------------


def test_compile_is_cached_by_content() -> None:
    assert compile_profile(None) is None
    first = compile_profile(default_profile({"CAP_NET_ADMIN"}))
    again = compile_profile(default_profile(frozenset({"NET_ADMIN"})))
    assert again is first
    copy = SeccompProfile(errno_action(errno.EPERM), default_profile().rules, source="elsewhere")
    assert compile_profile(copy) is compile_profile(default_profile())
    assert compile_profile(default_profile({"CAP_SYS_ADMIN"})) != compile_profile(default_profile())


def test_compile_time_and_size_of_the_default_profile() -> None:
    profile = default_profile(_DOCKER_CAPS)
    times = []
    for _ in range(20):
        seccomp._compile_cached.cache_clear()
        start = time.perf_counter()
        program = compile_profile(profile)
        times.append(time.perf_counter() - start)
    times.sort()
    print(
        f"\ndefault profile: compiled in {times[len(times) // 2] * 1e3:.2f} ms median "
        f"({times[0] * 1e3:.2f} .. {times[-1] * 1e3:.2f} ms), {len(program)} bytes = {len(program) // 8} BPF "
        f"instructions, libseccomp {'.'.join(map(str, seccomp.libseccomp_version()))}"
    )
    assert 0 < len(program) // 8 <= 4096
    assert len(program) % 8 == 0


def test_default_profile_follows_docker_on_capabilities() -> None:
    """Independent of seccomp_default.py: which capability lets which call through (moby's profile)."""
    grants = {
        "CAP_SYS_ADMIN": {
            "mount",
            "umount2",
            "unshare",
            "setns",
            "fsopen",
            "move_mount",
            "bpf",
            "perf_event_open",
            "quotactl",
            "syslog",
            "sethostname",
            "clone",
            "clone3",
        },
        "CAP_SYS_BOOT": {"reboot"},
        "CAP_SYS_MODULE": {"init_module", "finit_module", "delete_module"},
        "CAP_SYS_PACCT": {"acct"},
        "CAP_SYS_PTRACE": {"kcmp", "pidfd_getfd", "process_madvise"},
        "CAP_SYS_RAWIO": {"iopl", "ioperm"},
        "CAP_SYS_TIME": {"settimeofday", "clock_settime"},
        "CAP_SYS_TTY_CONFIG": {"vhangup"},
        "CAP_SYS_NICE": {"mbind", "set_mempolicy", "get_mempolicy"},
        "CAP_SYSLOG": {"syslog"},
        "CAP_BPF": {"bpf"},
        "CAP_PERFMON": {"perf_event_open"},
        "CAP_DAC_READ_SEARCH": {"open_by_handle_at"},
        "CAP_SYS_CHROOT": {"chroot"},
    }
    never = set(
        "keyctl add_key request_key userfaultfd io_uring_setup io_uring_enter io_uring_register kexec_load "
        "kexec_file_load swapon swapoff move_pages migrate_pages nfsservctl uselib ustat sysfs _sysctl "
        "create_module get_kernel_syms query_module vm86 open_tree_attr listns pivot_root".split()
    )

    def unconditional(profile: SeccompProfile) -> set[str]:
        return {n for rule in profile.rules if rule.action == ALLOW and not rule.args for n in rule.names}

    bare = unconditional(default_profile())
    everything = unconditional(default_profile(set(grants)))
    for capability, names in grants.items():
        assert not names & bare, f"allowed without {capability}: {names & bare}"
        assert names <= unconditional(default_profile({capability})), capability
    assert not never & everything
    assert {"ptrace", "process_vm_readv", "name_to_handle_at", "adjtimex", "arch_prctl", "mseal"} <= bare
    assert "lookup_dcookie" in unconditional(default_profile({"CAP_SYS_ADMIN"}))
    clone_rules = [rule for rule in default_profile().rules if rule.names == ("clone",)]
    assert clone_rules == [SyscallRule(("clone",), ALLOW, (ArgCondition(0, "SCMP_CMP_MASKED_EQ", 0x7E020000, 0),))]
    assert all(rule.names != ("clone3",) for rule in default_profile({"CAP_SYS_ADMIN"}).rules)


def test_newer_x86_64_table_agrees_with_libseccomp() -> None:
    for name, number in NEWER_X86_64_SYSCALLS.items():
        assert resolve_syscall(name) == number, name
        known = int(seccomp._lib().seccomp_syscall_resolve_name(name.encode()))
        assert known in (-1, number), f"{name}: libseccomp says {known}, stackd's table {number}"
    assert resolve_syscall("mkdir") == NR["mkdir"]
    assert resolve_syscall("no_such_call_stackd") is None
    socketcall = resolve_syscall("socketcall")  # i386 only: a negative pseudo number here
    assert socketcall is not None and socketcall < 0


def test_model_validates_its_values() -> None:
    with pytest.raises(ValueError, match='"SCMP_ACT_NOPE" is not an action'):
        Action("SCMP_ACT_NOPE")
    with pytest.raises(ValueError, match="takes no errno"):
        Action("SCMP_ACT_ALLOW", 1)
    assert Action("SCMP_ACT_ERRNO") == errno_action(errno.EPERM)
    assert Action("SCMP_ACT_KILL") == Action("SCMP_ACT_KILL_THREAD")
    assert errno_action(errno.ENOSYS).value == 0x00050026
    assert str(errno_action(errno.EACCES)) == "SCMP_ACT_ERRNO(EACCES)"
    with pytest.raises(ValueError, match="not an argument index"):
        ArgCondition(6, "SCMP_CMP_EQ", 0)
    with pytest.raises(ValueError, match="not an argument value"):
        ArgCondition(0, "SCMP_CMP_EQ", 1 << 64)
    with pytest.raises(ValueError, match="not a system call name"):
        SyscallRule(("",), ALLOW)
    with pytest.raises(ValueError, match="not another ABI"):
        SeccompProfile(ALLOW, (), ("aarch64",))


def test_compile_for_service(tmp_path: Path) -> None:
    def service(choice: object) -> Any:
        return SimpleNamespace(name="web", security_opt=SimpleNamespace(seccomp=choice))

    assert compile_for_service(service("unconfined"), frozenset()) is None
    assert compile_for_service(service("default"), _DOCKER_CAPS) == compile_profile(default_profile(_DOCKER_CAPS))
    good = _write(tmp_path / "good.json", {"defaultAction": "SCMP_ACT_ALLOW"})
    assert compile_for_service(service(good), frozenset()) == compile_profile(load_profile_file(good))
    bad = _write(tmp_path / "bad.json", {"defaultAction": "SCMP_ACT_NOPE"})
    with pytest.raises(LaunchError, match=r"service web: seccomp: .*bad\.json: defaultAction: \"SCMP_ACT_NOPE\""):
        compile_for_service(service(bad), frozenset())
    with pytest.raises(LaunchError, match=r"service web: seccomp: .*missing\.json: No such file"):
        compile_for_service(service(tmp_path / "missing.json"), frozenset())
