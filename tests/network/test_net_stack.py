"""The stack's network under the supervisor, on the real kernel: names, addresses, network modes,
isolation between stacks, up/down cycles, and teardown after the supervisor was SIGKILLed."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from stackd.errors import NetworkError
from stackd.runtime.network.firewall import list_stackd_tables, show_firewall
from stackd.runtime.network.names import bridge_name, link_prefixes, nft_table_name
from stackd.runtime.paths import StackPaths
from stackd.spec import parse_stack
from stackd.supervisor.logfile import log_path, read_log
from stackd.supervisor.restart import Backoff
from stackd.supervisor.router import LogRouter
from stackd.supervisor.stack import StackSupervisor
from stackd.testing.leaks import LeakGuard

PYTHON = "/usr/bin/python3"


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    name = f"ns-{secrets.token_hex(3)}"
    leak_check.track(name)
    return name


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def emit(self, event: str, service: str, **fields: Any) -> None:
        self.events.append((event, service, fields))


@asynccontextmanager
async def running(toml: str, tmp_path: Path, project: str) -> AsyncIterator[StackSupervisor]:
    """The stack's supervisor, open (the network is made by `up()`), closed and cleaned on exit."""
    stack = parse_stack(textwrap.dedent(toml), file=tmp_path / "stack.toml", project=project)
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    async with (
        LogRouter(paths.logs) as router,
        StackSupervisor.open(stack, emit=Events().emit, output=router, paths=paths) as supervisor,
    ):
        yield supervisor


async def run_to_end(toml: str, tmp_path: Path, project: str, *, until: float | None = None) -> dict[str, str]:
    """Run the stack until every service finished (or `until` s); each service's output."""
    stack = parse_stack(textwrap.dedent(toml), file=tmp_path / "stack.toml", project=project)
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    async with (
        LogRouter(paths.logs) as router,
        StackSupervisor.open(stack, emit=Events().emit, output=router, paths=paths) as supervisor,
    ):
        for runner in supervisor.runners.values():
            runner.restart.backoff = Backoff(initial=0.01, maximum=0.01)
        with anyio.move_on_after(until if until is not None else 60):
            await supervisor.up()
    return output_of(paths, list(stack.services))


def output_of(paths: StackPaths, services: list[str]) -> dict[str, str]:
    found = {}
    for name in services:
        if log_path(paths.logs, name).exists():
            found[name] = b"".join(line.raw() for line in read_log(log_path(paths.logs, name))).decode()
    return found


def quoted(script: str) -> str:
    return json.dumps(textwrap.dedent(script))


SERVER = quoted("""
    import socket, threading
    tcp = socket.create_server(("0.0.0.0", 7000))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", 7001))
    print("listening", flush=True)
    def serve_udp():
        for _ in range(3):
            data, peer = udp.recvfrom(100)
            udp.sendto(b"udp:" + data, peer)
    threading.Thread(target=serve_udp).start()
    for _ in range(3):
        conn, _ = tcp.accept()
        conn.sendall(b"tcp:" + conn.recv(100)); conn.close()
""")

CLIENT = quoted("""
    import socket, time
    for name in ("server", "server.{project}", "srv"):
        for attempt in range(100):
            try:
                tcp = socket.create_connection((name, 7000), timeout=2); break
            except ConnectionRefusedError:
                time.sleep(0.02)
        tcp.sendall(name.encode()); print(tcp.recv(100).decode(), socket.gethostbyname(name), flush=True)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.settimeout(2)
        udp.sendto(name.encode(), (name, 7001)); print(udp.recvfrom(100)[0].decode(), flush=True)
""")


async def test_services_talk_tcp_and_udp_by_name_project_name_and_alias(tmp_path: Path, project: str) -> None:
    output = await run_to_end(
        f"""
        [services.server]
        command = ["{PYTHON}", "-c", {SERVER}]
        aliases = ["srv"]
        [services.client]
        command = ["{PYTHON}", "-c", {CLIENT.replace("{project}", project)}]
        """,
        tmp_path,
        project,
    )
    lines = output["client"].splitlines()
    assert [line.split()[0] for line in lines] == [
        "tcp:server", "udp:server", f"tcp:server.{project}", f"udp:server.{project}", "tcp:srv", "udp:srv",
    ]  # fmt: skip
    addresses = {line.split()[1] for line in lines if line.startswith("tcp:")}
    assert len(addresses) == 1 and addresses.pop().startswith("10.")


ADDRESS = '["sh", "-c", "ip -4 -o addr show eth0 | awk \'{print $$4}\'; exit 1"]'


