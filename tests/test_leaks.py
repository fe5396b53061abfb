"""Tests of the host leak check (stackd.testing.leaks).

The parsing tests run on a fake tree; the others create real resources (netns, links, cgroups, mounts,
processes) with ip/mount/unshare on the real kernel, as root. Every resource carries a per-test random
name and is removed by a finalizer registered before it is created. Other tests may run on this host at
the same time, so assertions about "nothing new" are always filtered by the test's own name.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stackd.testing.leaks import (
    HostSnapshot,
    LeakGuard,
    Leaks,
    Mount,
    Process,
    Resource,
    check_no_leaks,
    diff,
    list_nft_tables,
    make_leak_check,
    take_snapshot,
)

pytest_plugins = ("pytester",)

_own_leak_check = make_leak_check(name="own_leak_check", settle=0.5)

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _quiet(*args: str) -> None:
    """Run a cleanup command, tolerating "already gone"."""
    subprocess.run(args, check=False, capture_output=True)


@functools.cache
def _link_type() -> str:
    """A link type with no side effects: dummy, or bridge on kernels built without the dummy driver."""
    probe = "lk" + secrets.token_hex(3)
    if subprocess.run(["ip", "link", "add", probe, "type", "dummy"], capture_output=True).returncode == 0:
        _quiet("ip", "link", "del", probe)
        return "dummy"
    return "bridge"


def _add_link(name: str) -> None:
    _run("ip", "link", "add", name, "type", _link_type())


@pytest.fixture
def uid() -> str:
    """A unique name for this test's resources: 8 bytes, fits an interface name."""
    return "lk" + secrets.token_hex(3)


