"""A launch that fails reaches the caller as a LaunchError naming the step, and leaves nothing behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from launchkit import facts, new_project, run_service, service_of, sh, stack_toml

from stackd.errors import LaunchError
from stackd.runtime.instance import prepare
from stackd.runtime.launcher import Launcher
from stackd.runtime.paths import StackPaths
from stackd.testing.leaks import LeakGuard
from stackd.testing.rootfs import make_busybox_rootfs

pytestmark = pytest.mark.root


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    """A unique project; the leak check reports what carries its name (others run benchmarks meanwhile)."""
    name = new_project()
    leak_check.track(name)
    return name


def assert_nothing_left(tmp_path: Path, project: str) -> None:
    """No state directory and no cgroup of the project in any hierarchy (the leak check also looks)."""
    assert not (tmp_path / "state" / project / "services" / "svc").exists()
    assert facts().driver.project_paths(project) == ()


async def test_missing_volume_source(tmp_path: Path, project: str) -> None:
    missing = tmp_path / "no-such-dir"
    toml = stack_toml(command=["true"], volumes=[f"{missing}:/data"])
    with pytest.raises(LaunchError) as caught:
        await run_service(toml, tmp_path=tmp_path, project=project)
    error = caught.value
    assert error.service == "svc"
    assert error.step == "mount /data"
    assert error.errno == errno.ENOENT
    assert error.path is not None
    # What a user must fix is the missing source: the message names it.
    assert str(missing) in str(error), str(error)
    assert str(error).startswith("service svc: mount /data: ENOENT")
    assert_nothing_left(tmp_path, project)


async def test_command_not_in_path(tmp_path: Path, project: str) -> None:
    with pytest.raises(LaunchError) as caught:
        await run_service(stack_toml(command=["no-such-command-lt"]), tmp_path=tmp_path, project=project)
    error = caught.value
    assert (error.service, error.step, error.path) == ("svc", "exec", "no-such-command-lt")
    assert "not found" in str(error)
    assert_nothing_left(tmp_path, project)


async def test_command_path_missing(tmp_path: Path, project: str) -> None:
    with pytest.raises(LaunchError) as caught:
        await run_service(stack_toml(command=["/no/such/binary"]), tmp_path=tmp_path, project=project)
    error = caught.value
    assert (error.step, error.errno, error.path) == ("exec", errno.ENOENT, "/no/such/binary")
    assert_nothing_left(tmp_path, project)


async def test_command_not_executable(tmp_path: Path, project: str) -> None:
    with pytest.raises(LaunchError) as caught:
        await run_service(stack_toml(command=["/etc/passwd"]), tmp_path=tmp_path, project=project)
    assert (caught.value.step, caught.value.errno) == ("exec", errno.EACCES)
    assert_nothing_left(tmp_path, project)


async def test_unknown_user(tmp_path: Path, project: str) -> None:
    with pytest.raises(LaunchError) as caught:
        await run_service(stack_toml(command=["true"], user="no-such-user-lt"), tmp_path=tmp_path, project=project)
    assert caught.value.step == "resolve user"
    assert "no-such-user-lt" in str(caught.value)
    assert_nothing_left(tmp_path, project)


async def test_exit_code_of_a_service(tmp_path: Path, project: str) -> None:
    """Not launch failures: a service that fails after exec is an Exit, not a LaunchError."""
    result = await run_service(stack_toml(command=sh("echo bye; exit 7")), tmp_path=tmp_path, project=project)
    assert (result.exit.code, result.exit.signal, result.reason) == (7, None, "exited with code 7")
    assert result.lines == ["bye"]


@pytest.mark.parametrize(("user", "uid", "gid"), [(None, "0", "0"), ("app", "1000", "1000"), ("1000", "1000", "1000")])
async def test_malformed_passwd_lines_do_not_break_user_lookup(
    tmp_path: Path, project: str, user: str | None, uid: str, gid: str
) -> None:
    """Short lines (NIS "+@netgroup", garbage) in the service's /etc/passwd and /etc/group are skipped."""
    rootfs = make_busybox_rootfs(tmp_path / "rootfs")
    passwd = rootfs / "etc" / "passwd"
    passwd.write_text("+@netgroup\n" + passwd.read_text() + "broken-line\n")
    group = rootfs / "etc" / "group"
    group.write_text("+\n" + group.read_text())
    keys = {"user": user} if user is not None else {}
    toml = stack_toml(command=["grep", "-E", "^(Uid|Gid):", "/proc/self/status"], rootfs=str(rootfs), **keys)
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert result.lines[0].split()[1:] == [uid] * 4
    assert result.lines[1].split()[1:] == [gid] * 4


async def test_launcher_keeps_working_after_a_failed_launch(tmp_path: Path, project: str) -> None:
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    bad = service_of(stack_toml("bad", command=["no-such-command-lt"]), tmp_path=tmp_path, project=project)
    good = service_of(stack_toml("good", command=["true"]), tmp_path=tmp_path, project=project)
    instances = []
    try:
        async with Launcher.open() as launcher:
            for service in (bad, good):
                instances.append(prepare(service, project=project, paths=paths, facts=facts()))
            null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
            try:
                with pytest.raises(LaunchError) as caught:
                    await launcher.launch(instances[0].plan, stdout=null, stderr=null)
                assert (caught.value.service, caught.value.step) == ("bad", "exec")
                # The failed attempt ends by itself (it may still be exiting when the reply comes).
                assert instances[0].cgroup.wait_empty(2.0), instances[0].cgroup.pids()
                pid = await launcher.launch(instances[1].plan, stdout=null, stderr=null)
            finally:
                os.close(null)
            exit = await launcher.wait(pid)
            assert (exit.code, exit.signal) == (0, None)
            await launcher.ping()
    finally:
        for instance in instances:
            instance.dispose()
    assert facts().driver.project_paths(project) == ()
