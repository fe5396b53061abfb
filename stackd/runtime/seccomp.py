"""Seccomp profiles (stackd's default, Docker-format JSON files) compiled to classic BPF with libseccomp.

    profile = default_profile(frozenset({"CAP_CHOWN", "CAP_SYS_CHROOT"}))   # or load_profile_file(path, ...)
    bpf = compile_profile(profile)          # bytes of struct sock_filter; cached by the profile's content
    ...                                     # the launcher's child: set_no_new_privs(); load_seccomp_bpf(bpf)

The launcher imports only the standard library, so it cannot use libseccomp: the supervisor compiles
each distinct profile once, here, with libseccomp's `seccomp_export_bpf`, and the launcher loads the raw
program just before exec (`stackd._sys.linux.load_seccomp_bpf`). libseccomp (libseccomp.so.2, in every
Debian, Ubuntu and Fedora base) is used through the few ctypes declarations below: the one binding on
PyPI (pyseccomp) has had no release since 2021 and types nothing, and this needs a dozen functions.

Choices, and why:

- Architectures: the filter admits the native architecture only (x86_64 on this host); a system call
  made through another ABI of the same CPU (i386 through int 0x80, x32) kills the process with SIGSYS.
  Docker also admits i386 and x32, but no service stackd runs from the host's root needs them, and the
  32-bit entry points are a classic source of kernel bugs and of filter gaps (on i386, socket(2) goes
  through socketcall(2), which no argument filter can see). A profile file can still ask for them with
  `architectures` or `archMap` (only the native architecture's own sub-architectures are honoured).
- System calls newer than this libseccomp: a name libseccomp cannot resolve is skipped, as Docker does,
  except the x86_64 calls in `NEWER_X86_64_SYSCALLS`, whose numbers stackd knows itself, so that
  Docker's allowlist works on a kernel newer than the library (fchmodat2, mseal, statmount, ...).
- Calls newer than the profile fail with ENOSYS, not EPERM, as runc arranges for Docker: every native
  system call number above the highest one the profile names (up to 511) gets ERRNO(ENOSYS), so a libc
  that tries a new call and falls back on ENOSYS keeps working under an old profile. Not done when the
  default action is an allowing one (ALLOW, LOG, TRACE), nor for the extra architectures of a file.
- Argument rules follow runc: the conditions of one rule must all hold, except that when two conditions
  test the same argument each becomes a rule of its own (either may hold). A rule whose action is the
  default action is dropped.
- Contradicting rules: as in Docker, libseccomp keeps one of two rules that give a call different
  actions (an unconditional rule beats conditional ones; of two unconditional ones the first wins), and
  the profile loads; `find_conflicts` names the ignored rules for a warning. Two conditional rules with
  the same conditions and different actions are refused (ValueError), as runc refuses them.
- socket(2) in the default profile: Docker refuses AF_ALG and AF_VSOCK with rules a family of
  0x1_00000026 slips through (the filter compares 64 bits, the kernel uses the low 32); stackd's rules
  refuse it (families above AF_VSOCK are allowed up to 255).
- A bad architecture (see above) gets SCMP_ACT_KILL_PROCESS rather than libseccomp's KILL_THREAD.
- Long filters use libseccomp's binary-tree layout (runc does the same above 32 system calls).
- Loading is the launcher's business: with no_new_privs it needs no capability; without it (security_opt
  "no-new-privileges:false") the filter must be loaded while the process still holds CAP_SYS_ADMIN.
"""

from __future__ import annotations

import ctypes
import errno as errno_module
import functools
import json
import os
import platform
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from stackd.errors import LaunchError
from stackd.runtime.seccomp_default import ALLOWED, ALLOWED_ON_ARCH, ALLOWED_WITH_CAPABILITY
from stackd.spec.problems import did_you_mean as _did_you_mean

if TYPE_CHECKING:
    from stackd.spec.models import Service

__all__ = [
    "ACTIONS",
    "ALLOW",
    "ARCHITECTURES",
    "CLONE_NAMESPACE_FLAGS",
    "NEWER_X86_64_SYSCALLS",
    "OPERATORS",
    "Action",
    "ArgCondition",
    "SeccompProfile",
    "SeccompUnavailableError",
    "SyscallRule",
    "compile_for_service",
    "compile_profile",
    "default_profile",
    "errno_action",
    "export_pfc",
    "find_conflicts",
    "libseccomp_version",
    "load_profile_file",
    "resolve_syscall",
]

# --- the model --------------------------------------------------------------------------------------

#: Docker's action names and libseccomp's values (SCMP_ACT_ERRNO and SCMP_ACT_TRACE take a number).
ACTIONS: dict[str, int] = {
    "SCMP_ACT_ALLOW": 0x7FFF0000,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_KILL": 0x00000000,
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000,
}
_TAKES_ERRNO = frozenset({"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"})
_ALLOWING = frozenset({"SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE"})
#: The largest return value seccomp passes on (MAX_ERRNO).
_MAX_ERRNO = 4095

#: Docker's comparison names and libseccomp's `enum scmp_compare`.
OPERATORS: dict[str, int] = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

