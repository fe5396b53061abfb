"""The cgroup v1 driver (with the unified hierarchy of a hybrid host) on the real kernel.

Needs root and v1 hierarchies (the development host runs hybrid cgroups). Every test uses its own project
`t-<hex>`, and the `project` fixture kills and removes whatever the test made, pass or fail. Processes are
started by the tests themselves and ended by their pid. The module-level fixture asserts at the end that
none of this module's projects left a directory in any hierarchy.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stackd.errors import CgroupError
from stackd.runtime.cgroups import (
    DEFAULT_DEVICE_RULES,
    CgroupFs,
    CgroupLimits,
    CgroupV1Driver,
    ServiceCgroup,
    detect_driver,
    read_cgroup_mounts,
    remove_cgroup_paths,
)
from stackd.runtime.cgroups.base import write_file

MiB = 1 << 20

MOUNTS = read_cgroup_mounts()

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not {"cpu", "memory", "pids", "freezer"} <= set(MOUNTS.v1),
        reason="needs a cgroup v1 (legacy or hybrid) host",
    ),
]

_OUR_PROJECTS: set[str] = set()


def _all_roots() -> list[Path]:
    roots = list(dict.fromkeys(MOUNTS.v1.values()))
    if MOUNTS.unified is not None:
        roots.append(MOUNTS.unified)
    return roots


def _leftovers(projects: set[str]) -> list[Path]:
    return [root / "stackd" / p for root in _all_roots() for p in sorted(projects) if (root / "stackd" / p).exists()]


def _stackd_t_dirs() -> set[Path]:
    """Every `stackd/t-*` directory in any hierarchy under /sys/fs/cgroup (named ones too) or our roots."""
    base = Path("/sys/fs/cgroup")
    found = set(base.glob("stackd/t-*")) | set(base.glob("*/stackd/t-*"))
    return found | {d for root in _all_roots() for d in (root / "stackd").glob("t-*")}


@pytest.fixture(scope="module", autouse=True)
def no_leaks() -> Iterator[None]:
    """At the end of the module no `stackd/t-*` directory of this module's projects is left anywhere.

    Filtered by name because other suites may be running on this host at the same time with their own
    live `t-*` projects.
    """
    yield
    assert sorted(d for d in _stackd_t_dirs() if d.name in _OUR_PROJECTS) == []


@pytest.fixture
def driver() -> CgroupV1Driver:
    found = detect_driver()
    assert isinstance(found, CgroupV1Driver)
    return found


@pytest.fixture
def project(driver: CgroupV1Driver) -> Iterator[str]:
    name = "t-" + os.urandom(6).hex()
    _OUR_PROJECTS.add(name)
    yield name
    driver.remove_project(name, timeout=10)
    assert _leftovers({name}) == []


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes; each is killed (by its pid) and reaped when the test ends."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], cg: ServiceCgroup | None = None, **kwargs: object) -> subprocess.Popen[bytes]:
        # With a cgroup, the child joins it before exec, as the launcher does: nothing it does runs outside.
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            argv, preexec_fn=cg.join if cg else None, **kwargs
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _read(path: Path) -> str:
    return path.read_text().strip()


def _cgroup_lines(pid: int) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controllers: path}; the cgroup2 line is under ""."""
    lines: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            lines[name] = path
    return lines


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.01)
    return _gone(pid)


# --- creation and limits --------------------------------------------------------------------------------


def test_limits_are_written_to_the_real_files(driver: CgroupV1Driver, project: str) -> None:
    limits = CgroupLimits(cpus=0.25, memory=64 * MiB, pids=64)
    expected_paths = driver.service_paths(project, "web")
    cg = driver.create(project, "web", limits)
    assert cg.paths == expected_paths
    assert cg.version == 1
    assert int(_read(cg.v1["cpu"] / "cpu.cfs_quota_us")) == 25000
    assert int(_read(cg.v1["cpu"] / "cpu.cfs_period_us")) == 100000
    assert int(_read(cg.v1["memory"] / "memory.limit_in_bytes")) == 64 * MiB
    assert _read(cg.v1["pids"] / "pids.max") == "64"
    # every hierarchy has the service directory, the unified one too
    for path in cg.paths:
        assert path.is_dir()
        assert path.parent.parent.name == "stackd" and path.parent.name == project
    assert cg.unified is not None and cg.unified.parent.parent.parent == MOUNTS.unified
    # cpuset was made joinable
    if "cpuset" in cg.v1:
        assert _read(cg.v1["cpuset"] / "cpuset.cpus")
        assert _read(cg.v1["cpuset"] / "cpuset.mems")
    stats = cg.stats()
    assert stats.memory_limit == 64 * MiB
    assert stats.pids_current == 0


