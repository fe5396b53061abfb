"""Linux capability names, Docker's default set, and how cap_add / cap_drop combine."""

from __future__ import annotations

from collections.abc import Iterable

from stackd.spec.problems import Invalid, did_you_mean, show

__all__ = ["CAPABILITIES", "DOCKER_DEFAULT_CAPABILITIES", "effective_capabilities", "normalise_capability"]

#: Every capability the kernel defines, name -> number (linux/capability.h, up to kernel 6.x).
CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        (
            "CHOWN",
            "DAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "LINUX_IMMUTABLE",
            "NET_BIND_SERVICE",
            "NET_BROADCAST",
            "NET_ADMIN",
            "NET_RAW",
            "IPC_LOCK",
            "IPC_OWNER",
            "SYS_MODULE",
            "SYS_RAWIO",
            "SYS_CHROOT",
            "SYS_PTRACE",
            "SYS_PACCT",
            "SYS_ADMIN",
            "SYS_BOOT",
            "SYS_NICE",
            "SYS_RESOURCE",
            "SYS_TIME",
            "SYS_TTY_CONFIG",
            "MKNOD",
            "LEASE",
            "AUDIT_WRITE",
            "AUDIT_CONTROL",
            "SETFCAP",
            "MAC_OVERRIDE",
            "MAC_ADMIN",
            "SYSLOG",
            "WAKE_ALARM",
            "BLOCK_SUSPEND",
            "AUDIT_READ",
            "PERFMON",
            "BPF",
            "CHECKPOINT_RESTORE",
        )
    )
}
CAPABILITIES = {f"CAP_{name}": number for name, number in CAPABILITIES.items()}

#: The 14 capabilities Docker grants by default (moby's oci/caps/defaults.go).
DOCKER_DEFAULT_CAPABILITIES: frozenset[str] = frozenset(
    f"CAP_{name}"
    for name in (
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    )
)


def normalise_capability(value: object) -> str:
    """ "net_admin", "NET_ADMIN" and "CAP_NET_ADMIN" all become "CAP_NET_ADMIN"; "all" becomes "ALL"."""
    if not isinstance(value, str):
        raise Invalid(f'{show(value)} is not a capability name (write e.g. "NET_ADMIN")')
    name = value.strip().upper()
    if name == "ALL":
        return "ALL"
    if not name.startswith("CAP_"):
        name = "CAP_" + name
    if name not in CAPABILITIES:
        short = [c.removeprefix("CAP_") for c in CAPABILITIES]
        hint = did_you_mean(name.removeprefix("CAP_"), short)
        raise Invalid(f"{show(value)} is not a Linux capability{hint} (allowed: ALL or e.g. NET_ADMIN, SYS_PTRACE)")
    return name


def effective_capabilities(cap_add: Iterable[str], cap_drop: Iterable[str]) -> frozenset[str]:
    """The capabilities a service runs with, with Docker's rules: start from the default 14 (or from
    all with cap_add ALL, or from none with cap_drop ALL), drop cap_drop, then add cap_add."""
    added, dropped = set(cap_add), set(cap_drop)
    if "ALL" in added:
        return frozenset(CAPABILITIES) - (dropped - {"ALL"})
    base = set() if "ALL" in dropped else set(DOCKER_DEFAULT_CAPABILITIES)
    return frozenset((base - dropped) | added)