#: Docker's architecture names and libseccomp's.
ARCHITECTURES: dict[str, str] = {
    "SCMP_ARCH_X86": "x86",
    "SCMP_ARCH_X86_64": "x86_64",
    "SCMP_ARCH_X32": "x32",
    "SCMP_ARCH_ARM": "arm",
    "SCMP_ARCH_AARCH64": "aarch64",
    "SCMP_ARCH_LOONGARCH64": "loongarch64",
    "SCMP_ARCH_M68K": "m68k",
    "SCMP_ARCH_MIPS": "mips",
    "SCMP_ARCH_MIPS64": "mips64",
    "SCMP_ARCH_MIPS64N32": "mips64n32",
    "SCMP_ARCH_MIPSEL": "mipsel",
    "SCMP_ARCH_MIPSEL64": "mipsel64",
    "SCMP_ARCH_MIPSEL64N32": "mipsel64n32",
    "SCMP_ARCH_PPC": "ppc",
    "SCMP_ARCH_PPC64": "ppc64",
    "SCMP_ARCH_PPC64LE": "ppc64le",
    "SCMP_ARCH_PARISC": "parisc",
    "SCMP_ARCH_PARISC64": "parisc64",
    "SCMP_ARCH_RISCV64": "riscv64",
    "SCMP_ARCH_S390": "s390",
    "SCMP_ARCH_S390X": "s390x",
    "SCMP_ARCH_SH": "sh",
    "SCMP_ARCH_SHEB": "sheb",
}

#: `platform.machine()` -> (libseccomp's name of it, other ABIs the CPU runs, Docker's name in
#: includes/excludes "arches").
_MACHINES: dict[str, tuple[str, frozenset[str], str]] = {
    "x86_64": ("x86_64", frozenset({"x86", "x32"}), "amd64"),
    "aarch64": ("aarch64", frozenset({"arm"}), "arm64"),
    "armv7l": ("arm", frozenset(), "arm"),
    "i686": ("x86", frozenset(), "x86"),
    "ppc64le": ("ppc64le", frozenset(), "ppc64le"),
    "s390x": ("s390x", frozenset({"s390"}), "s390x"),
    "riscv64": ("riscv64", frozenset(), "riscv64"),
    "loongarch64": ("loongarch64", frozenset(), "loong64"),
}

#: x86_64 system calls added to Linux after the oldest libseccomp stackd supports (2.5.4 knows up to
#: set_mempolicy_home_node, 450); used only for names the running libseccomp cannot resolve.
#: From arch/x86/entry/syscalls/syscall_64.tbl.
NEWER_X86_64_SYSCALLS: dict[str, int] = {
    "uretprobe": 335,  # 6.11
    "cachestat": 451,  # 6.5
    "fchmodat2": 452,  # 6.6
    "map_shadow_stack": 453,  # 6.6
    "futex_wake": 454,  # 6.7
    "futex_wait": 455,
    "futex_requeue": 456,
    "statmount": 457,  # 6.8
    "listmount": 458,
    "lsm_get_self_attr": 459,
    "lsm_set_self_attr": 460,
    "lsm_list_modules": 461,
    "mseal": 462,  # 6.10
    "setxattrat": 463,  # 6.13
    "getxattrat": 464,
    "listxattrat": 465,
    "removexattrat": 466,
    "open_tree_attr": 467,  # 6.15
    "file_getattr": 468,  # 6.17
    "file_setattr": 469,
    "listns": 470,  # after 6.18
}
#: Native system call numbers above the profile's highest and below this return ENOSYS (see above).
_ENOSYS_STUB_END = 512

_SYSCALL_NAME = re.compile(r"[a-z0-9_]{1,64}")


@dataclass(frozen=True, slots=True)
class Action:
    """What the filter does with a system call: a Docker action name, and for SCMP_ACT_ERRNO and
    SCMP_ACT_TRACE the number returned (EPERM when not given, as in Docker)."""

    name: str
    errno: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ACTIONS:
            hint = _hint(self.name, ACTIONS) if isinstance(self.name, str) else ""
            raise ValueError(f"{_show(self.name)} is not an action{hint} (allowed: {', '.join(ACTIONS)})")
        if self.name == "SCMP_ACT_KILL":
            object.__setattr__(self, "name", "SCMP_ACT_KILL_THREAD")
        if self.name in _TAKES_ERRNO:
            if self.errno is None:
                object.__setattr__(self, "errno", errno_module.EPERM)
            elif type(self.errno) is not int or not 0 <= self.errno <= _MAX_ERRNO:
                raise ValueError(f"{_show(self.errno)} is not an errno (use a number from 0 to {_MAX_ERRNO})")
        elif self.errno is not None:
            raise ValueError(f"{self.name} takes no errno (only SCMP_ACT_ERRNO and SCMP_ACT_TRACE do)")

    @property
    def value(self) -> int:
        """libseccomp's action value (`SCMP_ACT_ERRNO(EPERM)` is 0x00050001)."""
        return ACTIONS[self.name] | (self.errno or 0)

    @property
    def allows(self) -> bool:
        """Whether the call runs (ALLOW, LOG; TRACE too, when a tracer lets it)."""
        return self.name in _ALLOWING

    def __str__(self) -> str:
        if self.errno is None:
            return self.name
        return f"{self.name}({errno_module.errorcode.get(self.errno, str(self.errno))})"


