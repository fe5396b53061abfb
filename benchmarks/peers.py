"""Run the peer tools stackd is measured against: unshare, runc, podman, bubblewrap.

Each peer is prepared once (`prepare()` returns None when ready, or a note saying why it is skipped),
then run many times (`run(n)` returns the wall time of one start-to-exit in nanoseconds, as seen from
a Python parent that spawns the peer's command line, the way a Python supervisor would), then closed
(`close()` removes whatever it left: runc containers, podman containers, the cgroups podman made).

    limits = Limits(cpus=0.5, memory=64 << 20, pids=64)
    peers = default_peers(rootfs, workdir, prefix="bench-1a2b", limits=limits)
    for peer in peers:
        note = peer.prepare()
        ...
        elapsed_ns = peer.run(0)
    for peer in peers:
        peer.close()

Only the standard library: other benchmarks (stack up/down, logs) can reuse these peers.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Bwrap",
    "Limits",
    "Peer",
    "PeerFailed",
    "Podman",
    "Reaper",
    "Runc",
    "Unshare",
    "default_peers",
    "run_timed",
]


@dataclass(frozen=True)
class Limits:
    """The cgroup limits a peer applies where it can (runc, podman): the same as stackd's service."""

    cpus: float | None = None
    memory: int | None = None  # bytes
    pids: int | None = None


class PeerFailed(Exception):
    """A peer's command exited non-zero; the message holds its command line, exit code and stderr."""


def run_timed(argv: list[str], *, cwd: str | None = None) -> int:
    """Run `argv` to its end with stdin/stdout on /dev/null; return the wall time in ns.

    stderr goes to a temporary file (no pipe to drain while timing), read only when the command
    fails: then PeerFailed carries it.
    """
    with tempfile.TemporaryFile(prefix="peer-stderr-") as err:
        start = time.perf_counter_ns()
        code = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        elapsed = time.perf_counter_ns() - start
        if code != 0:
            err.seek(0)
            text = err.read().decode(errors="replace").strip()
            raise PeerFailed(f"`{' '.join(argv)}` exited with {code}: {text or '(no output)'}")
    return elapsed


