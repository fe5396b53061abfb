"""Published ports: a userspace TCP/UDP proxy that runs in the supervisor's event loop.

    async with PortPublisher() as publisher:          # inside the supervisor's task group, or on its own
        ports = await publisher.publish("web", service.ports, endpoint.address)   # before the service starts
        print(ports[0])                                 # 127.0.0.1:8080->80/tcp
        publisher.retarget("web", new_address)          # new connections go there
        await publisher.unpublish("web")                # listeners and the service's connections closed

Each host port is one listening socket of the supervisor; nothing is written into the host's firewall and
nothing outlives the supervisor (its sockets die with it, also on SIGKILL). docs/networking.md ("Published
ports") explains the choice against nftables DNAT and has the measurements (benchmarks/publish.py).

Everything is non-blocking sockets and the event loop's reader/writer callbacks (loop.add_reader,
add_writer, call_later): no task, future or transport per connection, so nothing is left to cancel and
closing is synchronous. That was measured against asyncio protocols and transports: the same throughput,
and 0.1 ms less latency and a third less CPU per connection (docs/networking.md).

- TCP: the listener accepts and at once starts a non-blocking connect to target:container_port; when it
  fails (refused, unreachable, or not done in `connect_timeout`, 2 s) the client is closed, as
  docker-proxy does. Nothing is read from the client meanwhile (the kernel keeps it). Then one pump per
  direction: recv_into one scratch buffer, send at once (no Python work per byte); what the other side
  cannot take now is set aside and the source is not read again until it is sent, so a fast sender
  stalls instead of growing the proxy's memory (at most one buffer per blocked direction). An end of
  file becomes shutdown(SHUT_WR) on the other socket (half-close); both sockets close when both
  directions have ended, or at once when either fails.
- UDP: one upstream socket per client address, connected to target:container_port, so that replies go
  back to the client that sent the request; a flow ends after `udp_idle_timeout` without datagrams in
  either direction, and at most `udp_max_flows` flows per listener are kept (the least recently used goes).
  Datagrams that cannot be sent at once (a full socket buffer) are dropped, as UDP allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from types import TracebackType
from typing import Literal

from stackd.errors import NetworkError
from stackd.spec.models import PortMapping

__all__ = [
    "CONNECT_TIMEOUT",
    "UDP_IDLE_TIMEOUT",
    "UDP_MAX_FLOWS",
    "PortPublisher",
    "PublishedPort",
    "host_ports",
]

#: Seconds to wait for a service to accept a proxied TCP connection before the client is closed.
CONNECT_TIMEOUT = 2.0
#: Seconds without a datagram, either way, after which a UDP flow's upstream socket is closed.
UDP_IDLE_TIMEOUT = 60.0
#: UDP flows (client addresses) kept per listener; past that the least recently used one goes.
UDP_MAX_FLOWS = 1024

#: Bytes read from a TCP socket at a time.
TCP_CHUNK = 256 * 1024
#: Connections accepted per wake-up of a listener, and the pause after running out of file descriptors.
ACCEPT_BATCH = 64
ACCEPT_RETRY_DELAY = 1.0
#: Datagrams handled per wake-up of one UDP socket, so that one busy flow cannot starve the others.
UDP_BATCH = 64
UDP_MAX_DATAGRAM = 65535


@dataclass(frozen=True, slots=True)
class PublishedPort:
    """One listening host port and where it forwards to: what `stackd ps` and the Python API show."""

    service: str
    protocol: Literal["tcp", "udp"]
    host_ip: str
    host_port: int
    container_port: int

    def __str__(self) -> str:
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{host}:{self.host_port}->{self.container_port}/{self.protocol}"


def host_ports(mapping: PortMapping) -> list[tuple[range, int]]:
    """The listeners a mapping asks for: (host ports to try in order, container port) pairs.

    "8000-8002:9000-9002" -> one per port, paired in order; "9000-9001" (no host port) -> one per
    container port, each on a free port the kernel picks (an empty range); "8000-8010:80" -> one listener,
    on the first free port of 8000-8010.
    """
    containers = range(mapping.container_port, mapping.container_port_end + 1)
    if mapping.host_port is None:
        return [(range(0), port) for port in containers]
    hosts = range(mapping.host_port, (mapping.host_port_end or mapping.host_port) + 1)
    if len(containers) == 1:
        return [(hosts, mapping.container_port)]
    return [(range(host, host + 1), port) for host, port in zip(hosts, containers, strict=True)]


# --- TCP ----------------------------------------------------------------------------------------------


class _Pump:
    """One direction of a proxied TCP connection: what `source` reads, `sink` sends.

    Reads go into the publisher's one scratch buffer (the event loop runs one callback at a time) and are
    sent at once. Only what the sink cannot take now is copied aside; then the source is not read again
    until that copy is sent, so one blocked direction holds at most one buffer.
    """

    def __init__(self, connection: _Connection, source: socket.socket, sink: socket.socket) -> None:
        self.connection = connection
        self.loop = connection.loop
        self.source, self.sink = source, sink
        self.pending = memoryview(b"")
        self.ended = False  # the source sent its end of file, and the sink was shut for writing

    def start(self) -> None:
        self.loop.add_reader(self.source.fileno(), self._readable)

    def _readable(self) -> None:
        scratch = self.connection.scratch
        try:
            count = self.source.recv_into(scratch)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer: the whole connection goes
            self.connection.close()
            return
        if count == 0:
            self._end()
            return
        try:
            sent = self.sink.send(scratch[:count])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.connection.close()
            return
        if sent < count:  # the sink is full: keep the rest, stop reading until it is sent
            self.pending = memoryview(bytes(scratch[sent:count]))
            self.loop.remove_reader(self.source.fileno())
            self.loop.add_writer(self.sink.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sink.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.connection.close()
            return
        self.pending = self.pending[sent:]
        if not self.pending:
            self.loop.remove_writer(self.sink.fileno())
            self.loop.add_reader(self.source.fileno(), self._readable)

    def _end(self) -> None:
        """Half-close: the source has no more to send, so the sink's peer is told (shutdown SHUT_WR)."""
        self.ended = True
        self.loop.remove_reader(self.source.fileno())
        with contextlib.suppress(OSError):
            self.sink.shutdown(socket.SHUT_WR)
        self.connection.pump_ended()


