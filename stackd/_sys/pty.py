"""A pseudo-terminal opened through a given devpts, for `stackd exec -t` inside a service.

Standard library only, no threads (imported by the launcher). The pair comes from the ptmx of the
devpts instance at `ptmx` (a service's own /dev/pts/ptmx once its mount namespace is joined), and the
slave is reached with TIOCGPTPEER (Linux 4.13): from the master itself, never by a path another
process could swap.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios

__all__ = ["TIOCGPTPEER", "TIOCSPTLCK", "make_controlling", "open_pty", "set_window_size"]

TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int): (un)lock the slave
TIOCGPTPEER = 0x5441  # _IO('T', 0x41): open the slave of this master


def open_pty(ptmx: str = "/dev/pts/ptmx") -> tuple[int, int]:
    """(master, slave), both close-on-exec and not the controlling terminal of the caller."""
    master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except BaseException:
        os.close(master)
        raise
    return master, int(slave)


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ: the terminal's size (on the master or the slave); the foreground group gets SIGWINCH."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def make_controlling(fd: int) -> None:
    """Start a new session and make the terminal `fd` its controlling terminal."""
    os.setsid()
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
