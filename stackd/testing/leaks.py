"""Host leak check: prove that nothing of stackd is left behind on the host after a test.

A :class:`HostSnapshot` records the host resources stackd creates (network namespaces, network links,
nftables tables named ``stackd_*``, cgroups under a ``stackd`` parent, mounts, the processes in those
cgroups and the entries of stackd's state and log directories). :func:`diff` lists what is new in a later snapshot, and
:func:`check_no_leaks` raises :class:`AssertionError` with a readable report when something stays
behind. The :data:`leak_check` pytest fixture wraps both around a test::

    # conftest.py
    from stackd.testing.leaks import leak_check  # noqa: F401

    def test_up_and_down(leak_check):
        ...

Everything is read from ``/proc``, ``/sys`` and the state directories with the standard library only
(no subprocess), so a snapshot costs about a millisecond on an idle host. The one exception is the
nftables tables, which only netlink knows: one dump request on a raw ``NETLINK_NETFILTER`` socket,
parsed with ``struct`` (about 0.1 ms; pyroute2 would cost more than the rest of the snapshot). Every
path is injectable, and so is the table lister, so the parsing can be tested against a fake tree.

Only resources that *appeared* count: what existed before the first snapshot, and what disappeared,
is never reported. Under pytest-xdist other workers create resources concurrently; pass ``projects``
(matched as substrings of cgroup paths, mount points and sources, netns and state paths) and
``link_prefixes`` (link names are hashes, so they are matched by prefix) to report only your own. A
stack's table ``stackd_1a2b3c4d`` is named after its bridge ``sd-1a2b3c4d``, so it counts as one of the
links with that prefix.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pytest

from stackd.runtime.network.names import NFT_TABLE_PREFIX, nft_table_bridge
from stackd.runtime.network.names import link_prefixes as project_link_prefixes

__all__ = [
    "DEFAULT_STATE_DIRS",
    "HostSnapshot",
    "LeakGuard",
    "Leaks",
    "Mount",
    "Process",
    "Resource",
    "check_no_leaks",
    "diff",
    "leak_check",
    "list_nft_tables",
    "make_leak_check",
    "take_snapshot",
]

#: stackd's runtime state and log directories, whose entries (one per project) are recorded by default.
DEFAULT_STATE_DIRS: tuple[str, ...] = ("/run/stackd", "/var/log/stackd")

_CGROUP_FSTYPES = frozenset({"cgroup", "cgroup2"})
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, order=True)
class Mount:
    """One line of mountinfo: where, what filesystem type, from which source.

    ``stacked`` tells apart identical mounts stacked on the same mount point (0 for the first), so a
    second identical mount over an existing one is still seen as new.
    """

    point: str
    fstype: str
    source: str
    stacked: int = 0


@dataclass(frozen=True)
class Process:
    """A process found in the ``cgroup.procs`` of a stackd cgroup.

    Identity is ``(pid, start_time)`` (start time in clock ticks after boot, from ``/proc/PID/stat``),
    so a reused pid is a different process; ``comm`` and ``cgroups`` are for the report only.
    """

    pid: int
    start_time: int
    comm: str = field(default="", compare=False)
    cgroups: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Resource:
    """One leaked resource, as handed to a ``diff(..., only=...)`` filter and printed in a report.

    ``kind`` is one of ``netns``, ``link``, ``nft``, ``cgroup``, ``mount``, ``process``, ``file``;
    ``name`` is its main name (a path, a link name, ``inet stackd_1a2b3c4d``, or a pid); ``text`` is
    its report line; ``also`` holds other names a filter matches (a process's cgroup paths, a mount's
    source, the bridge a table is named after).
    """

    kind: str
    name: str
    text: str
    also: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        """Every name of the resource, main name first."""
        return (self.name, *self.also)


@dataclass(frozen=True)
class HostSnapshot:
    """The stackd-relevant resources present on the host at one moment (see :func:`take_snapshot`).

    - ``netns``: paths of pinned network namespaces (``nsfs`` mounts of ``net:`` namespaces anywhere,
      and every file in the netns directory, ``/run/netns``);
    - ``links``: network interface names in the current network namespace;
    - ``nft_tables``: nftables tables whose name starts with ``stackd_``, as ``FAMILY NAME``
      (``inet stackd_1a2b3c4d``), in the current network namespace;
    - ``cgroups``: paths of every directory below a ``stackd`` directory at the top of every mounted
      cgroup hierarchy (v1 controllers and cgroup2; the ``stackd`` directories themselves excluded);
    - ``mounts``: every mount of the current mount namespace, except the netns pins above and the
      iproute2 self bind mount of the netns directory;
    - ``processes``: the processes in those cgroups (the ``stackd`` directories included);
    - ``files``: the entries of stackd's state and log directories.
    """

    netns: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()
    nft_tables: frozenset[str] = frozenset()
    cgroups: frozenset[str] = frozenset()
    mounts: frozenset[Mount] = frozenset()
    processes: frozenset[Process] = frozenset()
    files: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Leaks:
    """What :func:`diff` found new, per category; false when nothing leaked.

    ``str()`` gives one line per leaked resource, e.g. ``link sd3f2a1b`` or
    ``process 1234 (sleep) in /sys/fs/cgroup/pids/stackd/t-1a2b/web``.
    """

    netns: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()
    nft_tables: frozenset[str] = frozenset()
    cgroups: frozenset[str] = frozenset()
    mounts: frozenset[Mount] = frozenset()
    processes: frozenset[Process] = frozenset()
    files: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(
            self.netns or self.links or self.nft_tables or self.cgroups or self.mounts or self.processes or self.files
        )

    def __len__(self) -> int:
        return (
            len(self.netns)
            + len(self.links)
            + len(self.nft_tables)
            + len(self.cgroups)
            + len(self.mounts)
            + len(self.processes)
            + len(self.files)
        )

    def resources(self) -> list[Resource]:
        """Every leaked resource, in report order: processes, cgroups, mounts, netns, links, nft tables, files."""
        out: list[Resource] = [_process_resource(p) for p in sorted(self.processes, key=_process_key)]
        out += [_cgroup_resource(c) for c in sorted(self.cgroups)]
        out += [_mount_resource(m) for m in sorted(self.mounts)]
        out += [_netns_resource(n) for n in sorted(self.netns)]
        out += [_link_resource(n) for n in sorted(self.links)]
        out += [_nft_resource(t) for t in sorted(self.nft_tables)]
        out += [_file_resource(f) for f in sorted(self.files)]
        return out

    def filter(self, keep: Callable[[Resource], bool]) -> Leaks:
        """The leaks for which ``keep(resource)`` is true."""
        return Leaks(
            netns=frozenset(n for n in self.netns if keep(_netns_resource(n))),
            links=frozenset(n for n in self.links if keep(_link_resource(n))),
            nft_tables=frozenset(t for t in self.nft_tables if keep(_nft_resource(t))),
            cgroups=frozenset(c for c in self.cgroups if keep(_cgroup_resource(c))),
            mounts=frozenset(m for m in self.mounts if keep(_mount_resource(m))),
            processes=frozenset(p for p in self.processes if keep(_process_resource(p))),
            files=frozenset(f for f in self.files if keep(_file_resource(f))),
        )

    def __str__(self) -> str:
        return "\n".join(r.text for r in self.resources())


# --- report lines -------------------------------------------------------------------------------------


def _process_key(p: Process) -> tuple[int, int]:
    return (p.pid, p.start_time)


def _netns_resource(path: str) -> Resource:
    return Resource("netns", path, f"netns {path}")


def _link_resource(name: str) -> Resource:
    return Resource("link", name, f"link {name}")


def _nft_resource(table: str) -> Resource:
    bridge = nft_table_bridge(table.partition(" ")[2])
    return Resource("nft", table, f"nft table {table}", (bridge,) if bridge else ())


def _cgroup_resource(path: str) -> Resource:
    return Resource("cgroup", path, f"cgroup {path}")


def _mount_resource(m: Mount) -> Resource:
    stacked = f", stacked #{m.stacked + 1}" if m.stacked else ""
    return Resource("mount", m.point, f"mount {m.point} ({m.fstype} from {m.source}{stacked})", (m.source,))


def _process_resource(p: Process) -> Resource:
    where = p.cgroups[0] if p.cgroups else "?"
    more = f" (and {len(p.cgroups) - 1} more hierarchies)" if len(p.cgroups) > 1 else ""
    return Resource("process", str(p.pid), f"process {p.pid} ({p.comm}) in {where}{more}", p.cgroups)


def _file_resource(path: str) -> Resource:
    return Resource("file", path, f"file {path}")


# --- snapshot -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MountLine:
    dev: str
    root: str
    point: str
    fstype: str
    source: str


def _unescape(s: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ``\\011``, ``\\012``, ``\\134``)."""
    if "\\" not in s:
        return s
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), s)


