"""What a launched service sees from the inside: its own /proc, files and commands (docs/security.md).

Every test starts a real service through the launcher on the real kernel and asserts on what the
service itself printed (at most the list of what was asked for comes from the plan). See launchkit.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
from pathlib import Path

import pytest
from launchkit import facts, new_project, run_service, sh, stack_toml

from stackd.errors import LaunchError
from stackd.runtime.instance import Instance
from stackd.runtime.plan import MASKED_PATHS, READONLY_PATHS
from stackd.testing.leaks import LeakGuard
from stackd.testing.rootfs import make_busybox_rootfs

pytestmark = pytest.mark.root

#: Docker's default 14 capabilities as a mask (CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
#: NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP).
DOCKER_DEFAULT_CAPS = 0x00000000A80425FB
CAP_NET_BIND_SERVICE = 10
SECCOMP_MODULE = Path(__file__).resolve().parents[2] / "stackd" / "runtime" / "seccomp.py"


def parse_status(text: str) -> dict[str, str]:
    """The `Key:\\tvalue` lines of /proc/PID/status."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def parse_mountinfo(text: str) -> list[dict[str, str]]:
    """/proc/PID/mountinfo lines as dicts: point, root, options (per mount), fstype, source, super."""
    mounts = []
    for line in text.splitlines():
        if " - " not in line:
            continue
        head, _, tail = line.partition(" - ")
        fields = head.split()
        fstype, source, superopts = [*tail.split(), "", "", ""][:3]

        def unescape(s: str) -> str:
            return s.encode().decode("unicode_escape") if "\\" in s else s

        mounts.append(
            {
                "id": fields[0],
                "parent": fields[1],
                "root": unescape(fields[3]),
                "point": unescape(fields[4]),
                "options": fields[5],
                "fstype": fstype,
                "source": source,
                "super": superopts,
            }
        )
    return mounts


