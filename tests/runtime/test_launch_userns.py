"""userns_mode = "private": root inside maps to an unprivileged host range; the host's root filesystem is
idmapped so root inside owns what host root owns, and writes land in the service's own layer."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from launchkit import new_project, run_service, sh, stack_toml, started

from stackd.runtime.plan import USERNS_SIZE, exec_plan, userns_base
from stackd.testing.leaks import LeakGuard


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    name = new_project()
    leak_check.track(name)
    return name


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Root of a user namespace must traverse the state path: pytest's tmp dirs are mode 700."""
    path = Path(tempfile.mkdtemp(prefix="stackd-userns-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


SCRIPT = """
    cat /proc/self/uid_map; id -u; stat -c %u /etc/passwd
    echo probe > /etc/stackd-userns-probe && echo wrote
    readlink /proc/self/ns/user
    grep CapEff /proc/self/status
    unshare -m true 2>/dev/null; echo "unshare $?"
"""


async def test_root_inside_is_an_unprivileged_range_on_the_host(state_dir: Path, project: str) -> None:
    passwd_before = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    result = await run_service(
        stack_toml(command=sh(SCRIPT), userns_mode="private"), tmp_path=state_dir, project=project
    )
    assert result.exit.code == 0, result.output
    base = userns_base(project, "svc")
    lines = result.lines
    assert lines[0].split() == ["0", str(base), str(USERNS_SIZE)]
    assert lines[1:4] == ["0", "0", "wrote"], "root inside owns the idmapped host files and can write"
    assert lines[4] != os.readlink("/proc/self/ns/user")
    assert lines[5] == "CapEff:\t00000000a80425fb"
    assert lines[6] == "unshare 1", "the default seccomp filter still refuses namespaces"
    assert not Path("/etc/stackd-userns-probe").exists()
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd_before


async def test_the_host_sees_the_mapped_uid_and_the_layer_is_owned_by_it(state_dir: Path, project: str) -> None:
    toml = stack_toml(command=sh("touch /srv-written; sleep 30"), userns_mode="private")
    async with started(toml, tmp_path=state_dir, project=project) as running:
        await anyio.sleep(0.3)
        status = Path(f"/proc/{running.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        upper = running.instance.paths.upper("svc")
        written = upper / "srv-written"
        owner = written.stat().st_uid if written.exists() else None
        running.instance.cgroup.kill()
    base = userns_base(project, "svc")
    assert uid_line.split()[1:] == [str(base)] * 4
    assert owner == base


async def test_without_userns_mode_the_service_shares_the_hosts_users(state_dir: Path, project: str) -> None:
    result = await run_service(
        stack_toml(command=["readlink", "/proc/self/ns/user"]), tmp_path=state_dir, project=project
    )
    assert result.lines == [os.readlink("/proc/self/ns/user")]


async def test_exec_joins_the_private_user_namespace(state_dir: Path, project: str) -> None:
    toml = stack_toml(command=sh("touch /etc/from-service; sleep 30"), userns_mode="private")
    async with started(toml, tmp_path=state_dir, project=project) as running:
        await anyio.sleep(0.3)
        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            plan = exec_plan(
                running.instance.plan,
                running.pid,
                ["sh", "-c", "id -u; stat -c %u /etc/from-service; readlink /proc/self/ns/user"],
            )
            pid = await running.launcher.exec(plan, stdout=write, stderr=write)
        finally:
            os.close(write)
        with anyio.fail_after(10):
            exit = await running.launcher.wait(pid)
        output = os.read(read, 65536).decode().split()
        os.close(read)
        service_userns = os.readlink(f"/proc/{running.pid}/ns/user")
        running.instance.cgroup.kill()
    assert exit.code == 0, output
    assert output == ["0", "0", service_userns]
