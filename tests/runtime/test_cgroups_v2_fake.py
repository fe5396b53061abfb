"""The cgroup v2 driver against a FAKE v2 tree, plus host detection.

This host runs hybrid cgroups, so the v2 writer cannot be exercised on the real kernel here. The fake tree
is a tmp dir laid out like a pure v2 host's /sys/fs/cgroup. The driver opens interface files without
O_CREAT, exactly as it must on cgroupfs, so the fake has to provide the files the kernel would: `FakeKernelFs`
plays the kernel's part of mkdir(2) (creating the interface files of a new cgroup, with the kernel's default
contents) and of rmdir(2) (refusing a cgroup with children or processes, removing the interface files).
Everything else is the driver's ordinary code. What the fake cannot show (that the kernel accepts those
strings) is covered by the format being the kernel's documented one; the v1 driver is tested on the
real kernel in test_cgroups_host.py.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from stackd.errors import CgroupError
from stackd.runtime.cgroups import (
    CgroupFileError,
    CgroupFs,
    CgroupLimits,
    CgroupV1Driver,
    CgroupV2Driver,
    ServiceCgroup,
    detect_driver,
    parse_mountinfo,
    read_cgroup_mounts,
    remove_cgroup_paths,
)

MiB = 1 << 20

ROOT_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc"

#: The interface files of a new non-root cgroup2 directory (those the driver uses) and the kernel's defaults.
NEW_CGROUP_FILES: dict[str, str] = {
    "cgroup.procs": "",
    "cgroup.type": "domain\n",
    "cgroup.subtree_control": "\n",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.kill": "",
    "cgroup.freeze": "0\n",
    "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    "memory.max": "max\n",
    "memory.swap.max": "max\n",
    "memory.current": "0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "pids.max": "max\n",
    "pids.current": "0\n",
}

PURE_V2_MOUNTINFO = """\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
25 1 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:6 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""

