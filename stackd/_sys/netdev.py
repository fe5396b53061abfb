"""Network device flags through ioctl: bring an interface up in the current network namespace.

A new network namespace has only `lo`, and it is down; the launcher brings it up before the service
starts (the stack's own addresses and routes are the network layer's, through pyroute2).
"""

from __future__ import annotations

import fcntl
import socket
import struct

__all__ = ["link_is_up", "set_link_up"]

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags in the union (40 bytes in all)


def _flags(sock: socket.socket, name: str) -> int:
    reply = fcntl.ioctl(sock, _SIOCGIFFLAGS, struct.pack(_IFREQ, name.encode(), 0))
    return int(struct.unpack(_IFREQ, reply)[1])


def set_link_up(name: str = "lo") -> None:
    """Set IFF_UP on interface `name` of the calling thread's network namespace (OSError on failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        flags = _flags(sock, name)
        if not flags & _IFF_UP:
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack(_IFREQ, name.encode(), flags | _IFF_UP))


def link_is_up(name: str = "lo") -> bool:
    """Whether interface `name` has IFF_UP set."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        return bool(_flags(sock, name) & _IFF_UP)