def visible(mounts: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """The mount visible at each mount point: the last one listed there (mounts stack in order)."""
    return {m["point"]: m for m in mounts}


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    """A unique project; the leak check reports what carries its name (others run benchmarks meanwhile)."""
    name = new_project()
    leak_check.track(name)
    return name


# --- identity and confinement of the process --------------------------------------------------------


async def test_capabilities_and_no_new_privs_of_a_root_service(tmp_path: Path, project: str) -> None:
    result = await run_service(stack_toml(command=["cat", "/proc/self/status"]), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    status = parse_status(result.output)
    assert status["Uid"].split() == ["0"] * 4
    assert int(status["CapBnd"], 16) == DOCKER_DEFAULT_CAPS
    assert int(status["CapPrm"], 16) == DOCKER_DEFAULT_CAPS
    assert int(status["CapEff"], 16) == DOCKER_DEFAULT_CAPS
    assert int(status["CapInh"], 16) == 0
    assert int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    # The test itself runs with more (e.g. CAP_SYS_ADMIN): the numbers above are the service's own.
    assert int(parse_status(Path("/proc/self/status").read_text())["CapBnd"], 16) != DOCKER_DEFAULT_CAPS


async def test_default_seccomp_filter_is_loaded(tmp_path: Path, project: str) -> None:
    result = await run_service(stack_toml(command=["cat", "/proc/self/status"]), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    status = parse_status(result.output)
    if status["Seccomp"] != "2" and not SECCOMP_MODULE.exists():
        pytest.xfail("stackd/runtime/seccomp.py is not there yet: no default seccomp filter is compiled")
    assert status["Seccomp"] == "2"
    assert int(status.get("Seccomp_filters", "1")) >= 1


async def test_own_namespaces_pid_1_and_hostname(tmp_path: Path, project: str) -> None:
    names = ("mnt", "uts", "ipc", "pid", "net", "cgroup")
    script = """
        for n in mnt uts ipc pid net cgroup user; do echo "ns $n $(readlink /proc/self/ns/$n)"; done
        read pid rest < /proc/self/stat
        echo "stat-pid $pid"
        echo "shell-pid $$"
        echo "hostname $(hostname)"
        echo "env-hostname $HOSTNAME"
    """
    result = await run_service(stack_toml("probe-1", command=sh(script)), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    seen = {}
    for line in result.lines:
        if line.startswith("ns "):
            _, name, link = line.split()
            seen[name] = link
    for name in names:
        host = os.readlink(f"/proc/self/ns/{name}")
        assert seen[name].startswith(f"{name}:["), seen
        assert seen[name] != host, f"{name} namespace is the host's"
    # stackd does not map users yet (docs/security.md): the user namespace is the host's.
    assert seen["user"] == os.readlink("/proc/self/ns/user")
    assert "stat-pid 1" in result.lines
    assert "shell-pid 1" in result.lines
    assert "hostname probe-1" in result.lines
    assert "env-hostname probe-1" in result.lines


async def test_only_fds_0_1_2_reach_the_service(tmp_path: Path, project: str) -> None:
    script = """
        ls /proc/self/fd | tr '\\n' ' '; echo
        readlink /proc/self/fd/0
    """
    result = await run_service(stack_toml(command=sh(script)), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    fds = sorted(int(fd) for fd in result.lines[0].split())
    # 0-2 and the one descriptor `ls` opened for the directory itself.
    assert fds == [0, 1, 2, 3], result.output
    assert result.lines[1] == "/dev/null"


# --- mounts ----------------------------------------------------------------------------------------------


async def test_mountinfo_masks_readonly_paths_and_no_host_mounts(tmp_path: Path, project: str) -> None:
    result = await run_service(
        stack_toml(command=["cat", "/proc/self/mountinfo"]),
        tmp_path=tmp_path,
        project=project,
        inspect=lambda instance: [mount.target for mount in instance.plan.mounts],
    )
    assert result.exit.code == 0, result.output
    mounts = parse_mountinfo(result.output)
    top = visible(mounts)
    points = set(top)

    # Docker's masked paths that this kernel has: /dev/null over files, an empty read-only tmpfs over dirs.
    present = [path for path in MASKED_PATHS if os.path.exists(path)]
    assert "/proc/interrupts" in present and "/sys/firmware" in present  # so the loop below checks something
    for path in present:
        assert path in points, f"{path} is not masked"
        mount = top[path]
        if os.path.isdir(path):
            assert mount["fstype"] == "tmpfs" and "ro" in mount["options"].split(","), mount
        else:
            assert mount["root"] == "/null" and mount["fstype"] == "devtmpfs", mount

    # Docker's read-only paths that exist here, and every mount visible below them, are read-only.
    for path in READONLY_PATHS:
        if not os.path.exists(path):
            continue
        assert path in points, f"{path} is not a read-only mount"
        for point, mount in top.items():
            if point == path or point.startswith(path + "/"):
                assert "ro" in mount["options"].split(","), f"{point} is writable: {mount}"

    # Nothing of the host's other mounts: only what the plan mounts.
    expected = {"/", *result.inspected, *MASKED_PATHS, *READONLY_PATHS}
    assert points <= expected, f"mounts the plan did not ask for: {sorted(points - expected)}"
    for leaked in ("/mnt/sandboxing", "/run/netns", "/work"):
        matches = [p for p in points if p == leaked or p.startswith(leaked + "/")]
        assert matches == [], f"host mount {leaked} leaked into the service: {matches}"
    root = top["/"]
    assert root["fstype"] == "overlay" and "lowerdir=/" in root["super"], root
    # /proc and /sys are the service's own, /sys read-only.
    assert top["/proc"]["fstype"] == "proc"
    assert top["/sys"]["fstype"] == "sysfs" and "ro" in top["/sys"]["options"].split(",")


async def test_masked_files_read_empty(tmp_path: Path, project: str) -> None:
    script = """
        for f in /proc/interrupts /proc/keys /proc/timer_list /proc/kcore; do
            [ -e "$f" ] && echo "$f $(wc -c < $f)"
        done
        echo "acpi $(ls -A /proc/acpi | wc -l)"
        echo "firmware $(ls -A /sys/firmware | wc -l)"
        true
    """
    result = await run_service(stack_toml(command=sh(script)), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert Path("/proc/interrupts").read_text()  # not empty on the host
    assert "/proc/interrupts 0" in result.lines
    assert "/proc/timer_list 0" in result.lines
    assert "/proc/keys 0" in result.lines
    assert "acpi 0" in result.lines
    assert "firmware 0" in result.lines


async def test_writes_land_in_the_upper_layer_not_on_the_host(tmp_path: Path, project: str) -> None:
    name = f"stackd-probe-{project}"
    script = f"""
        echo written-inside > /etc/{name}
        echo appended >> /etc/hostname
        cat /etc/{name}
    """
    host_hostname = hashlib.sha256(Path("/etc/hostname").read_bytes()).hexdigest()

    def upper(instance: Instance) -> dict[str, str]:
        layer = instance.paths.upper(instance.service.name)
        return {path: (layer / path).read_text() for path in (f"etc/{name}", "etc/hostname") if (layer / path).exists()}

    result = await run_service(stack_toml(command=sh(script)), tmp_path=tmp_path, project=project, inspect=upper)
    assert result.exit.code == 0, result.output
    assert result.lines == ["written-inside"]
    assert result.inspected[f"etc/{name}"] == "written-inside\n"
    assert result.inspected["etc/hostname"].endswith("appended\n")
    assert not Path(f"/etc/{name}").exists()
    assert hashlib.sha256(Path("/etc/hostname").read_bytes()).hexdigest() == host_hostname


async def test_host_processes_are_invisible(tmp_path: Path, project: str) -> None:
    script = f"""
        echo "count $(ls /proc | grep -c '^[0-9]')"
        [ -e /proc/{os.getpid()} ] && echo "test visible" || echo "test hidden"
        [ -e /proc/{os.getppid()} ] && echo "parent visible" || echo "parent hidden"
    """
    result = await run_service(stack_toml(command=sh(script)), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    count = int(next(line.split()[1] for line in result.lines if line.startswith("count ")))
    assert 1 <= count <= 4, result.output  # sh, the subshell, ls, grep
    assert "test hidden" in result.lines
    assert "parent hidden" in result.lines
    assert sum(name.isdigit() for name in os.listdir("/proc")) > 20  # the host has many


async def test_private_dirs_are_empty_and_shadow_is_hidden(tmp_path: Path, project: str) -> None:
    assert os.listdir("/root"), "the host's /root should not be empty for this test to mean anything"
    assert Path("/etc/shadow").stat().st_size > 0
    script = """
        for d in /root /home /tmp /var/tmp /run; do echo "$d $(ls -A $d | wc -l)"; done
        echo "shadow $(wc -c < /etc/shadow)"
        [ -e /run/netns ] && echo "netns visible" || echo "netns hidden"
    """
    result = await run_service(stack_toml(command=sh(script)), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    for directory in ("/root", "/home", "/tmp", "/var/tmp", "/run"):
        assert f"{directory} 0" in result.lines, result.output
    assert "shadow 0" in result.lines
    assert "netns hidden" in result.lines


# --- sysctls ---------------------------------------------------------------------------------------------


def _read_sysctl(key: str) -> str:
    return Path("/proc/sys", key.replace(".", "/")).read_text().strip()


async def test_allowed_sysctls_apply_inside_only(tmp_path: Path, project: str) -> None:
    keys = ("net.core.somaxconn", "kernel.shmmax")
    before = {key: _read_sysctl(key) for key in keys}
    assert before["net.core.somaxconn"] != "1024" and before["kernel.shmmax"] != "68719476736"
    script = """
        echo "somaxconn $(cat /proc/sys/net/core/somaxconn)"
        echo "shmmax $(cat /proc/sys/kernel/shmmax)"
        echo 2048 > /proc/sys/net/core/somaxconn 2>/dev/null && echo "rewrite ok" || echo "rewrite refused"
    """
    toml = stack_toml(command=sh(script), sysctls={"net.core.somaxconn": 1024, "kernel.shmmax": 68719476736})
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert "somaxconn 1024" in result.lines
    assert "shmmax 68719476736" in result.lines
    assert "rewrite refused" in result.lines  # /proc/sys is read-only once they are written
    assert {key: _read_sysctl(key) for key in keys} == before


async def test_docker_network_sysctls_by_default(tmp_path: Path, project: str) -> None:
    host_start = _read_sysctl("net.ipv4.ip_unprivileged_port_start")
    script = """
        echo "port_start $(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)"
        echo "ping $(cat /proc/sys/net/ipv4/ping_group_range)"
    """
    result = await run_service(stack_toml(command=sh(script)), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert "port_start 0" in result.lines
    assert result.lines[1].split() == ["ping", "0", "2147483647"]
    assert _read_sysctl("net.ipv4.ip_unprivileged_port_start") == host_start


# --- users and capabilities ------------------------------------------------------------------------------

_BIND_80 = """
import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 80))
    print("bind80 ok")
except OSError as e:
    print("bind80", e.errno)
"""


async def test_non_root_user_has_no_capabilities(tmp_path: Path, project: str) -> None:
    script = f"""
        cat /proc/self/status
        python3 -c '{_BIND_80}'
    """
    toml = stack_toml(command=sh(script), user="nobody", sysctls={"net.ipv4.ip_unprivileged_port_start": 1024})
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    status = parse_status(result.output)
    assert status["Uid"].split() == ["65534"] * 4
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapPrm"], 16) == 0
    assert int(status["CapAmb"], 16) == 0
    assert int(status["CapBnd"], 16) == DOCKER_DEFAULT_CAPS
    assert f"bind80 {errno.EACCES}" in result.lines


async def test_non_root_user_keeps_cap_add_in_ambient(tmp_path: Path, project: str) -> None:
    script = f"""
        cat /proc/self/status
        python3 -c '{_BIND_80}'
    """
    toml = stack_toml(
        command=sh(script),
        user="nobody",
        cap_add=["NET_BIND_SERVICE"],
        sysctls={"net.ipv4.ip_unprivileged_port_start": 1024},
    )
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    status = parse_status(result.output)
    assert status["Uid"].split() == ["65534"] * 4
    assert int(status["CapAmb"], 16) == 1 << CAP_NET_BIND_SERVICE
    assert int(status["CapEff"], 16) == 1 << CAP_NET_BIND_SERVICE
    assert "bind80 ok" in result.lines  # the capability works after exec, not only as a bit


async def test_busybox_rootfs_user_and_groups(tmp_path: Path, project: str) -> None:
    rootfs = make_busybox_rootfs(tmp_path / "rootfs")
    script = """
        echo "uid $(id -u)"
        echo "gid $(id -g)"
        echo "groups $(id -G)"
        echo "home $HOME"
        grep -c . /etc/passwd
    """
    result = await run_service(
        stack_toml(command=sh(script), rootfs=str(rootfs), user="app"), tmp_path=tmp_path, project=project
    )
    assert result.exit.code == 0, result.output
    assert "uid 1000" in result.lines
    assert "gid 1000" in result.lines
    groups = next(line for line in result.lines if line.startswith("groups ")).split()[1:]
    assert "2000" in groups and "1000" in groups
    assert "home /home/app" in result.lines
    assert result.lines[-1] == "4"  # the rootfs's own /etc/passwd, not the host's


async def test_read_only_root(tmp_path: Path, project: str) -> None:
    script = """
        touch /probe 2>&1; echo "root rc=$?"
        touch /tmp/probe && echo "tmp ok"
    """
    result = await run_service(stack_toml(command=sh(script), read_only=True), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert any("Read-only file system" in line for line in result.lines), result.output
    assert "root rc=1" in result.lines
    assert "tmp ok" in result.lines
    assert not Path("/probe").exists()


# --- volumes, tmpfs, working directory, environment, ulimits ----------------------------------------------


async def test_volumes_bind_read_write_and_read_only(tmp_path: Path, project: str) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "in.txt").write_text("from-host\n")
    script = """
        echo from-service > /data/out.txt && echo "rw ok"
        cat /conf/in.txt
        echo nope > /conf/new.txt 2>&1; echo "ro rc=$?"
    """
    toml = stack_toml(command=sh(script), volumes=[f"{rw}:/data", f"{ro}:/conf:ro"])
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert (rw / "out.txt").read_text() == "from-service\n"
    assert "rw ok" in result.lines
    assert "from-host" in result.lines
    assert any("Read-only file system" in line for line in result.lines), result.output
    assert "ro rc=2" in result.lines or "ro rc=1" in result.lines
    assert not (ro / "new.txt").exists()


async def test_tmpfs_mount_with_size_and_mode(tmp_path: Path, project: str) -> None:
    script = """
        grep ' /scratch ' /proc/self/mountinfo
        stat -c 'mode %a' /scratch
    """
    toml = stack_toml(command=sh(script), tmpfs=["/scratch:size=8m,mode=1777"])
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    (mount,) = parse_mountinfo(result.lines[0])
    assert mount["fstype"] == "tmpfs"
    assert "size=8192k" in mount["super"].split(","), mount
    assert "nodev" in mount["options"].split(",") and "nosuid" in mount["options"].split(",")
    assert "mode 1777" in result.lines


async def test_working_dir_and_environment(tmp_path: Path, project: str) -> None:
    script = """
        echo "pwd $(pwd)"
        env | sort
    """
    toml = stack_toml(command=sh(script), working_dir="/srv/app", environment={"GREETING": "hello world", "EMPTY": ""})
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert "pwd /srv/app" in result.lines
    assert "GREETING=hello world" in result.lines
    assert "EMPTY=" in result.lines
    assert "HOME=/root" in result.lines
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in result.lines
    # Nothing of the test's own environment leaks in.
    assert "PYTEST_CURRENT_TEST" in os.environ
    assert not any(line.startswith("PYTEST_CURRENT_TEST=") for line in result.lines)


async def test_ulimits_nofile(tmp_path: Path, project: str) -> None:
    _, host_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert host_hard >= 1024
    script = """
        echo "soft $(ulimit -Sn)"
        echo "hard $(ulimit -Hn)"
    """
    toml = stack_toml(command=sh(script), ulimits={"nofile": {"soft": 512, "hard": 1024}})
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert "soft 512" in result.lines
    assert "hard 1024" in result.lines


async def test_ulimit_above_the_hard_limit_fails_the_launch(tmp_path: Path, project: str) -> None:
    # The test process has no CAP_SYS_RESOURCE here, so neither has the launcher: raising fails.
    status = parse_status(Path("/proc/self/status").read_text())
    if int(status["CapEff"], 16) & (1 << 24):
        pytest.skip("this host grants CAP_SYS_RESOURCE: raising the hard limit would succeed")
    _, host_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    toml = stack_toml(command=["true"], ulimits={"nofile": {"soft": 1024, "hard": host_hard + 1}})
    with pytest.raises(LaunchError) as caught:
        await run_service(toml, tmp_path=tmp_path, project=project)
    assert caught.value.step == "setrlimit"
    assert caught.value.errno == errno.EPERM
    assert caught.value.service == "svc"
    assert not (tmp_path / "state" / project / "services" / "svc").exists()


def test_host_facts_find_tini() -> None:
    """init = true needs a static init on the host (tests in test_launch_limits rely on it)."""
    assert facts().init_binary is not None


async def test_time_offsets_shift_the_service_clocks_only(tmp_path: Path, project: str) -> None:
    script = "read up idle < /proc/uptime; echo uptime $up; readlink /proc/self/ns/time"
    toml = stack_toml(command=sh(script), time_offsets={"boottime": "240h", "monotonic": "-1m"})
    host_before = float(Path("/proc/uptime").read_text().split()[0])
    result = await run_service(toml, tmp_path=tmp_path, project=project)
    host_after = float(Path("/proc/uptime").read_text().split()[0])
    assert result.exit.code == 0, result.output
    inside = float(next(line for line in result.lines if line.startswith("uptime ")).split()[1])
    assert host_before + 240 * 3600 - 1 <= inside <= host_after + 240 * 3600 + 1
    assert result.lines[-1] != os.readlink("/proc/self/ns/time")
    # Without time_offsets, the host's time namespace and clocks.
    plain = await run_service(stack_toml(command=sh(script)), tmp_path=tmp_path, project=project)
    assert plain.lines[-1] == os.readlink("/proc/self/ns/time")


async def test_bridge_mode_gives_an_own_netns_with_only_lo_up(tmp_path: Path, project: str) -> None:
    # Until the network layer joins it to a bridge, a service's namespace holds only lo, and lo is up:
    # a non-root service binds port 80 on it (ip_unprivileged_port_start = 0) and connects to itself.
    connect = (
        'import socket; s = socket.create_server(("127.0.0.1", 80)); '
        'c = socket.create_connection(("127.0.0.1", 80)); print("connected")'
    )
    script = f"ls /sys/class/net; cat /sys/class/net/lo/flags; python3 -c '{connect}'"
    result = await run_service(stack_toml(command=sh(script), user="nobody"), tmp_path=tmp_path, project=project)
    assert result.exit.code == 0, result.output
    assert result.lines[0] == "lo" and len([line for line in result.lines if line == "lo"]) == 1
    assert int(result.lines[1], 16) & 0x1, "lo is down"
    assert result.lines[-1] == "connected"
