"""A tiny root filesystem from the host's static busybox (Debian: busybox-static), for tests and examples.

make_busybox_rootfs("/tmp/rootfs")   # /bin/busybox, an applet link for each command, /etc files
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["BUSYBOX", "make_busybox_rootfs"]

BUSYBOX = "/bin/busybox"

_PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
_GROUP = """root:x:0:
daemon:x:1:
tty:x:5:
app:x:1000:
extra:x:2000:app
nogroup:x:65534:
"""


def make_busybox_rootfs(target: str | os.PathLike[str], *, busybox: str = BUSYBOX) -> Path:
    """Build (or refresh) a busybox root filesystem at `target` and return its path.

    Raises FileNotFoundError when the host has no static busybox (apt-get install busybox-static).
    """
    root = Path(target)
    if not Path(busybox).is_file():
        raise FileNotFoundError(f"{busybox} not found: install busybox-static")
    for directory in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "home/app",
        "var/tmp",
        "run",
    ):
        (root / directory).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = root / applet
        if applet.endswith("/busybox") or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)
    (root / "etc" / "passwd").write_text(_PASSWD)
    (root / "etc" / "group").write_text(_GROUP)
    (root / "etc" / "hostname").write_text("busybox\n")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n")
    return root