def _parse_mountinfo(text: str) -> list[_MountLine]:
    """Parse proc(5) mountinfo: ``id parent maj:min root point opts [optional...] - fstype source super``."""
    out: list[_MountLine] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        out.append(
            _MountLine(
                dev=fields[2],
                root=_unescape(fields[3]),
                point=_unescape(fields[4]),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
            )
        )
    return out


def _list_dir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _cgroup_hierarchies(lines: list[_MountLine]) -> list[str]:
    """One mount point per mounted cgroup hierarchy (same device = same hierarchy; prefer root ``/``)."""
    by_dev: dict[str, _MountLine] = {}
    for m in lines:
        if m.fstype not in _CGROUP_FSTYPES:
            continue
        known = by_dev.get(m.dev)
        if known is None or (known.root != "/" and m.root == "/"):
            by_dev[m.dev] = m
    return sorted(m.point for m in by_dev.values())


def _read_pids(cgroup_dir: str) -> list[int]:
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "rb") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _walk_cgroups(base: str, dirs: list[str], pids: dict[int, list[str]]) -> None:
    """Collect every directory below ``base`` and the pids of ``base`` and of each of them."""
    stack = [base]
    while stack:
        path = stack.pop()
        try:
            it = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(entry.path)
                    stack.append(entry.path)
        for pid in _read_pids(path):
            pids.setdefault(pid, []).append(path)


