"""What the host's network already uses, read once before a subnet is picked (addresses.pick_subnet):
its IPv4 addresses, its IPv4 routes (every table), its resolvers, and the MTU of its default route's
device. Two dumps through pyroute2, and a read of /etc/resolv.conf.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from pyroute2 import AsyncIPRoute

from stackd.runtime.network.hosts import parse_nameservers
from stackd.runtime.network.rtnl import (
    batch,
    check,
    dump_addresses_message,
    dump_routes_message,
    get_link_message,
    host_rtnl,
)

__all__ = ["HostNetworks", "read_host_networks"]


@dataclass(frozen=True, slots=True)
class HostNetworks:
    """The host's IPv4 addresses (with their prefixes), route destinations, resolvers, and the MTU of
    the device of its default route (None without one)."""

    addresses: tuple[IPv4Interface, ...] = ()
    routes: tuple[IPv4Network, ...] = ()
    resolvers: tuple[IPv4Address, ...] = ()
    uplink_mtu: int | None = None

    def blocked(self) -> list[IPv4Network]:
        """What a stack's subnet must not overlap (for pick_subnet's `host_networks`)."""
        found = {a.network for a in self.addresses} | set(self.routes)
        found |= {IPv4Network(r) for r in self.resolvers}
        return sorted(found)

    def suggested_mtu(self, ceiling: int = 1500) -> int:
        """A stack's MTU: 1500, or less when the host's way out is smaller (a VPN, a cloud network)."""
        return min(ceiling, self.uplink_mtu) if self.uplink_mtu else ceiling


async def read_host_networks(
    ipr: AsyncIPRoute | None = None,
    *,
    ignore_links: Iterable[str] = (),
    resolv_conf: Path | str = "/etc/resolv.conf",
) -> HostNetworks:
    """Read the host's networks. `ignore_links`: links whose addresses and routes do not count (the
    stack's own bridge, left by a run that died, when its subnet is picked again)."""
    ignored = set(ignore_links)
    async with host_rtnl(ipr) as host:
        # One dump at a time: a netlink socket refuses a second one while the first runs (EBUSY).
        (addr_reply,) = await batch(host, [dump_addresses_message()])
        (route_reply,) = await batch(host, [dump_routes_message()])
        check([addr_reply, route_reply], ["dump addresses", "dump routes"])
        ignored_index: set[int] = set()
        addresses = []
        for message in addr_reply.messages:
            if message.get("IFA_LABEL") in ignored:
                ignored_index.add(int(message["index"]))
                continue
            local = message.get("IFA_LOCAL") or message.get("IFA_ADDRESS")
            if local:
                addresses.append(IPv4Interface(f"{local}/{message['prefixlen']}"))
        routes = []
        uplink_index = None
        for message in route_reply.messages:
            oif = message.get("RTA_OIF")
            if oif in ignored_index:
                continue
            destination = message.get("RTA_DST") or "0.0.0.0"
            routes.append(IPv4Network(f"{destination}/{message['dst_len']}", strict=False))
            if message["dst_len"] == 0 and message["table"] == 254 and oif and uplink_index is None:
                uplink_index = int(oif)
        uplink_mtu = None
        if uplink_index is not None:
            (link,) = await batch(host, [get_link_message(index=uplink_index)])
            if link.error is None and link.messages:
                uplink_mtu = int(link.messages[0].get("IFLA_MTU") or 0) or None
    try:
        text = Path(resolv_conf).read_text()
    except OSError:
        text = ""
    resolvers = tuple(a for a in parse_nameservers(text) if isinstance(a, IPv4Address))
    return HostNetworks(tuple(addresses), tuple(routes), resolvers, uplink_mtu)