async def test_an_address_is_the_same_after_a_restart_and_in_the_next_run(tmp_path: Path, project: str) -> None:
    toml = f"""
        [services.a]
        command = {ADDRESS}
        restart = "on-failure:2"
        [services.b]
        command = {ADDRESS}
    """
    first = await run_to_end(toml, tmp_path, project)
    runs = first["a"].split()
    assert len(runs) == 3 and len(set(runs)) == 1, first["a"]
    assert first["b"].split() != runs
    second = await run_to_end(toml.replace("[services.b]", "[services.c]\ncommand = ['true']\n[services.b]"),
                              tmp_path, project)  # fmt: skip
    # (the log files keep the first run's lines)
    assert second["a"].split()[-1] == runs[0] and second["b"].split()[-1] == first["b"].split()[0]


NS = "readlink /proc/self/ns/net; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '; echo"


async def test_network_modes_none_host_and_service(tmp_path: Path, project: str) -> None:
    output = await run_to_end(
        f"""
        [services.web]
        command = ["sh", "-c", "{NS}; sleep 3"]
        [services.side]
        command = ["sh", "-c", "{NS}; grep -w side /etc/hosts"]
        network_mode = "service:web"
        [services.iso]
        command = ["sh", "-c", "{NS}; sleep 3"]
        network_mode = "none"
        [services.iso_side]
        command = ["sh", "-c", "{NS}"]
        network_mode = "service:iso"
        [services.onhost]
        command = ["sh", "-c", "{NS}"]
        network_mode = "host"
        depends_on = ["web"]
        """,
        tmp_path,
        project,
        until=2.0,
    )
    namespace = {name: text.splitlines()[0] for name, text in output.items()}
    links = {name: text.splitlines()[1].split() for name, text in output.items()}
    assert links["web"] == ["eth0", "lo"] and links["iso"] == ["lo"]
    assert namespace["side"] == namespace["web"] and links["side"] == ["eth0", "lo"]
    assert namespace["iso_side"] == namespace["iso"] != namespace["web"]
    assert namespace["onhost"] == os.readlink("/proc/self/ns/net")
    assert bridge_name(project) in links["onhost"]
    web_address = re.search(r"^(\S+)\s.*\bside\b", output["side"], re.M)
    assert web_address is not None  # the sharer's name resolves to the address it shares


SERVE_FOREVER = quoted("""
    import socket
    tcp = socket.create_server(("0.0.0.0", 7000))
    while True:
        conn, _ = tcp.accept(); conn.sendall(b"hello"); conn.close()
""")

PROBE = quoted("""
    import socket, sys, time
    time.sleep(0.3)
    for target in sys.argv[1:]:
        try:
            socket.create_connection((target, 7000), timeout=1).recv(10); print(target, "reached", flush=True)
        except OSError as error:
            print(target, "blocked", type(error).__name__, flush=True)
""")


async def test_two_stacks_cannot_reach_each_other(tmp_path: Path, leak_check: LeakGuard) -> None:
    a, b = f"ns-{secrets.token_hex(3)}", f"ns-{secrets.token_hex(3)}"
    leak_check.track(a, b)
    server = f"""
        [services.server]
        command = ["{PYTHON}", "-c", {SERVE_FOREVER}]
        init = true
    """
    async with running(server, tmp_path / "a", a) as stack_a, anyio.create_task_group() as group:
        group.start_soon(stack_a.up)
        await stack_a.runners["server"].started.wait()
        address_a = str(stack_a.network.address("server"))
        await _wait_listening(address_a)  # the host reaches a service through the bridge
        probe = f"""
            [services.server]
            command = ["{PYTHON}", "-c", {SERVE_FOREVER}]
            init = true
            [services.probe]
            command = ["{PYTHON}", "-c", {PROBE}, "server", "{address_a}"]
        """
        output = await run_to_end(probe, tmp_path / "b", b, until=5.0)
        group.cancel_scope.cancel()
    lines = output["probe"].splitlines()
    assert lines[0] == "server reached"  # its own stack: yes
    assert lines[1].startswith(f"{address_a} blocked"), lines  # the other stack: no


async def _wait_listening(address: str) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            with socket.create_connection((address, 7000), timeout=1) as conn:
                assert conn.recv(10) == b"hello"
                return
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            await anyio.sleep(0.02)


