"""A stack's network: what it is (StackNetwork, Endpoint: plain data for the state record) and its
creation: the bridge, then every service's pinned namespace, veth pair, address and route.

    network = StackNetwork.for_project("shop", pick_subnet("shop", host_networks=facts.blocked()))
    addresses = assign_addresses(network.subnet, ["db", "web"], previous=record_addresses)
    endpoints = [endpoint(network, paths, name, address) for name, address in addresses.items()]
    # write network.to_record() and every endpoint.to_record() to the state record, then:
    await create_network(network, paths, endpoints)
    ... build_plan(service, join_netns=str(endpoint.netns), extra_binds=name_binds(paths)) ...
    await teardown_network(network, paths, endpoints)     # teardown.py

Per service this is one batch of five messages on the socket opened inside its namespace (the veth
pair, lo, eth0, address, route: veth.py, inside.py), and one message in a batch on the host's socket
(the host end on the bridge). Namespaces are made in a thread of ours, without forking (netns.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute

from stackd.errors import NetworkError
from stackd.runtime.network.addresses import gateway_of, mac_for, parse_subnet
from stackd.runtime.network.bridge import DEFAULT_MTU, Bridge, ensure_bridge
from stackd.runtime.network.inside import inside_messages
from stackd.runtime.network.names import bridge_name, link_group, netns_dir, netns_path, veth_name
from stackd.runtime.network.netns import PinnedNamespace, create_namespaces, prepare_pin_dir, unpin
from stackd.runtime.network.rtnl import batch, check, delete_link_message, host_rtnl, open_rtnl
from stackd.runtime.network.veth import host_end_message, veth_pair_message
from stackd.runtime.paths import StackPaths

__all__ = ["Endpoint", "StackNetwork", "attach_endpoints", "create_network", "endpoint"]


@dataclass(frozen=True, slots=True)
class StackNetwork:
    """A stack's network: its subnet, its bridge's name and its MTU (the bridge's, every veth's)."""

    project: str
    subnet: IPv4Network
    bridge: str
    mtu: int = DEFAULT_MTU

    @classmethod
    def for_project(cls, project: str, subnet: IPv4Network | str, *, mtu: int = DEFAULT_MTU) -> StackNetwork:
        network = subnet if isinstance(subnet, IPv4Network) else parse_subnet(subnet)
        return cls(project, network, bridge_name(project), mtu)

    @property
    def gateway(self) -> IPv4Address:
        """The bridge's address on the host: every service's default route."""
        return gateway_of(self.subnet)

    def to_record(self) -> dict[str, Any]:
        return {"subnet": str(self.subnet), "bridge": self.bridge, "mtu": self.mtu}

    @classmethod
    def from_record(cls, project: str, record: Mapping[str, Any]) -> StackNetwork:
        return cls(project, parse_subnet(record["subnet"]), record["bridge"], int(record.get("mtu", DEFAULT_MTU)))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One service on the stack's network: its address, its namespace's pin and its veth's host end."""

    service: str
    address: IPv4Address
    netns: Path
    veth: str

    @property
    def mac(self) -> str:
        return mac_for(self.address)

    def to_record(self) -> dict[str, Any]:
        return {"address": str(self.address), "netns": str(self.netns), "veth": self.veth}

    @classmethod
    def from_record(cls, service: str, record: Mapping[str, Any]) -> Endpoint:
        address = ip_address(record["address"])
        if not isinstance(address, IPv4Address):
            raise NetworkError(f"service {service}: {address} is not an IPv4 address")
        return cls(service, address, Path(record["netns"]), record["veth"])


def endpoint(network: StackNetwork, paths: StackPaths, service: str, address: IPv4Address | str) -> Endpoint:
    """The endpoint of `service` with `address`, named after the project and service."""
    value = ip_address(address)
    if not isinstance(value, IPv4Address) or value not in network.subnet:
        raise NetworkError(f"service {service}: {address} is not an address of {network.subnet}")
    return Endpoint(service, value, netns_path(paths, service), veth_name(network.project, service))


async def create_network(
    network: StackNetwork,
    paths: StackPaths,
    endpoints: Sequence[Endpoint],
    *,
    ipr: AsyncIPRoute | None = None,
) -> Bridge:
    """The bridge (created, or taken over) and every endpoint (see attach_endpoints)."""
    async with host_rtnl(ipr) as host:
        bridge = await ensure_bridge(host, network.bridge, network.subnet, mtu=network.mtu)
        prepare_pin_dir(netns_dir(paths))
        await attach_endpoints(network, endpoints, bridge_index=bridge.index, ipr=host)
        return bridge


async def attach_endpoints(
    network: StackNetwork,
    endpoints: Sequence[Endpoint],
    *,
    bridge_index: int,
    ipr: AsyncIPRoute | None = None,
) -> None:
    """For each endpoint: a new namespace pinned at its path (a stale pin is replaced), its veth pair,
    lo and eth0 up, the address and the default route; then all host ends on the bridge, up.

    A stale host end with the same name (a namespace still being destroyed, or held by a stray
    process) is deleted and the pair made again: never "File exists". On failure, every namespace made
    here is unpinned again (their veths go with them) and NetworkError says which service and step."""
    if not endpoints:
        return
    # All namespaces first, then their configuration: handing each namespace over as soon as the
    # thread has made it (NamespacePinner can) was measured no faster: both need the rtnl lock.
    pins = await create_namespaces([e.netns for e in endpoints])
    host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        async with host_rtnl(ipr) as host:
            for pinned, point in zip(pins, endpoints, strict=True):
                await _configure_inside(network, point, pinned, host_fd, host)
            group = link_group(network.bridge)
            replies = await batch(host, [host_end_message(e.veth, bridge_index, group) for e in endpoints])
            check(replies, [f"service {e.service}: veth {e.veth}: on bridge {network.bridge}" for e in endpoints])
    except BaseException:
        for pinned in pins:
            pinned.close()
            with contextlib.suppress(NetworkError):
                unpin(pinned.path)
        raise
    finally:
        os.close(host_fd)
        for pinned in pins:
            pinned.close()


async def _configure_inside(
    network: StackNetwork, point: Endpoint, pinned: PinnedNamespace, host_fd: int, host: AsyncIPRoute
) -> None:
    index = pinned.free_index
    messages = [
        veth_pair_message(index=index, mac=point.mac, mtu=network.mtu, host_name=point.veth, host_netns_fd=host_fd),
        *inside_messages(eth_index=index, address=point.address, subnet=network.subnet, gateway=network.gateway),
    ]
    what = [
        f"service {point.service}: veth {point.veth}: create",
        f"service {point.service}: lo: up",
        f"service {point.service}: eth0: up",
        f"service {point.service}: eth0: address {point.address}/{network.subnet.prefixlen}",
        f"service {point.service}: default route via {network.gateway}",
    ]
    async with open_rtnl(pinned.take_socket()) as inner:
        replies = await batch(inner, messages)
        if replies[0].errno == errno.EEXIST:
            (stale,) = await batch(host, [delete_link_message(ifname=point.veth)])
            check([stale], [f"service {point.service}: veth {point.veth}: delete the stale one"], ignore=[errno.ENODEV])
            replies = await batch(inner, messages)
        check(replies, what)