class Reaper:
    """Make this process a child subreaper, so that what a peer leaves running after its command
    returned (podman's conmon, which then runs `podman container cleanup`) is reparented here and
    `settle()` can wait for it: otherwise that work would be billed to whichever row runs next.
    """

    PR_SET_CHILD_SUBREAPER = 36

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(self.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        self.keep: set[int] = set()

    @staticmethod
    def children() -> set[int]:
        pids: set[int] = set()
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/children") as handle:
                    pids.update(int(pid) for pid in handle.read().split())
            except OSError:
                pass
        return pids

    def baseline(self) -> None:
        """Children alive now (e.g. stackd's launcher) are never waited for."""
        self.keep = self.children()

    def settle(self, timeout: float = 5.0) -> int:
        """Wait (at most `timeout` s) until every other child has exited, and reap it; return the ns waited."""
        start = time.perf_counter_ns()
        deadline = time.monotonic() + timeout
        while True:
            others = self.children() - self.keep
            if not others:
                break
            for pid in others:
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                try:
                    select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                finally:
                    os.close(fd)
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            if time.monotonic() >= deadline:
                break
        return time.perf_counter_ns() - start


class Peer:
    """One peer tool. Subclasses set `name` and `what`, and implement `command`."""

    name = "peer"
    #: One line for the report: what the row runs.
    what = ""
    #: A remark printed under the table (workarounds this host needed), or "".
    remark = ""

    def prepare(self) -> str | None:
        """Get ready and check with one run; None when ready, else why the peer is skipped."""
        try:
            self.run(-1)
        except PeerFailed as error:
            return str(error)
        except OSError as error:
            return f"{self.name}: {error}"
        return None

    def command(self, n: int) -> list[str]:
        raise NotImplementedError

    def run(self, n: int) -> int:
        """One start-to-exit of the peer (run number `n`; -1 is the check run); wall time in ns."""
        try:
            return run_timed(self.command(n))
        finally:
            self.after(n)

    def after(self, n: int) -> None:
        """Untimed clean-up after run `n` (e.g. a container that lingers)."""

    def close(self) -> None:
        """Remove everything this peer left behind; safe to call twice, and after a failed prepare."""


class Unshare(Peer):
    """util-linux `unshare -muinpf true`: namespaces and nothing else, on the host's root; the floor."""

    name = "unshare"

    def __init__(self) -> None:
        self.binary = shutil.which("unshare")
        self.what = "unshare -muinpf true (host root, no cgroup, no mounts)"

    def prepare(self) -> str | None:
        if self.binary is None:
            return "unshare (util-linux) is not installed"
        return super().prepare()

    def command(self, n: int) -> list[str]:
        assert self.binary is not None
        return [self.binary, "-muinpf", "true"]


class Bwrap(Peer):
    """bubblewrap over the same root filesystem, every namespace it can unshare."""

    name = "bwrap"

    def __init__(self, rootfs: Path) -> None:
        self.binary = shutil.which("bwrap")
        self.rootfs = rootfs
        self.what = "bwrap --unshare-all --ro-bind ROOTFS / --proc /proc --dev /dev /bin/true (no cgroup)"

    def prepare(self) -> str | None:
        if self.binary is None:
            return "bwrap (bubblewrap) is not installed"
        return super().prepare()

    def command(self, n: int) -> list[str]:
        assert self.binary is not None
        return [
            self.binary, "--unshare-all", "--ro-bind", str(self.rootfs), "/",
            "--proc", "/proc", "--dev", "/dev", "/bin/true",
        ]  # fmt: skip


class Runc(Peer):
    """`runc run` of a bundle made by `runc spec` over the root filesystem, one container id per run.

    The bundle's config.json is runc's default with args ["/bin/true"], terminal false, the root set
    to ROOTFS (read-only, as runc spec has it), a cgroup namespace added (stackd makes one) and the
    same cgroup limits as stackd's service. runc keeps its state under a private --root, so close()
    can find and delete every container of ours and nothing else.
    """

    name = "runc"

    def __init__(self, rootfs: Path, workdir: Path, *, prefix: str, limits: Limits = Limits()) -> None:
        self.binary = shutil.which("runc")
        self.rootfs = rootfs
        self.bundle = workdir / "runc-bundle"
        self.state = workdir / "runc-state"
        self.prefix = prefix
        self.limits = limits
        self.what = "runc run --bundle B ID: runc spec, args /bin/true, same rootfs (ro), +cgroupns, same limits"

    def prepare(self) -> str | None:
        if self.binary is None:
            return "runc is not installed (scripts/install-bench-deps)"
        self.bundle.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                [self.binary, "spec", "--bundle", str(self.bundle)], check=True, capture_output=True, timeout=30
            )
        except subprocess.CalledProcessError as error:
            return f"runc spec failed: {error.stderr.decode(errors='replace').strip()}"
        config_file = self.bundle / "config.json"
        config = json.loads(config_file.read_text())
        config["process"]["args"] = ["/bin/true"]
        config["process"]["terminal"] = False
        config["root"]["path"] = str(self.rootfs)
        linux = config.setdefault("linux", {})
        namespaces = linux.setdefault("namespaces", [])
        if not any(ns.get("type") == "cgroup" for ns in namespaces):
            namespaces.append({"type": "cgroup"})
        resources = linux.setdefault("resources", {})
        if self.limits.cpus is not None:
            resources["cpu"] = {"quota": int(self.limits.cpus * 100_000), "period": 100_000}
        if self.limits.memory is not None:
            resources["memory"] = {"limit": self.limits.memory}
        if self.limits.pids is not None:
            resources["pids"] = {"limit": self.limits.pids}
        config_file.write_text(json.dumps(config, indent=2))
        return super().prepare()

    def container_id(self, n: int) -> str:
        return f"{self.prefix}-{n if n >= 0 else 'check'}"

    def command(self, n: int) -> list[str]:
        assert self.binary is not None
        return [self.binary, "--root", str(self.state), "run", "--bundle", str(self.bundle), self.container_id(n)]

    def after(self, n: int) -> None:
        # `runc run` deletes its container when the process exits; delete it here if it lingers.
        if (self.state / self.container_id(n)).exists():
            self._delete(self.container_id(n))

    def _delete(self, container: str) -> None:
        assert self.binary is not None
        subprocess.run(
            [self.binary, "--root", str(self.state), "delete", "--force", container],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )

    def close(self) -> None:
        if self.binary is None or not self.state.is_dir():
            return
        for entry in self.state.iterdir():
            if entry.is_dir() and entry.name.startswith(self.prefix):
                self._delete(entry.name)


