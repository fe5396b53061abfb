"""Network benchmark (issue #4): a stack's network set up and torn down, beside `ip -batch`.

    python benchmarks/network.py [--runs 7] [--services 1,10,50] [--options] [--options-services 10,50]

Rows, for N services each (a bridge, and per service a pinned network namespace, a veth pair with
`eth0` inside on the bridge, lo and eth0 up, an address and a default route):
  stackd     create_network() then teardown_network() (stackd.runtime.network): teardown returns when
             the kernel has removed every veth with its namespace, and the bridge is gone;
  ip -batch  the same work with iproute2: one `ip -batch -` for the host's side (bridge, `netns add`
             each, veth pairs with the peer in the namespace, host ends on the bridge), then one
             `ip -n NS -batch -` per namespace (lo, eth0, address, route); down: one `ip -batch -`
             of `netns del` each and `link del` of the bridge, then (timed apart) until the kernel has
             removed the veths.
In the same run, in alternating order, --runs rounds; medians (and per service) in ms, with the
ratio to ip -batch. Target: 50 services' networks up in <= 150 ms.

--options also measures the ways of doing it that were considered (docs/networking.md): pyroute2 used
naively (netns.create and AsyncIPRoute(netns=...) fork), namespaces made by a thread of ours, the veth
made from the host with its peer sent into the namespace versus made inside, pyroute2's high-level
calls versus batched messages, the in-namespace configuration done by a forked child with ioctl(2)
(as the launcher could), and three ways to tear down.

Everything is named after a unique prefix (nb-<hex>, links sd...), uses subnets in 10.241.0.0/16 that
overlap nothing on the host, and is removed at the end, also on an error or Ctrl-C. Root only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pyroute2 import AsyncIPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

from stackd._sys import linux
from stackd.runtime.network import (
    Endpoint,
    StackNetwork,
    assign_addresses,
    create_network,
    delete_bridge,
    endpoint,
    ensure_bridge,
    mac_for,
    netns_dir,
    pick_subnet,
    read_host_networks,
    teardown_network,
    unpin,
)
from stackd.runtime.network.inside import inside_messages
from stackd.runtime.network.netns import create_namespaces, prepare_pin_dir, release_pin_dir
from stackd.runtime.network.rtnl import (
    CREATE,
    batch,
    check,
    delete_link_message,
    get_link_message,
    link_up_message,
    open_rtnl,
)
from stackd.runtime.network.teardown import _link_monitor
from stackd.runtime.network.veth import host_end_message, veth_pair_message
from stackd.runtime.paths import StackPaths

POOL = (IPv4Network("10.241.0.0/16"),)
PREFIX = f"nb-{secrets.token_hex(2)}"
ms = 1000.0


@dataclass
class Stack:
    network: StackNetwork
    paths: StackPaths
    endpoints: list[Endpoint]


async def new_stack(workdir: Path, count: int, run: int) -> Stack:
    project = f"{PREFIX}-{run}"
    facts = await read_host_networks()
    subnet = pick_subnet(project, host_networks=facts.blocked(), pool=POOL)
    network = StackNetwork.for_project(project, subnet)
    paths = StackPaths(project, state_root=workdir / "state", log_root=workdir / "log")
    addresses = assign_addresses(subnet, [f"s{i}" for i in range(count)])
    return Stack(network, paths, [endpoint(network, paths, n, a) for n, a in addresses.items()])


async def remove(stack: Stack) -> None:
    """Whatever is left of a stack, as teardown_network does (tolerant of anything gone)."""
    with contextlib.suppress(Exception):
        await teardown_network(stack.network, stack.paths, stack.endpoints, timeout=2)


# --- stackd and ip -batch -------------------------------------------------------------------------


async def stackd_row(stack: Stack) -> tuple[float, float]:
    try:
        t0 = time.perf_counter()
        await create_network(stack.network, stack.paths, stack.endpoints)
        t1 = time.perf_counter()
        report = await teardown_network(stack.network, stack.paths, stack.endpoints)
        t2 = time.perf_counter()
        assert report.clean, report
        return t1 - t0, t2 - t1
    finally:
        await remove(stack)


def ip_batch(script: str, *options: str) -> None:
    result = subprocess.run(["ip", *options, "-batch", "-"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(options)} -batch: {result.stderr.strip()}")


def ip_names(stack: Stack) -> list[str]:
    return [f"{stack.network.project}-{e.service}" for e in stack.endpoints]


async def ip_row(stack: Stack) -> tuple[float, float, float]:
    net, names = stack.network, ip_names(stack)
    prefix = net.subnet.prefixlen
    host = [
        f"link add name {net.bridge} address {mac_for(net.gateway)} mtu {net.mtu} type bridge",
        f"addr add {net.gateway}/{prefix} brd + dev {net.bridge}",
        f"link set {net.bridge} up",
    ]
    host += [f"netns add {name}" for name in names]
    host += [
        f"link add {e.veth} mtu {net.mtu} type veth peer name eth0 mtu {net.mtu} address {e.mac} netns {name}"
        for e, name in zip(stack.endpoints, names, strict=True)
    ]
    host += [f"link set {e.veth} master {net.bridge} up" for e in stack.endpoints]
    inner = {
        name: "\n".join(
            [
                "link set lo up",
                "link set eth0 up",
                f"addr add {e.address}/{prefix} brd + dev eth0",
                f"route add default via {net.gateway}",
            ]
        )
        + "\n"
        for e, name in zip(stack.endpoints, names, strict=True)
    }
    down = [f"netns del {name}" for name in names] + [f"link del {net.bridge}"]
    try:
        t0 = time.perf_counter()
        ip_batch("\n".join(host) + "\n")
        for name, script in inner.items():
            ip_batch(script, "-n", name)
        t1 = time.perf_counter()
        ip_batch("\n".join(down) + "\n")
        t2 = time.perf_counter()
        while any(Path(f"/sys/class/net/{e.veth}").exists() for e in stack.endpoints):
            await asyncio.sleep(0.001)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t1
    finally:
        ip_cleanup(stack)


def ip_cleanup(stack: Stack) -> None:
    for name in ip_names(stack):
        if Path(f"/run/netns/{name}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for link in [stack.network.bridge, *(e.veth for e in stack.endpoints)]:
        if Path(f"/sys/class/net/{link}").exists():
            subprocess.run(["ip", "link", "del", link], capture_output=True)


# --- the options ------------------------------------------------------------------------------------


async def pins_by_thread(stack: Stack) -> float:
    prepare_pin_dir(netns_dir(stack.paths))
    t0 = time.perf_counter()
    pins = await create_namespaces([e.netns for e in stack.endpoints])
    t1 = time.perf_counter()
    for pinned in pins:
        pinned.close()
        unpin(pinned.path)
    release_pin_dir(netns_dir(stack.paths))
    return t1 - t0


async def pins_by_pyroute2(stack: Stack) -> float:
    names = ip_names(stack)
    try:
        t0 = time.perf_counter()
        for name in names:
            pyroute2_netns.create(name)
        return time.perf_counter() - t0
    finally:
        for name in names:
            with contextlib.suppress(OSError):
                pyroute2_netns.remove(name)


async def socket_by_pyroute2_netns(stack: Stack) -> float:
    """AsyncIPRoute(netns=...): pyroute2 forks a helper to open the socket inside."""
    names = ip_names(stack)
    try:
        for name in names:
            pyroute2_netns.create(name)
        t0 = time.perf_counter()
        for name in names:
            inner = AsyncIPRoute(netns=name)
            await batch(inner, [link_up_message(index=1)])
            inner.close()
        return time.perf_counter() - t0
    finally:
        for name in names:
            with contextlib.suppress(OSError):
                pyroute2_netns.remove(name)


async def socket_by_thread(stack: Stack) -> float:
    """A socket opened inside by our thread, handed to AsyncIPRoute(fileno=...)."""
    prepare_pin_dir(netns_dir(stack.paths))
    pins = await create_namespaces([e.netns for e in stack.endpoints])
    try:
        t0 = time.perf_counter()
        for pinned in pins:
            inner = open_rtnl(pinned.take_socket())
            await batch(inner, [link_up_message(index=1)])
            inner.close()
        return time.perf_counter() - t0
    finally:
        for pinned in pins:
            pinned.close()
            unpin(pinned.path)
        release_pin_dir(netns_dir(stack.paths))


async def naive_setup(stack: Stack) -> tuple[float, float]:
    """pyroute2's ordinary calls: netns.create, link add with the peer in the namespace by name,
    lookups, AsyncIPRoute(netns=...) inside; teardown: veths deleted, namespaces removed."""
    net, names = stack.network, ip_names(stack)
    ipr = AsyncIPRoute()
    try:
        t0 = time.perf_counter()
        await ipr.link("add", ifname=net.bridge, kind="bridge", mtu=net.mtu, address=mac_for(net.gateway))
        (bridge,) = await ipr.link_lookup(ifname=net.bridge)
        await ipr.addr("add", index=bridge, address=str(net.gateway), prefixlen=net.subnet.prefixlen)
        await ipr.link("set", index=bridge, state="up")
        for e, name in zip(stack.endpoints, names, strict=True):
            pyroute2_netns.create(name)
            await ipr.link("add", ifname=e.veth, kind="veth", mtu=net.mtu, peer={"ifname": "eth0", "net_ns_fd": name})
            (index,) = await ipr.link_lookup(ifname=e.veth)
            await ipr.link("set", index=index, master=bridge, state="up")
            inner = AsyncIPRoute(netns=name)
            await inner.link("set", index=1, state="up")
            (eth0,) = await inner.link_lookup(ifname="eth0")
            await inner.link("set", index=eth0, state="up", address=e.mac)
            await inner.addr("add", index=eth0, address=str(e.address), prefixlen=net.subnet.prefixlen)
            await inner.route("add", gateway=str(net.gateway))
            inner.close()
        t1 = time.perf_counter()
        for e, name in zip(stack.endpoints, names, strict=True):
            await ipr.link("del", ifname=e.veth)
            pyroute2_netns.remove(name)
        await ipr.link("del", index=bridge)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1
    finally:
        ipr.close()
        ip_cleanup(stack)


def host_side_veth(point: Endpoint, netns_fd: int, bridge_index: int, mtu: int) -> ifinfmsg:
    """The host end made here, on the bridge and up; its peer eth0 (with its MAC) in the namespace."""
    peer = {
        "attrs": [("IFLA_IFNAME", "eth0"), ("IFLA_MTU", mtu), ("IFLA_ADDRESS", point.mac), ("IFLA_NET_NS_FD", netns_fd)]
    }
    message = ifinfmsg()
    message["flags"] = message["change"] = IFF_UP
    message["attrs"] = [
        ("IFLA_IFNAME", point.veth),
        ("IFLA_MTU", mtu),
        ("IFLA_MASTER", bridge_index),
        (
            "IFLA_LINKINFO",
            {"attrs": [("IFLA_INFO_KIND", "veth"), ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]})]},
        ),
    ]
    message["header"]["type"] = RTM_NEWLINK
    message["header"]["flags"] = CREATE
    return message


async def host_made_veths(stack: Stack) -> float:
    """Option (a): veths made from the host with the peer sent into the namespace by fd (all in one
    batch, on the bridge and up at once); inside, eth0's index must be looked up first: two batches."""
    net = stack.network
    ipr = open_rtnl()
    try:
        t0 = time.perf_counter()
        bridge = await ensure_bridge(ipr, net.bridge, net.subnet, mtu=net.mtu)
        prepare_pin_dir(netns_dir(stack.paths))
        pins = await create_namespaces([e.netns for e in stack.endpoints])
        fds = [os.open(pinned.path, os.O_RDONLY | os.O_CLOEXEC) for pinned in pins]
        messages = [host_side_veth(e, fd, bridge.index, net.mtu) for e, fd in zip(stack.endpoints, fds, strict=True)]
        check(await batch(ipr, messages), [e.veth for e in stack.endpoints])
        for fd in fds:
            os.close(fd)
        for e, pinned in zip(stack.endpoints, pins, strict=True):
            inner = open_rtnl(pinned.take_socket())
            (found,) = await batch(inner, [get_link_message("eth0")])
            index = int(found.messages[0]["index"])
            check(
                await batch(
                    inner, inside_messages(eth_index=index, address=e.address, subnet=net.subnet, gateway=net.gateway)
                ),
                ["lo", "eth0", "addr", "route"],
            )
            inner.close()
        return time.perf_counter() - t0
    finally:
        ipr.close()
        await remove(stack)


