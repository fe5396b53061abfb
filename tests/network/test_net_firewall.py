"""The stack's firewall on the real kernel (stackd/runtime/network/firewall.py): its nftables table, what
it lets through and what not, the outbound opt-in and the host's ip_forward, removal from plain data.

Traffic only between namespaces these tests make and addresses of the host itself (a gateway, or a
link of the test's own with a 10.214.x.y/32). The outbound tests check the rules and their
removal; they send nothing to any address outside the machine. ip_forward is changed only by
install_firewall (outbound), and `host_forwarding` checks at the end that it is back where it was
(and puts it back, and fails the test, if not).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from netkit import MakeStack, NetStack, inside, running, script

from stackd.errors import NetworkError
from stackd.runtime.network import Endpoint, read_host_networks
from stackd.runtime.network.firewall import (
    FORWARDING_RECORD,
    StackFirewall,
    bridged_traffic_warning,
    firewall_table,
    forward_dropping_chains,
    install_firewall,
    list_stackd_tables,
    remove_firewall,
    show_firewall,
)
from stackd.runtime.network.nft import delete_table_message, nft_socket, transaction
from stackd.testing.leaks import LeakGuard

pytestmark = pytest.mark.root

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

CONNECT = """
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("ok")
except TimeoutError:
    print("timeout")
except OSError as error:
    print(errno.errorcode.get(error.errno, "error"))
"""

SERVE = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    server.accept()[0].close()
"""

#: How long a connection that should be dropped is given (a drop shows as a timeout, not a refusal).
BLOCKED = 0.5

Install = Callable[[StackFirewall], Awaitable[None]]


def connect(point: Endpoint, address: IPv4Address | str, port: int, timeout: float = 3.0) -> str:
    """From the service's namespace, a TCP connection to address:port: "ok", "timeout" or an errno name."""
    return inside(point.netns, *script(CONNECT, str(address), str(port), str(timeout))).stdout.strip()


@contextlib.contextmanager
def serving(point: Endpoint, port: int) -> Iterator[None]:
    """A TCP server in the service's namespace on 0.0.0.0:port (ended by its PID on the way out)."""
    with running(point.netns, script(SERVE, str(port))) as process:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield


@contextlib.contextmanager
def host_listeners(*addresses: IPv4Address) -> Iterator[int]:
    """TCP listeners in the host's namespace, one port at each of these addresses (the kernel completes
    the handshakes: nothing needs to accept); the port."""
    first = socket.create_server((str(addresses[0]), 0))
    port = first.getsockname()[1]
    others = [socket.create_server((str(address), port)) for address in addresses[1:]]
    try:
        yield port
    finally:
        for listener in (first, *others):
            listener.close()


def ip_forward() -> str:
    return IP_FORWARD.read_text().strip()


def bridge_forwarding(bridge: str) -> str:
    return Path(f"/proc/sys/net/ipv4/conf/{bridge}/forwarding").read_text().strip()


def link_local(pin: Path | None, ifname: str, timeout: float = 5.0) -> str:
    """The link's IPv6 link-local address once usable (its duplicate address detection done)."""
    argv = ["ip", "-j", "-6", "addr", "show", "dev", ifname, "scope", "link"]
    deadline = time.monotonic() + timeout
    while True:
        out = (inside(pin, *argv) if pin else subprocess.run(argv, capture_output=True, text=True, check=True)).stdout
        usable = [a["local"] for link in json.loads(out or "[]") for a in link["addr_info"] if not a.get("tentative")]
        if usable:
            return str(usable[0])
        assert time.monotonic() < deadline, f"no usable link-local address on {ifname}"
        time.sleep(0.05)  # test-only: duplicate address detection has no event we could wait on here


async def dropped(bridge: str, comment: str) -> int:
    """The packet count of the rule with this comment, from the kernel."""
    text = await show_firewall(bridge)
    assert text is not None
    (line,) = [line for line in text.splitlines() if f'comment "{comment}"' in line]
    match = re.search(r"counter packets (\d+)", line)
    assert match, line
    return int(match.group(1))


