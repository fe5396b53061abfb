"""Helpers for the network tests: a stack's network under a unique project, and commands run inside
its namespaces (TEST-ONLY: `nsenter --net=<pin>` subprocesses; stackd itself never runs `ip`).

Rules these tests keep on a shared machine: traffic only inside namespaces and bridges they made;
subnets inside 10.240.0.0/16 that overlap nothing on the host; every resource named after a unique
project `nt-<hex>` and removed in finalizers; processes ended only by their PID.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from stackd.runtime.network import (
    Endpoint,
    StackNetwork,
    TeardownReport,
    assign_addresses,
    create_network,
    endpoint,
    pick_subnet,
    read_host_networks,
    teardown_network,
    veth_name,
)
from stackd.runtime.paths import StackPaths

__all__ = ["TEST_POOL", "MakeStack", "NetStack", "inside", "ip_json", "new_project", "new_stack", "running", "script"]

#: Where the tests' subnets come from.
TEST_POOL = (IPv4Network("10.240.0.0/16"),)


def new_project() -> str:
    """A unique project name per test: nt-<6 hex digits>."""
    return f"nt-{secrets.token_hex(3)}"


#: The `make_stack` fixture (conftest.py): `await make_stack(["db", "web"])` -> a NetStack, not created yet.
MakeStack = Callable[..., Awaitable["NetStack"]]


@dataclass
class NetStack:
    """A stack's network for a test: its project, paths under tmp_path, network and endpoints."""

    project: str
    paths: StackPaths
    network: StackNetwork
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    created: bool = False

    def __getitem__(self, service: str) -> Endpoint:
        return self.endpoints[service]

    @property
    def link_names(self) -> list[str]:
        return [self.network.bridge, *(e.veth for e in self.endpoints.values())]

    async def create(self) -> None:
        self.created = True
        await create_network(self.network, self.paths, list(self.endpoints.values()))

    async def teardown(self, **options: Any) -> TeardownReport:
        report = await teardown_network(self.network, self.paths, list(self.endpoints.values()), **options)
        self.created = False
        return report


async def new_stack(
    tmp_path: Path, services: Iterable[str], *, project: str | None = None, taken: Sequence[IPv4Network] = ()
) -> NetStack:
    """A stack (not created yet) with these services, a free subnet of the test pool and stable addresses."""
    project = project or new_project()
    facts = await read_host_networks()
    subnet = pick_subnet(project, host_networks=facts.blocked(), taken=taken, pool=TEST_POOL)
    network = StackNetwork.for_project(project, subnet)
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    addresses = assign_addresses(subnet, services)
    stack = NetStack(project, paths, network)
    stack.endpoints = {name: endpoint(network, paths, name, address) for name, address in addresses.items()}
    assert all(veth_name(project, s) == e.veth for s, e in stack.endpoints.items())
    return stack


def inside(pin: Path | str, *argv: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run argv in the network namespace pinned at `pin` (and the host's other namespaces)."""
    return subprocess.run(
        ["nsenter", f"--net={pin}", *argv], capture_output=True, text=True, timeout=timeout, check=check
    )


def ip_json(pin: Path | str, *args: str) -> Any:
    """`ip -j ARGS` inside the namespace, parsed."""
    return json.loads(inside(pin, "ip", "-j", *args).stdout or "[]")


def script(text: str, *args: str) -> list[str]:
    """argv running a Python script (the test's own interpreter)."""
    return [sys.executable, "-I", "-c", textwrap.dedent(text), *args]


@contextlib.contextmanager
def running(pin: Path | str, argv: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
    """A process started inside the namespace; ended by its PID on the way out (if still running)."""
    process = subprocess.Popen(
        ["nsenter", f"--net={pin}", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)