def test_unlimited_values(driver: CgroupV1Driver, project: str) -> None:
    cg = driver.create(project, "s", CgroupLimits(memory=32 * MiB, memory_swap=-1, pids=-1))
    assert _read(cg.v1["pids"] / "pids.max") == "max"
    memsw = cg.v1["memory"] / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        assert int(_read(memsw)) > 1 << 62


def test_memory_swap_total(driver: CgroupV1Driver, project: str) -> None:
    memsw = MOUNTS.v1["memory"] / "memory.memsw.limit_in_bytes"
    limits = CgroupLimits(memory=32 * MiB, memory_swap=48 * MiB)
    if not memsw.exists():
        with pytest.raises(CgroupError, match="swap accounting is off"):
            driver.create(project, "s", limits)
        return
    cg = driver.create(project, "s", limits)
    assert int(_read(cg.v1["memory"] / "memory.memsw.limit_in_bytes")) == 48 * MiB
    assert int(_read(cg.v1["memory"] / "memory.limit_in_bytes")) == 32 * MiB


def test_kernel_rejection_is_reported_with_file_and_value(driver: CgroupV1Driver, project: str) -> None:
    # A value the kernel itself refuses: pids.max takes a number or "max".
    cg = driver.create(project, "s", CgroupLimits())
    with pytest.raises(CgroupError) as info:
        write_file(cg.v1["pids"] / "pids.max", "lots")
    assert str(info.value) == f'cgroup: write "lots" to {cg.v1["pids"]}/pids.max: EINVAL (Invalid argument)'


# --- processes ------------------------------------------------------------------------------------------