ALLOW = Action("SCMP_ACT_ALLOW")


def errno_action(code: int) -> Action:
    """SCMP_ACT_ERRNO(code): the call fails with `code` without running."""
    return Action("SCMP_ACT_ERRNO", code)


@dataclass(frozen=True, slots=True)
class ArgCondition:
    """A test of one system call argument: `args[index] <op> value`; for SCMP_CMP_MASKED_EQ,
    `args[index] & value == value_two` (Docker's `value` is the mask)."""

    index: int
    op: str
    value: int
    value_two: int = 0

    def __post_init__(self) -> None:
        if type(self.index) is not int or not 0 <= self.index <= 5:
            raise ValueError(f"{_show(self.index)} is not an argument index (use 0 to 5)")
        if self.op not in OPERATORS:
            hint = _hint(self.op, OPERATORS) if isinstance(self.op, str) else ""
            raise ValueError(f"{_show(self.op)} is not a comparison{hint} (allowed: {', '.join(OPERATORS)})")
        for value in (self.value, self.value_two):
            if type(value) is not int or not 0 <= value < 1 << 64:
                raise ValueError(f"{_show(value)} is not an argument value (use an integer from 0 to 2**64 - 1)")


@dataclass(frozen=True, slots=True)
class SyscallRule:
    """`action` for the named system calls, when every argument condition holds (see the module's
    notes for conditions on the same argument). `origin` only names the rule in messages."""

    names: tuple[str, ...]
    action: Action
    args: tuple[ArgCondition, ...] = ()
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in self.names:
            if not isinstance(name, str) or not _SYSCALL_NAME.fullmatch(name):
                raise ValueError(f'{_show(name)} is not a system call name (e.g. "mkdir")')


@dataclass(frozen=True, slots=True)
class SeccompProfile:
    """A whole filter: the default action, the rules, and the architectures admitted besides the native
    one (libseccomp names such as "x86"). Equal profiles compile to the same, cached, program."""

    default_action: Action
    rules: tuple[SyscallRule, ...]
    architectures: tuple[str, ...] = ()
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        extra = _native()[1]
        for arch in self.architectures:
            if arch not in extra:
                allowed = ", ".join(sorted(extra)) or "none"
                raise ValueError(f"{_show(arch)} is not another ABI of this {_native()[0]} CPU (allowed: {allowed})")


# --- stackd's default profile -----------------------------------------------------------------------

#: clone(2) flags that create namespaces (Docker's mask; CLONE_NEWTIME only exists for clone3/unshare).
CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_AF_ALG = 38
_AF_VSOCK = 40
_FAMILY_MAX = 255
#: personality(2) values Docker allows: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and query.
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


def default_profile(capabilities: Iterable[str] = frozenset()) -> SeccompProfile:
    """stackd's default profile for a service holding `capabilities` (its final set, names such as
    "CAP_SYS_ADMIN"), with the effect of Docker's default profile (see seccomp_default.py)."""
    return _default_profile(frozenset(_capability_name(c) for c in capabilities))


@functools.lru_cache(maxsize=64)
def _default_profile(capabilities: frozenset[str]) -> SeccompProfile:
    machine = platform.machine()
    allowed = set(ALLOWED) | ALLOWED_ON_ARCH.get(machine, frozenset())
    for capability, names in ALLOWED_WITH_CAPABILITY.items():
        if capability in capabilities:
            allowed |= names
    origin = "stackd's default profile"
    rules = [SyscallRule(tuple(sorted(allowed)), ALLOW, origin=origin)]
    # socket(2) for every address family but AF_ALG (kernel crypto) and AF_VSOCK (host <-> guest).
    # Docker allows "family > AF_VSOCK", which also admits 0x1_00000026: the filter sees 64 bits, the
    # kernel truncates the int to AF_ALG. Here families above AF_VSOCK are allowed up to 255 only (the
    # kernel knows fewer than 64), as aligned blocks `family & mask == value`.
    rules += [
        SyscallRule(("socket",), ALLOW, (ArgCondition(0, "SCMP_CMP_LT", _AF_ALG),), origin),
        SyscallRule(("socket",), ALLOW, (ArgCondition(0, "SCMP_CMP_EQ", _AF_ALG + 1),), origin),
    ]
    rules += [
        SyscallRule(("socket",), ALLOW, (ArgCondition(0, "SCMP_CMP_MASKED_EQ", mask, value),), origin)
        for mask, value in _aligned_blocks(_AF_VSOCK + 1, _FAMILY_MAX)
    ]
    rules += [
        SyscallRule(("personality",), ALLOW, (ArgCondition(0, "SCMP_CMP_EQ", p),), origin) for p in _PERSONALITIES
    ]
    if "CAP_SYS_ADMIN" not in capabilities:
        # clone without namespace flags (s390 passes the flags second); clone3 passes them in memory a
        # filter cannot read, so it fails with ENOSYS and libc falls back to clone.
        index = 1 if machine.startswith("s390") else 0
        no_namespaces = ArgCondition(index, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS, 0)
        rules.append(SyscallRule(("clone",), ALLOW, (no_namespaces,), origin))
        rules.append(SyscallRule(("clone3",), errno_action(errno_module.ENOSYS), (), origin))
    return SeccompProfile(errno_action(errno_module.EPERM), tuple(rules), source=origin)