def firewall_of(stack: NetStack, *, outbound: bool = False) -> StackFirewall:
    return StackFirewall.for_network(stack.network, outbound=outbound)


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
async def host_forwarding() -> AsyncIterator[str]:
    """The host's ip_forward before the test; after it, it must be that again and stackd's record of
    having changed it must be gone (both are put right, and the test fails, if not).

    ip_forward is one per host: the tests that use this fixture run one at a time, also under
    pytest-xdist and across concurrent runs (an flock on a file of the tests' own)."""
    lock = os.open(Path(tempfile.gettempdir()) / "stackd-tests-ip_forward.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        before = ip_forward()
        record_before = FORWARDING_RECORD in await list_stackd_tables()
        yield before
        problems = []
        if not record_before and FORWARDING_RECORD in await list_stackd_tables():
            async with nft_socket() as sock:
                await transaction(sock, [delete_table_message(FORWARDING_RECORD)])
            problems.append(f"table inet {FORWARDING_RECORD} was left")
        if ip_forward() != before:
            problems.append(f"net.ipv4.ip_forward was {before}, is {ip_forward()}")
            IP_FORWARD.write_text(before)
        assert not problems, "; ".join(problems)
    finally:
        os.close(lock)


@pytest.fixture
async def firewalls(make_stack: MakeStack, host_forwarding: str) -> AsyncIterator[Install]:
    """install_firewall, with every stack's table removed at the end (also when the test failed),
    before the stacks' networks go and before host_forwarding looks at ip_forward."""
    bridges: list[str] = []

    async def install(firewall: StackFirewall) -> None:
        bridges.append(firewall.bridge)
        await install_firewall(firewall)

    yield install
    for bridge in dict.fromkeys(bridges):
        await remove_firewall(bridge)


@pytest.fixture
async def host_address(leak_check: LeakGuard) -> AsyncIterator[IPv4Address]:
    """Another local address of the host: a /32 of 10.214.0.0/16 that nothing on the host uses, on a
    link of the test's own (sdt + 6 hex digits), up; deleted at the end."""
    name = "sdt" + secrets.token_hex(3)
    leak_check.track(link_prefixes=[name])
    taken = [n for n in (await read_host_networks()).blocked() if n.prefixlen >= 8]
    while True:
        address = IPv4Address(f"10.214.{random.randrange(256)}.{random.randrange(1, 255)}")
        if not any(address in network for network in taken):
            break
    try:
        # A dummy link, or a bridge without ports on kernels built without the dummy driver (as here).
        if subprocess.run(["ip", "link", "add", name, "type", "dummy"], capture_output=True).returncode != 0:
            subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True, capture_output=True)
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", name], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        yield address
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


# --- the rules, without the kernel ------------------------------------------------------------------------


def test_the_rules_as_nft_prints_them() -> None:
    firewall = StackFirewall("shop", "sd-1a2b3c4d", IPv4Network("10.213.7.0/24"), outbound=True)
    assert firewall.table == "stackd_1a2b3c4d"
    assert firewall_table(firewall).text == (
        "table inet stackd_1a2b3c4d {\n"
        '\tcomment "stackd project shop, outbound"\n'
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tiifname "sd-1a2b3c4d" ip daddr != 10.213.7.1 counter drop'
        ' comment "services reach the host only at their gateway"\n'
        '\t\tiifname "sd-1a2b3c4d" meta nfproto ipv6 counter drop comment "the stack has no IPv6"\n'
        "\t}\n"
        "\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        '\t\tiifname "sd-1a2b3c4d" oifname "sd-1a2b3c4d" accept comment "between the stack\'s own services"\n'
        '\t\tiifname "sd-1a2b3c4d" ip saddr 10.213.7.0/24 accept comment "outbound"\n'
        '\t\tiifname "sd-1a2b3c4d" counter drop comment "nothing else leaves the stack"\n'
        '\t\toifname "sd-1a2b3c4d" ct state established,related accept comment "replies"\n'
        '\t\toifname "sd-1a2b3c4d" counter drop comment "nothing else enters the stack"\n'
        "\t}\n"
        "\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        '\t\tip saddr 10.213.7.0/24 oifname != "sd-1a2b3c4d" masquerade comment "outbound"\n'
        "\t}\n"
        "}\n"
    )
    plain = firewall_table(StackFirewall("shop", "sd-1a2b3c4d", IPv4Network("10.213.7.0/24"))).text
    assert "postrouting" not in plain and "masquerade" not in plain and "ct state" not in plain
    assert StackFirewall.from_record("shop", json.loads(json.dumps(firewall.to_record()))) == firewall


