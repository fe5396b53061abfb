"""Which sysctls a service may set: runc's rules, with messages that say why.

A sysctl is allowed only when the kernel scopes it to a namespace the service owns, so that setting it
changes neither the host nor any other service:
- IPC: kernel.msgmax, msgmnb, msgmni, sem, shmall, shmmax, shmmni, shm_rmid_forced, fs.mqueue.*
  (every service has its own IPC namespace);
- net.*: needs a private network namespace (refused with network_mode "host" or "service:NAME");
- kernel.domainname: the service's UTS namespace. kernel.hostname is refused: use `hostname`.
Everything else is refused as not namespaced.
"""

from __future__ import annotations

import re

from stackd.spec.problems import Invalid, show

__all__ = ["IPC_SYSCTLS", "check_sysctl", "normalise_sysctl_key"]

IPC_SYSCTLS = frozenset(
    "kernel." + name for name in ("msgmax", "msgmnb", "msgmni", "sem", "shmall", "shmmax", "shmmni", "shm_rmid_forced")
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normalise_sysctl_key(key: str) -> tuple[str, ...]:
    """Split a key written with dots ("net.ipv4.ip_forward") or slashes ("net/ipv4/conf/eth0.1/...").

    With slashes, dots are part of a component (sysctl(8)'s rule), so VLAN interfaces can be named.
    """
    if _CONTROL.search(key) or " " in key:
        raise Invalid(f"{show(key)} is not a sysctl name: it contains spaces or control characters")
    parts = tuple(key.split("/")) if "/" in key else tuple(key.split("."))
    if not key or any(part in ("", ".", "..") for part in parts):
        raise Invalid(f'{show(key)} is not a sysctl name: empty parts or ".." are not allowed')
    return parts


def check_sysctl(parts: tuple[str, ...], network_mode: str) -> None:
    """Raise Invalid when the sysctl `parts` would reach outside the service's namespaces."""
    dotted = ".".join(parts)
    if dotted in IPC_SYSCTLS or (len(parts) > 2 and parts[:2] == ("fs", "mqueue")):
        return
    if parts[0] == "net":
        if network_mode == "host":
            raise Invalid(
                f"{dotted} would change the host's network stack: net.* sysctls need a private network "
                'namespace, and this service has network_mode = "host"'
            )
        if network_mode.startswith("service:"):
            owner = network_mode.removeprefix("service:")
            raise Invalid(
                f"{dotted} would change the network namespace of service {owner}, which this service "
                f'shares (network_mode = "{network_mode}"): set it on {owner} instead'
            )
        return
    if dotted == "kernel.domainname":
        return
    if dotted == "kernel.hostname":
        raise Invalid("kernel.hostname cannot be set as a sysctl: use the service's `hostname` key")
    raise Invalid(
        f"{dotted} is not namespaced: setting it would change the host and every other service. "
        "Allowed: net.* (with a private network), kernel.domainname, fs.mqueue.* and the IPC keys "
        + ", ".join(sorted(IPC_SYSCTLS))
    )
