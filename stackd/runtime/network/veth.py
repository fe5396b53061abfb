"""A service's veth pair: `eth0` inside its namespace, the host end (`sd<hash>`) on the stack's bridge.

The pair is created FROM INSIDE the namespace (through the rtnetlink socket opened there), with the
host end sent to the host's namespace by fd (`IFLA_NET_NS_FD` in the peer). Made that way, `eth0` gets
an index of our choosing (the kernel honours an index for the device a request creates, not for its
peer), and the address and default route can follow in the same batch, in one system call. The host
end is then put on the bridge and set up, all services' host ends in one batch.

`eth0` gets a MAC derived from its IP address (addresses.mac_for) and the bridge's MTU; so does the
host end's MTU. A stale host end (a namespace that is still being destroyed, or that a stray process
holds) is deleted when its name is needed again.
"""

from __future__ import annotations

from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from stackd.runtime.network.names import INNER_IFNAME
from stackd.runtime.network.rtnl import CREATE, link_up_message

__all__ = ["host_end_message", "veth_pair_message"]


def veth_pair_message(
    *, index: int, mac: str, mtu: int, host_name: str, host_netns_fd: int, ifname: str = INNER_IFNAME
) -> ifinfmsg:
    """Create `ifname` (index `index`, this MAC and MTU) in the namespace of the socket it is sent on,
    with its peer `host_name` (same MTU) in the namespace of `host_netns_fd`. Both down."""
    peer = {"attrs": [("IFLA_IFNAME", host_name), ("IFLA_MTU", mtu), ("IFLA_NET_NS_FD", host_netns_fd)]}
    message = ifinfmsg()
    message["index"] = index
    message["attrs"] = [
        ("IFLA_IFNAME", ifname),
        ("IFLA_MTU", mtu),
        ("IFLA_ADDRESS", mac),
        (
            "IFLA_LINKINFO",
            {"attrs": [("IFLA_INFO_KIND", "veth"), ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]})]},
        ),
    ]
    message["header"]["type"] = RTM_NEWLINK
    message["header"]["flags"] = CREATE
    return message


def host_end_message(host_name: str, bridge_index: int, group: int | None = None) -> ifinfmsg:
    """Put the host end on the bridge, in the stack's netdev group, and set it up (found by name)."""
    return link_up_message(ifname=host_name, master=bridge_index, group=group)