@pytest.fixture
def cleanup(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Register a cleanup command (run even when the test fails, in reverse order)."""

    def add(*args: str) -> None:
        request.addfinalizer(lambda: _quiet(*args))

    return add


# --- parsing, on a fake tree ----------------------------------------------------------------------------


def _write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_proc(proc: Path, pid: int, comm: str, start_time: int) -> None:
    rest = ["S"] + ["0"] * 18 + [str(start_time)] + ["0"] * 30
    _write(proc / str(pid) / "stat", f"{pid} ({comm}) {' '.join(rest)}\n")


def _mountinfo_line(mid: int, dev: str, root: str, point: str, fstype: str, source: str, opt: str) -> str:
    return f"{mid} 1 {dev} {root} {point} rw,relatime {opt}- {fstype} {source} rw\n"


def test_fake_pure_v2_host(tmp_path: Path) -> None:
    cg = tmp_path / "cgroup"
    proc = tmp_path / "proc"
    (cg / "other" / "x").mkdir(parents=True)  # not below stackd: ignored
    _write(cg / "other" / "x" / "cgroup.procs", "1\n")
    _write(cg / "stackd" / "cgroup.procs", "")
    _write(cg / "stackd" / "shop" / "cgroup.procs", "")
    _write(cg / "stackd" / "shop" / "web" / "cgroup.procs", "41\n42\n")
    _write(cg / "stackd" / "shop" / "db" / "cgroup.procs", "43\n")  # 43 has no /proc entry: gone
    _fake_proc(proc, 41, "python3 (x)", 1000)
    _fake_proc(proc, 42, "sleep", 1001)
    net = tmp_path / "net"
    for name in ("lo", "sd3f2a1b", "sd-3f2a1b"):
        (net / name).mkdir(parents=True)
    netns = tmp_path / "netns"
    _write(netns / "stale")
    state = tmp_path / "run-stackd"
    _write(state / "shop" / "state.json")
    spaced = tmp_path / "a dir"
    mi = tmp_path / "mountinfo"
    mi.write_text(
        _mountinfo_line(20, "254:0", "/", "/", "ext4", "/dev/vda", "shared:1 ")
        + _mountinfo_line(21, "0:30", "/", str(cg), "cgroup2", "cgroup2", "")
        + _mountinfo_line(22, "0:30", "/", str(cg), "cgroup2", "cgroup2", "")  # same hierarchy again
        + _mountinfo_line(23, "0:4", "net:[4026532177]", f"{state}/shop/netns/web", "nsfs", "nsfs", "")
        + _mountinfo_line(24, "0:4", "mnt:[4026532178]", f"{state}/shop/mntns", "nsfs", "nsfs", "")
        + _mountinfo_line(25, "0:40", "/", str(spaced).replace(" ", "\\040"), "tmpfs", "tmp\\040fs", "")
        + _mountinfo_line(26, "0:41", "/", str(spaced).replace(" ", "\\040"), "tmpfs", "tmp\\040fs", "")
        + _mountinfo_line(27, "254:0", str(netns), str(netns), "ext4", "/dev/vda", "shared:2 ")
        + "garbage line without separator\n"
    )

    snap = take_snapshot(
        mountinfo=str(mi),
        sys_class_net=str(net),
        netns_dir=str(netns),
        proc=str(proc),
        state_dirs=[str(state), str(tmp_path / "missing")],
        nft_tables=lambda: ["inet stackd_3f2a1b00"],
    )

    assert snap.links == {"lo", "sd3f2a1b", "sd-3f2a1b"}
    assert snap.netns == {f"{state}/shop/netns/web", f"{netns}/stale"}
    assert snap.cgroups == {f"{cg}/stackd/shop", f"{cg}/stackd/shop/web", f"{cg}/stackd/shop/db"}
    assert snap.processes == {Process(41, 1000), Process(42, 1001)}
    by_pid = {p.pid: p for p in snap.processes}
    assert by_pid[41].comm == "python3 (x)"
    assert by_pid[41].cgroups == (f"{cg}/stackd/shop/web",)
    assert snap.files == {f"{state}/shop"}
    assert snap.nft_tables == {"inet stackd_3f2a1b00"}
    assert snap.mounts == {
        Mount("/", "ext4", "/dev/vda"),
        Mount(str(cg), "cgroup2", "cgroup2", 0),
        Mount(str(cg), "cgroup2", "cgroup2", 1),
        Mount(f"{state}/shop/mntns", "nsfs", "nsfs"),  # not a netns: stays a mount
        Mount(str(spaced), "tmpfs", "tmp fs", 0),
        Mount(str(spaced), "tmpfs", "tmp fs", 1),
    }

    # Everything is new against an empty snapshot; the report has one line per resource.
    leaks = diff(HostSnapshot(), snap)
    assert len(leaks) == len(str(leaks).splitlines()) == 18
    assert "nft table inet stackd_3f2a1b00" in str(leaks).splitlines()
    assert f"process 42 (sleep) in {cg}/stackd/shop/web" in str(leaks).splitlines()
    assert f"mount {spaced} (tmpfs from tmp fs, stacked #2)" in str(leaks).splitlines()
    assert not diff(snap, snap)


def test_fake_hybrid_host_all_hierarchies(tmp_path: Path) -> None:
    root = tmp_path / "fs-cgroup"
    lines = [_mountinfo_line(31, "0:28", "/", str(root), "tmpfs", "tmpfs", "")]
    controllers = ["cpu", "cpuacct", "memory", "pids", "systemd", "unified"]
    for i, ctrl in enumerate(controllers):
        fstype = "cgroup2" if ctrl == "unified" else "cgroup"
        lines.append(_mountinfo_line(32 + i, f"0:{29 + i}", "/", f"{root}/{ctrl}", fstype, fstype, ""))
        _write(root / ctrl / "stackd" / "t-1a2b" / "web" / "cgroup.procs", "7\n" if ctrl != "cpu" else "")
    (root / "blkio" / "stackd" / "t-1a2b").mkdir(parents=True)  # not mounted: not a hierarchy
    mi = tmp_path / "mountinfo"
    mi.write_text("".join(lines))
    _fake_proc(tmp_path / "proc", 7, "sleep", 5)

    snap = take_snapshot(mountinfo=str(mi), sys_class_net=str(tmp_path), proc=str(tmp_path / "proc"), state_dirs=())
    assert snap.cgroups == {f"{root}/{ctrl}/stackd/{sub}" for ctrl in controllers for sub in ("t-1a2b", "t-1a2b/web")}
    (proc,) = snap.processes
    assert proc.cgroups == tuple(f"{root}/{c}/stackd/t-1a2b/web" for c in controllers if c != "cpu")
    assert str(diff(HostSnapshot(), snap)).startswith(
        f"process 7 (sleep) in {root}/cpuacct/stackd/t-1a2b/web (and 4 more hierarchies)\n"
    )

    # A reused pid is a different process.
    again = HostSnapshot(processes=frozenset({Process(7, 6, "sleep")}))
    assert diff(snap, again).processes == {Process(7, 6)}


def test_filters_on_values() -> None:
    before = HostSnapshot(links=frozenset({"eth0"}))
    after = HostSnapshot(
        links=frozenset({"eth0", "sdaaaa", "sdbbbb"}),
        cgroups=frozenset({"/cg/stackd/t-gw0-1/web", "/cg/stackd/t-gw1-1/web"}),
        mounts=frozenset({Mount("/run/stackd/t-gw0-1/web/rootfs", "overlay", "overlay")}),
        processes=frozenset({Process(9, 1, "sh", ("/cg/stackd/t-gw1-1/web",))}),
    )
    everything = diff(before, after)
    assert len(everything) == 6
    mine = diff(before, after, projects=["t-gw0-1"], link_prefixes=["sda"])
    assert mine == Leaks(
        links=frozenset({"sdaaaa"}),
        cgroups=frozenset({"/cg/stackd/t-gw0-1/web"}),
        mounts=frozenset({Mount("/run/stackd/t-gw0-1/web/rootfs", "overlay", "overlay")}),
    )
    # Projects without link prefixes: links are never reported (their names are hashes).
    assert not diff(before, after, projects=["t-gw1-1"]).links
    assert diff(before, after, projects=["t-gw1-1"]).processes == after.processes

    def only_cgroups(r: Resource) -> bool:
        return r.kind == "cgroup"

    assert diff(before, after, only=only_cgroups) == Leaks(cgroups=after.cgroups)


def test_nft_tables_follow_the_bridge_they_are_named_after() -> None:
    after = HostSnapshot(
        nft_tables=frozenset({"inet stackd_1a2b3c4d", "inet stackd_99999999", "inet stackd_ip_forward"})
    )
    everything = diff(HostSnapshot(), after)
    assert str(everything).splitlines() == [
        "nft table inet stackd_1a2b3c4d",
        "nft table inet stackd_99999999",
        "nft table inet stackd_ip_forward",
    ]
    # A stack's table is reported with its bridge's prefix (what LeakGuard.track(project) adds).
    assert diff(HostSnapshot(), after, link_prefixes=["sd-1a2b3c4d"]) == Leaks(
        nft_tables=frozenset({"inet stackd_1a2b3c4d"})
    )
    assert not diff(HostSnapshot(), after, projects=["t-1"], link_prefixes=["sd-12345678", "sd1a2b"])


# --- real resources -------------------------------------------------------------------------------------


@needs_root
def test_netns_reported_until_deleted(uid: str, cleanup: Callable[..., None]) -> None:
    before = take_snapshot()
    cleanup("ip", "netns", "del", uid)
    _run("ip", "netns", "add", uid)

    leaks = diff(before, take_snapshot(), projects=[uid])
    assert leaks.netns == {f"/run/netns/{uid}"}
    assert str(leaks) == f"netns /run/netns/{uid}"  # its nsfs pin is not reported again as a mount

    _run("ip", "netns", "del", uid)
    assert not diff(before, take_snapshot(), projects=[uid])


@needs_root
def test_netns_pinned_in_a_state_dir_reported(uid: str, tmp_path: Path, cleanup: Callable[..., None]) -> None:
    pin = tmp_path / uid / "netns"
    _write(pin)
    before = take_snapshot()
    cleanup("umount", str(pin))
    _run("unshare", f"--net={pin}", "true")  # bind-mounts the new netns on pin

    assert diff(before, take_snapshot(), projects=[uid]).netns == {str(pin)}

    _run("umount", str(pin))
    assert not diff(before, take_snapshot(), projects=[uid])


@needs_root
def test_link_reported_until_deleted(uid: str, cleanup: Callable[..., None]) -> None:
    before = take_snapshot()
    cleanup("ip", "link", "del", uid)
    _add_link(uid)

    leaks = diff(before, take_snapshot(), link_prefixes=[uid])
    assert leaks == Leaks(links=frozenset({uid}))
    assert str(leaks) == f"link {uid}"
    assert uid in diff(before, take_snapshot()).links  # also without a filter

    _run("ip", "link", "del", uid)
    assert not diff(before, take_snapshot(), link_prefixes=[uid])
    assert uid not in diff(before, take_snapshot()).links


def _hierarchy_for_pids() -> Path:
    """The v1 pids hierarchy if mounted (hybrid hosts), else the cgroup2 mount (pure v2 hosts)."""
    v2 = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        post = fields[fields.index("-") + 1 :]
        if post[0] == "cgroup" and "pids" in post[2].split(","):
            return Path(fields[4])
        if post[0] == "cgroup2" and v2 is None:
            v2 = Path(fields[4])
    if v2 is None:
        pytest.skip("no cgroup hierarchy with the pids controller")
    return v2


def _rmdir_retrying(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the killed process is still being torn down
            time.sleep(0.01)
    path.rmdir()


@pytest.fixture
def stackd_cgroup(uid: str, request: pytest.FixtureRequest) -> Path:
    """The path <pids hierarchy>/stackd/<uid>, for the test to create; removed at teardown if there.

    The stackd parent is created if missing (it is never reported), and removed again at teardown only
    if this fixture created it and it is empty.
    """
    parent = _hierarchy_for_pids() / "stackd"
    try:
        parent.mkdir()
    except FileExistsError:
        pass
    else:

        def remove_parent_if_empty() -> None:
            with contextlib.suppress(OSError):  # not empty: another test's cgroup is in it now
                parent.rmdir()

        request.addfinalizer(remove_parent_if_empty)
    cgroup = parent / uid
    request.addfinalizer(lambda: _rmdir_retrying(cgroup))
    return cgroup


@pytest.fixture
def sleeper(request: pytest.FixtureRequest) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sleep", "30"])

    def stop() -> None:
        proc.kill()  # by its pid, and only ours
        proc.wait()

    request.addfinalizer(stop)
    return proc


@needs_root
def test_cgroup_and_its_process_reported_until_removed(
    uid: str, stackd_cgroup: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    before = take_snapshot()
    stackd_cgroup.mkdir()
    assert diff(before, take_snapshot(), projects=[uid]) == Leaks(cgroups=frozenset({str(stackd_cgroup)}))

    (stackd_cgroup / "cgroup.procs").write_text(str(sleeper.pid))
    leaks = diff(before, take_snapshot(), projects=[uid])
    assert leaks.cgroups == {str(stackd_cgroup)}
    assert [(p.pid, p.comm, p.cgroups) for p in leaks.processes] == [(sleeper.pid, "sleep", (str(stackd_cgroup),))]
    assert str(leaks).splitlines() == [
        f"process {sleeper.pid} (sleep) in {stackd_cgroup}",
        f"cgroup {stackd_cgroup}",
    ]

    sleeper.kill()
    sleeper.wait()
    _rmdir_retrying(stackd_cgroup)
    assert not diff(before, take_snapshot(), projects=[uid])


@needs_root
def test_tmpfs_mount_reported_until_unmounted(uid: str, tmp_path: Path, cleanup: Callable[..., None]) -> None:
    point = tmp_path / uid
    point.mkdir()
    before = take_snapshot()
    cleanup("umount", str(point))
    cleanup("umount", str(point))
    _run("mount", "-t", "tmpfs", uid, str(point))

    leaks = diff(before, take_snapshot(), projects=[uid])
    assert leaks == Leaks(mounts=frozenset({Mount(str(point), "tmpfs", uid)}))
    assert str(leaks) == f"mount {point} (tmpfs from {uid})"

    _run("mount", "-t", "tmpfs", uid, str(point))  # the same mount stacked over the first is new too
    assert diff(before, take_snapshot(), projects=[uid]).mounts == {
        Mount(str(point), "tmpfs", uid, 0),
        Mount(str(point), "tmpfs", uid, 1),
    }

    _run("umount", str(point))
    _run("umount", str(point))
    assert not diff(before, take_snapshot(), projects=[uid])


@needs_root
def test_check_no_leaks_raises_with_a_readable_report(uid: str, cleanup: Callable[..., None]) -> None:
    before = take_snapshot()
    cleanup("ip", "link", "del", uid)
    _add_link(uid)

    start = time.monotonic()
    with pytest.raises(AssertionError) as excinfo:
        check_no_leaks(before, settle=0.2, link_prefixes=[uid])
    assert time.monotonic() - start >= 0.2  # it did wait for the resource to go
    assert str(excinfo.value) == (f"1 host resource(s) left behind (still there after 0.2 s):\n  link {uid}")


@needs_root
def test_check_no_leaks_passes_when_the_resource_goes_within_settle(
    uid: str, cleanup: Callable[..., None], request: pytest.FixtureRequest
) -> None:
    before = take_snapshot()
    cleanup("ip", "link", "del", uid)
    _add_link(uid)
    timer = threading.Timer(0.2, _run, ("ip", "link", "del", uid))
    request.addfinalizer(timer.join)
    request.addfinalizer(timer.cancel)
    timer.start()

    start = time.monotonic()
    check_no_leaks(before, settle=3.0, link_prefixes=[uid])
    assert 0.15 <= time.monotonic() - start < 3.0


@needs_root
def test_check_no_leaks_waits_for_veths_of_a_deleted_netns(uid: str, cleanup: Callable[..., None]) -> None:
    """The case settle exists for: the kernel removes the host veth some time after its netns goes."""
    before = take_snapshot()
    cleanup("ip", "link", "del", f"{uid}a")
    cleanup("ip", "netns", "del", uid)
    _run("ip", "netns", "add", uid)
    _run("ip", "link", "add", f"{uid}a", "type", "veth", "peer", "name", f"{uid}b", "netns", uid)
    assert diff(before, take_snapshot(), projects=[uid], link_prefixes=[uid]).links == {f"{uid}a"}

    _run("ip", "netns", "del", uid)
    check_no_leaks(before, settle=2.0, projects=[uid], link_prefixes=[uid])


@needs_root
def test_filter_hides_resources_without_the_prefix(uid: str, tmp_path: Path, cleanup: Callable[..., None]) -> None:
    point = tmp_path / uid
    point.mkdir()
    before = take_snapshot()
    cleanup("ip", "link", "del", uid)
    cleanup("umount", str(point))
    _add_link(uid)
    _run("mount", "-t", "tmpfs", uid, str(point))
    after = take_snapshot()

    other = "lk" + secrets.token_hex(4)
    assert not diff(before, after, projects=[other], link_prefixes=[other])
    check_no_leaks(before, settle=0, projects=[other], link_prefixes=[other])
    mine = diff(before, after, projects=[uid], link_prefixes=[uid])
    assert str(mine).splitlines() == [f"mount {point} (tmpfs from {uid})", f"link {uid}"]
    # A project name that only the mount point contains: links never match it, the mount does.
    assert diff(before, after, projects=[point.parent.name]) == Leaks(mounts=mine.mounts)
    only_links = diff(before, after, projects=[uid], link_prefixes=[uid], only=lambda r: r.kind == "link")
    assert only_links == Leaks(links=frozenset({uid}))


@needs_root
def test_fixture_passes_a_clean_test(own_leak_check: LeakGuard, uid: str, cleanup: Callable[..., None]) -> None:
    own_leak_check.track(uid, link_prefixes=[uid])
    cleanup("ip", "link", "del", uid)
    _add_link(uid)
    _run("ip", "link", "del", uid)


@needs_root
def test_fixture_fails_the_teardown_of_a_leaking_test(
    pytester: pytest.Pytester, uid: str, cleanup: Callable[..., None]
) -> None:
    cleanup("ip", "link", "del", f"{uid}x")
    cleanup("ip", "link", "del", f"{uid}y")
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest("from stackd.testing.leaks import leak_check, make_leak_check  # noqa: F401\n")
    pytester.makepyfile(
        f"""
        import subprocess
        from stackd.testing.leaks import make_leak_check

        quick = make_leak_check(name="quick", settle=0.1)

        def test_leaky(quick):
            quick.track(link_prefixes=["{uid}x"])
            subprocess.run(["ip", "link", "add", "{uid}x", "type", "{_link_type()}"], check=True)

        def test_clean(leak_check):
            leak_check.track(link_prefixes=["{uid}y"])
            subprocess.run(["ip", "link", "add", "{uid}y", "type", "{_link_type()}"], check=True)
            subprocess.run(["ip", "link", "del", "{uid}y"], check=True)
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_leaky*", "*1 host resource(s) left behind*", f"*link {uid}x"]
    )