class _Connection:
    """A client's connection and the one made for it to the service; closed together.

    Nothing is read from the client until the service has accepted (the kernel keeps what it sends).
    """

    def __init__(self, listener: _TcpListener, client: socket.socket) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.scratch = listener.owner.scratch
        self.client = client
        self.upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.pumps: tuple[_Pump, _Pump] | None = None
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        for sock in (client, self.upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # forward small writes at once

    def connect(self) -> None:
        """Start connecting to the service's current address; the client is closed if that fails."""
        target = (str(self.listener.owner.target), self.listener.port.container_port)
        failure = self.upstream.connect_ex(target)
        if failure not in (0, errno.EINPROGRESS):  # no route to the service, at once
            self.close()
            return
        self.loop.add_writer(self.upstream.fileno(), self._connected)
        self.timer = self.loop.call_later(self.listener.owner.connect_timeout, self.close)

    def _connected(self) -> None:
        assert self.timer is not None
        self.timer.cancel()
        self.loop.remove_writer(self.upstream.fileno())
        if self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):  # refused or unreachable
            self.close()
            return
        self.pumps = (_Pump(self, self.client, self.upstream), _Pump(self, self.upstream, self.client))
        for pump in self.pumps:
            pump.start()

    def pump_ended(self) -> None:
        if self.pumps is not None and all(pump.ended for pump in self.pumps):
            self.close()  # both directions ended: everything read was sent

    def close(self) -> None:
        """Both sockets closed, at once; safe to call again."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        for sock in (self.client, self.upstream):
            self.loop.remove_reader(sock.fileno())
            self.loop.remove_writer(sock.fileno())
            sock.close()
        self.listener.connections.discard(self)


class _TcpListener:
    """A listening TCP socket forwarding to one container port of a service."""

    def __init__(self, owner: _ServicePorts, sock: socket.socket, port: PublishedPort) -> None:
        self.owner = owner
        self.sock = sock
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.closed = False

    def start(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._acceptable)

    def _acceptable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of file descriptors or memory: stop accepting for a while (as asyncio does);
                    # the kernel keeps the clients in the backlog meanwhile.
                    self._pause()
                    return
                continue  # ECONNABORTED and the like: that client is gone
            try:
                connection = _Connection(self, client)
            except OSError:  # no socket for the service's side (EMFILE): this client goes, accepting pauses
                client.close()
                self._pause()
                return
            self.connections.add(connection)
            connection.connect()

    def _pause(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._acceptable)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for connection in list(self.connections):
            connection.close()


# --- UDP ----------------------------------------------------------------------------------------------


class _UdpFlow:
    """One client address of a UDP listener and its own socket connected to the service."""

    def __init__(self, listener: _UdpListener, client: tuple[object, ...], sock: socket.socket) -> None:
        self.listener = listener
        self.client = client
        self.sock = sock
        self.last_seen = listener.loop.time()
        self.timer = listener.loop.call_at(self.last_seen + listener.owner.udp_idle_timeout, self._expire)
        listener.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        """Replies from the service go back to the client, from the listening socket."""
        for _ in range(UDP_BATCH):
            try:
                data = self.sock.recv(UDP_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNREFUSED: an ICMP error for an earlier datagram (nothing listening)
                continue
            self.listener.seen(self)
            with contextlib.suppress(OSError):  # a full buffer or a client gone: the datagram is dropped
                self.listener.sock.sendto(data, self.client)

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a full buffer, or ECONNREFUSED of an earlier datagram: dropped
            self.sock.send(data)

    def _expire(self) -> None:
        deadline = self.last_seen + self.listener.owner.udp_idle_timeout
        if self.listener.loop.time() >= deadline:
            self.listener.drop(self)
        else:
            self.timer = self.listener.loop.call_at(deadline, self._expire)

    def close(self) -> None:
        self.timer.cancel()
        self.listener.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _UdpListener:
    """A bound UDP socket forwarding to one container port of a service, one flow per client address."""

    def __init__(self, owner: _ServicePorts, sock: socket.socket, port: PublishedPort) -> None:
        self.owner = owner
        self.sock = sock
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.flows: OrderedDict[tuple[object, ...], _UdpFlow] = OrderedDict()  # least recently used first
        self.closed = False

    def start(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(UDP_BATCH):
            try:
                data, client = self.sock.recvfrom(UDP_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            flow = self.flows.get(client)
            if flow is None:
                flow = self._open_flow(client)
                if flow is None:
                    continue
            else:
                self.seen(flow)
            flow.send(data)

    def _open_flow(self, client: tuple[object, ...]) -> _UdpFlow | None:
        while len(self.flows) >= self.owner.udp_max_flows:
            self.drop(next(iter(self.flows.values())))
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:  # out of file descriptors: the datagram is dropped
            return None
        try:
            sock.setblocking(False)
            sock.connect((str(self.owner.target), self.port.container_port))
        except OSError:  # no route to the service: the datagram is dropped
            sock.close()
            return None
        flow = self.flows[client] = _UdpFlow(self, client, sock)
        return flow

    def seen(self, flow: _UdpFlow) -> None:
        flow.last_seen = self.loop.time()
        self.flows.move_to_end(flow.client)

    def drop(self, flow: _UdpFlow) -> None:
        if self.flows.pop(flow.client, None) is flow:
            flow.close()

    def drop_flows(self) -> None:
        for flow in list(self.flows.values()):
            self.drop(flow)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.drop_flows()
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


# --- a service's ports and the publisher ----------------------------------------------------------------

_Listener = _TcpListener | _UdpListener


@dataclass(eq=False)
class _ServicePorts:
    """Everything published for one service: its current address and its listeners."""

    name: str
    target: IPv4Address
    connect_timeout: float
    udp_idle_timeout: float
    udp_max_flows: int
    scratch: memoryview
    listeners: list[_Listener] = field(default_factory=list)


class PortPublisher:
    """Listeners for every published port of a stack, forwarding to the services' addresses.

    Use it as an async context manager (or call aclose()) in any task of the supervisor's task group:
    leaving it closes every listener, connection and flow. It runs no task of its own (only callbacks of
    the running event loop) and closing never awaits, so a cancellation cannot cut it short.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        udp_idle_timeout: float = UDP_IDLE_TIMEOUT,
        udp_max_flows: int = UDP_MAX_FLOWS,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.udp_idle_timeout = udp_idle_timeout
        self.udp_max_flows = udp_max_flows
        self._services: dict[str, _ServicePorts] = {}
        self._scratch = memoryview(bytearray(TCP_CHUNK))  # every TCP read, one at a time

    async def __aenter__(self) -> PortPublisher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def publish(self, service: str, mappings: Sequence[PortMapping], target: IPv4Address) -> list[PublishedPort]:
        """Listen on every host port of `mappings` and forward to `target`; the ports as published.

        Every socket is bound before any is served: when one cannot be (a port in use), NetworkError
        names the service, the mapping and the reason, and nothing stays bound.
        """
        if service in self._services:
            raise NetworkError(f"service {service}: its ports are already published (unpublish them first)")
        owner = _ServicePorts(
            service, target, self.connect_timeout, self.udp_idle_timeout, self.udp_max_flows, self._scratch
        )
        bound: list[_Listener] = []
        try:
            for mapping in mappings:
                for candidates, container_port in host_ports(mapping):
                    sock, port = _bind(service, mapping, candidates, container_port)
                    listener_type = _TcpListener if mapping.protocol == "tcp" else _UdpListener
                    bound.append(listener_type(owner, sock, port))
            for listener in bound:
                listener.start()
        except BaseException:
            for listener in bound:
                listener.close()
            raise
        owner.listeners = bound
        self._services[service] = owner
        return [listener.port for listener in bound]

    def retarget(self, service: str, target: IPv4Address) -> None:
        """Send the service's new connections (and new UDP flows: its current ones end) to `target`."""
        owner = self._service(service)
        owner.target = target
        for listener in owner.listeners:
            if isinstance(listener, _UdpListener):
                listener.drop_flows()

    async def unpublish(self, service: str) -> None:
        """Close the service's listeners and its open connections and flows; no-op if none."""
        owner = self._services.pop(service, None)
        if owner is None:
            return
        for listener in owner.listeners:
            listener.close()

    def published(self, service: str | None = None) -> list[PublishedPort]:
        """The ports published, of one service or of all, in the order they were published."""
        if service is None:
            owners = list(self._services.values())
        else:
            owners = [self._services[service]] if service in self._services else []
        return [listener.port for owner in owners for listener in owner.listeners]

    async def aclose(self) -> None:
        """Unpublish every service."""
        for service in list(self._services):
            await self.unpublish(service)

    def _service(self, service: str) -> _ServicePorts:
        try:
            return self._services[service]
        except KeyError:
            raise NetworkError(f"service {service}: no published ports") from None


