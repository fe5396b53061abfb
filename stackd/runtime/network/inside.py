"""What a service's namespace holds, set from the rtnetlink socket opened inside it: `lo` up, `eth0` up
with the service's address, and a default route via the gateway (the bridge's address on the host).

The messages go in the same batch as the veth pair's creation (veth.py), after it. The default route
is accepted while `eth0` has no carrier yet (its host end is set up a moment later): the kernel looks
the gateway up ignoring the link state, and needs the device up, which it is.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from pyroute2.netlink import nlmsg

from stackd.runtime.network.rtnl import address_message, default_route_message, link_up_message

__all__ = ["LOOPBACK_INDEX", "inside_messages"]

#: `lo` is always the first interface of a network namespace.
LOOPBACK_INDEX = 1


def inside_messages(*, eth_index: int, address: IPv4Address, subnet: IPv4Network, gateway: IPv4Address) -> list[nlmsg]:
    """lo up; eth0 (index `eth_index`) up; its address; the default route via `gateway`."""
    return [
        link_up_message(index=LOOPBACK_INDEX),
        link_up_message(index=eth_index),
        address_message(eth_index, address, subnet),
        default_route_message(gateway),
    ]
