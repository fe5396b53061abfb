"""Readiness and status for a service manager: the sd_notify protocol, without libsystemd.

systemd (Type=notify) passes an AF_UNIX datagram socket in ``$NOTIFY_SOCKET``: a path, or a name in the
abstract namespace written with a leading ``@``. Each message is newline-separated ``KEY=VALUE`` pairs
(``READY=1``, ``STOPPING=1``, ``STATUS=...``); see sd_notify(3). Without the variable nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["sd_notify"]


def sd_notify(message: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send `message` to the service manager; False when there is none (or it cannot be reached).

    Never raises: readiness reporting must not bring the stack down."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    elif not address.startswith("/"):
        return False  # unset, or a kind we do not speak (vsock:...)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True
