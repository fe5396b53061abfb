"""A service launched into its pinned namespace (build_plan's join_netns) with the stack's /etc/hosts
and /etc/resolv.conf bound in (name_binds): it reaches another service by name over TCP and UDP."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from netkit import MakeStack, running, script

from stackd.runtime.network import name_binds, render_hosts, render_resolv_conf, service_entry, write_names_files
from stackd.runtime.plan import LaunchPlan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))
from launchkit import stack_toml, started

pytestmark = pytest.mark.root

SERVER = """
import socket
tcp = socket.create_server(("0.0.0.0", 7003))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 7003))
tcp.settimeout(20)
udp.settimeout(20)
print("ready", flush=True)
conn, _ = tcp.accept()
conn.sendall(conn.recv(100).upper())
conn.close()
data, peer = udp.recvfrom(100)
udp.sendto(data.upper(), peer)
"""

SERVICE = """
import json, socket, sys, time
project, gateway = sys.argv[1], sys.argv[2]
out = {"resolv": open("/etc/resolv.conf").read()}
for name in ("b", "b." + project, "bee", "a"):
    out[name] = socket.gethostbyname(name)
started = time.monotonic()
try:
    socket.getaddrinfo("example.com", 80)
    out["outside"] = "resolved"
except socket.gaierror as error:
    out["outside"] = error.errno
out["outside_seconds"] = time.monotonic() - started
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect((gateway, 9))
out["self"] = probe.getsockname()[0]
with socket.create_connection(("b", 7003), timeout=5) as conn:
    conn.sendall(b"by name")
    out["tcp"] = conn.recv(100).decode()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(2)
udp.sendto(b"udp by name", ("b", 7003))
out["udp"] = udp.recvfrom(100)[0].decode()
out["port_start"] = open("/proc/sys/net/ipv4/ip_unprivileged_port_start").read().strip()
print(json.dumps(out))
"""


async def test_a_launched_service_joins_its_namespace_and_finds_others_by_name(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    stack = await make_stack(["a", "b"])
    await stack.create()
    entries = [
        service_entry(stack.project, "a", stack["a"].address, hostname="a"),
        service_entry(stack.project, "b", stack["b"].address, hostname="b", aliases=["bee"]),
    ]
    write_names_files(stack.paths, hosts=render_hosts(stack.project, entries), resolv_conf=render_resolv_conf())

    def join(plan: LaunchPlan) -> LaunchPlan:
        namespaces = tuple(name for name in plan.namespaces if name != "net")
        return dataclasses.replace(plan, join_netns=str(stack["a"].netns), namespaces=namespaces)

    toml = stack_toml("a", command=["/usr/bin/python3", "-I", "-c", SERVICE, stack.project, str(stack.network.gateway)])
    with running(stack["b"].netns, script(SERVER)) as server:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        async with started(
            toml,
            tmp_path=tmp_path / "launch",
            project=stack.project,
            extra_binds=name_binds(stack.paths),
            edit_plan=join,
        ) as service:
            exit = await service.wait()
            output = await service.drained()
    assert exit.code == 0, output
    seen = json.loads(output.splitlines()[-1])
    b = str(stack["b"].address)
    assert (seen["b"], seen[f"b.{stack.project}"], seen["bee"], seen["a"]) == (b, b, b, str(stack["a"].address))
    assert seen["self"] == str(stack["a"].address)
    assert (seen["tcp"], seen["udp"]) == ("BY NAME", "UDP BY NAME")
    assert "nameserver" not in seen["resolv"].replace("# No nameserver", "")
    assert seen["outside"] != "resolved" and seen["outside_seconds"] < 1.0  # fails at once, no timeouts
    assert seen["port_start"] == "0"  # Docker's default in a private network namespace, applied in ours
