"""Taking a stack's network down: namespaces unpinned, then every link at once; tolerant of anything
already gone.

Deleting a link costs the kernel RCU grace periods (about 20 ms a veth, 36-40 ms a bridge, measured
here), one wait per request. A stack's bridge and veth host ends share a netdev group
(names.link_group), so teardown_network unpins every namespace (all of a stack's in one umount of
their directory) and deletes the whole group in one request: one wait for all of them, and the veths'
peers go with them. The namespaces, left with only `lo`, are freed by the kernel in the background,
as `ip netns del` leaves them. A namespace that something still holds (a stray process in it) is
reported with its processes, found through /proc; it has no veth any more, so it is cut off.

detach_endpoints, for some services of a running stack (the bridge stays), cannot use the group: it
unpins their namespaces and waits, on rtnetlink link events (no polling), until the kernel has removed
their veths with them; a host end that does not go within `timeout` belongs to a namespace something
holds, and is deleted. Links without the group (a stack brought up by an older stackd) are taken down
that way too. Nothing here raises for a half-made network: a pin file never mounted, a pin with no
veth, a veth with no pin, no bridge, no directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from socket import AF_UNSPEC

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

from stackd.runtime.network.bridge import delete_bridge
from stackd.runtime.network.hosts import remove_names_files
from stackd.runtime.network.names import link_group, netns_dir
from stackd.runtime.network.netns import detach_pin_dir, find_holders, namespace_inode, release_pin_dir, unpin
from stackd.runtime.network.rtnl import batch, check, delete_group_message, delete_link_message, host_rtnl, open_rtnl
from stackd.runtime.network.stack import Endpoint, StackNetwork
from stackd.runtime.paths import StackPaths

__all__ = ["DEFAULT_TIMEOUT", "TeardownReport", "detach_endpoints", "teardown_network"]

#: How long to wait for the kernel to destroy unpinned namespaces (it takes 10-150 ms when not held).
DEFAULT_TIMEOUT = 5.0


@dataclass
class TeardownReport:
    """What a teardown did. `held` lists, per service, the pids still in its namespace after it was
    unpinned (its host end was deleted anyway); empty when the namespace went as it should."""

    unpinned: list[str] = field(default_factory=list)
    held: dict[str, list[int]] = field(default_factory=dict)
    deleted_links: list[str] = field(default_factory=list)
    bridge_deleted: bool = False
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.held

    def problems(self) -> list[str]:
        """A line per namespace still held, naming the service and the pids in it."""
        return [
            f"service {service}: its network namespace is still held by pid(s) {', '.join(map(str, pids))}"
            for service, pids in self.held.items()
        ]

    def __str__(self) -> str:
        lines = [f"unpinned {len(self.unpinned)} namespace(s) in {self.seconds * 1000:.1f} ms"]
        return "\n".join(lines + self.problems())


async def teardown_network(
    network: StackNetwork,
    paths: StackPaths,
    endpoints: Sequence[Endpoint],
    *,
    ipr: AsyncIPRoute | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> TeardownReport:
    """Remove everything of the stack's network: unpin every endpoint's namespace, then delete the
    bridge and every veth host end at once (their netdev group, link_group: one unregister, one wait
    for the kernel's RCU grace periods), then remove the pins' directory and the hosts and resolv.conf
    files. The namespaces, left with only `lo`, are freed by the kernel in the background.

    A namespace something still holds is reported with the processes in it (a scan of /proc); its
    veth is gone all the same, so it is cut off the stack. Links made without the group (a stack
    brought up by an older stackd) go the slower way: they are waited for as their namespaces go
    (`timeout`), and deleted if they do not."""
    started = time.monotonic()
    group = link_group(network.bridge)
    async with host_rtnl(ipr) as host, _link_monitor() as monitor:
        deleted: list[str] = []
        bridge_deleted = False
        if group is not None:
            # Before the namespaces are unpinned: their destruction by the kernel would compete with
            # this deletion for the rtnl lock and the grace periods (measured: 27-75 ms after, 25-40 before).
            ours = [network.bridge, *(point.veth for point in endpoints)]
            present = await _existing_links(host, ours)
            (reply,) = await batch(host, [delete_group_message(group)])
            check([reply], [f"links of group {group:#x} (bridge {network.bridge}): delete"], ignore=[errno.ENODEV])
            gone = present - await _existing_links(host, ours)
            bridge_deleted = network.bridge in gone
            deleted = sorted(gone - {network.bridge})
        detaching = await _unpin_all(endpoints, host, pin_dir=netns_dir(paths))
        detaching.report.deleted_links += deleted
        if detaching.inodes and group is not None:  # who still holds a namespace (it outlives its pin)
            held = find_holders(detaching.inodes.values())
            for service, inode in detaching.inodes.items():
                if held.get(inode):
                    detaching.report.held[service] = held[inode]
        if await _existing_links(host, [network.bridge]):
            bridge_deleted = await delete_bridge(host, network.bridge)
        report = await _wait_detached(detaching, monitor, host, timeout)
    report.bridge_deleted = bridge_deleted
    release_pin_dir(netns_dir(paths))
    remove_names_files(paths)
    report.seconds = time.monotonic() - started
    return report


async def detach_endpoints(
    endpoints: Sequence[Endpoint],
    *,
    ipr: AsyncIPRoute | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> TeardownReport:
    """Unpin every endpoint's namespace and wait until the kernel has removed its veth pair (the
    stack's other services and its bridge stay)."""
    started = time.monotonic()
    if not endpoints:
        return TeardownReport()
    async with host_rtnl(ipr) as host, _link_monitor() as monitor:
        report = await _wait_detached(await _unpin_all(endpoints, host), monitor, host, timeout)
    report.seconds = time.monotonic() - started
    return report


@dataclass
class _Detaching:
    report: TeardownReport
    #: host end -> its endpoint, for the veths that should go with their namespaces
    waiting: dict[str, Endpoint]
    #: service -> inode of its namespace
    inodes: dict[str, int]


async def _unpin_all(endpoints: Sequence[Endpoint], host: AsyncIPRoute, *, pin_dir: Path | None = None) -> _Detaching:
    """Unpin every namespace (the link monitor already listens): all at once by unmounting `pin_dir`
    when the whole stack goes. Delete at once the host ends that have no namespace pinned any more
    (nothing else will)."""
    detaching = _Detaching(TeardownReport(), {}, {})
    if not endpoints:
        if pin_dir is not None:
            detach_pin_dir(pin_dir)
        return detaching
    present = await _existing_links(host, [e.veth for e in endpoints])
    inodes = {point.service: namespace_inode(point.netns) for point in endpoints}
    if pin_dir is not None:
        detach_pin_dir(pin_dir)
    stale: list[str] = []
    for point in endpoints:
        inode = inodes[point.service]
        if unpin(point.netns) or inode is not None:
            detaching.report.unpinned.append(point.service)
            if inode is not None:
                detaching.inodes[point.service] = inode
            if point.veth in present:
                detaching.waiting[point.veth] = point
        elif point.veth in present:
            stale.append(point.veth)
    await _delete_links(host, stale, detaching.report)
    return detaching


async def _wait_detached(
    detaching: _Detaching, monitor: _LinkMonitor, host: AsyncIPRoute, timeout: float
) -> TeardownReport:
    """Wait for the host ends to go; report who holds the namespaces of those that do not, and
    delete them."""
    report, waiting, inodes = detaching.report, detaching.waiting, detaching.inodes
    left = await monitor.wait_gone(set(waiting), timeout, host)
    if left:
        services = [waiting[name].service for name in sorted(left)]
        holders = find_holders(inodes[s] for s in services if s in inodes)
        for service in services:
            report.held[service] = holders.get(inodes.get(service, -1), [])
        await _delete_links(host, sorted(left), report)
    return report


async def _existing_links(host: AsyncIPRoute, names: Sequence[str]) -> set[str]:
    """Which of these links exist in the calling thread's namespace (the host socket's)."""
    # if_nametoindex(3) is one ioctl each; asking rtnetlink would cost a parsed RTM_NEWLINK (~0.2 ms) each.
    found = set()
    for name in names:
        with contextlib.suppress(OSError):
            socket.if_nametoindex(name)
            found.add(name)
    return found


async def _delete_links(host: AsyncIPRoute, names: Sequence[str], report: TeardownReport) -> None:
    if not names:
        return
    replies = await batch(host, [delete_link_message(ifname=name) for name in names])
    check(replies, [f"veth {name}: delete" for name in names], ignore=[errno.ENODEV])
    report.deleted_links += [name for name, reply in zip(names, replies, strict=True) if reply.error is None]


class _LinkMonitor:
    """RTM_DELLINK events of the host's namespace, from an rtnetlink socket bound to RTMGRP_LINK."""

    def __init__(self) -> None:
        self.socket = open_rtnl()

    async def start(self) -> None:
        await self.socket.bind(groups=RTMGRP_LINK)

    def close(self) -> None:
        self.socket.close()

    async def wait_gone(self, names: set[str], timeout: float, host: AsyncIPRoute) -> set[str]:
        """Wait until every link in `names` is deleted, at most `timeout` s; the ones left."""
        remaining = set(names)
        if not remaining:
            return remaining
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while remaining:
            try:
                async with asyncio.timeout_at(deadline):
                    async for message in self.socket.get():
                        # A port leaving a bridge is announced as RTM_DELLINK of family AF_BRIDGE;
                        # the device itself going, as RTM_DELLINK of family AF_UNSPEC.
                        if message.get("event") == "RTM_DELLINK" and message.get("family") == AF_UNSPEC:
                            remaining.discard(message.get("ifname"))
            except TimeoutError:
                break
            except OSError as error:  # ENOBUFS: events were lost; start again and look
                if error.errno != errno.ENOBUFS:
                    raise
                self.close()
                self.socket = open_rtnl()
                await self.start()
                remaining &= await _existing_links(host, sorted(remaining))
        return remaining


@contextlib.asynccontextmanager
async def _link_monitor() -> AsyncIterator[_LinkMonitor]:
    monitor = _LinkMonitor()
    try:
        await monitor.start()
        yield monitor
    finally:
        monitor.close()