HYBRID_COMOUNTED_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
34 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,pids
37 31 0:34 / /sys/fs/cgroup/my\\040cgroup rw,relatime shared:15 - cgroup cgroup rw,freezer
"""


class FakeKernelFs(CgroupFs):
    """The kernel's side of mkdir/rmdir on cgroupfs, for a tree of plain files."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        enabled = (path.parent / "cgroup.subtree_control").read_text().replace("+", "").split()
        (path / "cgroup.controllers").write_text(" ".join(enabled) + "\n")
        for name, content in NEW_CGROUP_FILES.items():
            (path / name).write_text(content)

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if any(p.is_dir() for p in path.iterdir()) or (path / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        for child in path.iterdir():
            child.unlink()
        os.rmdir(path)


def make_v2_host(tmp_path: Path, *, root_subtree: str = "cpu io memory pids") -> Path:
    """A fake pure-v2 host under tmp_path: mountinfo at tmp_path/mountinfo, cgroupfs at .../sys/fs/cgroup."""
    (tmp_path / "mountinfo").write_text(PURE_V2_MOUNTINFO)
    root = tmp_path / "sys/fs/cgroup"
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(ROOT_CONTROLLERS + "\n")
    (root / "cgroup.subtree_control").write_text(root_subtree + "\n")
    (root / "cgroup.procs").write_text("1\n")
    return root


@pytest.fixture
def v2_root(tmp_path: Path) -> Path:
    return make_v2_host(tmp_path)


@pytest.fixture
def driver(v2_root: Path) -> CgroupV2Driver:
    return CgroupV2Driver(v2_root, fs=FakeKernelFs())


def text(path: Path) -> str:
    return path.read_text()


# --- detection ------------------------------------------------------------------------------------------


def test_detect_picks_v2_on_a_pure_v2_host(tmp_path: Path) -> None:
    root = make_v2_host(tmp_path)
    found = detect_driver(tmp_path / "mountinfo", root=tmp_path)
    assert isinstance(found, CgroupV2Driver)
    assert found.root == root
    assert found.version == 2


def test_detect_picks_v1_when_cgroup2_lacks_controllers(tmp_path: Path) -> None:
    root = make_v2_host(tmp_path)
    (root / "cgroup.controllers").write_text("cpu pids\n")  # memory still on a v1 hierarchy
    assert isinstance(detect_driver(tmp_path / "mountinfo", root=tmp_path), CgroupV1Driver)


def test_detect_picks_v1_on_this_host() -> None:
    mounts = read_cgroup_mounts()
    if mounts.unified is None or not mounts.v1:
        pytest.skip("this test describes the hybrid development host")
    found = detect_driver()
    assert isinstance(found, CgroupV1Driver)
    assert found.version == 1
    # On this host cpu and cpuacct are separate mounts; the unified hierarchy is kept for cgroup.kill.
    assert found.hierarchies["cpu"] != found.hierarchies["cpuacct"]
    assert found.unified == mounts.unified
    assert "systemd" in mounts.named and "systemd" not in found.hierarchies


def test_parse_mountinfo_comounted_hybrid_with_root_and_escapes(tmp_path: Path) -> None:
    mounts = parse_mountinfo(HYBRID_COMOUNTED_MOUNTINFO, root=tmp_path)
    base = tmp_path / "sys/fs/cgroup"
    assert mounts.unified == base / "unified"
    assert mounts.v1["cpu"] == mounts.v1["cpuacct"] == base / "cpu,cpuacct"
    assert mounts.v1["memory"] == base / "memory"
    assert mounts.v1["freezer"] == base / "my cgroup"
    assert mounts.named == {"systemd": base / "systemd"}
    drv = CgroupV1Driver(mounts.v1, mounts.unified)
    # one directory per hierarchy: the co-mounted cpu,cpuacct gets one, not two
    paths = drv.service_paths("p", "web")
    assert paths.count(base / "cpu,cpuacct/stackd/p/web") == 1
    assert len(paths) == 5


def test_detect_with_no_cgroup_mounted(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text("22 1 0:21 / /proc rw - proc proc rw\n")
    with pytest.raises(CgroupError, match="no cgroup hierarchy"):
        detect_driver(tmp_path / "mountinfo", root=tmp_path)


# --- what create writes ---------------------------------------------------------------------------------


def test_create_writes_limits_and_enables_controllers(driver: CgroupV2Driver, v2_root: Path) -> None:
    limits = CgroupLimits(cpus=0.25, memory=256 * MiB, memory_swap=512 * MiB, pids=128)
    assert driver.service_paths("shop", "web") == (v2_root / "stackd/shop/web",)
    cg = driver.create("shop", "web", limits)
    leaf = v2_root / "stackd/shop/web"
    assert cg.paths == (leaf,)
    assert cg.procs_files == (leaf / "cgroup.procs",)
    assert cg.version == 2
    assert text(leaf / "cpu.max") == "25000 100000"
    assert text(leaf / "memory.max") == str(256 * MiB)
    assert text(leaf / "memory.swap.max") == str(256 * MiB)  # memswap - memory
    assert text(leaf / "pids.max") == "128"
    # controllers are enabled on each parent; the root already had them, so it is left untouched
    assert text(v2_root / "stackd/cgroup.subtree_control") == "+cpu +memory +pids"
    assert text(v2_root / "stackd/shop/cgroup.subtree_control") == "+cpu +memory +pids"
    assert text(v2_root / "cgroup.subtree_control") == "cpu io memory pids\n"
    assert text(leaf / "cgroup.subtree_control") == "\n"
    # no process was put anywhere
    assert text(leaf / "cgroup.procs") == ""
    assert not cg.devices_enforced


def test_create_enables_missing_controllers_on_root(tmp_path: Path) -> None:
    root = make_v2_host(tmp_path, root_subtree="io memory")
    CgroupV2Driver(root, fs=FakeKernelFs()).create("p", "s", CgroupLimits())
    assert text(root / "cgroup.subtree_control") == "+cpu +pids"


def test_unlimited_values_are_max(driver: CgroupV2Driver, v2_root: Path) -> None:
    driver.create("p", "s", CgroupLimits(memory=64 * MiB, memory_swap=-1, pids=-1))
    leaf = v2_root / "stackd/p/s"
    assert text(leaf / "memory.swap.max") == "max"
    assert text(leaf / "pids.max") == "max"
    assert text(leaf / "cpu.max") == "max 100000\n"  # not asked: the kernel default stays


def test_swap_equal_to_memory_disables_swap(driver: CgroupV2Driver, v2_root: Path) -> None:
    driver.create("p", "s", CgroupLimits(memory=64 * MiB, memory_swap=64 * MiB))
    assert text(v2_root / "stackd/p/s/memory.swap.max") == "0"


@pytest.mark.parametrize(("cpus", "expected"), [(1, "100000 100000"), (1.5, "150000 100000"), (0.01, "1000 100000")])
def test_cpu_max_strings(driver: CgroupV2Driver, v2_root: Path, cpus: float, expected: str) -> None:
    driver.create("p", "s", CgroupLimits(cpus=cpus))
    assert text(v2_root / "stackd/p/s/cpu.max") == expected


def test_second_service_shares_parents(driver: CgroupV2Driver, v2_root: Path) -> None:
    driver.create("p", "a", CgroupLimits())
    driver.create("p", "b", CgroupLimits(pids=5))
    assert sorted(p.name for p in (v2_root / "stackd/p").iterdir() if p.is_dir()) == ["a", "b"]


def test_no_swap_accounting(v2_root: Path) -> None:
    class NoSwapFs(FakeKernelFs):
        def mkdir(self, path: Path) -> None:
            super().mkdir(path)
            (path / "memory.swap.max").unlink()

    drv = CgroupV2Driver(v2_root, fs=NoSwapFs())
    drv.create("p", "ok", CgroupLimits(memory=64 * MiB, memory_swap=-1))  # unlimited: nothing to write
    with pytest.raises(CgroupError, match=r"memory\.swap\.max does not exist: swap accounting is off"):
        drv.create("p", "bad", CgroupLimits(memory=64 * MiB, memory_swap=128 * MiB))
    assert not (v2_root / "stackd/p/bad").exists()  # rolled back


def test_missing_controller_is_refused_before_anything(v2_root: Path) -> None:
    (v2_root / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(CgroupError, match=r"controller\(s\) memory pids not available"):
        CgroupV2Driver(v2_root, fs=FakeKernelFs()).create("p", "s", CgroupLimits())
    assert not (v2_root / "stackd").exists()


def test_write_error_names_file_value_and_errno_and_rolls_back(v2_root: Path) -> None:
    class NoCpuMaxFs(FakeKernelFs):
        def mkdir(self, path: Path) -> None:
            super().mkdir(path)
            (path / "cpu.max").unlink()

    drv = CgroupV2Driver(v2_root, fs=NoCpuMaxFs())
    with pytest.raises(CgroupFileError) as info:
        drv.create("p", "web", CgroupLimits(cpus=0.5))
    leaf = v2_root / "stackd/p/web"
    assert str(info.value) == f'cgroup: write "50000 100000" to {leaf}/cpu.max: ENOENT (No such file or directory)'
    assert info.value.errno == errno.ENOENT
    assert info.value.path == leaf / "cpu.max"
    assert isinstance(info.value, CgroupError)
    # everything this call made is gone again
    assert not (v2_root / "stackd").exists()


def test_stale_empty_leaf_is_replaced_busy_one_refused(driver: CgroupV2Driver, v2_root: Path) -> None:
    driver.create("p", "s", CgroupLimits(pids=5))
    driver.create("p", "s", CgroupLimits())  # leftover from a crashed run, empty: recreated with defaults
    leaf = v2_root / "stackd/p/s"
    assert text(leaf / "pids.max") == "max\n"
    (leaf / "cgroup.procs").write_text("4242\n")
    with pytest.raises(CgroupError, match=r"already exists with processes \[4242\].*stackd down -p p"):
        driver.create("p", "s", CgroupLimits())
    assert leaf.is_dir()  # not ours to remove: it was there before this call


@pytest.mark.parametrize("bad", ["", "..", ".", "a/b", "-x", "x" * 200, "a\0b"])
def test_bad_names_are_refused(driver: CgroupV2Driver, bad: str) -> None:
    with pytest.raises(CgroupError, match="cannot be a cgroup directory name"):
        driver.create(bad, "s", CgroupLimits())
    with pytest.raises(CgroupError, match="cannot be a cgroup directory name"):
        driver.create("p", bad, CgroupLimits())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpus": 0}, "positive"),
        ({"cpus": float("nan")}, "positive"),
        ({"cpus": 0.001}, "minimum"),
        ({"memory": 0}, "positive"),
        ({"memory_swap": 10}, "needs memory"),
        ({"memory": 100, "memory_swap": 10}, "smaller than memory"),
        ({"pids": 0}, "positive"),
        ({"pids": True}, "not an integer"),
    ],
)
def test_limits_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(CgroupError, match=message):
        CgroupLimits(**kwargs)  # type: ignore[arg-type]


# --- operating a service cgroup -------------------------------------------------------------------------


def test_kill_writes_cgroup_kill(driver: CgroupV2Driver, v2_root: Path) -> None:
    cg = driver.create("p", "s", CgroupLimits())
    cg.kill()
    assert text(v2_root / "stackd/p/s/cgroup.kill") == "1"


def test_freeze_and_thaw_write_cgroup_freeze(driver: CgroupV2Driver, v2_root: Path) -> None:
    cg = driver.create("p", "s", CgroupLimits())
    leaf = v2_root / "stackd/p/s"
    (leaf / "cgroup.events").write_text("populated 0\nfrozen 1\n")  # what the kernel reports once frozen
    assert not cg.frozen()
    cg.freeze(timeout=1)
    assert text(leaf / "cgroup.freeze") == "1"
    assert cg.frozen()
    cg.thaw()
    assert text(leaf / "cgroup.freeze") == "0"
    assert not cg.frozen()


def test_freeze_times_out_and_undoes(driver: CgroupV2Driver, v2_root: Path) -> None:
    cg = driver.create("p", "s", CgroupLimits())
    with pytest.raises(CgroupError, match="did not freeze"):
        cg.freeze(timeout=0.05)
    assert text(v2_root / "stackd/p/s/cgroup.freeze") == "0"


def test_reads_events_stats_and_oom(driver: CgroupV2Driver, v2_root: Path) -> None:
    cg = driver.create("p", "s", CgroupLimits(memory=64 * MiB))
    leaf = v2_root / "stackd/p/s"
    assert cg.events_path() == leaf / "cgroup.events"
    assert not cg.populated()
    assert cg.pids() == []
    (leaf / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (leaf / "cgroup.procs").write_text("12\n34\n")
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    (leaf / "cpu.stat").write_text("usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n")
    (leaf / "memory.current").write_text("1048576\n")
    (leaf / "pids.current").write_text("3\n")
    assert cg.populated()
    assert cg.pids() == [12, 34]
    assert cg.oom_kill_count() == 2
    stats = cg.stats()
    assert stats.cpu_usage_usec == 123456
    assert stats.memory_current == MiB
    assert stats.memory_limit == 64 * MiB
    assert stats.pids_current == 3


def test_add_pid_writes_every_procs_file(driver: CgroupV2Driver, v2_root: Path) -> None:
    cg = driver.create("p", "s", CgroupLimits())
    cg.add_pid(4321)
    assert text(v2_root / "stackd/p/s/cgroup.procs") == "4321"


def test_the_shared_parent_goes_with_the_last_project(driver: CgroupV2Driver, v2_root: Path) -> None:
    a = driver.create("p", "a", CgroupLimits())
    b = driver.create("p", "b", CgroupLimits())
    a.remove()
    assert (v2_root / "stackd/p").is_dir()  # b still lives there
    c = driver.create("q", "c", CgroupLimits())
    b.remove()
    assert not (v2_root / "stackd/p").exists()
    assert (v2_root / "stackd").is_dir()  # project q still lives there
    c.remove()
    assert not (v2_root / "stackd").exists()  # the last project takes the shared parent with it
    b.remove()  # already gone: fine


def test_attach_finds_existing(driver: CgroupV2Driver, v2_root: Path) -> None:
    driver.create("p", "s", CgroupLimits())
    cg = driver.attach("p", "s")
    assert cg.paths == (v2_root / "stackd/p/s",)
    with pytest.raises(CgroupError, match="does not exist"):
        driver.attach("p", "nope")


def test_remove_recorded_paths(driver: CgroupV2Driver, v2_root: Path) -> None:
    a = driver.create("p", "a", CgroupLimits())
    b = driver.create("p", "b", CgroupLimits())
    other = driver.create("q", "a", CgroupLimits())
    recorded = [*a.paths, *b.paths, v2_root / "stackd/p", v2_root / "stackd/p/gone"]
    remove_cgroup_paths(recorded, fs=FakeKernelFs())
    assert not (v2_root / "stackd/p").exists()
    assert other.paths[0].is_dir()


def test_from_paths_classifies(driver: CgroupV2Driver, v2_root: Path) -> None:
    driver.create("p", "s", CgroupLimits())
    cg = ServiceCgroup.from_paths([v2_root / "stackd/p/s"])
    assert cg.unified == v2_root / "stackd/p/s"
    assert cg.v1 == {}


@pytest.mark.parametrize(
    "bad", ["/sys/fs/cgroup", "/sys/fs/cgroup/stackd", "/sys/fs/cgroup/process_api/x/y", "/etc/x/y/z"]
)
def test_remove_refuses_foreign_paths(bad: str) -> None:
    with pytest.raises(CgroupError):
        remove_cgroup_paths([bad])


def test_kill_other_signal_without_processes_is_noop(driver: CgroupV2Driver, v2_root: Path) -> None:
    cg = driver.create("p", "s", CgroupLimits())
    cg.kill(signal.SIGTERM)
    assert text(v2_root / "stackd/p/s/cgroup.kill") == ""
