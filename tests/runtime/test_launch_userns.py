"""userns_mode = "private": root inside maps to an unprivileged host range; the host's root filesystem is
idmapped so root inside owns what host root owns, and writes land in the service's own layer.

Every test starts a real service through the launcher (see launchkit) and asserts on what the service
printed and on what the host sees of it: its uid in /proc/PID/status, the owners in its writable layer.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from launchkit import new_project, run_service, sh, stack_toml, started

from stackd.errors import LaunchError
from stackd.runtime.instance import Instance
from stackd.runtime.plan import USERNS_SIZE, LaunchPlan, exec_plan, userns_base
from stackd.testing.leaks import LeakGuard
from stackd.testing.rootfs import make_busybox_rootfs

pytestmark = pytest.mark.root

#: Docker's default 14 capabilities as a mask (the same inside a user namespace).
DOCKER_DEFAULT_CAPS = "00000000a80425fb"


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    name = new_project()
    leak_check.track(name)
    return name


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Root of a user namespace must search the state path: pytest's tmp dirs are mode 700 (see
    test_a_state_directory_others_cannot_search_is_a_clear_error)."""
    path = Path(tempfile.mkdtemp(prefix="stackd-userns-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def status_ids(pid: int, key: str) -> list[str]:
    """The four ids of the Uid: or Gid: line of /proc/PID/status, as the host sees them."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key + ":"))
    return line.split()[1:]


async def appears(path: Path, timeout: float = 10.0) -> None:
    """Wait until a running service has written `path` (a host path in its writable layer)."""
    with anyio.fail_after(timeout):
        while not path.exists():
            await anyio.sleep(0.02)


# --- the mapping ----------------------------------------------------------------------------------------


def test_the_host_range_is_stable_aligned_and_unprivileged() -> None:
    base = userns_base("shop", "web")
    assert base == userns_base("shop", "web"), "the same (project, service) always gets the same range"
    assert base != userns_base("shop", "db") or base != userns_base("other", "web")
    assert base >= 1_000_000_000 and (base - 1_000_000_000) % USERNS_SIZE == 0
    assert base + USERNS_SIZE - 1 < 2**32 - 1, "the whole range is valid uids (-1 is not)"


SCRIPT = """
    cat /proc/self/uid_map; cat /proc/self/gid_map; id -u; stat -c %u:%g /etc/passwd
    echo probe > /etc/stackd-userns-probe && echo wrote
    readlink /proc/self/ns/user
    grep CapEff /proc/self/status
    unshare -m true 2>/dev/null; echo "unshare $?"
"""


async def test_root_inside_is_an_unprivileged_range_on_the_host(state_dir: Path, project: str) -> None:
    passwd_before = sha256("/etc/passwd")
    result = await run_service(
        stack_toml(command=sh(SCRIPT), userns_mode="private"), tmp_path=state_dir, project=project
    )
    assert result.exit.code == 0, result.output
    base = userns_base(project, "svc")
    lines = result.lines
    assert lines[0].split() == ["0", str(base), str(USERNS_SIZE)]
    assert lines[1].split() == ["0", str(base), str(USERNS_SIZE)]
    assert lines[2:5] == ["0", "0:0", "wrote"], "root inside owns the idmapped host files and can write"
    assert lines[5] != os.readlink("/proc/self/ns/user")
    assert lines[6] == f"CapEff:\t{DOCKER_DEFAULT_CAPS}"
    assert lines[7] == "unshare 1", "the default seccomp filter still refuses namespaces"
    assert not Path("/etc/stackd-userns-probe").exists()
    assert sha256("/etc/passwd") == passwd_before


async def test_the_host_sees_the_mapped_uid_and_the_layer_is_owned_by_it(state_dir: Path, project: str) -> None:
    toml = stack_toml(command=sh("touch /srv-written; sleep 30"), userns_mode="private")
    async with started(toml, tmp_path=state_dir, project=project) as running:
        upper = running.instance.paths.upper("svc")
        written = upper / "srv-written"
        await appears(written)
        uids, gids = status_ids(running.pid, "Uid"), status_ids(running.pid, "Gid")
        owner = (written.stat().st_uid, written.stat().st_gid)
        layer_owner = upper.stat().st_uid
        running.instance.cgroup.kill()
    base = userns_base(project, "svc")
    assert uids == [str(base)] * 4
    assert gids == [str(base)] * 4
    assert owner == (base, base)
    assert layer_owner == base


async def test_a_non_root_user_is_the_same_offset_into_the_range(state_dir: Path, project: str) -> None:
    script = "id -u; cat /proc/1/cmdline | tr '\\0' ' '; echo; grep CapEff /proc/self/status; sleep 30"
    toml = stack_toml(command=sh(script), userns_mode="private", user="nobody", init=True)
    async with started(toml, tmp_path=state_dir, project=project) as running:
        with anyio.fail_after(10):
            while "CapEff" not in running.output:
                await anyio.sleep(0.05)
        children = Path(f"/proc/{running.pid}/task/{running.pid}/children").read_text().split()
        service_uids = status_ids(int(children[0]), "Uid")
        running.instance.cgroup.kill()
    lines = running.output.splitlines()
    assert lines[0] == "65534"
    assert lines[1].startswith("/dev/init -g -- sh"), "init = true works in a user namespace"
    assert lines[2] == "CapEff:\t0000000000000000"
    assert service_uids == [str(userns_base(project, "svc") + 65534)] * 4


async def test_without_userns_mode_the_service_shares_the_hosts_users(state_dir: Path, project: str) -> None:
    result = await run_service(
        stack_toml(command=sh("readlink /proc/self/ns/user; cat /proc/self/uid_map")),
        tmp_path=state_dir,
        project=project,
    )
    assert result.lines[0] == os.readlink("/proc/self/ns/user")
    assert result.lines[1].split() == ["0", "0", "4294967295"]


# --- the root filesystem --------------------------------------------------------------------------------


async def test_writes_to_host_root_files_land_in_the_layer_owned_by_the_mapped_root(
    state_dir: Path, project: str
) -> None:
    motd = Path("/etc/motd")
    if not motd.is_file() or motd.stat().st_uid != 0:
        pytest.skip("needs a root-owned /etc/motd on the host")
    before = sha256(motd)
    # Without the idmapped root, /etc/motd (host uid 0) would be nobody's inside and root of the user
    # namespace could not write it: a volume is not idmapped, and shows what that looks like.
    volume = state_dir / "volume"
    volume.mkdir()
    (volume / "hosts-file").write_text("host\n")
    volume.chmod(0o755)
    script = """
        stat -c %u:%g /etc/motd
        echo stackd >> /etc/motd && echo "append ok"
        echo new > /etc/stackd-userns-new && echo "create ok"
        tail -n 1 /etc/motd
        stat -c %u:%g /vol/hosts-file
        (echo x >> /vol/hosts-file) 2>/dev/null && echo "volume append ok" || echo "volume append refused"
    """
    toml = stack_toml(command=sh(script), userns_mode="private", volumes=[f"{volume}:/vol"])

    def layer(instance: Instance) -> dict[str, tuple[int, int, str]]:
        upper = instance.paths.upper("svc")
        return {
            name: (path.stat().st_uid, path.stat().st_gid, path.read_text())
            for name in ("etc/motd", "etc/stackd-userns-new")
            if (path := upper / name).exists()
        }

    result = await run_service(toml, tmp_path=state_dir, project=project, inspect=layer)
    assert result.exit.code == 0, result.output
    assert result.lines == ["0:0", "append ok", "create ok", "stackd", "65534:65534", "volume append refused"]
    base = userns_base(project, "svc")
    assert result.inspected["etc/motd"] == (base, base, motd.read_text() + "stackd\n")
    assert result.inspected["etc/stackd-userns-new"] == (base, base, "new\n")
    assert sha256(motd) == before, "the host's file never changes"
    assert not Path("/etc/stackd-userns-new").exists()
    assert (volume / "hosts-file").read_text() == "host\n"


async def test_read_only_root_in_a_user_namespace(state_dir: Path, project: str) -> None:
    script = "id -u; stat -c %u /etc/passwd; touch /probe 2>&1; echo rc=$?; touch /tmp/probe && echo tmp ok"
    result = await run_service(
        stack_toml(command=sh(script), userns_mode="private", read_only=True), tmp_path=state_dir, project=project
    )
    assert result.exit.code == 0, result.output
    assert result.lines[:2] == ["0", "0"]
    assert "Read-only file system" in result.lines[2]
    assert result.lines[3:] == ["rc=1", "tmp ok"]
    assert not Path("/probe").exists()


async def test_a_directory_rootfs_owned_by_host_root_is_roots_inside(state_dir: Path, project: str) -> None:
    try:
        rootfs = make_busybox_rootfs(state_dir / "rootfs")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    script = "id -u; stat -c %u:%g /bin/busybox /etc/passwd; echo hi > /etc/new && stat -c %u /etc/new"
    result = await run_service(
        stack_toml(command=sh(script), userns_mode="private", rootfs=str(rootfs)),
        tmp_path=state_dir,
        project=project,
        inspect=lambda instance: (instance.paths.upper("svc") / "etc" / "new").stat().st_uid,
    )
    assert result.exit.code == 0, result.output
    assert result.lines == ["0", "0:0", "0:0", "0"]
    assert result.inspected == userns_base(project, "svc")
    assert not (rootfs / "etc" / "new").exists()


async def test_a_state_directory_others_cannot_search_is_a_clear_error(tmp_path: Path, project: str) -> None:
    # pytest's tmp_path sits below mode-700 directories that the mapped root could not search.
    closed = next(p for p in (tmp_path, *tmp_path.parents) if not p.stat().st_mode & 0o001)
    with pytest.raises(LaunchError) as caught:
        await run_service(stack_toml(command=["true"], userns_mode="private"), tmp_path=tmp_path, project=project)
    assert caught.value.step == "user namespace"
    assert caught.value.errno == errno.EACCES
    assert caught.value.path == str(closed)
    assert not (tmp_path / "state" / project / "services" / "svc").exists()


# --- mounts, kernel filesystems and privileges -----------------------------------------------------------


async def test_a_volume_below_a_directory_root_inside_cannot_search(state_dir: Path, project: str) -> None:
    # The launcher clones bind sources as host root before it enters the user namespace, as runc does.
    private = state_dir / "private"
    (private / "data").mkdir(parents=True)
    (private / "data" / "file").write_text("secret\n")
    private.chmod(0o700)
    result = await run_service(
        stack_toml(command=["cat", "/data/file"], userns_mode="private", volumes=[f"{private}/data:/data:ro"]),
        tmp_path=state_dir,
        project=project,
    )
    assert result.exit.code == 0, result.output
    assert result.lines == ["secret"]


@pytest.mark.parametrize("userns_mode", ["host", "private"])
async def test_a_volume_from_a_shared_mount_propagates_nothing_to_the_host(
    state_dir: Path, project: str, userns_mode: str
) -> None:
    # Binds are cloned from the host's mount namespace (open_tree), and a clone of a shared mount would
    # stay its peer: what the service mounts below the volume would then appear on the host.
    shared = state_dir / "shared"
    (shared / "sub").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        toml = stack_toml(
            command=sh("mount -t tmpfs none /vol/sub && echo mounted; sleep 30"),
            userns_mode=userns_mode,
            volumes=[f"{shared}:/vol"],
            cap_add=["SYS_ADMIN"],
            security_opt=["seccomp=unconfined"],
        )
        async with started(toml, tmp_path=state_dir, project=project) as running:
            with anyio.fail_after(10):
                while "mounted" not in running.output:
                    await anyio.sleep(0.02)
            host_points = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
            running.instance.cgroup.kill()
    finally:
        subprocess.run(["umount", "-R", str(shared)], check=False)
    assert str(shared / "sub") not in host_points


async def test_kernel_filesystems_are_the_same_as_without_a_user_namespace(state_dir: Path, project: str) -> None:
    script = """
        ls /sys/fs/cgroup | tr '\\n' ' '; echo
        ls /sys/class/net | tr '\\n' ' '; echo
        awk '$5 ~ "^/(proc|sys|dev)" {print $5, $6}' /proc/self/mountinfo | sort -u | tr '\\n' ';'; echo
        cat /proc/sys/net/ipv4/ip_unprivileged_port_start
        (echo 1 > /proc/sys/net/ipv4/ip_forward) 2>/dev/null && echo "proc/sys writable" || echo "proc/sys read-only"
    """
    plain = await run_service(stack_toml(command=sh(script)), tmp_path=state_dir, project=project)
    private = await run_service(
        stack_toml(command=sh(script), userns_mode="private"), tmp_path=state_dir, project=project
    )
    assert plain.exit.code == 0 and private.exit.code == 0, (plain.output, private.output)
    assert private.lines == plain.lines
    assert "cgroup.controllers" in private.lines[0] or "memory" in private.lines[0]
    assert private.lines[1].split() == ["lo"]
    assert private.lines[3:] == ["0", "proc/sys read-only"]


async def test_network_mode_host_gets_the_hosts_sysfs(state_dir: Path, project: str) -> None:
    # Only an owner of the network namespace may mount sysfs: the launcher mounts it before entering.
    script = "readlink /proc/self/ns/net; ls /sys/class/net | tr '\\n' ' '; echo; grep ' /sys ' /proc/self/mountinfo"
    result = await run_service(
        stack_toml(command=sh(script), userns_mode="private", network_mode="host"),
        tmp_path=state_dir,
        project=project,
    )
    assert result.exit.code == 0, result.output
    assert result.lines[0] == os.readlink("/proc/self/ns/net")
    assert result.lines[1].split() == sorted(os.listdir("/sys/class/net"))
    assert result.lines[2].split()[5].split(",")[0] == "ro"


async def test_a_joined_network_namespace_gets_its_sysfs_and_sysctls(state_dir: Path, project: str) -> None:
    # A namespace pinned by someone else (the network layer, or another service): not the service's
    # user namespace's own, so sysfs and the net.* sysctls are done before the user namespace is entered.
    host_start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        netns = f"/proc/{holder.pid}/ns/net"
        with anyio.fail_after(5):
            while os.readlink(netns) == os.readlink("/proc/self/ns/net"):
                await anyio.sleep(0.01)

        def join(plan: LaunchPlan) -> LaunchPlan:
            namespaces = tuple(name for name in plan.namespaces if name != "net")
            return dataclasses.replace(plan, join_netns=netns, namespaces=namespaces)

        script = "readlink /proc/self/ns/net; ls /sys/class/net; cat /proc/sys/net/ipv4/ip_unprivileged_port_start"
        result = await run_service(
            stack_toml(command=sh(script), userns_mode="private", sysctls={"net.core.somaxconn": 1000}),
            tmp_path=state_dir,
            project=project,
            edit_plan=join,
        )
        joined = os.readlink(netns)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit.code == 0, result.output
    assert result.lines == [joined, "lo", "0"]
    assert Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text() == host_start


async def test_sys_admin_inside_cannot_mount_a_host_filesystem(state_dir: Path, project: str) -> None:
    root = next(
        line.split(" - ")[1].split()[:2]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == "/"
    )
    fstype, device = root
    if not device.startswith("/dev/"):
        pytest.skip(f"the host's root is {fstype} on {device}, not a block device")
    rdev = os.stat(device).st_rdev
    script = textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        def mount(source, target, fstype):
            os.makedirs(target, exist_ok=True)
            ok = libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) == 0
            return "ok" if ok else os.strerror(ctypes.get_errno())
        print("tmpfs", mount("none", "/tmp/t", "tmpfs"))
        print("host", mount("{device}", "/tmp/h", "{fstype}"))
        try:
            os.mknod("/tmp/disk", 0o60600, {rdev})
            print("mknod ok")
        except OSError as error:
            print("mknod", error.strerror)
    """)
    toml = stack_toml(
        command=["python3", "-c", script],
        userns_mode="private",
        cap_add=["SYS_ADMIN"],
        security_opt=["seccomp=unconfined"],
    )
    result = await run_service(toml, tmp_path=state_dir, project=project)
    assert result.exit.code == 0, result.output
    assert result.lines == [
        "tmpfs ok",  # CAP_SYS_ADMIN is real, over what the user namespace owns
        "host Operation not permitted",  # a disk filesystem needs it in the host's user namespace
        "mknod Operation not permitted",  # and so does a device node, CAP_MKNOD or not
    ]


async def test_exec_joins_the_private_user_namespace(state_dir: Path, project: str) -> None:
    toml = stack_toml(command=sh("touch /etc/from-service; sleep 30"), userns_mode="private")
    async with started(toml, tmp_path=state_dir, project=project) as running:
        await appears(running.instance.paths.upper("svc") / "etc" / "from-service")
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