def _read_process(proc: str, pid: int, cgroups: list[str]) -> Process | None:
    """Comm and start time from /proc/PID/stat; None when the process is already gone."""
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    lparen, rparen = stat.find("("), stat.rfind(")")
    rest = stat[rparen + 2 :].split()
    if lparen < 0 or rparen < 0 or len(rest) < 20:
        return None
    # Fields after the comm start at field 3 (state); starttime is field 22.
    return Process(pid, int(rest[19]), stat[lparen + 1 : rparen], tuple(sorted(cgroups)))


# nftables over netlink (linux/netlink.h, linux/netfilter/nfnetlink.h, nf_tables.h)
_NETLINK_NETFILTER = 12
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NFT_MSG_GETTABLE = (10 << 8) | 1  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETTABLE
_NFTA_TABLE_NAME = 1
_NFPROTO_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def list_nft_tables(prefix: str = NFT_TABLE_PREFIX) -> list[str]:
    """The nftables tables whose name starts with ``prefix``, as ``FAMILY NAME``, in the calling
    thread's network namespace; empty when nftables cannot be asked (no CAP_NET_ADMIN, no nf_tables)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER)
    except OSError:
        return []
    found: list[str] = []
    with sock:
        # nlmsghdr (length, type, flags, seq, pid) + nfgenmsg (family: 0 = all, version, res_id)
        sock.send(struct.pack("=IHHIIBBH", 20, _NFT_MSG_GETTABLE, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0, 0, 0, 0))
        while True:
            try:
                data = sock.recv(1 << 16)
            except OSError:
                return found
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < 16:
                    return found
                name = _nft_table_name(data[offset + 20 : offset + length])
                if name is not None and name.startswith(prefix):
                    found.append(f"{_NFPROTO_NAMES.get(data[offset + 16], str(data[offset + 16]))} {name}")
                offset += (length + 3) & ~3


def _nft_table_name(attributes: bytes) -> str | None:
    """NFTA_TABLE_NAME among a table message's attributes."""
    offset = 0
    while offset + 4 <= len(attributes):
        length, kind = struct.unpack_from("=HH", attributes, offset)
        if length < 4:
            return None
        if kind & 0x3FFF == _NFTA_TABLE_NAME:
            return attributes[offset + 4 : offset + length].rstrip(b"\0").decode(errors="replace")
        offset += (length + 3) & ~3
    return None