def _aligned_blocks(low: int, high: int) -> Iterator[tuple[int, int]]:
    """(mask, value) pairs whose matches `arg & mask == value` together are exactly low..high."""
    while low <= high:
        size = low & -low if low else 1 << 64
        while low + size - 1 > high:
            size >>= 1
        yield ((1 << 64) - size, low)
        low += size


def _capability_name(name: str) -> str:
    upper = name.strip().upper()
    return upper if upper.startswith("CAP_") else "CAP_" + upper


# --- Docker-format profile files --------------------------------------------------------------------


def load_profile_file(path: str | os.PathLike[str], *, capabilities: Iterable[str] = frozenset()) -> SeccompProfile:
    """Read a Docker-format seccomp profile (`docker run --security-opt seccomp=FILE`) for a service
    holding `capabilities`, resolving its includes/excludes (caps, arches, minKernel) as Docker does.

    Raises ValueError naming the file, the JSON path and what is allowed, e.g.
    `seccomp.json: syscalls[3].action: "SCMP_ACT_FOO" is not an action (allowed: ...)`; OSError when the
    file cannot be read. System call names unknown here are skipped at compile time, as Docker does.
    """
    label = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{label}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{label}: line {error.lineno}, column {error.colno}: invalid JSON: {error.msg}") from None
    caps = frozenset(_capability_name(c) for c in capabilities)
    return _ProfileReader(label, caps).profile(document)


# Unknown keys are refused (Docker ignores them): a misspelt "args" would silently widen a rule.
# "defaultErrno" and "errno" are containers/common's (podman's) names of the numbers, informational
# there too: the numeric defaultErrnoRet / errnoRet decide.
_TOP_KEYS = ("defaultAction", "defaultErrnoRet", "defaultErrno", "architectures", "archMap", "syscalls", "flags")
_UNSUPPORTED_TOP_KEYS = {
    "listenerPath": "seccomp notify agents are not supported by stackd",
    "listenerMetadata": "seccomp notify agents are not supported by stackd",
}
_SYSCALL_KEYS = ("names", "name", "action", "errnoRet", "errno", "args", "comment", "includes", "excludes")
_ARG_KEYS = ("index", "value", "valueTwo", "op")
_FILTER_KEYS = ("caps", "arches", "minKernel")
_ARCHMAP_KEYS = ("architecture", "subArchitectures")
#: Load flags a profile may name. stackd loads every filter the same way (no TSYNC needed in a
#: single-threaded child, no logging, speculation mitigations left on), so they are accepted and ignored.
_FLAGS = ("SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW")
_NO_KEYS: Mapping[str, str] = {}