# --- isolation --------------------------------------------------------------------------------------------


async def test_a_service_reaches_the_host_only_at_its_gateway(
    make_stack: MakeStack, firewalls: Install, host_address: IPv4Address
) -> None:
    stack = await make_stack(["a", "b"])
    await stack.create()
    a, gateway = stack["a"], stack.network.gateway
    with host_listeners(gateway, host_address) as port:
        # Without the firewall, the host answers at any of its addresses: the test can fail.
        assert connect(a, host_address, port) == "ok"
        assert connect(a, gateway, port) == "ok"

        await firewalls(firewall_of(stack))
        assert connect(a, host_address, port, timeout=BLOCKED) == "timeout"
        assert connect(a, gateway, port) == "ok"
    assert await dropped(stack.network.bridge, "services reach the host only at their gateway") >= 1
    # The stack's own services still reach each other (bridged: with br_netfilter, through the forward hook).
    with serving(stack["b"], 7101):
        assert connect(a, stack["b"].address, 7101) == "ok"


async def test_stacks_stay_apart_when_another_one_has_outbound(
    make_stack: MakeStack, firewalls: Install, host_forwarding: str
) -> None:
    first, second = await make_stack(["a", "a2"]), await make_stack(["b"])
    await first.create()
    await second.create()
    a, b = first["a"], second["b"]
    await firewalls(firewall_of(second))
    await firewalls(firewall_of(first, outbound=True))  # routing on: ip_forward 1, first's bridge forwarding 1
    assert ip_forward() == "1"
    assert bridge_forwarding(first.network.bridge) == "1"
    if host_forwarding == "0":  # turning ip_forward on turned every interface's forwarding on
        assert bridge_forwarding(second.network.bridge) == "1"
    with serving(b, 7102), serving(a, 7103):
        assert connect(a, b.address, 7102, timeout=BLOCKED) == "timeout"
        assert connect(b, a.address, 7103, timeout=BLOCKED) == "timeout"
        # nor through the host: the other stack's gateway is just another address of the host
        assert connect(a, second.network.gateway, 7102, timeout=BLOCKED) == "timeout"
        assert connect(b, first.network.gateway, 7103, timeout=BLOCKED) == "timeout"
        # Within the outbound stack, services still reach each other.
        assert connect(first["a2"], a.address, 7103) == "ok"
        # a -> b: the first stack's table accepts it (outbound), the second's drops it;
        # b -> a: dropped by whichever table's chain the kernel runs first (same hook, same priority).
        assert await dropped(second.network.bridge, "nothing else enters the stack") >= 1
        assert (
            await dropped(second.network.bridge, "nothing else leaves the stack")
            + await dropped(first.network.bridge, "nothing else enters the stack")
        ) >= 1

        # What keeps the second stack apart is its own table: without it (and with its bridge's
        # forwarding as ip_forward left it), the outbound stack's accept lets a new connection through.
        await remove_firewall(second.network.bridge)
        Path(f"/proc/sys/net/ipv4/conf/{second.network.bridge}/forwarding").write_text("1")
        assert connect(a, b.address, 7102) == "ok"
        await firewalls(firewall_of(second))
        assert connect(a, b.address, 7102, timeout=BLOCKED) == "timeout"


async def test_no_ipv6_to_the_host(make_stack: MakeStack, firewalls: Install) -> None:
    stack = await make_stack(["a"])
    await stack.create()
    a = stack["a"]
    gateway6 = link_local(None, stack.network.bridge)
    link_local(a.netns, "eth0")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        listener.bind((gateway6, 0, 0, socket.if_nametoindex(stack.network.bridge)))
        listener.listen()
        port = listener.getsockname()[1]
        assert connect(a, f"{gateway6}%eth0", port) == "ok"  # without the firewall: the test can fail
        await firewalls(firewall_of(stack))
        assert connect(a, f"{gateway6}%eth0", port, timeout=BLOCKED) == "timeout"
    assert await dropped(stack.network.bridge, "the stack has no IPv6") >= 1