# --- speed ----------------------------------------------------------------------------------------------


@needs_root
async def test_stackd_nft_table_reported_until_removed(uid: str) -> None:
    from stackd.runtime.network.nft import delete_table_message, new_table_message, nft_socket, transaction

    table, other = f"stackd_{uid}", f"notstackd_{uid}"
    before = take_snapshot()
    try:
        async with nft_socket() as sock:
            await transaction(sock, [new_table_message(table), new_table_message(other)])
        assert f"inet {table}" in list_nft_tables()
        assert f"inet {other}" not in list_nft_tables()  # not stackd's: never looked at
        leaks = diff(before, take_snapshot(), link_prefixes=[f"sd-{uid}"])
        assert leaks == Leaks(nft_tables=frozenset({f"inet {table}"}))
        assert str(leaks) == f"nft table inet {table}"
    finally:
        async with nft_socket() as sock:
            await transaction(sock, [delete_table_message(table)])
            await transaction(sock, [delete_table_message(other)])
    assert not diff(before, take_snapshot(), link_prefixes=[f"sd-{uid}"])


def _snapshot_times_ms(n: int = 20) -> Iterator[float]:
    return _times_ms(take_snapshot, n)


def _times_ms(call: Callable[[], object], n: int) -> Iterator[float]:
    for _ in range(n):
        start = time.perf_counter()
        call()
        yield (time.perf_counter() - start) * 1000


def test_snapshot_speed(capsys: pytest.CaptureFixture[str]) -> None:
    take_snapshot()  # warm up
    median = statistics.median(_snapshot_times_ms(20))
    nft = statistics.median(_times_ms(list_nft_tables, 20))
    with capsys.disabled():
        print(f"\ntake_snapshot(): median of 20 = {median:.3f} ms, of which the nftables dump {nft:.3f} ms")
