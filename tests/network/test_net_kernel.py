"""A stack's network on the real kernel: bridge, pinned namespaces, veths, addresses, routes; traffic
between them; isolation between stacks; teardown, also of half-made and held networks."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from netkit import TEST_POOL, MakeStack, inside, ip_json, running, script

from stackd.errors import NetworkError
from stackd.runtime.network import (
    Endpoint,
    assign_addresses,
    create_network,
    mac_for,
    namespace_inode,
    netns_dir,
    pick_subnet,
    read_host_networks,
    teardown_network,
    unpin,
)
from stackd.runtime.network.names import link_group
from stackd.runtime.network.rtnl import batch, delete_link_message, open_rtnl

pytestmark = pytest.mark.root

SERVER = """
import socket, sys
port = int(sys.argv[1])
tcp = socket.create_server(("0.0.0.0", port))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
tcp.settimeout(10)
udp.settimeout(10)
print("ready", flush=True)
conn, peer = tcp.accept()
print("tcp from", peer[0], flush=True)
conn.sendall(conn.recv(100).upper())
conn.close()
data, peer = udp.recvfrom(100)
print("udp from", peer[0], flush=True)
udp.sendto(data.upper(), peer)
"""

CLIENT = """
import errno, json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
result = {}
try:
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(b"tcp ping")
        result["tcp"] = conn.recv(100).decode()
except OSError as error:
    result["tcp_error"] = errno.errorcode.get(error.errno, type(error).__name__)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(timeout / 3)
for attempt in range(3):
    udp.sendto(b"udp ping", (host, port))
    try:
        result["udp"] = udp.recvfrom(100)[0].decode()
        break
    except OSError as error:
        result["udp_error"] = errno.errorcode.get(error.errno, type(error).__name__)