#: The cgroup podman (cgroupfs manager) puts its containers and conmon under, in every hierarchy.
_PODMAN_PARENT = "libpod_parent"


def _cgroup_roots() -> list[Path]:
    """The mount point of every cgroup hierarchy of this process's mount namespace."""
    roots = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            sep = fields.index("-", 6)
            if fields[sep + 1] in ("cgroup", "cgroup2"):
                roots.append(Path(fields[4]))
    return roots


class Podman(Peer):
    """`podman run --rm --network none --rootfs ROOTFS /bin/true`, with the same cgroup limits.

    Runs through runc (`--runtime runc`): crun refuses this kind of hybrid-cgroup host. Where root
    lacks CAP_SYS_RESOURCE (so cannot raise a hard rlimit), podman's default RLIMIT_NOFILE/NPROC of
    1048576/4194304 make runc fail with "error setting rlimits": then the run uses --ulimit
    nofile=1024:1024 --ulimit nproc=1024:1024 and says so in `remark`.
    """

    name = "podman"

    def __init__(self, rootfs: Path, *, prefix: str, limits: Limits = Limits()) -> None:
        self.binary = shutil.which("podman")
        self.rootfs = rootfs
        self.prefix = prefix
        self.limits = limits
        self.extra: list[str] = []
        self.what = "podman run --rm --network none --runtime runc --rootfs ROOTFS /bin/true, same limits"
        # Podman makes a libpod_parent cgroup (and libpod_parent/conmon) in each hierarchy and leaves
        # them; close() removes those only if they were not there before us, and only when empty.
        self.parents_before = {root for root in _cgroup_roots() if (root / _PODMAN_PARENT).exists()}

    def prepare(self) -> str | None:
        if self.binary is None:
            return "podman is not installed (scripts/install-bench-deps)"
        failure = super().prepare()
        if failure is None or "error setting rlimit" not in failure:
            return failure
        self.extra = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
        if super().prepare() is None:
            self.remark = (
                "podman: its default rlimits fail here (root lacks CAP_SYS_RESOURCE), so it ran with "
                "--ulimit nofile=1024:1024 --ulimit nproc=1024:1024"
            )
            return None
        self.extra = []
        return failure

    def container_name(self, n: int) -> str:
        return f"{self.prefix}-{n if n >= 0 else 'check'}"

    def command(self, n: int) -> list[str]:
        assert self.binary is not None
        limits = []
        if self.limits.cpus is not None:
            limits += ["--cpus", str(self.limits.cpus)]
        if self.limits.memory is not None:
            limits += ["--memory", str(self.limits.memory)]
        if self.limits.pids is not None:
            limits += ["--pids-limit", str(self.limits.pids)]
        return [
            self.binary, "run", "--rm", "--network", "none", "--runtime", "runc", "--name", self.container_name(n),
            *limits, *self.extra, "--rootfs", str(self.rootfs), "/bin/true",
        ]  # fmt: skip

    def close(self) -> None:
        if self.binary is None:
            return
        try:
            listed = subprocess.run(
                [self.binary, "ps", "--all", "--quiet", "--filter", f"name=^{self.prefix}-"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.split()
            if listed:
                subprocess.run(
                    [self.binary, "rm", "--force", *listed], stdin=subprocess.DEVNULL, capture_output=True, timeout=60
                )
        except (OSError, subprocess.SubprocessError):
            pass
        for root in _cgroup_roots():
            if root in self.parents_before:
                continue
            for cgroup in (root / _PODMAN_PARENT / "conmon", root / _PODMAN_PARENT):
                try:
                    cgroup.rmdir()  # fails (EBUSY/ENOTEMPTY) while anything is inside: then it stays
                except OSError:
                    pass


def default_peers(rootfs: Path, workdir: Path, *, prefix: str, limits: Limits = Limits()) -> list[Peer]:
    """The peers of the launch benchmark, in the order of its table."""
    os.makedirs(workdir, exist_ok=True)
    return [
        Unshare(),
        Bwrap(rootfs),
        Runc(rootfs, workdir, prefix=prefix, limits=limits),
        Podman(rootfs, prefix=prefix, limits=limits),
    ]