# --- outbound ---------------------------------------------------------------------------------------------


async def test_outbound_rules_and_ip_forward_given_back(
    make_stack: MakeStack, firewalls: Install, host_forwarding: str
) -> None:
    stack = await make_stack(["a"])
    await stack.create()
    firewall = firewall_of(stack, outbound=True)
    assert bridge_forwarding(stack.network.bridge) == "0"

    await firewalls(firewall)
    # Exactly these rules, as the kernel holds them (decoded by pyroute2, not by the code that sent them).
    shown = await show_firewall(stack.network.bridge, counters=False)
    assert shown == firewall_table(firewall).text
    assert f'ip saddr {stack.network.subnet} oifname != "{stack.network.bridge}" masquerade' in shown
    assert f'iifname "{stack.network.bridge}" ip saddr {stack.network.subnet} accept' in shown
    assert ip_forward() == "1" and bridge_forwarding(stack.network.bridge) == "1"
    assert (FORWARDING_RECORD in await list_stackd_tables()) == (host_forwarding == "0")

    assert await remove_firewall(stack.network.bridge)
    assert ip_forward() == host_forwarding
    assert bridge_forwarding(stack.network.bridge) == "0"
    assert firewall.table not in await list_stackd_tables()
    assert FORWARDING_RECORD not in await list_stackd_tables()


async def test_ip_forward_stays_on_until_the_last_outbound_stack_goes(
    make_stack: MakeStack, firewalls: Install, host_forwarding: str
) -> None:
    stacks = [await make_stack(["a"]) for _ in range(3)]
    for stack in stacks:
        await stack.create()
    first, second, plain = (
        firewall_of(stacks[0], outbound=True),
        firewall_of(stacks[1], outbound=True),
        firewall_of(stacks[2]),
    )
    for firewall in (first, second, plain):
        await firewalls(firewall)
    assert ip_forward() == "1"

    await remove_firewall(first.bridge)
    assert ip_forward() == "1"  # the second still needs it
    await remove_firewall(plain.bridge)
    assert ip_forward() == "1"
    # Replacing the last outbound table by one without outbound gives ip_forward back too.
    await install_firewall(StackFirewall(second.project, second.bridge, second.subnet, outbound=False))
    assert ip_forward() == host_forwarding
    assert FORWARDING_RECORD not in await list_stackd_tables()
    assert bridge_forwarding(second.bridge) == "0"
    await remove_firewall(second.bridge)
    assert ip_forward() == host_forwarding


async def test_outbound_needs_the_bridge_and_changes_nothing_without_it(host_forwarding: str) -> None:
    firewall = StackFirewall("nt-nobridge", "sd-" + secrets.token_hex(4), IPv4Network("10.240.250.0/24"), True)
    with pytest.raises(NetworkError, match="does not exist"):
        await install_firewall(firewall)
    assert firewall.table not in await list_stackd_tables()
    assert ip_forward() == host_forwarding


# --- removal, idempotence ---------------------------------------------------------------------------------


