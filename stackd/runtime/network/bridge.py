"""The stack's bridge on the host: created (or found again) with the gateway address, and deleted.

The bridge gets a fixed MAC address derived from the gateway's IP. A bridge without one takes the
lowest MAC of its ports, so it would change as services come and go and leave every service with a
stale ARP entry for its gateway. STP stays off (the default), so a new port forwards at once.

Packets that arrive on the bridge are not routed on (per-interface `forwarding` 0, written to
/proc/sys/net/ipv4/conf/<bridge>/forwarding), whatever the host's global ip_forward says (a Docker
host has it on). That flag does not last: setting ip_forward sets every interface's `forwarding`. The
stack's firewall (firewall.py: nftables) is what keeps stacks apart and the host to the gateway; with
`[network] outbound` it sets this flag to 1 (and ip_forward if needed), so install it after this.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

from stackd.errors import NetworkError
from stackd.runtime.network.addresses import gateway_of, mac_for
from stackd.runtime.network.names import link_group
from stackd.runtime.network.rtnl import (
    CREATE,
    address_message,
    batch,
    check,
    delete_address_message,
    delete_link_message,
    dump_addresses_message,
    get_link_message,
    link_up_message,
    netlink_error,
)

__all__ = ["Bridge", "delete_bridge", "ensure_bridge", "new_bridge_message"]

DEFAULT_MTU = 1500


@dataclass(frozen=True, slots=True)
class Bridge:
    """A bridge on the host: its name, index, MTU, and whether this call created it."""

    name: str
    index: int
    mtu: int
    created: bool


def new_bridge_message(name: str, *, mtu: int, mac: str) -> ifinfmsg:
    """Create bridge `name`, up, with this MTU and MAC."""
    message = ifinfmsg()
    message["flags"] = IFF_UP
    message["change"] = IFF_UP
    message["attrs"] = [
        ("IFLA_IFNAME", name),
        ("IFLA_MTU", mtu),
        ("IFLA_ADDRESS", mac),
        ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "bridge")]}),
    ]
    message["header"]["type"] = RTM_NEWLINK
    message["header"]["flags"] = CREATE
    return message


async def ensure_bridge(ipr: AsyncIPRoute, name: str, subnet: IPv4Network, *, mtu: int = DEFAULT_MTU) -> Bridge:
    """The bridge `name` with the subnet's gateway address, up: created, or found and made right
    (a bridge left by a supervisor that died is taken over). NetworkError when `name` exists and is
    not a bridge."""
    gateway: IPv4Address = gateway_of(subnet)
    (made,) = await batch(ipr, [new_bridge_message(name, mtu=mtu, mac=mac_for(gateway))])
    if made.error is not None and made.errno != errno.EEXIST:
        raise netlink_error(f"bridge {name}: create", made.error)
    (found,) = await batch(ipr, [get_link_message(name)])
    if found.error is not None or not found.messages:
        raise netlink_error(f"bridge {name}: look up", found.error or OSError(errno.ENODEV, "gone"))
    link = found.messages[0]
    kind = link.get(("linkinfo", "kind"))
    if kind != "bridge":
        raise NetworkError(f"bridge {name}: a {kind or 'non-bridge'} link of that name exists on the host")
    index = int(link["index"])
    if made.error is not None:  # taken over: no address of another subnet may stay on it
        await _remove_other_addresses(ipr, name, index, f"{gateway}/{subnet.prefixlen}")
    up = link_up_message(index=index, group=link_group(name))
    replies = await batch(ipr, [address_message(index, gateway, subnet, replace=True), up])
    check(replies, [f"bridge {name}: address {gateway}/{subnet.prefixlen}", f"bridge {name}: up"])
    _write_forwarding(name, "0")
    return Bridge(name, index, int(link.get("mtu") or mtu), made.error is None)


async def delete_bridge(ipr: AsyncIPRoute, name: str) -> bool:
    """Delete bridge `name`; False when it was already gone. Its ports are detached, not deleted.

    The kernel waits for RCU grace periods here (40-60 ms measured): the call blocks its thread that long."""
    (reply,) = await batch(ipr, [delete_link_message(ifname=name)])
    if reply.errno == errno.ENODEV:
        return False
    check([reply], [f"bridge {name}: delete"])
    return True


async def _remove_other_addresses(ipr: AsyncIPRoute, name: str, index: int, keep: str) -> None:
    (dump,) = await batch(ipr, [dump_addresses_message()])
    check([dump], [f"bridge {name}: addresses"])
    stale = []
    for message in dump.messages:
        local = message.get("IFA_LOCAL") or message.get("IFA_ADDRESS")
        if message["index"] == index and local and f"{local}/{message['prefixlen']}" != keep:
            stale.append(delete_address_message(index, local, message["prefixlen"]))
    if stale:
        check(
            await batch(ipr, stale),
            [f"bridge {name}: remove an old address"] * len(stale),
            ignore=[errno.EADDRNOTAVAIL],
        )


def _write_forwarding(name: str, value: str) -> None:
    path = f"/proc/sys/net/ipv4/conf/{name}/forwarding"
    try:
        with open(path, "w") as handle:
            handle.write(value)
    except OSError as error:
        raise NetworkError(f"bridge {name}: forwarding {value}: {error.strerror} on {path}") from None
