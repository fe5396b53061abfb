"""Published ports (stackd/runtime/network/publish.py) on the real kernel: a server in a service's
namespace, reached through the proxy's listeners on 127.0.0.1 (and ::1, 0.0.0.0).

Traffic only between the host's loopback, the test's own bridge and the namespaces it made. Host ports
are the kernel's free ones or found free in 20000-32767 (below the ephemeral range); every listener is
closed by the publisher on the way out and the server processes are ended by their PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from netkit import MakeStack, NetStack, running, script

from stackd.errors import NetworkError
from stackd.runtime.network.publish import PortPublisher, PublishedPort, host_ports
from stackd.spec.models import PortMapping

pytestmark = pytest.mark.root

#: In the namespace: every TCP port in argv[2] (comma-separated) greets with "NAME:PORT\n", echoes what
#: it reads until the end of file, then sends "|eof:N" (N bytes read) and closes. Port 81 floods: it
#: sends as much as it can until a send has blocked for 2 s, prints "flood N" (N bytes sent) and closes.
#: UDP port 53 answers every datagram with the datagram, "|NAME|" and the sender's address as it sees it.
SERVER = """
import socket, sys, threading
name, ports = sys.argv[1], [int(p) for p in sys.argv[2].split(",")]

def echo(conn, port):
    with conn:
        conn.sendall(f"{name}:{port}\\n".encode())
        total = 0
        while data := conn.recv(1 << 20):
            total += len(data)
            conn.sendall(data)
        conn.sendall(b"|eof:%d" % total)

def flood(conn):
    with conn:
        conn.settimeout(2.0)
        chunk, sent = bytes(1 << 20), 0
        try:
            while sent < (256 << 20):
                sent += conn.send(chunk)
        except TimeoutError:
            pass
        print(f"flood {sent}", flush=True)

def serve(listener, port):
    while True:
        conn, _ = listener.accept()
        target = flood if port == 81 else echo
        threading.Thread(target=target, args=(conn,) if port == 81 else (conn, port), daemon=True).start()

def udp(sock):
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data + f"|{name}|{peer[0]}:{peer[1]}".encode(), peer)

for port in [*ports, 81]:
    listener = socket.create_server(("0.0.0.0", port), backlog=128)
    threading.Thread(target=serve, args=(listener, port), daemon=True).start()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 53))