def test_add_pid_places_process_in_every_hierarchy(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    cg = driver.create(project, "web", CgroupLimits(cpus=0.5, memory=64 * MiB, pids=16))
    proc = spawn(["sleep", "30"])
    assert not cg.populated()
    cg.add_pid(proc.pid)
    where = f"/stackd/{project}/web"
    lines = _cgroup_lines(proc.pid)
    for controller in ("memory", "pids", "cpu", "cpuacct", "freezer", "devices", ""):
        assert lines[controller] == where, (controller, lines)
    assert cg.pids() == [proc.pid]
    assert cg.populated()
    events = cg.events_path()
    assert events is not None and "populated 1" in events.read_text()
    assert cg.stats().pids_current == 1


@pytest.mark.parametrize("with_unified", [True, False], ids=["cgroup.kill", "freezer"])
def test_kill_reaches_daemonised_grandchild(
    driver: CgroupV1Driver,
    project: str,
    spawn: Callable[..., subprocess.Popen[bytes]],
    with_unified: bool,
) -> None:
    # Without the unified hierarchy (a legacy host) kill() must freeze, signal every pid, thaw.
    drv = driver if with_unified else CgroupV1Driver(driver.hierarchies, None)
    cg = drv.create(project, "web", CgroupLimits())
    assert (cg.unified is not None) == with_unified
    script = "(setsid sleep 300 & echo $!); exec sleep 300"  # the grandchild: own session, orphaned
    proc = spawn(["sh", "-c", script], cg, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    deadline = time.monotonic() + 5
    expected = sorted([proc.pid, grandchild])
    while cg.pids() != expected and time.monotonic() < deadline:
        time.sleep(0.01)  # until the subshell has exited and sh has exec'd
    assert cg.pids() == expected
    while os.getsid(grandchild) != grandchild and time.monotonic() < deadline:
        time.sleep(0.01)  # `echo $!` may run before the child has called setsid()
    assert os.getsid(grandchild) == grandchild
    cg.kill()
    assert cg.pids() == []
    assert not cg.populated()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert _wait_gone(grandchild)
    if with_unified:
        events = cg.events_path()
        assert events is not None and "populated 0" in events.read_text()


def test_kill_with_sigterm_signals_everyone_once(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    cg = driver.create(project, "s", CgroupLimits())
    proc = spawn(["sleep", "300"], cg)
    deadline = time.monotonic() + 5
    while not cg.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    cg.kill(signal.SIGTERM)
    assert proc.wait(timeout=5) == -signal.SIGTERM
    assert _read(cg.v1["freezer"] / "freezer.state") == "THAWED"


def test_memory_limit_oom_kill(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    cg = driver.create(project, "hog", CgroupLimits(memory=16 * MiB, memory_swap=16 * MiB))
    assert cg.oom_kill_count() == 0
    proc = spawn([sys.executable, "-I", "-S", "-c", "b = bytearray(64 << 20)"], cg)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert cg.oom_kill_count() >= 1


def test_stats_report_cpu_time(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    cg = driver.create(project, "busy", CgroupLimits(memory=64 * MiB))
    busy = "import time\nend = time.monotonic() + 0.2\nwhile time.monotonic() < end: pass"
    proc = spawn([sys.executable, "-I", "-S", "-c", busy], cg)
    assert proc.wait(timeout=30) == 0
    stats = cg.stats()
    assert stats.cpu_usage_usec >= 100_000  # at least half of the 0.2 s busy loop
    assert stats.memory_limit == 64 * MiB
    assert stats.pids_current == 0


def test_freeze_and_thaw(driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    cg = driver.create(project, "s", CgroupLimits())
    ticker = "import time, sys\nwhile True:\n    print(flush=True); time.sleep(0.01)"
    proc = spawn([sys.executable, "-I", "-S", "-c", ticker], cg, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    assert not cg.frozen()
    cg.freeze()
    assert cg.frozen()
    assert _read(cg.v1["freezer"] / "freezer.state") == "FROZEN"
    cg.kill(signal.SIGUSR1)  # another signal to a paused service leaves it paused
    assert cg.frozen()
    cg.thaw()
    assert not cg.frozen()
    assert _read(cg.v1["freezer"] / "freezer.state") == "THAWED"
    assert proc.wait(timeout=5) == -signal.SIGUSR1  # delivered once thawed


def test_kill_a_paused_service(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    for drv, name in ((driver, "unified"), (CgroupV1Driver(driver.hierarchies, None), "legacy")):
        cg = drv.create(project, name, CgroupLimits())
        proc = spawn(["sleep", "300"], cg)
        deadline = time.monotonic() + 5
        while not cg.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        cg.freeze()
        cg.kill()
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert cg.pids() == []


# --- devices --------------------------------------------------------------------------------------------


_OPEN_NODES = """
import errno, os, sys
results = []
for i, spec in enumerate(sys.argv[2:]):
    kind, numbers = spec.split()
    major, minor = map(int, numbers.split(":"))
    node = os.path.join(sys.argv[1], "node%d" % i)
    try:
        os.mknod(node, 0o600 | (0o60000 if kind == "b" else 0o20000), os.makedev(major, minor))
    except OSError as exc:
        results.append("mknod:" + errno.errorcode[exc.errno])
        continue
    try:
        os.close(os.open(node, os.O_RDONLY))
        results.append("open:ok")
    except OSError as exc:
        results.append("open:" + errno.errorcode[exc.errno])
print(" ".join(results))
"""


def _opens(path: Path, kind: str, major: int, minor: int) -> bool:
    os.mknod(path, 0o600 | (0o60000 if kind == "b" else 0o20000), os.makedev(major, minor))
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError:
        return False
    return True


def _openable_block_device(tmp_path: Path) -> str:
    """A block device this process can open outside any device cgroup (here even root cannot open /dev/vda)."""
    for i, dev in enumerate(sorted(Path("/sys/block").glob("*/dev"))):
        major, minor = map(int, dev.read_text().split(":"))
        if _opens(tmp_path / f"probe{i}", "b", major, minor):
            return f"b {major}:{minor}"
    pytest.skip("no block device can be opened on this host, even outside a cgroup")


def test_devices_allowlist(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    cg = driver.create(project, "s", CgroupLimits(devices_allowlist=True))
    assert cg.devices_enforced
    assert _read(cg.v1["devices"] / "devices.list").splitlines() == list(DEFAULT_DEVICE_RULES)
    block = _openable_block_device(tmp_path)
    assert _opens(tmp_path / "kmsg", "c", 1, 11)  # /dev/kmsg opens from outside the cgroup
    inside = tmp_path / "inside"
    inside.mkdir()
    argv = [sys.executable, "-I", "-S", "-c", _OPEN_NODES, str(inside), "b 8:0", block, "c 1:11", "c 1:3"]
    proc = spawn(argv, cg, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    # mknod is allowed (Docker keeps CAP_MKNOD), opening is not: `mknod /tmp/x b 8 0` cannot reach a disk,
    # nor can a node for a block device that opens fine outside; /dev/null still works.
    assert out.decode().split() == ["open:EPERM", "open:EPERM", "open:EPERM", "open:ok"]


def test_no_devices_allowlist_leaves_devices_open(driver: CgroupV1Driver, project: str) -> None:
    cg = driver.create(project, "s", CgroupLimits())
    assert not cg.devices_enforced
    assert _read(cg.v1["devices"] / "devices.list") == "a *:* rwm"


# --- teardown -------------------------------------------------------------------------------------------


def test_remove_leaves_nothing(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    cg = driver.create(project, "web", CgroupLimits(cpus=1, memory=64 * MiB, pids=32, devices_allowlist=True))
    spawn(["sleep", "300"], cg)
    cg.remove()
    assert _leftovers({project}) == []
    for root in _all_roots():
        # The shared parent goes with the last project; it stays only while another project lives in it.
        parent = root / "stackd"
        assert not parent.exists() or any(p.is_dir() for p in parent.iterdir())
    cg.remove()  # again: already gone is fine


def test_remove_keeps_project_dir_while_other_services_live(driver: CgroupV1Driver, project: str) -> None:
    a = driver.create(project, "a", CgroupLimits())
    b = driver.create(project, "b", CgroupLimits())
    a.remove()
    assert all(not p.exists() for p in a.paths)
    assert all(p.is_dir() for p in b.paths)
    b.remove()
    assert _leftovers({project}) == []


def test_nested_cgroups_made_by_the_service_are_killed_and_removed(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    cg = driver.create(project, "s", CgroupLimits(memory=64 * MiB))
    proc = spawn(["sleep", "300"], cg)
    deadline = time.monotonic() + 5
    while not cg.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cg.unified is not None
    for parent in (cg.v1["memory"], cg.v1["pids"], cg.unified):  # as a nested container runtime would
        (parent / "inner").mkdir()
        (parent / "inner" / "cgroup.procs").write_text(str(proc.pid))
    assert _cgroup_lines(proc.pid)["memory"] == f"/stackd/{project}/s/inner"
    assert cg.pids() == [proc.pid]
    assert cg.populated()
    cg.remove()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert _leftovers({project}) == []


def test_down_from_recorded_paths_after_supervisor_death(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    recorded: list[str] = []
    for service in ("db", "web"):
        recorded.extend(str(p) for p in driver.service_paths(project, service))  # recorded before creating
        cg = driver.create(project, service, CgroupLimits(memory=64 * MiB))
        spawn(["sh", "-c", "(setsid sleep 300 &); exec sleep 300"], cg)
    del cg  # the supervisor is gone: only the record is left
    remove_cgroup_paths(recorded, timeout=10)
    assert _leftovers({project}) == []


def test_attach_and_stale_leaf(
    driver: CgroupV1Driver, project: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    driver.create(project, "s", CgroupLimits(pids=5, devices_allowlist=True))
    cg = driver.attach(project, "s")
    assert cg.devices_enforced
    assert set(cg.paths) == set(driver.service_paths(project, "s"))
    proc = spawn(["sleep", "300"], cg)
    deadline = time.monotonic() + 5
    while not cg.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(CgroupError, match="already exists with processes"):
        driver.create(project, "s", CgroupLimits())
    cg.kill()
    proc.wait(timeout=5)
    fresh = driver.create(project, "s", CgroupLimits())  # empty leftover: replaced with defaults
    assert _read(fresh.v1["pids"] / "pids.max") == "max"


def test_read_only_unified_hierarchy_is_done_without(driver: CgroupV1Driver, project: str) -> None:
    if driver.unified is None:
        pytest.skip("no unified hierarchy on this host")
    unified: Path = driver.unified

    class ReadOnlyUnified(CgroupFs):
        def mkdir(self, path: Path) -> None:
            if path.is_relative_to(unified):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            super().mkdir(path)

    cg = CgroupV1Driver(driver.hierarchies, unified, fs=ReadOnlyUnified()).create(project, "s", CgroupLimits(pids=8))
    assert cg.unified is None
    assert cg.events_path() is None
    assert _read(cg.v1["pids"] / "pids.max") == "8"


def test_unknown_project_is_a_noop(driver: CgroupV1Driver, project: str) -> None:
    driver.remove_project(project)
    with pytest.raises(CgroupError, match="no cgroup of service"):
        driver.attach(project, "s")


def test_create_timing(driver: CgroupV1Driver, project: str) -> None:
    """Not a benchmark: a guard that creation stays far inside the 15 ms launch budget."""
    driver.create(project, "warm", CgroupLimits())
    start = time.perf_counter()
    driver.create(project, "s", CgroupLimits(cpus=0.5, memory=64 * MiB, pids=64, devices_allowlist=True))
    assert time.perf_counter() - start < 0.1
