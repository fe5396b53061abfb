"""The names a service sees: the stack's /etc/hosts and /etc/resolv.conf.

One hosts file per stack, bind-mounted read-only at /etc/hosts in every service: every service by
NAME, by NAME.PROJECT, by its host name and by its aliases (Compose resolves these through Docker's
DNS server; stackd runs no DNS server, and a hosts file is read by every libc, by Go and by Java).

It is rewritten IN PLACE when an address changes. A bind mount holds the file's inode, so a new file
renamed over the old one (the usual atomic replacement) would never reach a running service. So:
when the new text only adds lines (services added: the common case), they are appended and the lines
already there are never touched; otherwise the new text goes in with ONE write at offset 0, padded
with a comment line to the old length, and the file is truncated after that, so between system calls
the file is the old text, the new text with a trailing comment, or the new text, never empty and
never the new text followed by old lines. A reader whose read() runs during that one write (a
memcpy of a few KiB) can still see a mix: readers take no lock, and only a new mount could swap
the file under them atomically (MOVE_MOUNT_BENEATH, from inside each service's mount namespace: a
possible later step). Writers serialise with flock(2).

/etc/resolv.conf is deliberate: a stack has no way out (no NAT, no forwarding), so no outside resolver
can answer, and the host's may be on 127.0.0.53 (systemd-resolved), which inside the namespace is the
service's own loopback. So it lists NO nameserver. Every resolver (glibc, musl, Go) then asks
127.0.0.1:53, where nothing listens, and a lookup of an outside name fails at once (measured: 1.7 ms,
EAI_AGAIN) instead of hanging through timeouts and retries. Stack names never reach DNS: the hosts
file answers them first. The `[network] outbound` opt-in (not built yet) would list the host's
resolvers that are reachable from the stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from stackd.runtime.network.names import names_dir
from stackd.runtime.paths import StackPaths
from stackd.runtime.plan import Mount

__all__ = [
    "HostsEntry",
    "hosts_path",
    "name_binds",
    "parse_nameservers",
    "remove_names_files",
    "render_hosts",
    "render_resolv_conf",
    "resolv_conf_path",
    "service_entry",
    "write_names_file",
    "write_names_files",
]

_LOCAL_LINES = (
    ("127.0.0.1", ("localhost",)),
    ("::1", ("localhost", "ip6-localhost", "ip6-loopback")),
    ("fe00::0", ("ip6-localnet",)),
    ("ff00::0", ("ip6-mcastprefix",)),
    ("ff02::1", ("ip6-allnodes",)),
    ("ff02::2", ("ip6-allrouters",)),
)


@dataclass(frozen=True, slots=True)
class HostsEntry:
    """One line of the hosts file: an address and its names, the canonical one first."""

    address: IPv4Address | IPv6Address
    names: tuple[str, ...]


def service_entry(
    project: str,
    service: str,
    address: IPv4Address | str,
    *,
    hostname: str | None = None,
    aliases: Iterable[str] = (),
) -> HostsEntry:
    """A service's line: NAME, NAME.PROJECT, its host name (when not NAME) and its aliases."""
    names = [service, f"{service}.{project}"]
    if hostname:
        names.append(hostname)
    names += aliases
    return HostsEntry(ip_address(address), tuple(dict.fromkeys(names)))


def render_hosts(project: str, entries: Iterable[HostsEntry]) -> str:
    """The stack's hosts file. A name that an earlier entry already has is left out of later ones,
    so every name has one address."""
    lines = [
        f"# /etc/hosts of stack {project}, kept by stackd: every service by NAME, NAME.{project} and its aliases.",
        "# Rewritten when an address changes; changes made here are lost.",
    ]
    lines += [f"{address}\t{' '.join(names)}" for address, names in _LOCAL_LINES]
    seen: set[str] = set()
    for entry in entries:
        names = [name for name in entry.names if name not in seen]
        seen.update(names)
        if names:
            lines.append(f"{entry.address}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def render_resolv_conf(
    *,
    nameservers: Iterable[IPv4Address | IPv6Address | str] = (),
    search: Iterable[str] = (),
    options: Iterable[str] = (),
) -> str:
    """/etc/resolv.conf for a stack. With no nameservers (the default: a stack has no way out), none
    is listed, and lookups of outside names fail at once; the comment says so to whoever reads it."""
    servers = [str(ip_address(server)) for server in nameservers]
    lines = ["# /etc/resolv.conf of a stackd stack. Service names resolve through /etc/hosts."]
    if not servers:
        lines += [
            "# No nameserver: this stack cannot reach any (no outbound access), so none is listed and",
            "# lookups of other names fail at once instead of waiting for timeouts.",
        ]
    lines += [f"nameserver {server}" for server in servers]
    domains = list(search)
    if domains:
        lines.append("search " + " ".join(domains))
    chosen = list(options)
    if chosen:
        lines.append("options " + " ".join(chosen))
    return "\n".join(lines) + "\n"


def parse_nameservers(text: str) -> list[IPv4Address | IPv6Address]:
    """The nameserver addresses of a resolv.conf text (zone suffixes dropped, junk skipped)."""
    found: list[IPv4Address | IPv6Address] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append(ip_address(fields[1].split("%", 1)[0]))
    return found


def hosts_path(paths: StackPaths) -> Path:
    return names_dir(paths) / "hosts"


def resolv_conf_path(paths: StackPaths) -> Path:
    return names_dir(paths) / "resolv.conf"


def write_names_files(paths: StackPaths, *, hosts: str, resolv_conf: str) -> tuple[Path, Path]:
    """Write (or rewrite in place) the stack's hosts and resolv.conf files; their paths."""
    written = (hosts_path(paths), resolv_conf_path(paths))
    write_names_file(written[0], hosts)
    write_names_file(written[1], resolv_conf)
    return written


def write_names_file(path: Path, text: str) -> None:
    """Write `text` to `path`: a new file appears whole (renamed into place); an existing one keeps its
    inode (bind mounts hold it) and is rewritten in place as the module's docstring says."""
    data = text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        old = _read_all(fd)
        if data == old:
            return
        if data.startswith(old):
            os.pwrite(fd, data[len(old) :], len(old))
            return
        padding = len(old) - len(data)
        filler = (b"#" * (padding - 1) + b"\n") if padding > 0 else b""
        if filler and not data.endswith(b"\n"):
            filler = b"\n" + filler[1:]
        os.pwrite(fd, data + filler, 0)
        if padding > 0:
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)  # releases the lock


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def name_binds(paths: StackPaths) -> tuple[Mount, ...]:
    """The read-only bind mounts of the stack's hosts and resolv.conf files at /etc/hosts and
    /etc/resolv.conf, for build_plan's `extra_binds`. Read-only: the file is shared by the stack, a
    service must not rewrite its neighbours' names."""
    flags = ("ro", "nosuid", "nodev", "noexec")
    return (
        Mount("/etc/hosts", "bind", str(hosts_path(paths)), flags, create="file"),
        Mount("/etc/resolv.conf", "bind", str(resolv_conf_path(paths)), flags, create="file"),
    )


def remove_names_files(paths: StackPaths) -> None:
    """Remove the stack's hosts and resolv.conf files and their directory (stackd's alone, with any
    temporary file a killed writer left); tolerant of "already gone"."""
    shutil.rmtree(names_dir(paths), ignore_errors=True)
