"""The Compose tools stackd's stack benchmark runs beside it: docker-compose and podman-compose.

Each peer brings up N services from a Compose file and tears them down again, with the services of
`benchmarks/stack.py` (busybox `sh` waiting for SIGTERM, stop_grace_period 5s), from an image imported
from the same busybox root filesystem directory that stackd runs from; on Compose's default network (a
bridge per project) or with `network_mode: none`.

    peers, daemons = default_compose_peers(workdir, prefix="sb1a2b3c", networks=("bridge", "none"))
    note = peer.prepare(rootfs)        # None when ready, or why the peer is skipped
    up = peer.up(50, project)          # seconds, from the command's start to its exit (all started)
    pids = peer.pids(project)          # untimed: the services' host pids
    down = peer.down(50, project)      # seconds
    peer.close(); daemon.close()       # removes everything they made

Nothing of the host's own Docker or Podman is used or changed:

- docker-compose talks to a private `dockerd` that this module starts (its own data root, exec root,
  socket and containerd under the work directory; `--bridge=none --iptables=false --ip-forward=false
  --ip-masq=false`, so no default bridge, no firewall rule, no sysctl is touched; a project's bridge
  network exists from its `up` to its `down`; containers in a cgroup parent named after the prefix)
  and stops by its pid at the end. A Docker daemon already running on the host is left alone.
- podman and podman-compose run with CONTAINERS_CONF and CONTAINERS_STORAGE_CONF pointing at private
  files: storage, run root and libpod's tmp_dir under the work directory, `runtime = "runc"` (crun refuses
  this kind of hybrid-cgroup host), `cgroup_manager = "cgroupfs"`, and `default_ulimits` of 1024 (root here
  lacks CAP_SYS_RESOURCE, so runc cannot apply podman's default 1048576 and fails with "error setting
  rlimits"). The `libpod_parent` cgroups podman makes are removed at the end if they were not there
  before and are empty.

Only the standard library; the tools themselves come from scripts/install-bench-deps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

__all__ = [
    "ComposePeer",
    "DockerCompose",
    "PeerError",
    "PodmanCompose",
    "PrivateDockerd",
    "compose_file",
    "default_compose_peers",
]

#: The service of the stack benchmark, as Compose says it (the same as stack.py's stackd service).
SERVICE_COMMAND = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait; done"]
STOP_GRACE = "5s"
_PODMAN_PARENT = "libpod_parent"
_PODMAN_COMPOSE_VENV = Path("/opt/stackd-bench/podman-compose/bin/podman-compose")


def compose_file(count: int, image: str, network: str = "none") -> str:
    """A Compose file of `count` services s0 ... s{count-1} (version 2.4: docker-compose v1 reads it).

    `network`: "none" (`network_mode: none`, a loopback only) or "bridge" (Compose's default: the
    project's own bridge network, created by `up` and removed by `down`).
    """
    quoted = ", ".join(f'"{part}"' for part in (part.replace('"', '\\"') for part in SERVICE_COMMAND))
    lines = ['version: "2.4"', "services:"]
    for index in range(count):
        lines += [f"  s{index}:", f"    image: {image}"]
        if network == "none":
            lines.append("    network_mode: none")
        lines += [f"    command: [{quoted}]", f"    stop_grace_period: {STOP_GRACE}"]
    return "\n".join(lines) + "\n"


def cgroup_roots() -> list[Path]:
    """The mount point of every cgroup hierarchy of this process's mount namespace."""
    roots = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            sep = fields.index("-", 6)
            if fields[sep + 1] in ("cgroup", "cgroup2"):
                roots.append(Path(fields[4]))
    return roots


def remove_empty_cgroups(names: list[str]) -> None:
    """rmdir `name` (deepest first) in every hierarchy; a cgroup that still has anything in it stays."""
    for root in cgroup_roots():
        for name in names:
            with contextlib.suppress(OSError):
                (root / name.strip("/")).rmdir()


def unmount_under(directory: Path) -> None:
    """Lazily unmount whatever a peer left mounted under `directory` (deepest first)."""
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == str(directory) or point.startswith(f"{directory}/"):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def tar_of(rootfs: Path, target: Path) -> Path:
    """The root filesystem directory as a tar archive, for `docker import` / `podman import`."""
    with tarfile.open(target, "w") as archive:
        archive.add(rootfs, arcname=".")
    return target


class PeerError(Exception):
    """A peer's command failed: its command line, exit code and output."""


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300) -> str:
    """Run a command to its end; its stdout, or PeerError with its output."""
    done = subprocess.run(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        text = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PeerError(f"`{' '.join(argv[:4])} ...` exited with {done.returncode}: {' / '.join(text)}")
    return done.stdout


def timed(argv: list[str], *, env: dict[str, str], cwd: Path) -> float:
    """Seconds from spawning `argv` to its exit (output to a file, read only on failure)."""
    with open(cwd / "last-command.log", "w+b") as out:
        start = time.perf_counter()
        code = subprocess.call(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        elapsed = time.perf_counter() - start
        if code != 0:
            out.seek(0)
            text = out.read().decode(errors="replace").strip().splitlines()[-5:]
            raise PeerError(f"`{' '.join(argv[:4])} ...` exited with {code}: {' / '.join(text)}")
    return elapsed


class ComposePeer:
    """One Compose tool on one kind of network. `name` is the row's name, `what` one line on how it runs."""

    tool = "compose"

    def __init__(self, workdir: Path, *, prefix: str, network: str = "none") -> None:
        self.network = network
        self.name = f"{self.tool} ({'bridge' if network == 'bridge' else 'no network'})"
        self.workdir = workdir / f"{self.tool.replace(' ', '-')}-{network}"
        self.prefix = prefix
        self.env = dict(os.environ)
        self.image = ""
        self.what = ""
        self._files: dict[int, Path] = {}

    # to implement
    def prepare(self, rootfs: Path) -> str | None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def pids(self, project: str) -> list[int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # shared
    def file(self, count: int) -> Path:
        if count not in self._files:
            path = self.workdir / f"compose-{count}.yml"
            path.write_text(compose_file(count, self.image, self.network))
            self._files[count] = path
        return self._files[count]

    def _compose(self, count: int, project: str, *verb: str) -> list[str]:
        return [*self.command(), "-p", project, "-f", str(self.file(count)), *verb]

    def up(self, count: int, project: str) -> float:
        return timed(self._compose(count, project, "up", "-d"), env=self.env, cwd=self.workdir)

    def down(self, count: int, project: str) -> float:
        return timed(self._compose(count, project, "down"), env=self.env, cwd=self.workdir)

    def force_down(self, count: int, project: str) -> None:
        """After a failure: remove what the project still has (untimed, errors ignored)."""
        with contextlib.suppress(PeerError, OSError, subprocess.SubprocessError):
            run(self._compose(count, project, "down", "-t", "0"), env=self.env)


class PrivateDockerd:
    """A dockerd of the benchmark's own, shared by the docker rows; started once, stopped by its pid."""

    def __init__(self, workdir: Path, *, prefix: str) -> None:
        self.workdir = workdir / "dockerd"
        self.prefix = prefix
        self.cgroup_parent = f"{prefix}-docker"
        self.env = dict(os.environ)
        self.image = f"{prefix}-busybox:latest"
        self.version = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.failure: str | None = None
        self._started = False

    def ensure(self, rootfs: Path) -> str | None:
        """Start the daemon and import the image, once; None when ready, else why not."""
        if not self._started:
            self._started = True
            self.failure = self._start(rootfs)
        return self.failure

    def _start(self, rootfs: Path) -> str | None:
        if shutil.which("dockerd") is None or shutil.which("docker") is None:
            return "dockerd or the docker CLI is not installed (scripts/install-bench-deps: docker.io)"
        base = self.workdir
        base.mkdir(parents=True, exist_ok=True)
        (base / "daemon.json").write_text("{}\n")
        socket = base / "d.sock"
        argv = [
            "dockerd",
            "--data-root", str(base / "data"),
            "--exec-root", str(base / "x"),
            "--pidfile", str(base / "dockerd.pid"),
            "--host", f"unix://{socket}",
            "--config-file", str(base / "daemon.json"),
            "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
            "--cgroup-parent", f"/{self.cgroup_parent}",
        ]  # fmt: skip
        with open(base / "dockerd.log", "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self.env["DOCKER_HOST"] = f"unix://{socket}"
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                return f"dockerd exited with {self.process.returncode}: {self._log_tail()}"
            probe = subprocess.run(
                ["docker", "info", "--format", "{{.ServerVersion}}"],
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode == 0:
                self.version = probe.stdout.strip()
                break
            if time.monotonic() > deadline:
                return f"dockerd did not answer within 30 s: {self._log_tail()}"
            time.sleep(0.2)
        try:
            run(["docker", "import", str(tar_of(rootfs, base / "rootfs.tar")), self.image], env=self.env)
            run(["docker", "run", "--rm", "--network", "none", self.image, "true"], env=self.env)
        except PeerError as error:
            return str(error)
        return None

    def _log_tail(self) -> str:
        try:
            return " / ".join((self.workdir / "dockerd.log").read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                with contextlib.suppress(PeerError, OSError, subprocess.SubprocessError):
                    ids = run(["docker", "ps", "-aq"], env=self.env, timeout=60).split()
                    if ids:
                        run(["docker", "rm", "-f", *ids], env=self.env, timeout=120)
                    run(["docker", "network", "prune", "-f"], env=self.env, timeout=60)
                self.process.send_signal(signal.SIGTERM)  # our own child, by its pid
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        unmount_under(self.workdir)
        remove_empty_cgroups([self.cgroup_parent])


class DockerCompose(ComposePeer):
    """docker-compose (v1, Debian's package) or `docker compose` (v2, the CLI plugin) on the private dockerd."""

    def __init__(
        self, workdir: Path, daemon: PrivateDockerd, *, prefix: str, network: str = "none", plugin: bool = False
    ) -> None:
        self.plugin = plugin
        self.tool = "docker compose v2" if plugin else "docker-compose"
        super().__init__(workdir, prefix=prefix, network=network)
        self.daemon = daemon
        self.version = ""

    def command(self) -> list[str]:
        return ["docker", "compose"] if self.plugin else ["docker-compose"]

    def prepare(self, rootfs: Path) -> str | None:
        if self.plugin:
            if shutil.which("docker") is None:
                return "no docker CLI"
            probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
            if probe.returncode != 0:
                return "the `docker compose` CLI plugin is not installed (Debian does not package it)"
            self.version = probe.stdout.strip()
        else:
            if shutil.which("docker-compose") is None:
                return "docker-compose is not installed (scripts/install-bench-deps)"
            self.version = run(["docker-compose", "version", "--short"]).strip()
        failure = self.daemon.ensure(rootfs)
        if failure:
            return failure
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(self.daemon.env)
        self.image = self.daemon.image
        network = (
            "a bridge network per project (no NAT: the daemon runs without iptables)"
            if self.network == "bridge"
            else "network_mode: none"
        )
        self.what = (
            f"{' '.join(self.command())} {self.version} on a private dockerd {self.daemon.version} "
            f"(runc, overlay2, cgroupfs); {network}"
        )
        return None

    def pids(self, project: str) -> list[int]:
        ids = run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"], env=self.env)
        if not ids.split():
            return []
        out = run(["docker", "inspect", "--format", "{{.State.Pid}}", *ids.split()], env=self.env)
        return [int(pid) for pid in out.split() if pid != "0"]

    def close(self) -> None:
        pass  # the daemon's close() removes everything


class PodmanCompose(ComposePeer):
    """podman-compose (PyPI) driving podman through runc, with private storage and configuration.

    Services without a network only: podman's bridge networks (CNI here) add rules to the host's
    firewall, which the benchmark does not touch.
    """

    tool = "podman-compose"

    def __init__(self, workdir: Path, *, prefix: str) -> None:
        super().__init__(workdir, prefix=prefix, network="none")
        self.binary = shutil.which("podman-compose") or (
            str(_PODMAN_COMPOSE_VENV) if _PODMAN_COMPOSE_VENV.exists() else None
        )
        self.parents_before = {root for root in cgroup_roots() if (root / _PODMAN_PARENT).exists()}
        self.version = ""

    def command(self) -> list[str]:
        assert self.binary is not None
        return [self.binary]

    def prepare(self, rootfs: Path) -> str | None:
        if shutil.which("podman") is None:
            return "podman is not installed (scripts/install-bench-deps)"
        if self.binary is None:
            return "podman-compose is not installed (scripts/install-bench-deps: pip, in its own venv)"
        base = self.workdir
        base.mkdir(parents=True, exist_ok=True)
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/root"\nrunroot = "{base}/run"\n'
        )
        (base / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{base}/tmp"\n'
        )
        self.env["CONTAINERS_STORAGE_CONF"] = str(base / "storage.conf")
        self.env["CONTAINERS_CONF"] = str(base / "containers.conf")
        self.image = f"localhost/{self.prefix}-busybox:latest"
        try:
            self.version = run([self.binary, "--version"], env=self.env).splitlines()[0].split()[-1]
            podman = run(["podman", "--version"], env=self.env).split()[-1]
            run(["podman", "import", str(tar_of(rootfs, base / "rootfs.tar")), self.image], env=self.env)
            run(["podman", "run", "--rm", "--network", "none", self.image, "true"], env=self.env)
        except (PeerError, IndexError) as error:
            return str(error)
        self.what = (
            f"podman-compose {self.version} -> podman {podman} (runc, overlay, cgroupfs; private storage); "
            "network_mode: none"
        )
        return None

    def pids(self, project: str) -> list[int]:
        ids = run(["podman", "ps", "-q", "--filter", f"label=io.podman.compose.project={project}"], env=self.env)
        if not ids.split():
            return []
        out = run(["podman", "inspect", "--format", "{{.State.Pid}}", *ids.split()], env=self.env)
        return [int(pid) for pid in out.split() if pid != "0"]

    def close(self) -> None:
        if "CONTAINERS_CONF" in self.env:
            with contextlib.suppress(PeerError, OSError, subprocess.SubprocessError):
                run(["podman", "rm", "--all", "--force", "--time", "0"], env=self.env, timeout=120)
                run(["podman", "rmi", "--all", "--force"], env=self.env, timeout=120)
        unmount_under(self.workdir)
        for root in cgroup_roots():
            if root in self.parents_before:
                continue
            for cgroup in (root / _PODMAN_PARENT / "conmon", root / _PODMAN_PARENT):
                with contextlib.suppress(OSError):
                    cgroup.rmdir()  # fails (EBUSY/ENOTEMPTY) while anything is inside: then it stays


def default_compose_peers(
    workdir: Path, *, prefix: str, networks: tuple[str, ...] = ("bridge", "none")
) -> tuple[list[ComposePeer], list[PrivateDockerd]]:
    """The peer rows for these network modes, and the daemons to close after them."""
    daemon = PrivateDockerd(workdir, prefix=prefix)
    peers: list[ComposePeer] = []
    for network in networks:
        peers.append(DockerCompose(workdir, daemon, prefix=prefix, network=network))
        peers.append(DockerCompose(workdir, daemon, prefix=prefix, network=network, plugin=True))
    if "none" in networks:
        peers.append(PodmanCompose(workdir, prefix=prefix))
    return peers, [daemon]
