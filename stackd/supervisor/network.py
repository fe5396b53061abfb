"""The stack's network as the supervisor runs it: which service gets what, recorded before it is made.

    network = StackNetworking(stack, paths, record)
    await network.attach(["db", "web"])         # subnet picked, recorded, bridge + namespaces made
    join_netns, binds = network.attachment("web")   # for prepare(): the pin to join, /etc/hosts ...
    ...
    await teardown_from_record(record)           # from the record alone (cleanup.remove_recorded)

Per network_mode:
- "bridge": an endpoint (pinned namespace, veth on the stack's bridge, address, default route) and a
  line in the stack's hosts file;
- "service:NAME": no namespace of its own; it joins NAME's pin, and its name resolves to NAME's address;
- "none": the launcher makes a namespace with only `lo` (a pinned one here when another service shares
  it, so that the sharer and every restart see the same namespace);
- "host": nothing.

The stack's firewall (runtime/network/firewall.py: an nftables table named after the bridge) is made
with the bridge and removed after it: stacks cannot reach each other, services reach the host only at
their gateway, and `[network] outbound = true` adds the way out.

Everything is written to the state record before it is created, so `stackd down` can remove it after
the supervisor died by SIGKILL (teardown_from_record).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import anyio

from stackd.errors import NetworkError
from stackd.runtime.network import (
    Endpoint,
    StackNetwork,
    TeardownReport,
    assign_addresses,
    attach_endpoints,
    create_network,
    detach_endpoints,
    endpoint,
    name_binds,
    names_dir,
    netns_path,
    parse_subnet,
    pick_subnet,
    read_host_networks,
    render_hosts,
    render_resolv_conf,
    service_entry,
    teardown_network,
    write_names_file,
    write_names_files,
)
from stackd.runtime.network.bridge import ensure_bridge
from stackd.runtime.network.firewall import (
    StackFirewall,
    bridged_traffic_warning,
    install_firewall,
    remove_firewall,
)
from stackd.runtime.network.hosts import HostsEntry
from stackd.runtime.network.names import bridge_name, netns_dir
from stackd.runtime.network.netns import create_namespaces, prepare_pin_dir, release_pin_dir, unpin
from stackd.runtime.network.rtnl import batch, check, host_rtnl, link_up_message, open_rtnl
from stackd.runtime.paths import StackPaths
from stackd.runtime.plan import Mount
from stackd.spec.models import Service, Stack
from stackd.supervisor.state import StateRecord

__all__ = ["StackNetworking", "teardown_from_record"]

#: Record kinds: the stack's network, the bridged services' endpoints, the pins of "none" namespaces.
NETWORK, ENDPOINT, PIN = "network", "endpoint", "pin"


class StackNetworking:
    """The network of one running stack: created on demand for the services being started."""

    def __init__(self, stack: Stack, paths: StackPaths, record: StateRecord) -> None:
        self.stack = stack
        self.paths = paths
        self.record = record
        self.network: StackNetwork | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self.pins: set[str] = set()  # services with mode "none" whose namespace is pinned (shared)
        self.resolvers: tuple[IPv4Address, ...] = ()  # the host's, listed in resolv.conf with outbound
        self.warnings: list[str] = []  # about the host, found while making the network; the caller tells

    # -- what a service gets ---------------------------------------------------------------------

    def owner(self, name: str) -> Service:
        """The service whose namespace `name` uses: itself, or the end of its service: chain."""
        service = self.stack[name]
        seen = {name}
        while service.network_mode.kind == "service" and service.network_mode.service not in seen:
            owner = service.network_mode.service or ""
            seen.add(owner)
            service = self.stack[owner]
        return service

    def address(self, name: str) -> IPv4Address | None:
        """The service's address on the stack's network (its owner's, for a service: sharer)."""
        point = self.endpoints.get(self.owner(name).name)
        return point.address if point else None

    def attachment(self, name: str) -> tuple[str | None, tuple[Mount, ...]]:
        """For prepare(): the namespace pin the service joins (None: the launcher makes one, or none at
        all for "host"), and the files bound into it (/etc/hosts, /etc/resolv.conf)."""
        owner = self.owner(name)
        kind = owner.network_mode.kind
        if kind == "bridge":
            binds = name_binds(self.paths)
            if self.stack[name].extra_hosts:
                hosts = Mount("/etc/hosts", "bind", str(_own_hosts_path(self.paths, name)), binds[0].flags, "file")
                binds = (hosts, binds[1])
            return str(netns_path(self.paths, owner.name)), binds
        if kind == "none" and owner.name in self.pins:
            return str(netns_path(self.paths, owner.name)), ()
        return None, ()

    # -- making it ---------------------------------------------------------------------------------

    async def attach(self, names: Iterable[str]) -> None:
        """Make the network of these services (and of the services whose namespaces they share):
        the stack's subnet and bridge the first time, then an endpoint per bridged service."""
        wanted = list(dict.fromkeys(self.owner(name).name for name in names))
        bridged = [n for n in wanted if self.stack[n].network_mode.kind == "bridge" and n not in self.endpoints]
        shared_none = {
            self.owner(n).name
            for n in self.stack.services
            if self.stack[n].network_mode.kind == "service" and self.owner(n).network_mode.kind == "none"
        }
        pinned = [n for n in wanted if n in shared_none and n not in self.pins]
        if bridged:
            await self._attach_bridged(bridged)
        if pinned:
            await self._pin_isolated(pinned)
        self.write_names()

    async def _attach_bridged(self, names: list[str]) -> None:
        first = self.network is None
        if first:
            async with _network_lock(self.paths):
                facts = await read_host_networks(ignore_links=[bridge_name(self.stack.name)])
                if self.stack.network.subnet:
                    subnet = parse_subnet(self.stack.network.subnet)
                    _refuse_overlap(self.stack.name, subnet, facts.blocked(), _other_stacks_subnets(self.paths))
                else:
                    subnet = pick_subnet(
                        self.stack.name, host_networks=facts.blocked(), taken=_other_stacks_subnets(self.paths)
                    )
                network = StackNetwork.for_project(self.stack.name, subnet, mtu=facts.suggested_mtu())
                # With outbound access the host's resolvers answer, except those on its loopback
                # (systemd-resolved's 127.0.0.53), which inside a service would be its own.
                self.resolvers = tuple(r for r in facts.resolvers if not r.is_loopback)
                # Recorded before the lock is let go: the next supervisor sees this subnet as taken.
                self.record.add(NETWORK, "stack", **network.to_record(), outbound=self.stack.network.outbound)
            self.network = network
        else:
            assert self.network is not None
            network = self.network
        addresses = assign_addresses(
            network.subnet,
            [*self.endpoints, *names],
            previous={name: point.address for name, point in self.endpoints.items()},
        )
        points = [endpoint(network, self.paths, name, addresses[name]) for name in names]
        self.record.add_all(ENDPOINT, {p.service: p.to_record() for p in points})
        outbound = self.stack.network.outbound
        if first:
            await create_network(network, self.paths, points)
            # The network record (bridge, subnet, outbound) is the firewall's record too.
            await install_firewall(StackFirewall.for_network(network, outbound=outbound))
            if len(self.stack.services) > 1 and (warning := await bridged_traffic_warning(network.bridge)):
                self.warnings.append(warning)
        else:
            async with host_rtnl() as host:
                bridge = await ensure_bridge(host, network.bridge, network.subnet, mtu=network.mtu)
                await attach_endpoints(network, points, bridge_index=bridge.index, ipr=host)
            if outbound:  # ensure_bridge turned the bridge's forwarding off again
                await install_firewall(StackFirewall.for_network(network, outbound=True))
        self.endpoints.update({p.service: p for p in points})

    async def detach_unused(self) -> list[str]:
        """Remove the endpoints and pins of services that left the stack or no longer have a namespace
        of their own (a changed `network_mode`), after their processes are gone; rewrite the names.
        Returns problems, as teardown_from_record does."""

        def unused(name: str, kind: str) -> bool:
            return name not in self.stack.services or self.stack[name].network_mode.kind != kind

        going = [point for name, point in self.endpoints.items() if unused(name, "bridge")]
        problems: list[str] = []
        if going:
            problems += (await detach_endpoints(going)).problems()
            for point in going:
                del self.endpoints[point.service]
                self.record.discard(ENDPOINT, point.service)
        for name in [n for n in self.pins if unused(n, "none")]:
            with contextlib.suppress(NetworkError):
                unpin(netns_path(self.paths, name))
            self.pins.discard(name)
            self.record.discard(PIN, name)
        self.write_names()
        return problems

    async def _pin_isolated(self, names: list[str]) -> None:
        """Pinned namespaces with only `lo` (up), for "none" services that another service shares."""
        self.record.add_all(PIN, {name: {"netns": str(netns_path(self.paths, name))} for name in names})
        prepare_pin_dir(netns_dir(self.paths))
        made = await create_namespaces([netns_path(self.paths, name) for name in names])
        try:
            for pinned, name in zip(made, names, strict=True):
                async with open_rtnl(pinned.take_socket()) as inner:
                    check(await batch(inner, [link_up_message(index=1)]), [f"service {name}: lo: up"])
        finally:
            for pinned in made:
                pinned.close()
        self.pins.update(names)

    def write_names(self) -> None:
        """(Re)write the stack's /etc/hosts and /etc/resolv.conf, and the hosts files of services
        with extra_hosts. In place: running services see the change."""
        if self.network is None:
            return
        entries: list[HostsEntry] = []
        for name, service in self.stack.services.items():
            address = self.address(name)
            if address is not None:
                entries.append(
                    service_entry(self.stack.name, name, address, hostname=service.hostname, aliases=service.aliases)
                )
        hosts = render_hosts(self.stack.name, entries)
        nameservers = self.resolvers if self.stack.network.outbound else ()
        write_names_files(self.paths, hosts=hosts, resolv_conf=render_resolv_conf(nameservers=nameservers))
        for name, service in self.stack.services.items():
            if service.extra_hosts and self.owner(name).name in self.endpoints:
                write_names_file(_own_hosts_path(self.paths, name), hosts + _extra_lines(service, self.network))


def _extra_lines(service: Service, network: StackNetwork) -> str:
    lines = [f"# extra_hosts of {service.name}"]
    for host, address in service.extra_hosts.items():
        lines.append(f"{network.gateway if address == 'host-gateway' else address}\t{host}")
    return "\n".join(lines) + "\n"


def _own_hosts_path(paths: StackPaths, service: str) -> Path:
    return names_dir(paths) / f"hosts.{service}"


@contextlib.asynccontextmanager
async def _network_lock(paths: StackPaths) -> AsyncIterator[None]:
    """Serialise subnet choice between supervisors, from reading what is taken to recording ours.
    Waited for in a thread: two stacks of one process (tests) must not block the event loop."""
    paths.state_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.state_root / ".network.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _other_stacks_subnets(paths: StackPaths) -> list[IPv4Network]:
    """The subnets recorded by the other projects under the same state root."""
    found = []
    for file in paths.state_root.glob("*/state.json"):
        if file.parent == paths.state:
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            subnet = json.loads(file.read_text())["resources"][NETWORK]["stack"]["subnet"]
            found.append(parse_subnet(subnet))
    return found


def _refuse_overlap(project: str, subnet: IPv4Network, host: list[IPv4Network], stacks: list[IPv4Network]) -> None:
    for other in stacks:
        if subnet.overlaps(other):
            raise NetworkError(f"project {project}: [network] subnet {subnet} overlaps {other}, used by another stack")
    for other in host:
        if other.prefixlen >= 8 and subnet.overlaps(other):
            raise NetworkError(
                f"project {project}: [network] subnet {subnet} overlaps {other}, an address or route of this host"
            )


async def teardown_from_record(record: StateRecord, *, timeout: float | None = None) -> list[str]:
    """Remove the network written in `record` (bridge, namespaces, veths, names files), forgetting
    each part once it is gone. Returns problems (a namespace still held by a process: which)."""
    resources = record.resources
    stack = resources.get(NETWORK, {}).get("stack")
    points = [Endpoint.from_record(name, details) for name, details in resources.get(ENDPOINT, {}).items()]
    pins = [Path(details["netns"]) for details in resources.get(PIN, {}).values()]
    problems: list[str] = []
    for pin in pins:
        with contextlib.suppress(NetworkError):
            unpin(pin)
    if stack is not None or points:
        network = StackNetwork.from_record(record.paths.project, stack or _unknown_network(record.paths))
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        report: TeardownReport = await teardown_network(network, record.paths, points, **kwargs)
        problems += report.problems()
        try:
            await remove_firewall(network.bridge)
        except NetworkError as error:
            problems.append(str(error))
    else:
        release_pin_dir(netns_dir(record.paths))
    record.forget_all([NETWORK, ENDPOINT, PIN])
    return problems


def _unknown_network(paths: StackPaths) -> Mapping[str, Any]:
    """Endpoints recorded but the network record lost: the bridge's name is still known."""
    return {"subnet": "10.213.0.0/24", "bridge": bridge_name(paths.project)}