async def test_a_hundred_up_down_cycles_of_ten_services_leave_nothing(tmp_path: Path, project: str) -> None:
    toml = "\n".join(f'[services.s{i}]\ncommand = ["true"]' for i in range(10))
    prefixes = link_prefixes(project)
    for cycle in range(100):
        output = await run_to_end(toml, tmp_path, project)
        assert len(output) == 10, f"cycle {cycle}"
        left = [name for _, name in socket.if_nameindex() if name.startswith(prefixes)]
        assert left == [], f"cycle {cycle}: {left}"
    assert not (tmp_path / "state" / project).exists()


def test_down_after_sigkill_of_the_supervisor_removes_the_network(tmp_path: Path, project: str) -> None:
    (tmp_path / "stack.toml").write_text(
        f'name = "{project}"\n'
        + "\n".join(f'[services.s{i}]\ncommand = ["sleep", "60"]\n' for i in range(3))
        + '[services.s3]\ncommand = ["sleep", "60"]\nnetwork_mode = "service:s0"\n'
    )
    env = {**os.environ, "STACKD_STATE_DIR": str(tmp_path / "run"), "STACKD_LOG_DIR": str(tmp_path / "log")}
    prefixes = link_prefixes(project)

    def links() -> list[str]:
        return [name for _, name in socket.if_nameindex() if name.startswith(prefixes)]

    def pins() -> list[str]:
        return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp_path) in line]

    for attempt in range(2):  # the second `up` works after the forced teardown
        process = subprocess.Popen([sys.executable, "-m", "stackd", "up"], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 15
            record = tmp_path / "run" / project / "state.json"
            while len(links()) < 4 or '"s3"' not in (record.read_text() if record.exists() else ""):
                assert time.monotonic() < deadline, f"attempt {attempt}: the stack did not come up"
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                time.sleep(0.05)
            time.sleep(0.2)
            assert len(pins()) >= 3
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert len(links()) == 4  # the bridge and three veths outlive their supervisor
        down = subprocess.run([sys.executable, "-m", "stackd", "down"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert links() == [] and pins() == []
        assert not (tmp_path / "run" / project).exists()


HOST_PROBE = quoted("""
    import socket, struct, sys, time
    port, other = int(sys.argv[1]), sys.argv[2]
    route = next(line.split() for line in open("/proc/net/route") if line.split()[1] == "00000000")
    own = socket.inet_ntoa(struct.pack("<I", int(route[2], 16)))  # the default route's gateway
    deadline = time.monotonic() + 5
    while True:  # the host listens on the gateway once the test saw this service start
        try:
            print(own, socket.create_connection((own, port), timeout=1).recv(10).decode(), flush=True); break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline; time.sleep(0.02)
    try:
        socket.create_connection((other, port), timeout=1).recv(10); print(other, "reached", flush=True)
    except OSError as error:
        print(other, "blocked", type(error).__name__, flush=True)
""")


@contextmanager
def host_listener(address: str, port: int) -> Iterator[None]:
    """A socket of the host on `address` that greets every connection (served from a thread)."""
    server = socket.create_server((address, port))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"host")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_service_reaches_the_host_only_at_its_gateway(tmp_path: Path, leak_check: LeakGuard) -> None:
    """The host's other addresses (here: another stack's gateway) are closed to a service; without the
    stack's firewall the kernel would deliver to them (any local address, whatever the interface)."""
    a, b = f"ns-{secrets.token_hex(3)}", f"ns-{secrets.token_hex(3)}"
    leak_check.track(a, b)
    port = free_port()
    probe = f'[services.probe]\ncommand = ["{PYTHON}", "-c", {HOST_PROBE}, "{port}", "GATEWAY_A"]'
    async with (
        running('[services.idle]\ncommand = ["sleep", "30"]', tmp_path / "a", a) as stack_a,
        anyio.create_task_group() as group,
    ):
        group.start_soon(stack_a.up)
        await stack_a.runners["idle"].started.wait()
        assert stack_a.network.network is not None
        gateway_a = str(stack_a.network.network.gateway)
        assert nft_table_name(bridge_name(a)) in await list_stackd_tables()
        with host_listener(gateway_a, port):
            async with running(probe.replace("GATEWAY_A", gateway_a), tmp_path / "b", b) as stack_b:
                done = anyio.Event()

                async def run_b() -> None:
                    await stack_b.up()
                    done.set()

                group.start_soon(run_b)
                await stack_b.runners["probe"].started.wait()
                assert stack_b.network.network is not None
                with host_listener(str(stack_b.network.network.gateway), port), anyio.fail_after(10):
                    await done.wait()
                gateway_b = str(stack_b.network.network.gateway)
                lines = output_of(stack_b.paths, ["probe"])["probe"].splitlines()
        group.cancel_scope.cancel()
    assert lines[0] == f"{gateway_b} host"  # its own gateway: the host answers
    assert lines[1].startswith(f"{gateway_a} blocked"), lines  # another address of the host: no


async def greeting(port: int) -> bytes | None:
    """What the host's loopback port answers (None: refused). Async: the proxy runs in this event loop."""
    try:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", port) as conn:
                return await conn.receive(10)
    except OSError:
        return None


async def test_a_published_port_answers_on_the_host_loopback(tmp_path: Path, project: str) -> None:
    fixed = free_port()
    toml = f"""
        [services.web]
        command = ["{PYTHON}", "-c", {SERVE_FOREVER}]
        init = true
        ports = ["{fixed}:7000", "7000"]
    """
    async with running(toml, tmp_path, project) as supervisor, anyio.create_task_group() as group:
        group.start_soon(supervisor.up)
        await supervisor.runners["web"].started.wait()
        shown = supervisor.ports_of("web")
        assert shown[0] == f"127.0.0.1:{fixed}->7000/tcp"  # the default host address is the loopback
        random_port = int(re.fullmatch(r"127\.0\.0\.1:(\d+)->7000/tcp", shown[1])[1])  # type: ignore[index]
        await _wait_listening(str(supervisor.network.address("web")))
        assert await greeting(fixed) == b"hello" and await greeting(random_port) == b"hello"
        assert [s.ports for s in supervisor.status()] == [shown]

        await supervisor.stop_service("web")  # a stopped service's ports are free, as with Docker
        assert await greeting(fixed) is None and supervisor.ports_of("web") == ()
        await supervisor.start_service("web")
        await supervisor.runners["web"].started.wait()
        await _wait_listening(str(supervisor.network.address("web")))
        assert await greeting(fixed) == b"hello"
        group.cancel_scope.cancel()
    assert await greeting(fixed) is None


async def test_a_busy_host_port_fails_the_start_and_names_it(tmp_path: Path, project: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        toml = f"""
            [services.web]
            command = ["sleep", "30"]
            ports = ["127.0.0.1:{port}:80"]
        """
        with pytest.raises(ExceptionGroup) as caught:  # from the supervisor's task group
            async with running(toml, tmp_path, project) as supervisor:
                await supervisor.up()
        assert caught.group_contains(NetworkError, match=rf'service web: ports "127.0.0.1:{port}:80/tcp": cannot '
                                     rf"listen on 127.0.0.1:{port}/tcp: address already in use")  # fmt: skip
        assert not supervisor.runners["web"].started.is_set()  # it never started


async def test_an_outbound_stack_gets_the_nat_rules_and_they_go_with_it(tmp_path: Path, project: str) -> None:
    """Only the rules are checked: no traffic is sent anywhere outside this machine."""
    toml = '[network]\noutbound = true\n[services.a]\ncommand = ["sleep", "30"]\n[services.b]\ncommand = ["true"]'
    forwarding_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    async with running(toml, tmp_path, project) as supervisor, anyio.create_task_group() as group:
        group.start_soon(supervisor.up)
        await supervisor.runners["a"].started.wait()
        table = await show_firewall(bridge_name(project), counters=False)
        assert table is not None and "masquerade" in table
        assert Path(f"/proc/sys/net/ipv4/conf/{bridge_name(project)}/forwarding").read_text() == "1\n"
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == "1\n"
        group.cancel_scope.cancel()
    assert await show_firewall(bridge_name(project)) is None
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forwarding_before


async def test_a_warning_about_the_hosts_firewall_is_an_event(
    tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The detection itself is tested in a namespace of its own (test_net_firewall.py); here, that what it
    finds reaches the stack's events once, when the network is made."""
    import stackd.supervisor.network as supervisor_network

    async def warn(bridge: str) -> str:
        return f"drops {bridge}"

    monkeypatch.setattr(supervisor_network, "bridged_traffic_warning", warn)
    stack = parse_stack('[services.a]\ncommand = ["true"]\n[services.b]\ncommand = ["true"]', file=tmp_path / "s.toml",
                        project=project)  # fmt: skip
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    events = Events()
    async with (
        LogRouter(paths.logs) as router,
        StackSupervisor.open(stack, emit=events.emit, output=router, paths=paths) as sup,
    ):
        await sup.up()
    warnings = [fields for event, _, fields in events.events if event == "warning"]
    assert warnings == [{"problem": f"drops {bridge_name(project)}"}]