def take_snapshot(
    *,
    mountinfo: str = "/proc/self/mountinfo",
    sys_class_net: str = "/sys/class/net",
    netns_dir: str = "/run/netns",
    proc: str = "/proc",
    cgroup_parent: str = "stackd",
    state_dirs: Iterable[str] = DEFAULT_STATE_DIRS,
    nft_tables: Callable[[], Iterable[str]] | None = list_nft_tables,
) -> HostSnapshot:
    """Record the host resources stackd creates (see :class:`HostSnapshot` for what is recorded).

    Cgroup hierarchies are found through ``mountinfo`` (fstype ``cgroup`` or ``cgroup2``), so hybrid
    hosts (v1 controllers plus cgroup2 at ``/sys/fs/cgroup/unified``) and pure v2 hosts are both
    covered; ``cgroup_parent`` is the directory looked for at the top of each hierarchy. Every path is
    injectable for tests; missing directories count as empty. Pass ``state_dirs=()`` to skip the
    state and log directories, ``nft_tables=None`` to skip nftables (or a function to fake it).
    """
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        lines = _parse_mountinfo(f.read())

    netns: set[str] = set()
    mounts: list[Mount] = []
    seen: dict[tuple[str, str, str], int] = {}
    for m in lines:
        if m.fstype == "nsfs" and m.root.startswith("net:"):
            netns.add(m.point)
            continue
        if m.point == netns_dir:
            continue  # iproute2 bind-mounts the netns dir onto itself, once, for propagation.
        key = (m.point, m.fstype, m.source)
        n = seen.get(key, 0)
        seen[key] = n + 1
        mounts.append(Mount(m.point, m.fstype, m.source, n))
    netns.update(os.path.join(netns_dir, name) for name in _list_dir(netns_dir))

    cgroups: list[str] = []
    pids: dict[int, list[str]] = {}
    for hierarchy in _cgroup_hierarchies(lines):
        _walk_cgroups(os.path.join(hierarchy, cgroup_parent), cgroups, pids)
    processes = [_read_process(proc, pid, paths) for pid, paths in pids.items()]

    files = [os.path.join(d, name) for d in state_dirs for name in _list_dir(d)]

    return HostSnapshot(
        netns=frozenset(netns),
        links=frozenset(_list_dir(sys_class_net)),
        nft_tables=frozenset(nft_tables() if nft_tables is not None else ()),
        cgroups=frozenset(cgroups),
        mounts=frozenset(mounts),
        processes=frozenset(p for p in processes if p is not None),
        files=frozenset(files),
    )


# --- diff and check -----------------------------------------------------------------------------------


def _make_filter(
    projects: Iterable[str] | None,
    link_prefixes: Iterable[str] | None,
    only: Callable[[Resource], bool] | None,
) -> Callable[[Resource], bool] | None:
    names = tuple(p for p in projects or () if p)
    prefixes = tuple(p for p in link_prefixes or () if p)
    if not names and not prefixes and only is None:
        return None

    def keep(r: Resource) -> bool:
        if names or prefixes:
            mine = any(p in n for n in r.names() for p in names) or (
                r.kind in ("link", "nft") and any(n.startswith(prefixes) for n in r.names())
            )
            if not mine:
                return False
        return only is None or only(r)

    return keep


def diff(
    before: HostSnapshot,
    after: HostSnapshot,
    *,
    projects: Iterable[str] | None = None,
    link_prefixes: Iterable[str] | None = None,
    only: Callable[[Resource], bool] | None = None,
) -> Leaks:
    """What is in ``after`` but not in ``before``: the resources that appeared and were not cleaned up.

    Filtering (all optional, for pytest-xdist workers that must not report each other's resources):

    - ``projects``: when non-empty (or ``link_prefixes`` is), a resource is reported only if one of
      its names (path, mount point or source, a process's cgroup paths) *contains* one of them;
    - ``link_prefixes``: links are reported if their name *starts with* one of these (stackd's link
      names are hashes and never contain the project name, so with ``projects`` alone stackd's links
      are not reported); so are nftables tables named after such a link (``stackd_1a2b3c4d`` after
      bridge ``sd-1a2b3c4d``);
    - ``only``: a predicate on each :class:`Resource`, applied on top of the two above.
    """
    leaks = Leaks(
        netns=after.netns - before.netns,
        links=after.links - before.links,
        nft_tables=after.nft_tables - before.nft_tables,
        cgroups=after.cgroups - before.cgroups,
        mounts=after.mounts - before.mounts,
        processes=after.processes - before.processes,
        files=after.files - before.files,
    )
    keep = _make_filter(projects, link_prefixes, only)
    return leaks if keep is None or not leaks else leaks.filter(keep)