async def test_remove_from_the_record_alone_in_a_new_process_and_again(
    make_stack: MakeStack, firewalls: Install, host_forwarding: str
) -> None:
    stack = await make_stack(["a"])
    await stack.create()
    firewall = firewall_of(stack, outbound=True)
    await firewalls(firewall)
    record = json.dumps({"project": stack.project, **firewall.to_record()})

    # What `stackd down` does after the supervisor died: a new process, the record's plain data.
    code = (
        "import asyncio, json, sys\n"
        "from stackd.runtime.network.firewall import StackFirewall, remove_firewall\n"
        "record = json.loads(sys.argv[1])\n"
        "firewall = StackFirewall.from_record(record.pop('project'), record)\n"
        "print(asyncio.run(remove_firewall(firewall.bridge)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, record], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
    assert firewall.table not in await list_stackd_tables()
    assert ip_forward() == host_forwarding

    assert await remove_firewall(firewall.bridge) is False  # again: nothing left, no error
    assert await remove_firewall("sd-" + secrets.token_hex(4)) is False  # never installed
    assert ip_forward() == host_forwarding


async def test_install_twice_is_the_same_ruleset(make_stack: MakeStack, firewalls: Install) -> None:
    stack = await make_stack(["a"])
    await stack.create()
    firewall = firewall_of(stack)
    await firewalls(firewall)
    once = await show_firewall(stack.network.bridge, counters=False)
    await firewalls(firewall)
    twice = await show_firewall(stack.network.bridge, counters=False)
    assert once == twice == firewall_table(firewall).text
    assert (await list_stackd_tables()).count(firewall.table) == 1


async def test_a_table_deleted_behind_stackds_back_still_gives_ip_forward_back(
    make_stack: MakeStack, firewalls: Install, host_forwarding: str
) -> None:
    outbound, plain = await make_stack(["a"]), await make_stack(["b"])
    await outbound.create()
    await plain.create()
    await firewalls(firewall_of(outbound, outbound=True))
    await firewalls(firewall_of(plain))
    async with nft_socket() as sock:  # an operator's `nft delete table inet stackd_...`
        await transaction(sock, [delete_table_message(firewall_of(outbound).table)])
    assert ip_forward() == "1"
    # The next change of any stack's firewall sees that no outbound stack is left.
    await remove_firewall(plain.network.bridge)
    assert ip_forward() == host_forwarding


# --- speed ------------------------------------------------------------------------------------------------


async def test_install_and_remove_speed(
    make_stack: MakeStack, host_forwarding: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = await make_stack(["a"])
    await stack.create()
    times: dict[str, list[float]] = {}
    try:
        for outbound in (False, True) * 5:
            firewall = firewall_of(stack, outbound=outbound)
            for step, call in (("install", install_firewall(firewall)), ("remove", remove_firewall(firewall.bridge))):
                await asyncio.sleep(0.03)  # let the kernel finish freeing the last table (an RCU grace period)
                start = time.perf_counter()
                await call
                times.setdefault(f"{step} (outbound={outbound})", []).append((time.perf_counter() - start) * 1000)
    finally:
        await remove_firewall(stack.network.bridge)
    with capsys.disabled():
        print()
        for label, values in times.items():
            print(f"{label}: median of {len(values)} = {statistics.median(values):.2f} ms")


def in_namespace(pin: str, work: Callable[[], object]) -> object:
    """`work()` in a thread of its own that has joined the network namespace pinned at `pin`."""
    import threading

    from stackd._sys.linux import CLONE_NEWNET, setns_path

    box: list[object] = []

    def run() -> None:
        try:
            setns_path(pin, CLONE_NEWNET)
            box.append(work())
        except BaseException as error:  # handed to the caller
            box.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def test_a_host_firewall_that_drops_forwarded_traffic_is_told() -> None:
    """With br_netfilter, a FORWARD policy of drop (what a running dockerd sets) drops the traffic
    between a stack's services whatever its own table accepts: stackd says so. In a namespace of the
    test's own, never on the host."""
    name = f"sdfw-{secrets.token_hex(3)}"
    pin = f"/run/netns/{name}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert in_namespace(pin, lambda: asyncio.run(forward_dropping_chains())) == []
        assert in_namespace(pin, lambda: asyncio.run(bridged_traffic_warning("sd-1a2b3c4d"))) is None
        subprocess.run(["ip", "netns", "exec", name, "iptables", "-P", "FORWARD", "DROP"], check=True)
        assert in_namespace(pin, lambda: asyncio.run(forward_dropping_chains())) == ["ip filter FORWARD"]
        warning = in_namespace(pin, lambda: asyncio.run(bridged_traffic_warning("sd-1a2b3c4d")))
        if Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():  # br_netfilter loaded
            assert isinstance(warning, str) and "policy drop: ip filter FORWARD" in warning
            assert "iptables -I FORWARD -i sd-1a2b3c4d -o sd-1a2b3c4d -j ACCEPT" in warning
        else:
            assert warning is None  # bridged frames never meet the forward hook
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
