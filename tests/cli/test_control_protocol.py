"""The control protocol itself (docs/control-protocol.md), against a ControlServer in this process: the
versioned JSON lines, errors, SO_PEERCRED and the socket's mode and group, and a streaming client that
never reads, which is cut off while the supervisor's publish() never waits."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from stackd.runtime.paths import StackPaths
from stackd.supervisor.control import ControlServer, EventHub, _Peer

PROJECT = "cp-proto"


@asynccontextmanager
async def server(tmp_path: Path, **kwargs: Any) -> AsyncIterator[tuple[ControlServer, EventHub, Path]]:
    paths = StackPaths(PROJECT, state_root=tmp_path / "run", log_root=tmp_path / "log")
    fake = SimpleNamespace(
        stack=SimpleNamespace(name=PROJECT, services={"web": None}, source=None), paths=paths, runners={}
    )
    hub = EventHub()
    async with ControlServer.serve(fake, hub, **kwargs) as control:  # type: ignore[arg-type]
        yield control, hub, control.path


def exchange(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.settimeout(5)
        replies = []
        for line in lines:
            sock.sendall(line)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            replies.append(json.loads(data))
        return replies


async def test_hello_versions_and_errors(tmp_path: Path) -> None:
    async with server(tmp_path) as (_, _, path):
        mode = path.stat().st_mode
        assert stat.S_IMODE(mode) == 0o600
        replies = await anyio.to_thread.run_sync(
            lambda: exchange(
                path,
                b'{"v": 1, "op": "hello"}\n',
                b'{"v": 2, "op": "hello"}\n',
                b'{"v": 1, "op": "fly"}\n',
                b'{"v": 1, "op": "ps", "services": ["nope"]}\n',
                b"not json\n",
            )
        )
    hello, version, unknown, service, bad = replies
    assert hello["ok"] and hello["v"] == 1 and hello["protocol"] == 1 and hello["project"] == PROJECT
    assert hello["pid"] == os.getpid() and hello["services"] == ["web"]
    assert version["error"]["code"] == "version" and version["error"]["exit_code"] == 2
    assert unknown["error"]["code"] == "unknown-op" and "ps" in unknown["error"]["message"]
    assert service["error"] == {
        "code": "no-such-service",
        "message": "no such service: nope (services: web)",
        "exit_code": 2,
    }
    assert bad["error"]["code"] == "bad-request"
    assert not path.exists(), "the socket goes with the server"


async def test_a_client_that_never_reads_is_cut_off_and_publish_never_waits(tmp_path: Path) -> None:
    async with server(tmp_path) as (control, hub, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(path))
        sock.sendall(b'{"v": 1, "op": "events"}\n')
        await anyio.sleep(0.2)
        started = time.perf_counter()
        for i in range(20000):
            hub.publish("started", "web", {"pid": i, "padding": "x" * 100})
            if i % 500 == 0:
                await anyio.sleep(0)  # let the connection's task run, as the supervisor's loop would
        publish_seconds = time.perf_counter() - started
        with anyio.fail_after(3):  # cut off (after at most 1 s trying to tell it why)
            while control._connections:
                await anyio.sleep(0.05)
        # Read what the server managed to send: the stream ends with the overflow error.
        sock.settimeout(5)
        data = b""
        while chunk := sock.recv(1 << 20):
            data += chunk
        sock.close()
    lines = data.splitlines()
    assert len(lines) < 20000, "the stream was cut"
    last = json.loads(lines[-1]) if lines[-1].endswith(b"}") else {}
    assert last.get("ok") is not False or last["error"]["code"] == "overflow"
    assert publish_seconds < 2.0, f"20000 events took {publish_seconds:.2f} s to publish"


async def test_group_access_through_the_sockets_mode_and_peer_credentials() -> None:
    client_python = shutil.which("python3", path="/usr/bin:/bin")
    if client_python is None:
        pytest.skip("no system python3 that an unprivileged user may run")
    gid = 4242  # a group id no user of this host is in
    root = Path(tempfile.mkdtemp(prefix="stackd-cp-"))  # searchable by others, unlike pytest's tmp dirs
    try:
        os.chmod(root, 0o755)
        async with server(root, group=gid) as (control, _, path):
            os.chmod(path.parent, 0o755)
            os.chmod(path.parent.parent, 0o755)
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
            client = (
                "import socket, sys; s = socket.socket(socket.AF_UNIX); "
                's.connect(sys.argv[1]); s.sendall(b\'{"v": 1, "op": "hello"}\\n\'); print(s.recv(4096).decode())'
            )

            def run(groups: list[int]) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [client_python, "-I", "-c", client, str(path)],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    cwd="/",
                    user=65534,
                    group=65534,
                    extra_groups=groups,
                )

            member = await anyio.to_thread.run_sync(lambda: run([gid]))
            stranger = await anyio.to_thread.run_sync(lambda: run([]))
            assert member.returncode == 0 and json.loads(member.stdout)["ok"], member.stderr
            assert stranger.returncode != 0 and "PermissionError" in stranger.stderr
            # SO_PEERCRED: uid 0 and the supervisor's uid always; others by their primary or supplementary group.
            assert control._allowed(_Peer(os.getpid(), 0, 0))
            assert control._allowed(_Peer(1, 65534, gid))
            assert not control._allowed(_Peer(1, 65534, 65534))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_unknown_group_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with server(tmp_path, group="no-such-group-stackd"):
            pass

    with pytest.raises(Exception, match="no such group"):
        anyio.run(main)
