"""Kernel names and places of a stack's network: the bridge, the host ends of the veths, the netns pins.

Interface names have a 15-byte limit (IFNAMSIZ - 1), so they are short hashes (design.md §4):

    bridge_name("shop")        -> "sd-1a2b3c4d"      (sd- and 8 hex digits: 11 bytes)
    veth_name("shop", "db")    -> "sd0f1e2d3c4b5a"   (sd, 4 hex digits of the project, 8 of the service)

A bridge name has a dash and a veth name has none, so the two can never collide; both start with "sd"
(what the leak check and an operator look for); `link_prefixes(project)` are the beginnings of every
link name of one project (the leak check uses them to look at one project's links only). The peer
inside every namespace is `eth0`.

The stack's nftables table (firewall.py) is named after its bridge, so that the state record's bridge
name is enough to find it:

    nft_table_name("sd-1a2b3c4d") -> "stackd_1a2b3c4d"   (family inet)

A service's network namespace is pinned (bind-mounted) at `<state>/netns/<service>`, under the
project's state directory, so that it lives without any process in it and `stackd down` can find it.
"""

from __future__ import annotations

from pathlib import Path

from stackd.runtime.paths import StackPaths, short_hash

__all__ = [
    "IFNAMSIZ",
    "INNER_IFNAME",
    "NFT_TABLE_PREFIX",
    "bridge_name",
    "link_group",
    "link_prefixes",
    "names_dir",
    "netns_dir",
    "netns_path",
    "nft_table_bridge",
    "nft_table_name",
    "veth_name",
]

#: The kernel's interface name limit, including the terminating NUL.
IFNAMSIZ = 16
#: The name of the service's end of its veth pair, inside its namespace.
INNER_IFNAME = "eth0"
#: How the name of every nftables table of stackd begins.
NFT_TABLE_PREFIX = "stackd_"
_BRIDGE_PREFIX = "sd-"


def bridge_name(project: str) -> str:
    """The stack's bridge: "sd-" and 8 hex digits of a hash of the project."""
    return _BRIDGE_PREFIX + short_hash("bridge", project, length=8)


def veth_name(project: str, service: str) -> str:
    """The host end of a service's veth pair: "sd", 4 hex digits of a hash of the project and 8 of a
    hash of project and service."""
    return _veth_prefix(project) + short_hash("veth", project, service, length=8)


def _veth_prefix(project: str) -> str:
    return "sd" + short_hash("veth-project", project, length=4)


def link_prefixes(project: str) -> tuple[str, ...]:
    """How the names of a project's links begin: its bridge's name, and its veths' common prefix."""
    return bridge_name(project), _veth_prefix(project)


def link_group(bridge: str) -> int | None:
    """The netdev group (IFLA_GROUP) of the stack's bridge and veth host ends: 31 bits of the bridge's
    8 hex digits (the kernel keeps the group as a signed int, and `ip` prints it so), so that two
    running stacks share a group about as rarely as a bridge name. Teardown deletes the whole group in
    one request. None (no group) where that would be 0, the group of every other link of the host."""
    number = int(bridge.removeprefix(_BRIDGE_PREFIX), 16) & 0x7FFFFFFF
    return number or None


def nft_table_name(bridge: str) -> str:
    """The nftables table (family inet) holding the firewall of the stack whose bridge is `bridge`."""
    return NFT_TABLE_PREFIX + bridge.removeprefix(_BRIDGE_PREFIX)


def nft_table_bridge(table: str) -> str | None:
    """The bridge a stack's table is named after (None for a name that is not one of stackd's)."""
    if not table.startswith(NFT_TABLE_PREFIX):
        return None
    return _BRIDGE_PREFIX + table.removeprefix(NFT_TABLE_PREFIX)


def netns_dir(paths: StackPaths) -> Path:
    """Where the stack's network namespaces are pinned."""
    return paths.state / "netns"


def netns_path(paths: StackPaths, service: str) -> Path:
    """The pin of a service's network namespace. A `network_mode = "service:NAME"` service joins
    NAME's pin (pass it to build_plan as `join_netns`)."""
    return netns_dir(paths) / service


def names_dir(paths: StackPaths) -> Path:
    """Where the stack's /etc/hosts and /etc/resolv.conf are kept (bind-mounted into every service)."""
    return paths.state / "network"