async def high_level_calls(stack: Stack) -> float:
    """Our namespaces and sockets, but pyroute2's high-level calls, one request each."""
    net = stack.network
    ipr = open_rtnl()
    host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        t0 = time.perf_counter()
        bridge = await ensure_bridge(ipr, net.bridge, net.subnet, mtu=net.mtu)
        prepare_pin_dir(netns_dir(stack.paths))
        pins = await create_namespaces([e.netns for e in stack.endpoints])
        for e, pinned in zip(stack.endpoints, pins, strict=True):
            inner = open_rtnl(pinned.take_socket())
            await inner.link(
                "add", ifname="eth0", kind="veth", mtu=net.mtu, address=e.mac,
                peer={"ifname": e.veth, "net_ns_fd": host_fd, "mtu": net.mtu},
            )  # fmt: skip
            await inner.link("set", index=1, state="up")
            (eth0,) = await inner.link_lookup(ifname="eth0")
            await inner.link("set", index=eth0, state="up")
            await inner.addr("add", index=eth0, address=str(e.address), prefixlen=net.subnet.prefixlen)
            await inner.route("add", gateway=str(net.gateway))
            inner.close()
            await ipr.link("set", ifname=e.veth, master=bridge.index, state="up")
        return time.perf_counter() - t0
    finally:
        os.close(host_fd)
        ipr.close()
        await remove(stack)


