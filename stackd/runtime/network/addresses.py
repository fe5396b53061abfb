"""Pure choices of a stack's addresses: its subnet, its gateway, each service's address and MAC.

Nothing here does I/O: the host's facts (its addresses, routes and resolvers: `host.read_host_networks`)
and the subnets of the other running stacks come in as arguments, and the caller writes the results
to the stack's state record, so that they are the same at the next `up`.

- The subnet: `[network] subnet`, else the first /24 of a private pool, starting at a place derived
  from the project's name (so a project gets the same subnet run after run while it is free), that
  overlaps none of the host's addresses, routes or resolvers and no other stack's subnet.
- The gateway is the subnet's first address; it is the bridge's address on the host.
- A service's address is derived from a hash of its name, with a deterministic walk past taken
  addresses; an address the caller remembers from an earlier run is kept.
- A service's MAC address is derived from its IP address (as Docker does), so that a namespace
  re-created with the same address does not leave stale ARP entries in its neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

from stackd.errors import NetworkError
from stackd.runtime.paths import short_hash

__all__ = [
    "BROAD_ROUTE_PREFIX",
    "DEFAULT_POOL",
    "DEFAULT_PREFIXLEN",
    "assign_addresses",
    "gateway_of",
    "mac_for",
    "parse_subnet",
    "pick_subnet",
    "usable_addresses",
]

#: Where stacks without `[network] subnet` get theirs: 256 /24 subnets, rarely used by others
#: (Docker takes 172.17-31.0.0/16 and 192.168.0.0/16, Podman 10.88-89.0.0/16, Kubernetes 10.96/12, 10.244/16).
DEFAULT_POOL: tuple[IPv4Network, ...] = (IPv4Network("10.213.0.0/16"),)
DEFAULT_PREFIXLEN = 24
#: Routes broader than this (the default route, a VPN's 0.0.0.0/1 + 128.0.0.0/1) do not make a subnet
#: taken: the stack's connected route on its bridge is more specific and wins for its own traffic.
BROAD_ROUTE_PREFIX = 8


def gateway_of(subnet: IPv4Network) -> IPv4Address:
    """The subnet's first address: the bridge's address on the host, every service's default route."""
    return subnet.network_address + 1


def usable_addresses(subnet: IPv4Network) -> range:
    """The integer values of the addresses services may have: all but network, gateway and broadcast."""
    first = int(subnet.network_address) + 2
    last = int(subnet.broadcast_address) - 1
    return range(first, last + 1)


def pick_subnet(
    project: str,
    *,
    host_networks: Iterable[IPv4Network],
    taken: Iterable[IPv4Network] = (),
    pool: Iterable[IPv4Network] = DEFAULT_POOL,
    prefixlen: int = DEFAULT_PREFIXLEN,
) -> IPv4Network:
    """A free subnet of `prefixlen` from `pool` for `project`.

    `host_networks` are what the host uses (its addresses' networks, its routes' destinations, its
    resolvers as /32); routes broader than /8 are ignored (see BROAD_ROUTE_PREFIX). `taken` are the
    subnets of the other stacks (from their state records: a stack coming up may not have its bridge yet).
    The search starts at a place derived from the project's name and walks the pool in order, so the
    same project gets the same subnet while it stays free. NetworkError when the pool is full.
    """
    blocked = [n for n in host_networks if n.prefixlen >= BROAD_ROUTE_PREFIX] + list(taken)
    candidates = [sub for block in pool for sub in block.subnets(new_prefix=prefixlen)]
    if not candidates:
        raise NetworkError(f"the subnet pool {', '.join(map(str, pool))} has no /{prefixlen} subnets")
    start = int(short_hash("subnet", project), 16) % len(candidates)
    for step in range(len(candidates)):
        candidate = candidates[(start + step) % len(candidates)]
        if not any(candidate.overlaps(other) for other in blocked):
            return candidate
    raise NetworkError(
        f"project {project}: every /{prefixlen} of {', '.join(map(str, pool))} overlaps an address or route of "
        'this host or another stack: set [network] subnet = "..." to a free private subnet'
    )


def assign_addresses(
    subnet: IPv4Network,
    services: Iterable[str],
    *,
    previous: Mapping[str, IPv4Address | str] | None = None,
    reserved: Iterable[IPv4Address] = (),
) -> dict[str, IPv4Address]:
    """An address in `subnet` for every service, stable for its name.

    A service keeps its `previous` address (from the state record) when it is still in the subnet and
    not taken by another. The others, in name order, get the address derived from a hash of the name,
    or the next free one after it (wrapping), which is deterministic for the same set of names.
    `reserved` addresses are never handed out. NetworkError when the subnet is too small.
    """
    usable = usable_addresses(subnet)
    names = list(dict.fromkeys(services))
    used = {int(a) for a in reserved}
    result: dict[str, IPv4Address] = {}
    for name, value in (previous or {}).items():
        address = int(ip_address(value))
        if name in names and address in usable and address not in used:
            result[name] = IPv4Address(address)
            used.add(address)
    free = len(usable) - sum(1 for address in used if address in usable)
    if len(names) - len(result) > free:
        raise NetworkError(f"{subnet} has room for {len(usable)} services, not {len(names)}: pick a larger subnet")
    for name in sorted(set(names) - result.keys()):
        offset = int(short_hash("address", name), 16) % len(usable)
        for step in range(len(usable)):
            address = usable[(offset + step) % len(usable)]
            if address not in used:
                break
        else:  # pragma: no cover - the room check above makes this unreachable
            raise NetworkError(f"{subnet} is full")
        result[name] = IPv4Address(address)
        used.add(address)
    return {name: result[name] for name in names}


def mac_for(address: IPv4Address | str) -> str:
    """The MAC address of an interface with this IPv4 address: 02:5d and the four bytes of the address
    (locally administered, unicast). Stable across re-creation, so neighbours' ARP caches stay right."""
    packed = ip_address(address).packed
    return "02:5d:" + ":".join(f"{byte:02x}" for byte in packed)


def parse_subnet(text: str) -> IPv4Network:
    """An IPv4 subnet from its text (the spec validated it already)."""
    network = ip_network(text, strict=True)
    if not isinstance(network, IPv4Network):
        raise NetworkError(f"{text}: only IPv4 subnets are supported")
    return network