def _bind(
    service: str, mapping: PortMapping, candidates: range, container_port: int
) -> tuple[socket.socket, PublishedPort]:
    """A socket bound (and, for TCP, listening) on the first free port of `candidates` (empty: any)."""
    family = socket.AF_INET6 if ip_address(mapping.host_ip).version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    error: OSError | None = None
    for port in candidates or (0,):
        sock = socket.socket(family, kind)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # "::" is IPv6 only, as "0.0.0.0" is v4
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebinding past TIME_WAIT
            sock.bind((mapping.host_ip, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(socket.SOMAXCONN)
        except OSError as failure:
            sock.close()
            error = failure
            if failure.errno == errno.EADDRINUSE:
                continue  # the next port of a host range, if there is one
            break
        host_port = sock.getsockname()[1]
        return sock, PublishedPort(service, mapping.protocol, mapping.host_ip, host_port, container_port)
    assert error is not None
    raise NetworkError(_bind_error(service, mapping, candidates, error)) from error


def _bind_error(service: str, mapping: PortMapping, candidates: range, error: OSError) -> str:
    """`service web: ports "127.0.0.1:8080:80/tcp": cannot listen on 127.0.0.1:8080/tcp: address already
    in use (EADDRINUSE); stop what listens there, or publish on another host port`."""
    host = f"[{mapping.host_ip}]" if ":" in mapping.host_ip else mapping.host_ip
    if not candidates:
        where = f"a free port of {host}"
    elif len(candidates) == 1:
        where = f"{host}:{candidates[0]}"
    else:
        where = f"any port of {host}:{candidates[0]}-{candidates[-1]}"
    number = error.errno or 0
    reason = f"{os.strerror(number).lower()} ({errno.errorcode.get(number, str(number))})"
    advice = {
        errno.EADDRINUSE: "stop what listens there, or publish on another host port",
        errno.EADDRNOTAVAIL: f"{mapping.host_ip} is not an address of this host",
    }.get(number)
    text = f'service {service}: ports "{mapping}": cannot listen on {where}/{mapping.protocol}: {reason}'
    return f"{text}; {advice}" if advice else text