class _ProfileReader:
    """Turns a parsed Docker profile into a SeccompProfile, with errors that say where."""

    def __init__(self, label: str, capabilities: frozenset[str]) -> None:
        self.label = label
        self.capabilities = capabilities

    def fail(self, where: str, message: str) -> ValueError:
        return ValueError(f"{self.label}: {where}: {message}" if where else f"{self.label}: {message}")

    def mapping(
        self, value: object, where: str, keys: Sequence[str], unsupported: Mapping[str, str] = _NO_KEYS
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"{_show(value)} is not an object (expected {{...}})")
        for key in value:
            if key in unsupported:
                raise self.fail(_join(where, key), unsupported[key])
            if key not in keys:
                hint = _hint(key, keys)
                raise self.fail(_join(where, key), f"unknown key{hint} (allowed: {', '.join(keys)})")
        return value

    def array(self, value: object, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"{_show(value)} is not an array (expected [...])")
        return value

    def string(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"{_show(value)} is not a string")
        return value

    def strings(self, value: object, where: str) -> list[str]:
        """An array of strings; null or missing is empty."""
        return [self.string(item, f"{where}[{i}]") for i, item in enumerate(self.array(value or [], where))]

    def choice(self, value: object, where: str, choices: Iterable[str], what: str) -> str:
        text = self.string(value, where)
        if text not in choices:
            hint = _hint(text, choices)
            raise self.fail(where, f"{_show(text)} is not {what}{hint} (allowed: {', '.join(choices)})")
        return text

    def integer(self, value: object, where: str, low: int, high: int, what: str) -> int:
        if type(value) is not int or not low <= value <= high:
            raise self.fail(where, f"{_show(value)} is not {what} (use an integer from {low} to {high})")
        return value

    def profile(self, document: object) -> SeccompProfile:
        top = self.mapping(document, "", _TOP_KEYS, _UNSUPPORTED_TOP_KEYS)
        if "defaultAction" not in top:
            raise self.fail(
                "defaultAction",
                'missing (e.g. "SCMP_ACT_ERRNO"; to run without seccomp, use security_opt "seccomp=unconfined")',
            )
        default = self.action(top["defaultAction"], top.get("defaultErrnoRet"), "defaultAction", "defaultErrnoRet")
        if "defaultErrno" in top:
            self.string(top["defaultErrno"], "defaultErrno")
        architectures = self.architectures(top)
        for index, flag in enumerate(self.array(top.get("flags") or [], "flags")):
            self.choice(flag, f"flags[{index}]", _FLAGS, "a seccomp flag")
        rules: list[SyscallRule] = []
        for index, entry in enumerate(self.array(top.get("syscalls") or [], "syscalls")):
            rule = self.rule(entry, f"syscalls[{index}]")
            if rule is not None:
                rules.append(rule)
        return SeccompProfile(default, tuple(rules), architectures, source=self.label)

    def action(self, name: object, errno: object, where: str, errno_where: str) -> Action:
        text = self.string(name, where)
        if text == "SCMP_ACT_NOTIFY":
            raise self.fail(where, '"SCMP_ACT_NOTIFY" needs a seccomp agent, which stackd does not support')
        self.choice(text, where, ACTIONS, "an action")
        if errno is not None:
            if text not in _TAKES_ERRNO:
                raise self.fail(errno_where, f"only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take an errno, not {text}")
            return Action(text, self.integer(errno, errno_where, 0, _MAX_ERRNO, "an errno"))
        return Action(text)

    def architectures(self, top: dict[str, Any]) -> tuple[str, ...]:
        """The extra architectures to admit: Docker's `architectures`, or the native entry of `archMap`
        with its sub-architectures; only the native CPU's other ABIs are kept."""
        if top.get("architectures") and top.get("archMap"):
            raise self.fail("archMap", 'give either "architectures" or "archMap", not both')
        names: list[str] = []
        for index, value in enumerate(self.array(top.get("architectures") or [], "architectures")):
            names.append(self.arch(value, f"architectures[{index}]"))
        native = _native()[0]
        for index, entry in enumerate(self.array(top.get("archMap") or [], "archMap")):
            where = f"archMap[{index}]"
            item = self.mapping(entry, where, _ARCHMAP_KEYS)
            if "architecture" not in item:
                raise self.fail(_join(where, "architecture"), 'missing (e.g. "SCMP_ARCH_X86_64")')
            main = self.arch(item["architecture"], _join(where, "architecture"))
            subs = [
                self.arch(value, f"{where}.subArchitectures[{i}]")
                for i, value in enumerate(self.array(item.get("subArchitectures") or [], f"{where}.subArchitectures"))
            ]
            if main == native:
                names += subs
        extra = _native()[1]
        return tuple(sorted({name for name in names if name in extra}))

    def arch(self, value: object, where: str) -> str:
        return ARCHITECTURES[self.choice(value, where, ARCHITECTURES, "an architecture")]

    def rule(self, value: object, where: str) -> SyscallRule | None:
        """One syscalls[] entry, or None when its includes/excludes leave it out for this service."""
        entry = self.mapping(value, where, _SYSCALL_KEYS)
        if "name" in entry and "names" in entry:
            raise self.fail(_join(where, "name"), 'give either "name" or "names", not both')
        if "names" in entry:
            raw = self.array(entry["names"], _join(where, "names"))
            names = tuple(self.syscall_name(name, f"{where}.names[{i}]") for i, name in enumerate(raw))
        elif "name" in entry:
            names = (self.syscall_name(entry["name"], _join(where, "name")),)
        else:
            raise self.fail(_join(where, "names"), 'missing (e.g. ["mkdir", "mkdirat"])')
        if "action" not in entry:
            raise self.fail(_join(where, "action"), 'missing (e.g. "SCMP_ACT_ALLOW")')
        action = self.action(entry["action"], entry.get("errnoRet"), _join(where, "action"), _join(where, "errnoRet"))
        for key in ("comment", "errno"):
            if key in entry:
                self.string(entry[key], _join(where, key))
        args = tuple(
            self.condition(arg, f"{where}.args[{i}]")
            for i, arg in enumerate(self.array(entry.get("args") or [], _join(where, "args")))
        )
        include = self.applies(entry.get("includes"), _join(where, "includes"), include=True)
        exclude = self.applies(entry.get("excludes"), _join(where, "excludes"), include=False)
        if not include or exclude:
            return None
        return SyscallRule(names, action, args, origin=f"{self.label}: {where}")

    def syscall_name(self, value: object, where: str) -> str:
        text = self.string(value, where)
        if not _SYSCALL_NAME.fullmatch(text):
            raise self.fail(where, f'{_show(text)} is not a system call name (e.g. "mkdir")')
        return text

    def condition(self, value: object, where: str) -> ArgCondition:
        arg = self.mapping(value, where, _ARG_KEYS)
        for key in ("index", "op"):
            if key not in arg:
                raise self.fail(_join(where, key), "missing")
        index = self.integer(arg["index"], _join(where, "index"), 0, 5, "an argument index")
        op = self.choice(arg["op"], _join(where, "op"), OPERATORS, "a comparison")
        top = (1 << 64) - 1
        first = self.integer(arg.get("value", 0), _join(where, "value"), 0, top, "an argument value")
        second = self.integer(arg.get("valueTwo", 0), _join(where, "valueTwo"), 0, top, "an argument value")
        return ArgCondition(index, op, first, second)

    def applies(self, value: object, where: str, *, include: bool) -> bool:
        """Docker's includes (every condition must hold) or excludes (any condition excludes)."""
        if value is None:
            return include
        spec = self.mapping(value, where, _FILTER_KEYS)
        held: list[bool] = []
        caps = [_capability_name(cap) for cap in self.strings(spec.get("caps"), _join(where, "caps"))]
        if caps:
            present = [cap in self.capabilities for cap in caps]
            held.append(all(present) if include else any(present))
        arches = self.strings(spec.get("arches"), _join(where, "arches"))
        if arches:
            held.append(_native()[2] in arches)
        if spec.get("minKernel"):
            held.append(_kernel_at_least(self.kernel_version(spec["minKernel"], _join(where, "minKernel"))))
        return all(held) if include else any(held)

    def kernel_version(self, value: object, where: str) -> tuple[int, int]:
        text = self.string(value, where)
        match = re.fullmatch(r"(\d{1,3})\.(\d{1,3})", text)
        if not match or text == "0.0":
            raise self.fail(where, f'{_show(text)} is not a kernel version (write "<kernel>.<major>", e.g. "4.8")')
        return int(match[1]), int(match[2])


