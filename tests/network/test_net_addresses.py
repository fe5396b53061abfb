"""Pure choices of the network layer: kernel names, the subnet, addresses, MACs."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stackd.errors import NetworkError
from stackd.runtime.network import (
    DEFAULT_POOL,
    IFNAMSIZ,
    assign_addresses,
    bridge_name,
    gateway_of,
    mac_for,
    netns_path,
    pick_subnet,
    veth_name,
)
from stackd.runtime.network.addresses import usable_addresses
from stackd.runtime.paths import StackPaths

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=40)


@given(NAMES, NAMES)
def test_kernel_names_fit_and_are_distinct(project: str, service: str) -> None:
    bridge, veth = bridge_name(project), veth_name(project, service)
    assert len(bridge.encode()) < IFNAMSIZ and len(veth.encode()) < IFNAMSIZ
    assert bridge.startswith("sd-") and veth.startswith("sd") and "-" not in veth
    assert bridge == bridge_name(project) and veth == veth_name(project, service)
    assert veth != veth_name(project, service + "x") and veth != veth_name(project + "x", service)


def test_pins_live_under_the_state_directory() -> None:
    paths = StackPaths("shop", state_root=Path("/run/stackd"))
    assert netns_path(paths, "db") == Path("/run/stackd/shop/netns/db")


def test_a_project_gets_the_same_free_subnet_every_time() -> None:
    first = pick_subnet("shop", host_networks=[])
    assert first == pick_subnet("shop", host_networks=[])
    assert first.prefixlen == 24 and any(first.subnet_of(block) for block in DEFAULT_POOL)
    assert gateway_of(first) == first.network_address + 1


def test_the_subnet_avoids_host_addresses_routes_resolvers_and_other_stacks() -> None:
    preferred = pick_subnet("shop", host_networks=[])
    # the host has an address in it, then a route over it, then another stack took the next one
    around = [IPv4Network(f"{preferred.network_address + 7}/32")]
    second = pick_subnet("shop", host_networks=around)
    assert second != preferred and not second.overlaps(around[0])
    third = pick_subnet("shop", host_networks=[*around, IPv4Network(second.supernet(new_prefix=23))], taken=[])
    assert not third.overlaps(second.supernet(new_prefix=23)) and third != preferred
    fourth = pick_subnet("shop", host_networks=around, taken=[second])
    assert fourth not in (preferred, second)


def test_the_default_route_and_other_broad_routes_do_not_count() -> None:
    broad = [IPv4Network("0.0.0.0/0"), IPv4Network("0.0.0.0/1"), IPv4Network("10.0.0.0/7")]
    assert pick_subnet("shop", host_networks=broad) == pick_subnet("shop", host_networks=[])
    with pytest.raises(NetworkError):  # a /8 route counts: here it covers the whole pool
        pick_subnet("shop", host_networks=[IPv4Network("10.0.0.0/8")])


def test_a_full_pool_says_what_to_do() -> None:
    pool = [IPv4Network("10.99.0.0/23")]
    with pytest.raises(NetworkError, match=r"set \[network\] subnet"):
        pick_subnet("shop", host_networks=[IPv4Network("10.99.0.0/24")], taken=[IPv4Network("10.99.1.0/24")], pool=pool)


def test_addresses_are_stable_for_a_name_whatever_the_others() -> None:
    subnet = IPv4Network("10.77.0.0/24")
    alone = assign_addresses(subnet, ["db"])
    crowd = assign_addresses(subnet, ["web", "db", "cache", "worker"])
    assert crowd["db"] == alone["db"]
    assert assign_addresses(subnet, ["worker", "cache", "db", "web"]) == crowd
    assert list(crowd) == ["web", "db", "cache", "worker"]  # the caller's order
    assert len(set(crowd.values())) == 4
    for address in crowd.values():
        assert address in subnet and address not in (
            subnet.network_address,
            gateway_of(subnet),
            subnet.broadcast_address,
        )


def test_a_remembered_address_is_kept_and_collisions_walk_on() -> None:
    subnet = IPv4Network("10.77.0.0/24")
    natural = assign_addresses(subnet, ["db", "web"])
    # web remembers db's natural address (from an earlier run with other names): it keeps it, db walks on
    moved = assign_addresses(subnet, ["db", "web"], previous={"web": str(natural["db"])})
    assert moved["web"] == natural["db"]
    assert moved["db"] == natural["db"] + 1 or moved["db"] != natural["db"]
    assert moved == assign_addresses(subnet, ["web", "db"], previous={"web": natural["db"]})
    # a remembered address outside the subnet, or of a service that is gone, is dropped
    again = assign_addresses(subnet, ["db"], previous={"db": "10.1.2.3", "old": str(natural["web"])})
    assert again == {"db": natural["db"]}


def test_every_address_of_a_small_subnet_and_no_more() -> None:
    subnet = IPv4Network("10.77.0.0/29")  # 8 addresses: network, gateway, broadcast and 5 for services
    names = [f"s{i}" for i in range(5)]
    assert sorted(assign_addresses(subnet, names).values()) == [IPv4Address(a) for a in usable_addresses(subnet)]
    with pytest.raises(NetworkError, match="room for 5 services, not 6"):
        assign_addresses(subnet, [*names, "s5"])
    with pytest.raises(NetworkError):
        assign_addresses(subnet, names, reserved=[IPv4Address("10.77.0.4")])


def test_macs_follow_addresses() -> None:
    assert mac_for("10.77.0.5") == "02:5d:0a:4d:00:05"
    assert mac_for(IPv4Address("192.168.1.200")) == "02:5d:c0:a8:01:c8"