def check_no_leaks(
    before: HostSnapshot,
    *,
    settle: float = 1.0,
    step: float = 0.02,
    projects: Iterable[str] | None = None,
    link_prefixes: Iterable[str] | None = None,
    only: Callable[[Resource], bool] | None = None,
    take: Callable[[], HostSnapshot] | None = None,
) -> None:
    """Raise :class:`AssertionError` listing every resource new since ``before`` that stays for ``settle`` s.

    Resources may vanish asynchronously (the kernel deletes the veths of a deleted network namespace
    up to ~150 ms later), so a leak found is re-checked every ``step`` seconds until ``settle`` has
    passed. ``take`` makes the after-snapshots (default :func:`take_snapshot` with default paths; pass
    the same paths that made ``before``). The filters are those of :func:`diff`.
    """
    take_after = take or take_snapshot
    proj = tuple(projects or ())
    prefixes = tuple(link_prefixes or ())
    deadline = time.monotonic() + settle
    while True:
        leaks = diff(before, take_after(), projects=proj, link_prefixes=prefixes, only=only)
        if not leaks:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            report = "\n".join(f"  {r.text}" for r in leaks.resources())
            raise AssertionError(
                f"{len(leaks)} host resource(s) left behind (still there after {settle:g} s):\n{report}"
            )
        time.sleep(min(step, remaining))


# --- pytest fixture -----------------------------------------------------------------------------------


class LeakGuard:
    """What the leak-check fixture gives a test: the before-snapshot and the names to report.

    When ``projects`` and ``link_prefixes`` are both empty every new resource is reported (right for a
    serial run). Under pytest-xdist, call :meth:`track` with the test's project name(s) and link name
    prefixes so that only this test's resources are reported.
    """

    def __init__(
        self,
        before: HostSnapshot,
        *,
        settle: float = 1.0,
        take: Callable[[], HostSnapshot] | None = None,
        projects: Iterable[str] = (),
        link_prefixes: Iterable[str] = (),
    ) -> None:
        self.before = before
        self.settle = settle
        self.take = take or take_snapshot
        self.projects: set[str] = set(projects)
        self.link_prefixes: set[str] = set(link_prefixes)

    def track(self, *projects: str, link_prefixes: Iterable[str] = ()) -> None:
        """Restrict the report to resources of these projects and links with these name prefixes."""
        self.projects.update(projects)
        self.link_prefixes.update(link_prefixes)
        for project in projects:  # stackd's link names are hashes: look for this project's
            self.link_prefixes.update(project_link_prefixes(project))

    def leaks(self) -> Leaks:
        """What is new right now (no settling), with the tracked filter."""
        return diff(self.before, self.take(), projects=self.projects, link_prefixes=self.link_prefixes)

    def check(self) -> None:
        """:func:`check_no_leaks` against the before-snapshot, with the tracked filter."""
        check_no_leaks(
            self.before,
            settle=self.settle,
            projects=self.projects,
            link_prefixes=self.link_prefixes,
            take=self.take,
        )


def make_leak_check(
    *,
    name: str = "leak_check",
    autouse: bool = False,
    settle: float = 1.0,
    take: Callable[[], HostSnapshot] | None = None,
    projects: Iterable[str] = (),
    link_prefixes: Iterable[str] = (),
) -> Callable[..., Iterator[LeakGuard]]:
    """Build a function-scoped pytest fixture that snapshots before the test and checks after it.

    The fixture yields a :class:`LeakGuard`; at teardown it calls :meth:`LeakGuard.check`, so a leak
    fails the test's teardown with the report. Put the result in a conftest under the name given::

        strict_leak_check = make_leak_check(name="strict_leak_check", settle=0.5)
    """
    take_fn = take or take_snapshot
    fixed_projects = tuple(projects)
    fixed_prefixes = tuple(link_prefixes)

    def fixture() -> Iterator[LeakGuard]:
        guard = LeakGuard(take_fn(), settle=settle, take=take_fn, projects=fixed_projects, link_prefixes=fixed_prefixes)
        yield guard
        guard.check()

    fixture.__doc__ = f"Fail the test's teardown if it left host resources behind (settle {settle:g} s)."
    fixture.__name__ = name
    return pytest.fixture(name=name, autouse=autouse)(fixture)


#: The default leak-check fixture; import it into a conftest to use it (see the module docstring).
leak_check = make_leak_check()