class _SockaddrIn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_ushort), ("addr", ctypes.c_ubyte * 4),
                ("zero", ctypes.c_ubyte * 8)]  # fmt: skip


class _Rtentry(ctypes.Structure):
    _fields_ = [("pad1", ctypes.c_ulong), ("dst", _SockaddrIn), ("gateway", _SockaddrIn), ("genmask", _SockaddrIn),
                ("flags", ctypes.c_ushort), ("pad2", ctypes.c_short), ("pad3", ctypes.c_ulong),
                ("pad4", ctypes.c_void_p), ("metric", ctypes.c_short), ("dev", ctypes.c_char_p),
                ("mtu", ctypes.c_ulong), ("window", ctypes.c_ulong), ("irtt", ctypes.c_ushort)]  # fmt: skip


def _sockaddr(address: IPv4Address) -> _SockaddrIn:
    return _SockaddrIn(socket.AF_INET, 0, (ctypes.c_ubyte * 4)(*address.packed))


def _ioctl_configure(address: IPv4Address, subnet: IPv4Network, gateway: IPv4Address) -> None:
    """What a launcher child could do after setns, with ioctl(2) and no netlink at all."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for name in (b"lo", b"eth0"):
            flags = struct.unpack("16sH22x", fcntl.ioctl(sock, 0x8913, struct.pack("16sH22x", name, 0)))[1]
            fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", name, flags | 1))  # SIOCSIFFLAGS IFF_UP
        fcntl.ioctl(sock, 0x8916, b"eth0".ljust(16, b"\0") + bytes(_sockaddr(address)) + bytes(8))  # SIOCSIFADDR
        fcntl.ioctl(sock, 0x891C, b"eth0".ljust(16, b"\0") + bytes(_sockaddr(subnet.netmask)) + bytes(8))
        route = _Rtentry(dst=_sockaddr(IPv4Address(0)), gateway=_sockaddr(gateway), genmask=_sockaddr(IPv4Address(0)))
        route.flags = 0x1 | 0x2  # RTF_UP | RTF_GATEWAY
        fcntl.ioctl(sock, 0x890B, bytes(route))  # SIOCADDRT
    finally:
        sock.close()


async def child_configures(stack: Stack) -> tuple[float, float]:
    """Option (c): the supervisor makes namespaces and veths (eth0 inside, down, no address); a forked
    child (as the launcher's would be, before exec) joins each and configures it with ioctl(2).
    Returns the supervisor's time and the children's in-namespace time (summed)."""
    net = stack.network
    ipr = open_rtnl()
    host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    inside_total = 0.0
    try:
        t0 = time.perf_counter()
        bridge = await ensure_bridge(ipr, net.bridge, net.subnet, mtu=net.mtu)
        prepare_pin_dir(netns_dir(stack.paths))
        pins = await create_namespaces([e.netns for e in stack.endpoints])
        for e, pinned in zip(stack.endpoints, pins, strict=True):
            inner = open_rtnl(pinned.take_socket())
            message = veth_pair_message(
                index=pinned.free_index, mac=e.mac, mtu=net.mtu, host_name=e.veth, host_netns_fd=host_fd
            )
            check(await batch(inner, [message]), [e.veth])
            inner.close()
        check(await batch(ipr, [host_end_message(e.veth, bridge.index) for e in stack.endpoints]), [""] * len(pins))
        t1 = time.perf_counter()
        for e in stack.endpoints:
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                try:
                    os.close(read_end)
                    started = time.perf_counter()
                    linux.setns_path(e.netns, linux.CLONE_NEWNET)
                    _ioctl_configure(e.address, net.subnet, net.gateway)
                    os.write(write_end, struct.pack("d", time.perf_counter() - started))
                finally:
                    os._exit(0)
            os.close(write_end)
            data = os.read(read_end, 8)
            os.close(read_end)
            os.waitpid(pid, 0)
            inside_total += struct.unpack("d", data)[0]
        # the result is the same as ours: address and route inside
        shown = subprocess.run(
            ["nsenter", f"--net={stack.endpoints[0].netns}", "ip", "-j", "route"], capture_output=True, text=True
        )
        assert any(r.get("gateway") == str(net.gateway) for r in json.loads(shown.stdout)), shown.stdout
        return t1 - t0, inside_total
    finally:
        os.close(host_fd)
        ipr.close()
        await remove(stack)


async def teardown_ways(stack: Stack, way: str) -> float:
    """ours: unpin all, delete the bridge while the kernel destroys them, wait for the veths;
    sequential: unpin all, wait for the veths, then the bridge; delete-veths: delete every veth (an RCU
    wait each), then unpin, then the bridge."""
    net = stack.network
    await create_network(net, stack.paths, stack.endpoints)
    ipr = open_rtnl()
    try:
        t0 = time.perf_counter()
        if way == "ours":
            await teardown_network(net, stack.paths, stack.endpoints, ipr=ipr)
        elif way == "sequential":
            async with _link_monitor() as monitor:
                for e in stack.endpoints:
                    unpin(e.netns)
                left = await monitor.wait_gone({e.veth for e in stack.endpoints}, 5, ipr)
                assert not left
            await delete_bridge(ipr, net.bridge)
        else:
            replies = await batch(ipr, [delete_link_message(ifname=e.veth) for e in stack.endpoints])
            check(replies, [e.veth for e in stack.endpoints], ignore=[errno.ENODEV])
            for e in stack.endpoints:
                unpin(e.netns)
            await delete_bridge(ipr, net.bridge)
        return time.perf_counter() - t0
    finally:
        ipr.close()
        await remove(stack)


# --- running and printing ---------------------------------------------------------------------------


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * ms:7.1f}"


async def main_rows(workdir: Path, counts: list[int], runs: int) -> None:
    print(f"stackd beside ip -batch: {runs} runs each, alternating; medians in ms (per service in brackets)")
    print(f"{'services':>8}  {'stackd up':>16}  {'ip -batch up':>16}  {'ratio':>5}   {'stackd down':>16}"
          f"  {'ip -batch down':>16}  {'(veths gone)':>12}")  # fmt: skip
    serial = 0
    for count in counts:
        ours_up, ours_down, ip_up, ip_down, ip_gone = [], [], [], [], []
        for run in range(runs):
            order = ("stackd", "ip") if run % 2 == 0 else ("ip", "stackd")
            for row in order:
                serial += 1
                stack = await new_stack(workdir, count, serial)
                if row == "stackd":
                    up, down = await stackd_row(stack)
                    ours_up.append(up)
                    ours_down.append(down)
                else:
                    up, down, gone = await ip_row(stack)
                    ip_up.append(up)
                    ip_down.append(down)
                    ip_gone.append(gone)
        ratio = statistics.median(ours_up) / statistics.median(ip_up)
        cells = [
            f"{median_ms(v)} ({statistics.median(v) * ms / count:5.2f})" for v in (ours_up, ip_up, ours_down, ip_down)
        ]
        print(f"{count:>8}  {cells[0]:>16}  {cells[1]:>16}  {ratio:5.2f}   {cells[2]:>16}"
              f"  {cells[3]:>16}  {median_ms(ip_gone):>12}")  # fmt: skip
        if count == 50:
            verdict = "PASS" if statistics.median(ours_up) <= 0.150 else "MISS"
            print(f"{'':>8}  target: 50 services up in <= 150 ms: {verdict}")


async def option_rows(workdir: Path, counts: list[int], runs: int) -> None:
    print(f"\nthe options (docs/networking.md), {runs} runs each; medians in ms, per service in brackets")
    serial = 1000
    rows: list[tuple[str, Callable[[Stack], Awaitable[float]]]] = [
        ("pin: pyroute2 netns.create (forks)", pins_by_pyroute2),
        ("pin: unshare in our thread + bind mount (d)", pins_by_thread),
        ("socket inside: AsyncIPRoute(netns=) (forks)", socket_by_pyroute2_netns),
        ("socket inside: our thread, AsyncIPRoute(fileno=) (b)", socket_by_thread),
        ("up: veths from the host, peer by fd, 2 batches in (a)", host_made_veths),
        ("up: our pins, pyroute2 high-level calls", high_level_calls),
        ("down: ours (unpin, bridge while they die, wait)", lambda s: teardown_ways(s, "ours")),
        ("down: unpin, wait for veths, then bridge", lambda s: teardown_ways(s, "sequential")),
        ("down: delete every veth, unpin, bridge", lambda s: teardown_ways(s, "delete-veths")),
    ]
    for count in counts:
        print(f"  {count} services:")
        for label, function in rows:
            values = []
            for _ in range(runs):
                serial += 1
                values.append(await function(await new_stack(workdir, count, serial)))
            print(f"    {label:<56} {median_ms(values)} ({statistics.median(values) * ms / count:6.2f})")
        naive_up, naive_down, supervisor, children = [], [], [], []
        for _ in range(runs):
            serial += 1
            up, down = await naive_setup(await new_stack(workdir, count, serial))
            naive_up.append(up)
            naive_down.append(down)
            serial += 1
            parent, inside = await child_configures(await new_stack(workdir, count, serial))
            supervisor.append(parent)
            children.append(inside)
        print(f"    {'up: naive pyroute2 (netns.create, netns=, lookups)':<56} {median_ms(naive_up)} "
              f"({statistics.median(naive_up) * ms / count:6.2f})")  # fmt: skip
        print(f"    {'down: naive pyroute2 (delete veths, netns.remove)':<56} {median_ms(naive_down)} "
              f"({statistics.median(naive_down) * ms / count:6.2f})")  # fmt: skip
        print(f"    {'up (c): supervisor side (pins, veths, host ends)':<56} {median_ms(supervisor)} "
              f"({statistics.median(supervisor) * ms / count:6.2f})")  # fmt: skip
        print(f"    {'up (c): + in each launcher child, ioctl config':<56} {median_ms(children)} "
              f"({statistics.median(children) * ms / count:6.2f})")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--services", default="1,10,50", help="comma-separated service counts")
    parser.add_argument("--options", action="store_true", help="also measure the options considered")
    parser.add_argument("--options-services", default="10,50")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/network.py needs root")
    with tempfile.TemporaryDirectory(prefix="stackd-netbench-") as tmp:
        workdir = Path(tmp)
        await main_rows(workdir, [int(n) for n in args.services.split(",")], args.runs)
        if args.options:
            await option_rows(workdir, [int(n) for n in args.options_services.split(",")], args.runs)


if __name__ == "__main__":
    asyncio.run(main())
