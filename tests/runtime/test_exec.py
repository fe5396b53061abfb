"""Running a command inside a running service (health checks, `stackd exec`): its namespaces, cgroup,
user and confinement, read from inside the command."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from launchkit import new_project, sh, stack_toml, started

from stackd.errors import LaunchError
from stackd.runtime.launcher import Exit
from stackd.runtime.plan import exec_plan
from stackd.testing.leaks import LeakGuard


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    name = new_project()
    leak_check.track(name)
    return name


async def run_exec(running, argv: list[str], **kwargs) -> tuple[Exit, str]:
    read, write = os.pipe2(os.O_CLOEXEC)
    try:
        pid = await running.launcher.exec(
            exec_plan(running.instance.plan, running.pid, argv, **kwargs), stdout=write, stderr=write
        )
    finally:
        os.close(write)
    with anyio.fail_after(10):
        exit = await running.launcher.wait(pid)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    return exit, b"".join(chunks).decode()


SERVICE = stack_toml(
    "svc-x",
    command=sh("echo from-service > /tmp/mark; sleep 30"),
    user="nobody",
    environment={"GREETING": "hello"},
)


async def test_exec_joins_the_services_namespaces_cgroup_and_confinement(tmp_path: Path, project: str) -> None:
    async with started(SERVICE, tmp_path=tmp_path, project=project) as running:
        await anyio.sleep(0.2)
        script = """
            id -u; hostname; cat /tmp/mark; echo "pid $$"; echo "greeting $GREETING"
            grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status
            for n in mnt uts ipc pid net cgroup; do echo "ns $n $(readlink /proc/self/ns/$n)"; done
        """
        exit, output = await run_exec(running, ["sh", "-c", script.replace("$$", "$$")])
        service_ns = {
            n: os.readlink(f"/proc/{running.pid}/ns/{n}") for n in ("mnt", "uts", "ipc", "pid", "net", "cgroup")
        }
        procs = {int(p) for path in running.instance.cgroup.procs_files for p in Path(path).read_text().split()}
        running.instance.cgroup.kill()
    assert exit.code == 0, output
    lines = output.splitlines()
    assert lines[:3] == ["65534", "svc-x", "from-service"]
    pid = int(lines[3].split()[1])
    assert 1 < pid < 100, "in the service's pid namespace"
    assert "greeting hello" in lines
    assert "Seccomp:\t2" in lines and "NoNewPrivs:\t1" in lines and "CapEff:\t0000000000000000" in lines
    for line in lines:
        if line.startswith("ns "):
            _, name, link = line.split()
            assert link == service_ns[name], f"{name} namespace is not the service's"
    assert running.pid in procs


async def test_exec_as_another_user_and_its_exit_code(tmp_path: Path, project: str) -> None:
    async with started(SERVICE, tmp_path=tmp_path, project=project) as running:
        exit, output = await run_exec(running, ["sh", "-c", "id -u; exit 7"], user="0")
        missing = None
        try:
            await run_exec(running, ["no-such-program"])
        except LaunchError as error:
            missing = error
        running.instance.cgroup.kill()
    assert (exit.code, output.split()) == (7, ["0"])
    assert missing is not None and "exec" in missing.step and "no-such-program" in str(missing)


async def test_exec_into_a_service_that_is_gone_fails_cleanly(tmp_path: Path, project: str) -> None:
    async with started(stack_toml(command=["true"]), tmp_path=tmp_path, project=project) as running:
        await running.wait()
        with pytest.raises(LaunchError, match="namespace"):
            await run_exec(running, ["true"])


async def test_tmp_is_writable_by_everyone_and_sticky(tmp_path: Path, project: str) -> None:
    async with started(
        stack_toml(command=sh("stat -c %a /tmp /var/tmp; touch /tmp/x && echo ok"), user="nobody"),
        tmp_path=tmp_path,
        project=project,
    ) as running:
        exit = await running.wait()
        output = running.output
    assert exit.code == 0, output
    assert output.split() == ["1777", "1777", "ok"]
