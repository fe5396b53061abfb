"""The stack's /etc/hosts and /etc/resolv.conf: their text, their in-place rewrite, their mounts."""

from __future__ import annotations

import os
import threading
from ipaddress import IPv4Address
from pathlib import Path

from stackd.runtime.network import (
    hosts_path,
    name_binds,
    parse_nameservers,
    remove_names_files,
    render_hosts,
    render_resolv_conf,
    resolv_conf_path,
    service_entry,
    write_names_file,
    write_names_files,
)
from stackd.runtime.paths import StackPaths


def test_every_service_by_name_name_project_hostname_and_aliases() -> None:
    text = render_hosts(
        "shop",
        [
            service_entry("shop", "db", "10.77.0.5", hostname="db", aliases=["database", "pg"]),
            service_entry("shop", "my_web", IPv4Address("10.77.0.9"), hostname="my-web"),
            service_entry("shop", "other", "10.77.0.10", aliases=["pg"]),  # pg is db's already
        ],
    )
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "127.0.0.1\tlocalhost" in lines
    assert "::1\tlocalhost ip6-localhost ip6-loopback" in lines
    assert "10.77.0.5\tdb db.shop database pg" in lines
    assert "10.77.0.9\tmy_web my_web.shop my-web" in lines
    assert "10.77.0.10\tother other.shop" in lines
    assert text.endswith("\n")


def test_resolv_conf_lists_no_resolver_that_cannot_answer() -> None:
    text = render_resolv_conf()
    assert "nameserver" not in text.replace("# No nameserver", "")
    assert all(line.startswith("#") for line in text.splitlines())
    chosen = render_resolv_conf(nameservers=["10.0.0.53"], search=["shop"], options=["ndots:1"])
    assert "nameserver 10.0.0.53\nsearch shop\noptions ndots:1\n" in chosen


def test_nameservers_of_a_resolv_conf() -> None:
    text = "# x\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver junk\nsearch a\n"
    assert [str(a) for a in parse_nameservers(text)] == ["127.0.0.53", "fe80::1"]


def test_a_rewrite_keeps_the_inode_that_bind_mounts_hold(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    write_names_file(path, "a\nb\n")
    inode = path.stat().st_ino
    write_names_file(path, "a\nb\nc\n")  # an addition: appended
    assert path.read_text() == "a\nb\nc\n" and path.stat().st_ino == inode
    write_names_file(path, "x\n")  # shorter: rewritten, padded, truncated
    assert path.read_text() == "x\n" and path.stat().st_ino == inode
    write_names_file(path, "a longer text than before\n")
    assert path.read_text() == "a longer text than before\n" and path.stat().st_ino == inode
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_reader_sees_the_lines_it_knew_while_services_are_added(tmp_path: Path) -> None:
    """Adding services appends: the lines already there are never rewritten under a reader."""
    path = tmp_path / "hosts"
    texts = [render_hosts("p", [service_entry("p", f"s{j}", f"10.0.0.{j + 2}") for j in range(n)]) for n in range(40)]
    write_names_file(path, texts[0])
    stop = threading.Event()
    seen: list[str] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for text in texts[1:]:
            write_names_file(path, text)
    finally:
        stop.set()
        reader.join()
    assert seen
    for text in seen:
        assert text.startswith(texts[0])


def test_files_binds_and_removal(tmp_path: Path) -> None:
    paths = StackPaths("shop", state_root=tmp_path)
    hosts, resolv = write_names_files(paths, hosts="h\n", resolv_conf="r\n")
    assert (hosts, resolv) == (hosts_path(paths), resolv_conf_path(paths))
    assert hosts.read_text() == "h\n" and resolv.read_text() == "r\n"
    binds = {mount.target: mount for mount in name_binds(paths)}
    assert binds["/etc/hosts"].source == str(hosts) and binds["/etc/resolv.conf"].source == str(resolv)
    assert all("ro" in mount.flags and mount.fstype == "bind" for mount in binds.values())
    remove_names_files(paths)
    assert not hosts.parent.exists()
    remove_names_files(paths)  # already gone
    assert not any(name.startswith(".") for name in os.listdir(tmp_path / "shop"))