def _hint(word: str, choices: Iterable[str]) -> str:
    """`' (did you mean "X"?)'` for a near miss, judged on what follows the choices' common prefix
    (so that "SCMP_ACT_FOO" is not taken for "SCMP_ACT_LOG")."""
    options = list(choices)
    prefix = options[0] if options else ""
    for option in options:
        while not option.startswith(prefix):
            prefix = prefix[:-1]
    if not prefix or not word.startswith(prefix):
        return _did_you_mean(word, options)
    hint = _did_you_mean(word.removeprefix(prefix), [option.removeprefix(prefix) for option in options])
    return hint.replace('"', '"' + prefix, 1) if hint else ""


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: object) -> str:
    """A short JSON rendering of a bad value for a message."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = json.dumps(value) if isinstance(value, str | int | float | bool) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kernel_at_least(version: tuple[int, int]) -> bool:
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return match is not None and (int(match[1]), int(match[2])) >= version


@functools.cache
def _native() -> tuple[str, frozenset[str], str]:
    """(libseccomp's name for this CPU's architecture, its other ABIs, Docker's name for it)."""
    machine = platform.machine()
    return _MACHINES.get(machine, (machine, frozenset(), machine))


# --- compiling with libseccomp ----------------------------------------------------------------------


class SeccompUnavailableError(RuntimeError):
    """libseccomp.so.2 cannot be loaded, or is too old for stackd (2.5.0 or later is needed)."""


_NR_SCMP_ERROR = -1
_ARCH_NATIVE = 0
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_OPTIMIZE = 8
_BINARY_TREE = 2
_BPF_MAXINSNS = 4096
_KILL_PROCESS = ACTIONS["SCMP_ACT_KILL_PROCESS"]


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


@functools.cache
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError as error:
        raise SeccompUnavailableError(
            f"cannot load libseccomp.so.2 ({error}): install libseccomp2 (Debian, Ubuntu) or libseccomp "
            '(Fedora), or run services with security_opt "seccomp=unconfined"'
        ) from None
    ctx, u32 = ctypes.c_void_p, ctypes.c_uint32
    signatures: dict[str, tuple[list[Any], Any]] = {
        "seccomp_version": ([], ctypes.POINTER(_Version)),
        "seccomp_init": ([u32], ctx),
        "seccomp_release": ([ctx], None),
        "seccomp_attr_set": ([ctx, ctypes.c_int, u32], ctypes.c_int),
        "seccomp_arch_add": ([ctx, u32], ctypes.c_int),
        "seccomp_arch_remove": ([ctx, u32], ctypes.c_int),
        "seccomp_arch_resolve_name": ([ctypes.c_char_p], u32),
        "seccomp_syscall_resolve_name": ([ctypes.c_char_p], ctypes.c_int),
        "seccomp_rule_add_array": ([ctx, u32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)], ctypes.c_int),
        "seccomp_merge": ([ctx, ctx], ctypes.c_int),
        "seccomp_export_bpf": ([ctx, ctypes.c_int], ctypes.c_int),
        "seccomp_export_pfc": ([ctx, ctypes.c_int], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    version = lib.seccomp_version().contents
    if (version.major, version.minor) < (2, 5):
        raise SeccompUnavailableError(
            f"libseccomp {version.major}.{version.minor}.{version.micro} is too old: stackd needs 2.5.0 or later"
        )
    return lib


def libseccomp_version() -> tuple[int, int, int]:
    """The version of the libseccomp this process uses, e.g. (2, 5, 4)."""
    version = _lib().seccomp_version().contents
    return int(version.major), int(version.minor), int(version.micro)


def resolve_syscall(name: str) -> int | None:
    """The native number of a system call, from libseccomp or `NEWER_X86_64_SYSCALLS`; None when
    unknown. Calls that exist only on another ABI get libseccomp's negative pseudo number."""
    number = int(_lib().seccomp_syscall_resolve_name(name.encode()))
    if number == _NR_SCMP_ERROR:
        return NEWER_X86_64_SYSCALLS.get(name) if _native()[0] == "x86_64" else None
    return number


@overload
def compile_profile(profile: None) -> None: ...
@overload
def compile_profile(profile: SeccompProfile) -> bytes: ...
def compile_profile(profile: SeccompProfile | None) -> bytes | None:
    """The classic BPF program (struct sock_filter[] in native byte order) of `profile` for this
    machine, ready for `load_seccomp_bpf`; None for None (unconfined: load nothing). Compiled once per
    distinct profile content in this process; later calls return the cached bytes.

    Raises ValueError when libseccomp refuses a rule (e.g. two rules giving the same call different
    actions) or the program is too long for the kernel, SeccompUnavailableError without libseccomp.
    """
    if profile is None:
        return None
    with _compile_lock:
        return _compile_cached(profile)


# libseccomp is not documented as thread-safe, and a cache miss should compile once, not twice.
_compile_lock = threading.Lock()


@functools.lru_cache(maxsize=128)
def _compile_cached(profile: SeccompProfile) -> bytes:
    return _Compiler(_lib(), profile).compile()


class _Compiler:
    def __init__(self, lib: ctypes.CDLL, profile: SeccompProfile) -> None:
        self.lib = lib
        self.profile = profile
        self.where = profile.source or "seccomp profile"
        # The native filter: (rule, name, number) for every call this host knows; the others are skipped,
        # as Docker does, and so are calls of other ABIs only (negative pseudo numbers).
        self.native = [
            (rule, name, number)
            for rule in profile.rules
            for name in rule.names
            if (number := resolve_syscall(name)) is not None and number >= 0
        ]
        highest = max((number for _, _, number in self.native), default=-1)
        enosys = errno_action(errno_module.ENOSYS)
        newer = not profile.default_action.allows and profile.default_action != enosys
        self.stub = range(highest + 1, _ENOSYS_STUB_END) if newer else range(0)
        # Every context gets the same attributes (seccomp_merge demands it); the binary tree is worth it
        # for long rule lists (and libseccomp <= 2.5.4 mishandles it for very short ones, as runc notes).
        self.optimize = len(self.native) + len(self.stub) > 32

    def compile(self) -> bytes:
        ctx = self.context(None)
        try:
            for arch in self.profile.architectures:
                other = self.context(arch)
                rc = self.lib.seccomp_merge(ctx, other)
                if rc < 0:
                    self.lib.seccomp_release(other)
                    raise self.refused(f"merging the {arch} filter", rc)
            return self.export(ctx)
        finally:
            self.lib.seccomp_release(ctx)

    def context(self, arch: str | None) -> int:
        """A libseccomp filter for the native architecture (None) or for one other ABI `arch`."""
        lib, default = self.lib, self.profile.default_action
        ctx = lib.seccomp_init(default.value)
        if not ctx:
            raise ValueError(f"{self.where}: libseccomp refused the default action {default}")
        try:
            self.check(lib.seccomp_attr_set(ctx, _ATTR_ACT_BADARCH, _KILL_PROCESS), "setting the bad-arch action")
            if self.optimize:
                self.check(lib.seccomp_attr_set(ctx, _ATTR_CTL_OPTIMIZE, _BINARY_TREE), "choosing the binary tree")
            if arch is None:
                entries = self.native
                stub = SyscallRule((), errno_action(errno_module.ENOSYS), origin=f"{self.where}: newer system calls")
                entries = entries + [(stub, f"#{number}", number) for number in self.stub]
            else:
                token = int(lib.seccomp_arch_resolve_name(arch.encode()))
                if token == 0:
                    raise ValueError(f"{self.where}: this libseccomp does not know the architecture {arch}")
                self.check(lib.seccomp_arch_add(ctx, token), f"adding architecture {arch}")
                self.check(lib.seccomp_arch_remove(ctx, _ARCH_NATIVE), "removing the native architecture")
                # libseccomp translates native (or pseudo) numbers to the other ABI's by name.
                entries = [
                    (rule, name, number)
                    for rule in self.profile.rules
                    for name in rule.names
                    if (number := int(lib.seccomp_syscall_resolve_name(name.encode()))) != _NR_SCMP_ERROR
                ]
            for rule, name, number in entries:
                if rule.action != default:
                    self.add(ctx, rule, name, number)
            return int(ctx)
        except BaseException:
            lib.seccomp_release(ctx)
            raise

    def add(self, ctx: int, rule: SyscallRule, name: str, number: int) -> None:
        for conditions in _condition_sets(rule.args):
            array = (_ArgCmp * max(len(conditions), 1))()
            for slot, cond in zip(array, conditions, strict=False):
                slot.arg, slot.op = cond.index, OPERATORS[cond.op]
                slot.datum_a, slot.datum_b = cond.value, cond.value_two
            rc = self.lib.seccomp_rule_add_array(ctx, rule.action.value, number, len(conditions), array)
            if rc < 0:
                origin = rule.origin or self.where
                hint = " (another rule gives it a different action)" if rc == -errno_module.EEXIST else ""
                raise ValueError(f"{origin}: {name}: libseccomp refused the rule{hint}: {os.strerror(-rc)}")

    def export(self, ctx: int) -> bytes:
        fd = os.memfd_create("stackd-seccomp", os.MFD_CLOEXEC)
        try:
            self.check(self.lib.seccomp_export_bpf(ctx, fd), "exporting the BPF program")
            program = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        if not program or len(program) % 8:
            raise ValueError(f"{self.where}: libseccomp exported {len(program)} bytes, not a BPF program")
        if len(program) // 8 > _BPF_MAXINSNS:
            raise ValueError(
                f"{self.where}: the filter has {len(program) // 8} BPF instructions, more than the kernel's "
                f"{_BPF_MAXINSNS}: use fewer argument rules"
            )
        return program

    def check(self, rc: int, step: str) -> None:
        if rc < 0:
            raise self.refused(step, rc)

    def refused(self, step: str, rc: int) -> ValueError:
        return ValueError(f"{self.where}: libseccomp failed {step}: {os.strerror(-rc)}")


def find_conflicts(profile: SeccompProfile) -> list[str]:
    """Rules of `profile` that libseccomp will silently ignore, as messages (for warnings): a rule giving
    a call another action under the same conditions as an earlier rule (the earlier one applies), and
    conditional rules for a call that also has an unconditional rule with another action (the
    unconditional one applies). Docker loads such profiles without a word; podman's own default profile
    has one (setns is allowed unconditionally, then refused without CAP_SYS_ADMIN: it stays allowed)."""
    exact: dict[tuple[int, tuple[ArgCondition, ...]], SyscallRule] = {}
    unconditional: dict[int, SyscallRule] = {}
    conditional: dict[int, list[SyscallRule]] = {}
    found: list[str] = []
    for rule in profile.rules:
        for name in rule.names:
            number = resolve_syscall(name)
            if number is None or number < 0:
                continue
            if rule.args:
                others = [exact.get((number, rule.args)), unconditional.get(number)]
                conditional.setdefault(number, []).append(rule)
            else:
                others = [unconditional.get(number), *conditional.get(number, [])]
                unconditional.setdefault(number, rule)
            exact.setdefault((number, rule.args), rule)
            for other in others:
                if other is not None and other.action != rule.action:
                    ignored, kept = (other, rule) if other.args and not rule.args else (rule, other)
                    found.append(
                        f"{ignored.origin or profile.source or 'seccomp profile'}: {name}: {ignored.action} is "
                        f"ignored: {kept.origin or 'another rule'} gives it {kept.action}"
                    )
    return found


def _condition_sets(args: tuple[ArgCondition, ...]) -> Iterator[tuple[ArgCondition, ...]]:
    """runc's reading of a rule's conditions: all at once, unless two test the same argument; then
    each on its own (a rule per condition)."""
    indexes = [cond.index for cond in args]
    if len(set(indexes)) == len(indexes):
        yield args
    else:
        for cond in args:
            yield (cond,)


def export_pfc(profile: SeccompProfile) -> str:
    """libseccomp's human-readable pseudo code of the native filter, for debugging a profile."""
    compiler = _Compiler(_lib(), profile)
    ctx = compiler.context(None)
    try:
        fd = os.memfd_create("stackd-seccomp-pfc", os.MFD_CLOEXEC)
        try:
            compiler.check(compiler.lib.seccomp_export_pfc(ctx, fd), "exporting pseudo code")
            return os.pread(fd, os.fstat(fd).st_size, 0).decode()
        finally:
            os.close(fd)
    finally:
        compiler.lib.seccomp_release(ctx)


# --- the runtime's hook -----------------------------------------------------------------------------


def compile_for_service(service: Service, capabilities: frozenset[str]) -> bytes | None:
    """The filter for a service's `security_opt` seccomp choice ("default", "unconfined" or a profile
    file), for a service holding `capabilities`: the `compile_seccomp` of `HostFacts`. A bad profile
    file raises LaunchError(service, "seccomp", detail=<file: JSON path: what is wrong>)."""
    choice = service.security_opt.seccomp
    if choice == "unconfined":
        return None
    try:
        if choice == "default":
            return compile_profile(default_profile(capabilities))
        return compile_profile(load_profile_file(choice, capabilities=capabilities))
    except OSError as error:
        raise LaunchError(service.name, "seccomp", detail=f"{error.filename}: {error.strerror}") from error
    except (ValueError, SeccompUnavailableError) as error:
        raise LaunchError(service.name, "seccomp", detail=str(error)) from error