threading.Thread(target=udp, args=(sock,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

SERVED = "80,9000,9001,9002"
MiB = 1 << 20


def tcp(host_port: int | None, container_port: int = 80, *, host_ip: str = "127.0.0.1", end: int = 0) -> PortMapping:
    """A TCP mapping host_ip:host_port[-end]:container_port; host_port None: any free port."""
    return PortMapping(container_port, container_port, host_ip, host_port, end or host_port)


def udp(host_port: int | None = None, container_port: int = 53) -> PortMapping:
    return PortMapping(container_port, container_port, "127.0.0.1", host_port, host_port, "udp")


@contextlib.contextmanager
def serving(stack: NetStack, service: str) -> Iterator[subprocess.Popen[str]]:
    """SERVER in the service's namespace, ready; ended by its PID on the way out."""
    with running(stack[service].netns, script(SERVER, service, SERVED)) as process:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready", process.stderr.read() if process.stderr else ""
        yield process


@pytest.fixture
async def stack(make_stack: MakeStack) -> AsyncIterator[NetStack]:
    """A stack network with services web and api (created; torn down by make_stack)."""
    made = await make_stack(["web", "api"])
    await made.create()
    yield made


def free_ports(count: int, kinds: tuple[int, ...] = (socket.SOCK_STREAM, socket.SOCK_DGRAM)) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1 for TCP and UDP right now, in 20000-32767."""
    for _ in range(200):
        first = random.randrange(20000, 32768 - count)
        if all(_free(port, kind) for port in range(first, first + count) for kind in kinds):
            return first
    raise AssertionError("no free port range found")


def _free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def open_to(port: int, host: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A connection through the proxy, and the greeting the server sent on it ("web:80")."""
    reader, writer = await asyncio.open_connection(host, port)
    greeting = await asyncio.wait_for(reader.readline(), 5)
    return reader, writer, greeting.decode().strip()


async def greeting_of(port: int, host: str = "127.0.0.1") -> str:
    _, writer, greeting = await open_to(port, host)
    writer.close()
    return greeting


async def until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything left on the connection until the proxy closes it (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


def refused(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def has_ipv6_loopback() -> bool:
    try:
        return any(line.split()[0] == "0" * 31 + "1" for line in Path("/proc/net/if_inet6").read_text().splitlines())
    except OSError:
        return False


# --- pure -------------------------------------------------------------------------------------------------


def test_host_ports_expands_ranges() -> None:
    assert host_ports(PortMapping(9000, 9002, "127.0.0.1", 8000, 8002)) == [
        (range(8000, 8001), 9000),
        (range(8001, 8002), 9001),
        (range(8002, 8003), 9002),
    ]
    assert host_ports(PortMapping(80, 80, "127.0.0.1", 8000, 8010)) == [(range(8000, 8011), 80)]
    assert host_ports(PortMapping(9000, 9001, "127.0.0.1", None, None)) == [(range(0), 9000), (range(0), 9001)]
    assert host_ports(PortMapping(80, 80, "127.0.0.1", 8080, None)) == [(range(8080, 8081), 80)]


def test_published_port_reads_like_docker_ps() -> None:
    assert str(PublishedPort("web", "tcp", "127.0.0.1", 8080, 80)) == "127.0.0.1:8080->80/tcp"
    assert str(PublishedPort("dns", "udp", "::1", 5353, 53)) == "[::1]:5353->53/udp"


# --- TCP --------------------------------------------------------------------------------------------------


async def test_tcp_echo_20mb_both_ways_byte_exact(stack: NetStack) -> None:
    payload = os.urandom(20 * MiB)
    with serving(stack, "web"):
        async with PortPublisher() as publisher:
            (port,) = await publisher.publish("web", [tcp(None)], stack["web"].address)
            reader, writer, greeting = await open_to(port.host_port)
            assert greeting == "web:80"

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            async with asyncio.timeout(60):
                _, echoed = await asyncio.gather(send(), reader.read())
            writer.close()
    assert len(echoed) == len(payload) + len(b"|eof:%d" % len(payload))
    assert echoed == payload + b"|eof:%d" % len(payload)


async def test_tcp_half_close_client_still_reads_the_reply(stack: NetStack) -> None:
    with serving(stack, "web"):
        async with PortPublisher() as publisher:
            (port,) = await publisher.publish("web", [tcp(None)], stack["web"].address)
            reader, writer, _ = await open_to(port.host_port)
            writer.write(b"hello")
            await writer.drain()
            writer.write_eof()  # shutdown(SHUT_WR): the server must see the end of file...
            reply = await until_closed(reader)  # ...and the client still reads what comes after it
            writer.close()
    assert reply == b"hello|eof:5"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_tcp_many_connections_at_once_and_none_left_open(stack: NetStack) -> None:
    """100 clients at once, each echoed byte-exact; once they are done, the proxy holds no socket."""
    with serving(stack, "web"):
        async with PortPublisher() as publisher:
            (port,) = await publisher.publish("web", [tcp(None)], stack["web"].address)
            before = open_fds()

            async def one(index: int) -> bytes:
                payload = index.to_bytes(4, "big") * 16384  # 64 KiB of its own
                reader, writer, _ = await open_to(port.host_port)
                writer.write(payload)
                writer.write_eof()
                echoed = await until_closed(reader, timeout=30)
                writer.close()
                await writer.wait_closed()
                return echoed == payload + b"|eof:%d" % len(payload)

            async with asyncio.timeout(60):
                results = await asyncio.gather(*(one(i) for i in range(100)))
            assert all(results)
            with anyio.fail_after(5):
                while open_fds() > before:  # test-only: the proxy closes its sockets in callbacks
                    await anyio.sleep(0.01)


async def test_tcp_refused_upstream_closes_the_client(stack: NetStack) -> None:
    with serving(stack, "web"):  # listens on 80, not on 8
        async with PortPublisher() as publisher:
            (port,) = await publisher.publish("web", [tcp(None, 8)], stack["web"].address)
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port.host_port)
            assert await until_closed(reader) == b""
            assert time.monotonic() - started < 1.0  # refused at once, not after the connect timeout
            writer.close()
            # the listener itself is still there
            with socket.create_connection(("127.0.0.1", port.host_port), timeout=2):
                pass


async def test_tcp_unreachable_upstream_closed_after_the_connect_timeout(stack: NetStack) -> None:
    nobody = stack.network.subnet.broadcast_address - 1  # an address of the stack nobody has
    async with PortPublisher(connect_timeout=0.5) as publisher:
        (port,) = await publisher.publish("web", [tcp(None)], nobody)
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port.host_port)
        assert await until_closed(reader) == b""
        elapsed = time.monotonic() - started
        writer.close()
    assert 0.4 < elapsed < 2.0


async def test_tcp_slow_reader_stops_the_sender(stack: NetStack) -> None:
    """Backpressure: a client that reads nothing must stall the server after a few buffers, and then get
    every byte once it reads (without flow control the proxy would take the whole 256 MiB into memory)."""
    with serving(stack, "web") as server:
        async with PortPublisher() as publisher:
            (port,) = await publisher.publish("web", [tcp(None, 81)], stack["web"].address)
            reader, writer = await asyncio.open_connection("127.0.0.1", port.host_port)
            assert server.stdout is not None
            with anyio.fail_after(20):
                line = await anyio.to_thread.run_sync(server.stdout.readline, abandon_on_cancel=True)
            sent = int(line.split()[1])
            received = 0
            with anyio.fail_after(30):
                while data := await reader.read(MiB):
                    received += len(data)
            writer.close()
    assert sent < 96 * MiB, f"the server sent {sent / MiB:.0f} MiB to a client that read nothing"
    assert received == sent


async def test_busy_host_port_fails_clearly_and_leaves_nothing_bound(stack: NetStack) -> None:
    first = free_ports(2)
    free, busy = first, first + 1
    with socket.create_server(("127.0.0.1", busy)):
        async with PortPublisher() as publisher:
            with pytest.raises(NetworkError) as failure:
                await publisher.publish("web", [tcp(free), udp(), tcp(busy)], stack["web"].address)
            assert publisher.published() == []
    message = str(failure.value)
    assert message.startswith("service web: ")
    assert f'"127.0.0.1:{busy}:80/tcp"' in message
    assert "address already in use" in message
    assert refused(free)  # the mapping bound before the busy one was let go
    assert _free(free, socket.SOCK_STREAM)


async def test_busy_udp_port_fails_clearly(stack: NetStack) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        busy = blocker.getsockname()[1]
        async with PortPublisher() as publisher:
            with pytest.raises(NetworkError, match=rf'"127.0.0.1:{busy}:53/udp".*address already in use'):
                await publisher.publish("web", [udp(busy)], stack["web"].address)


async def test_random_host_port_is_reported(stack: NetStack) -> None:
    with serving(stack, "web"):
        async with PortPublisher() as publisher:
            (port,) = await publisher.publish("web", [tcp(None)], stack["web"].address)
            assert port.host_port > 0
            assert str(port) == f"127.0.0.1:{port.host_port}->80/tcp"
            assert publisher.published("web") == [port] == publisher.published()
            assert publisher.published("api") == []
            assert await greeting_of(port.host_port) == "web:80"


async def test_ranges(stack: NetStack) -> None:
    with serving(stack, "web"):
        async with PortPublisher() as publisher:
            pairs = free_ports(3)
            single = free_ports(4)
            with socket.create_server(("127.0.0.1", single)):  # the range's first port is taken
                ports = await publisher.publish(
                    "web",
                    [
                        PortMapping(9000, 9002, "127.0.0.1", pairs, pairs + 2),  # "P-P+2:9000-9002"
                        tcp(single, 80, end=single + 3),  # "S-S+3:80": the first free one
                        PortMapping(9000, 9001, "127.0.0.1", None, None),  # "9000-9001": any free ports
                    ],
                    stack["web"].address,
                )
            assert [(p.host_port, p.container_port) for p in ports[:4]] == [
                (pairs, 9000),
                (pairs + 1, 9001),
                (pairs + 2, 9002),
                (single + 1, 80),
            ]
            assert [p.container_port for p in ports[4:]] == [9000, 9001]
            assert len({p.host_port for p in ports}) == 6
            for port in ports:
                assert await greeting_of(port.host_port) == f"web:{port.container_port}"


async def test_any_address_and_ipv6(stack: NetStack) -> None:
    with serving(stack, "web"):
        async with PortPublisher() as publisher:
            (anywhere,) = await publisher.publish("web", [tcp(None, host_ip="0.0.0.0")], stack["web"].address)
            assert str(anywhere) == f"0.0.0.0:{anywhere.host_port}->80/tcp"
            assert await greeting_of(anywhere.host_port, "127.0.0.1") == "web:80"
            if not has_ipv6_loopback():
                pytest.skip("no ::1 on this host")
            # "::" is IPv6 only (as "0.0.0.0" is IPv4 only), so both can have the same port, as Docker does
            (v6_any,) = await publisher.publish("api", [tcp(anywhere.host_port, host_ip="::")], stack["web"].address)
            assert str(v6_any) == f"[::]:{anywhere.host_port}->80/tcp"
            assert await greeting_of(anywhere.host_port, "::1") == "web:80"
            await publisher.unpublish("api")
            (v6,) = await publisher.publish("api", [tcp(None, host_ip="::1")], stack["web"].address)
            assert str(v6) == f"[::1]:{v6.host_port}->80/tcp"
            assert await greeting_of(v6.host_port, "::1") == "web:80"


async def test_unpublish_closes_listeners_and_connections(stack: NetStack) -> None:
    with serving(stack, "web"), serving(stack, "api"):
        async with PortPublisher() as publisher:
            web_tcp, web_udp = await publisher.publish("web", [tcp(None), udp()], stack["web"].address)
            (api,) = await publisher.publish("api", [tcp(None)], stack["api"].address)
            reader, writer, _ = await open_to(web_tcp.host_port)
            api_reader, api_writer, _ = await open_to(api.host_port)

            await publisher.unpublish("web")

            assert await until_closed(reader) == b""  # the open connection was closed
            writer.close()
            assert refused(web_tcp.host_port)
            assert _free(web_udp.host_port, socket.SOCK_DGRAM)
            assert publisher.published() == [api]
            # the other service's connection and listener are untouched
            api_writer.write(b"still")
            api_writer.write_eof()
            assert await until_closed(api_reader) == b"still|eof:5"
            api_writer.close()
            await publisher.unpublish("web")  # again: nothing to do
            assert await publisher.publish("web", [tcp(web_tcp.host_port)], stack["web"].address)  # and again
            assert await greeting_of(web_tcp.host_port) == "web:80"


async def test_publishing_a_service_twice_is_refused(stack: NetStack) -> None:
    async with PortPublisher() as publisher:
        (port,) = await publisher.publish("web", [tcp(None)], stack["web"].address)
        with pytest.raises(NetworkError, match="service web: its ports are already published"):
            await publisher.publish("web", [tcp(None)], stack["web"].address)
        assert publisher.published() == [port]


async def test_retarget_sends_new_connections_to_the_new_address(stack: NetStack) -> None:
    with serving(stack, "web"), serving(stack, "api"):
        async with PortPublisher() as publisher:
            port, dns = await publisher.publish("web", [tcp(None), udp()], stack["web"].address)
            reader, writer, greeting = await open_to(port.host_port)
            assert greeting == "web:80"
            async with await anyio.create_connected_udp_socket("127.0.0.1", dns.host_port) as client:
                await client.send(b"q")
                with anyio.fail_after(5):
                    assert (await client.receive()).startswith(b"q|web|")

                publisher.retarget("web", stack["api"].address)

                assert await greeting_of(port.host_port) == "api:80"
                await client.send(b"q")  # the same client's next datagram goes to the new address too
                with anyio.fail_after(5):
                    assert (await client.receive()).startswith(b"q|api|")
            # the connection made before goes on to the old address
            writer.write(b"old")
            writer.write_eof()
            assert await until_closed(reader) == b"old|eof:3"
            writer.close()
    with pytest.raises(NetworkError, match="service nothing: no published ports"):
        publisher.retarget("nothing", stack["api"].address)


async def test_closing_the_publisher_closes_everything(stack: NetStack) -> None:
    """Leaving the context (here by cancellation) ends listeners, open connections and pending connects."""
    nobody = stack.network.subnet.broadcast_address - 1
    with serving(stack, "web"):
        started = time.monotonic()
        with anyio.move_on_after(10) as scope:
            async with PortPublisher(connect_timeout=30) as publisher:
                (port,) = await publisher.publish("web", [tcp(None)], stack["web"].address)
                (stuck,) = await publisher.publish("api", [tcp(None)], nobody)
                reader, writer, _ = await open_to(port.host_port)
                pending_reader, pending_writer = await asyncio.open_connection("127.0.0.1", stuck.host_port)
                await asyncio.sleep(0.1)  # the connect to nobody is under way
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert time.monotonic() - started < 2  # the pending connect (30 s; ARP gives up after 3 s) was cancelled
        assert await until_closed(reader) == b""
        assert await until_closed(pending_reader) == b""
        writer.close()
        pending_writer.close()
        assert refused(port.host_port)
        assert refused(stuck.host_port)


# --- UDP --------------------------------------------------------------------------------------------------


async def test_udp_two_clients_each_get_their_own_replies(stack: NetStack) -> None:
    with serving(stack, "web"):
        async with PortPublisher() as publisher:
            (port,) = await publisher.publish("web", [udp()], stack["web"].address)
            assert str(port) == f"127.0.0.1:{port.host_port}->53/udp"
            async with (
                await anyio.create_connected_udp_socket("127.0.0.1", port.host_port) as a,
                await anyio.create_connected_udp_socket("127.0.0.1", port.host_port) as b,
            ):
                seen: dict[bytes, list[bytes]] = {b"a": [], b"b": []}
                for round_ in range(3):
                    for name, client in ((b"a", a), (b"b", b)):
                        await client.send(name + str(round_).encode())
                    for name, client in ((b"a", a), (b"b", b)):
                        with anyio.fail_after(5):
                            reply = await client.receive()
                        data, server_name, peer = reply.split(b"|")
                        assert data == name + str(round_).encode()
                        assert server_name == b"web"
                        seen[name].append(peer)
    gateway = str(stack.network.gateway).encode()
    assert all(peer.startswith(gateway + b":") for peers in seen.values() for peer in peers)
    assert len(set(seen[b"a"])) == 1 and len(set(seen[b"b"])) == 1  # one upstream socket per client...
    assert seen[b"a"][0] != seen[b"b"][0]  # ...of its own


async def udp_peer(client: anyio.abc.ConnectedUDPSocket, data: bytes = b"x") -> bytes:
    """The address the server saw this client's datagram come from (the flow's upstream socket)."""
    await client.send(data)
    with anyio.fail_after(5):
        return (await client.receive()).split(b"|")[2]


async def test_udp_flow_ends_after_idle_timeout(stack: NetStack) -> None:
    with serving(stack, "web"):
        async with PortPublisher(udp_idle_timeout=0.4) as publisher:
            (port,) = await publisher.publish("web", [udp()], stack["web"].address)
            async with await anyio.create_connected_udp_socket("127.0.0.1", port.host_port) as client:
                first = await udp_peer(client)
                for _ in range(6):  # active for 0.9 s, twice the timeout: the same flow
                    await anyio.sleep(0.15)
                    assert await udp_peer(client) == first
                await anyio.sleep(0.8)  # idle: the flow is gone, the next datagram opens a new one
                assert await udp_peer(client) != first


async def test_udp_flows_are_bounded_least_recently_used_goes(stack: NetStack) -> None:
    with serving(stack, "web"):
        async with PortPublisher(udp_max_flows=2) as publisher:
            (port,) = await publisher.publish("web", [udp()], stack["web"].address)
            async with (
                await anyio.create_connected_udp_socket("127.0.0.1", port.host_port) as a,
                await anyio.create_connected_udp_socket("127.0.0.1", port.host_port) as b,
                await anyio.create_connected_udp_socket("127.0.0.1", port.host_port) as c,
            ):
                peer_a, peer_b = await udp_peer(a), await udp_peer(b)
                await udp_peer(c)  # a third flow: a's, the least recently used, goes
                assert await udp_peer(b) == peer_b  # b's stays (and is now the most recent but one)
                assert await udp_peer(a) != peer_a  # a gets a new flow (c's goes)