print(json.dumps(result))
"""


def host_link(name: str) -> dict[str, Any]:
    (link,) = host_ip("-d", "link", "show", name)
    return dict(link)


def host_ip(*args: str) -> Any:
    """`ip -j ARGS` on the host (test-only, to look)."""
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout)


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def nsfs_mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo") as handle:
        return [line.split()[4] for line in handle if line.split()[4].startswith(str(directory))]


async def test_every_namespace_has_lo_eth0_address_and_default_route(make_stack: MakeStack) -> None:
    stack = await make_stack(["db", "web", "cache"])
    await stack.create()
    bridge = host_link(stack.network.bridge)
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    assert bridge["address"] == mac_for(stack.network.gateway)
    assert Path(f"/proc/sys/net/ipv4/conf/{stack.network.bridge}/forwarding").read_text().strip() == "0"
    (bridge_addr,) = host_ip("-4", "addr", "show", stack.network.bridge)
    assert [(a["local"], a["prefixlen"]) for a in bridge_addr["addr_info"]] == [(str(stack.network.gateway), 24)]
    for point in stack.endpoints.values():
        links = {link["ifname"]: link for link in ip_json(point.netns, "link")}
        assert set(links) == {"lo", "eth0"}
        assert "UP" in links["lo"]["flags"]
        eth0 = links["eth0"]
        assert "UP" in eth0["flags"] and eth0["operstate"] == "UP"
        assert eth0["mtu"] == bridge["mtu"] == stack.network.mtu
        assert eth0["address"] == point.mac
        (addresses,) = ip_json(point.netns, "-4", "addr", "show", "eth0")
        assert [(a["local"], a["prefixlen"], a.get("broadcast")) for a in addresses["addr_info"]] == [
            (str(point.address), 24, str(stack.network.subnet.broadcast_address))
        ]
        (lo,) = ip_json(point.netns, "-4", "addr", "show", "lo")
        assert [a["local"] for a in lo["addr_info"]] == ["127.0.0.1"]
        routes = ip_json(point.netns, "-4", "route")
        default = [r for r in routes if r["dst"] == "default"]
        assert [(r["gateway"], r["dev"]) for r in default] == [(str(stack.network.gateway), "eth0")]
        host_end = host_link(point.veth)
        assert host_end["master"] == stack.network.bridge
        assert host_end["operstate"] == "UP" and host_end["mtu"] == bridge["mtu"]
        assert host_end["linkinfo"]["info_kind"] == "veth"


async def test_tcp_and_udp_between_two_namespaces_by_address(make_stack: MakeStack) -> None:
    stack = await make_stack(["client", "server"])
    await stack.create()
    server, client = stack["server"], stack["client"]
    with running(server.netns, script(SERVER, "7001")) as process:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        result = json.loads(inside(client.netns, *script(CLIENT, str(server.address), "7001")).stdout)
        out, err = process.communicate(timeout=10)
    assert result == {"tcp": "TCP PING", "udp": "UDP PING"}, err
    assert out.split("\n")[:2] == [f"tcp from {client.address}", f"udp from {client.address}"]
    # and the gateway answers: it is the host, on the bridge (nothing listens on port 9: refused)
    reply = json.loads(inside(client.netns, *script(CLIENT, str(stack.network.gateway), "9", "0.3")).stdout)
    assert reply["tcp_error"] == "ECONNREFUSED"


async def test_two_stacks_cannot_reach_each_other(make_stack: MakeStack) -> None:
    first = await make_stack(["a"])
    second = await make_stack(["b"])
    assert not first.network.subnet.overlaps(second.network.subnet)
    await first.create()
    await second.create()
    for source, target in ((first["a"], second["b"]), (second["b"], first["a"])):
        with running(target.netns, script(SERVER, "7002")) as process:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
            started = time.monotonic()
            result = json.loads(inside(source.netns, *script(CLIENT, str(target.address), "7002", "0.6")).stdout)
            assert time.monotonic() - started < 10
            # The host routes nothing from one bridge to another: packets to the other stack are dropped
            # silently (no forwarding on the bridge, so no ICMP either).
            assert result == {"tcp_error": "TimeoutError", "udp_error": "TimeoutError"}
            process.kill()
            out, _ = process.communicate(timeout=10)
            assert out == ""  # the server never heard from the other stack


async def test_addresses_and_macs_are_stable_across_teardown_and_recreate(make_stack: MakeStack) -> None:
    stack = await make_stack(["db", "web", "worker"])
    await stack.create()
    seen = {name: ip_json(e.netns, "-4", "addr", "show", "eth0")[0] for name, e in stack.endpoints.items()}
    macs = {name: ip_json(e.netns, "link", "show", "eth0")[0]["address"] for name, e in stack.endpoints.items()}
    await stack.teardown()
    again = assign_addresses(stack.network.subnet, ["worker", "web", "db"])  # another order, no record
    assert again == {name: e.address for name, e in stack.endpoints.items()}
    remembered = assign_addresses(
        stack.network.subnet,
        ["db", "web", "worker", "new"],
        previous={n: e.address for n, e in stack.endpoints.items()},
    )
    assert {n: remembered[n] for n in stack.endpoints} == again
    await stack.create()
    for name, point in stack.endpoints.items():
        now = ip_json(point.netns, "-4", "addr", "show", "eth0")[0]
        assert ip_json(point.netns, "link", "show", "eth0")[0]["address"] == macs[name] == point.mac
        assert now["addr_info"][0]["local"] == seen[name]["addr_info"][0]["local"] == str(point.address)


async def test_teardown_leaves_nothing(make_stack: MakeStack) -> None:
    stack = await make_stack(["a", "b", "c"])
    await stack.create()
    pins = netns_dir(stack.paths)
    assert len(nsfs_mounts_under(pins)) == 4  # the shared directory and three pins
    inodes = [namespace_inode(e.netns) for e in stack.endpoints.values()]
    assert all(inodes) and len(set(inodes)) == 3
    group = link_group(stack.network.bridge)  # the bridge and the host ends share a netdev group
    groups = {
        name: host_link(name)["group"] for name in [stack.network.bridge, *(e.veth for e in stack.endpoints.values())]
    }
    assert set(groups.values()) == {str(group)}, groups
    report = await stack.teardown()
    assert report.clean and sorted(report.unpinned) == ["a", "b", "c"] and report.bridge_deleted
    assert report.deleted_links == sorted(e.veth for e in stack.endpoints.values())  # with the group, at once
    assert nsfs_mounts_under(pins) == [] and not pins.exists()
    assert not any(link_exists(name) for name in stack.link_names)
    again = await stack.teardown()  # nothing left to do, and no error
    assert again.unpinned == [] and not again.bridge_deleted


async def test_teardown_of_a_half_made_network(make_stack: MakeStack) -> None:
    stack = await make_stack(["pinned", "gone", "no-veth", "plain-file", "never"])
    await stack.create()
    # a namespace whose pin went but whose veth may still be there; a veth deleted by hand;
    # a pin replaced by a plain file; an endpoint that was never made at all
    unpin(stack["gone"].netns)
    ipr = open_rtnl()
    try:
        await batch(ipr, [delete_link_message(ifname=stack["no-veth"].veth)])
    finally:
        ipr.close()
    unpin(stack["plain-file"].netns)
    stack["plain-file"].netns.touch()
    unpin(stack["never"].netns)
    await batch_delete([stack["never"].veth])
    report = await stack.teardown(timeout=2.0)
    assert report.clean
    assert "pinned" in report.unpinned and "no-veth" in report.unpinned
    assert not any(link_exists(name) for name in stack.link_names)
    assert not netns_dir(stack.paths).exists()


async def batch_delete(names: list[str]) -> None:
    ipr = open_rtnl()
    try:
        await batch(ipr, [delete_link_message(ifname=name) for name in names])
    finally:
        ipr.close()


async def test_teardown_of_a_network_that_was_never_made(make_stack: MakeStack) -> None:
    stack = await make_stack(["a", "b"])
    report = await stack.teardown()
    assert report.clean and report.unpinned == [] and not report.bridge_deleted


async def test_a_failed_create_unpins_what_it_made(make_stack: MakeStack) -> None:
    stack = await make_stack(["good", "bad"])
    bad = stack["bad"]
    # An address off the stack's subnet: eth0 gets it, but the gateway is not on its link.
    wrong = Endpoint("bad", stack.network.subnet.network_address + 2**12, bad.netns, bad.veth)
    with pytest.raises(NetworkError, match=r"service bad: default route via .*: ENETUNREACH"):
        await create_network(stack.network, stack.paths, [stack["good"], wrong])
    assert nsfs_mounts_under(netns_dir(stack.paths)) == [str(netns_dir(stack.paths))]
    report = await teardown_network(stack.network, stack.paths, list(stack.endpoints.values()), timeout=2.0)
    assert report.clean and report.bridge_deleted


async def test_a_held_namespace_is_unpinned_and_reported(make_stack: MakeStack) -> None:
    stack = await make_stack(["held", "free"])
    await stack.create()
    held = stack["held"]
    with running(held.netns, ["sleep", "60"]) as stray:
        time.sleep(0.2)  # nsenter has setns'd and exec'd sleep
        report = await stack.teardown(timeout=0.5)
        assert report.held == {"held": [stray.pid]}
        assert held.veth in report.deleted_links  # cut off: its host end is gone
        assert sorted(report.unpinned) == ["free", "held"]
        assert not held.netns.exists() and not link_exists(held.veth)
        assert ip_json(f"/proc/{stray.pid}/ns/net", "link")[0]["ifname"] == "lo"  # only lo left in there


async def test_a_stale_veth_of_a_dying_namespace_is_replaced_not_file_exists(make_stack: MakeStack) -> None:
    stack = await make_stack([f"s{i}" for i in range(5)])
    await stack.create()
    for point in stack.endpoints.values():  # a supervisor killed in the middle of its teardown
        unpin(point.netns)
    await stack.create()  # at once: the old veths are still being destroyed by the kernel
    for point in stack.endpoints.values():
        assert ip_json(point.netns, "-4", "addr", "show", "eth0")[0]["addr_info"][0]["local"] == str(point.address)


async def test_an_existing_bridge_is_taken_over(make_stack: MakeStack) -> None:
    stack = await make_stack(["a"])
    await stack.create()
    for point in stack.endpoints.values():
        unpin(point.netns)
    await stack.create()  # the bridge of the "dead" run is reused, not "File exists"
    assert host_link(stack["a"].veth)["master"] == stack.network.bridge
    # the next run picked another subnet: the bridge keeps only the new gateway
    for point in stack.endpoints.values():
        unpin(point.netns)
    other = await make_stack(["a"], project=stack.project)
    assert other.network.bridge == stack.network.bridge and other.network.subnet != stack.network.subnet
    await other.create()
    (bridge,) = host_ip("-4", "addr", "show", stack.network.bridge)
    assert [a["local"] for a in bridge["addr_info"]] == [str(other.network.gateway)]
    inside_route = ip_json(other["a"].netns, "-4", "route")
    assert [r["gateway"] for r in inside_route if r["dst"] == "default"] == [str(other.network.gateway)]


async def test_the_host_facts_see_a_stack_and_can_ignore_its_own_bridge(make_stack: MakeStack) -> None:
    stack = await make_stack(["a"])
    await stack.create()
    seen = await read_host_networks()
    assert any(interface.network == stack.network.subnet for interface in seen.addresses)
    assert stack.network.subnet in seen.routes and stack.network.subnet in seen.blocked()
    assert pick_subnet(stack.project, host_networks=seen.blocked(), pool=TEST_POOL) != stack.network.subnet
    mine = await read_host_networks(ignore_links=[stack.network.bridge])
    assert stack.network.subnet not in mine.blocked()
    assert pick_subnet(stack.project, host_networks=mine.blocked(), pool=TEST_POOL) == stack.network.subnet
