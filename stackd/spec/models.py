"""The stack file as frozen, typed models. Built by `stackd.spec.loader`; never touched by I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

__all__ = [
    "Dependency",
    "Healthcheck",
    "Network",
    "NetworkMode",
    "PortMapping",
    "RestartPolicy",
    "Rootfs",
    "SecurityOptions",
    "Service",
    "Stack",
    "Sysctl",
    "Tmpfs",
    "Ulimit",
    "User",
    "Volume",
    "frozen_map",
]


def frozen_map(items: Mapping[str, object] | None = None) -> Mapping[str, object]:
    """A read-only mapping (the models are frozen all the way down)."""
    return MappingProxyType(dict(items or {}))


RestartMode = Literal["no", "always", "on-failure", "unless-stopped"]
Condition = Literal["service_started", "service_healthy", "service_completed_successfully"]


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """`restart`: when to start a service again after it exits. max_retries only with on-failure."""

    mode: RestartMode = "no"
    max_retries: int | None = None

    def __str__(self) -> str:
        return f"{self.mode}:{self.max_retries}" if self.max_retries is not None else self.mode


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    """`restart_backoff`: the wait before a restart starts at `initial` seconds and is multiplied by
    `factor` at each restart of a streak, up to `maximum`; a run of `reset_after` seconds ends the streak."""

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 60.0
    reset_after: float = 10.0


@dataclass(frozen=True, slots=True)
class User:
    """`user`: a name or uid, and optionally a group name or gid; resolved in the rootfs at launch."""

    user: str | int
    group: str | int | None = None

    def __str__(self) -> str:
        return f"{self.user}:{self.group}" if self.group is not None else str(self.user)


@dataclass(frozen=True, slots=True)
class Rootfs:
    """`rootfs`: the host's root (read-only, with a private writable layer) or a directory."""

    kind: Literal["host", "directory"] = "host"
    path: Path | None = None

    def __str__(self) -> str:
        return "host" if self.kind == "host" else str(self.path)


@dataclass(frozen=True, slots=True)
class Volume:
    """One bind mount from `volumes`: a host path onto an absolute path inside the service."""

    source: Path
    target: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class Tmpfs:
    """One tmpfs from `tmpfs` (or a `volumes` entry of type tmpfs)."""

    target: str
    size: int | None = None
    mode: int | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ulimit:
    """One rlimit; -1 means unlimited."""

    soft: int
    hard: int


@dataclass(frozen=True, slots=True)
class Sysctl:
    """One sysctl: its key as components (so "eth0.1" survives) and its value as written to /proc/sys."""

    parts: tuple[str, ...]
    value: str

    @property
    def key(self) -> str:
        return ".".join(self.parts)

    @property
    def proc_path(self) -> str:
        return "/proc/sys/" + "/".join(self.parts)


@dataclass(frozen=True, slots=True)
class SecurityOptions:
    """`security_opt`: no_new_privs, and the seccomp profile ("default", "unconfined" or a file)."""

    no_new_privileges: bool = True
    seccomp: Literal["default", "unconfined"] | Path = "default"


@dataclass(frozen=True, slots=True)
class NetworkMode:
    """`network_mode`: "bridge" (the stack's network), "none", "host" or "service:NAME"."""

    kind: Literal["bridge", "none", "host", "service"] = "bridge"
    service: str | None = None

    def __str__(self) -> str:
        return f"service:{self.service}" if self.kind == "service" else self.kind


@dataclass(frozen=True, slots=True)
class PortMapping:
    """One published port range: host_ip:host_port(-end) -> container_port(-end)/protocol.

    host_port None means "any free port", chosen when the port is published.
    """

    container_port: int
    container_port_end: int
    host_ip: str = "127.0.0.1"
    host_port: int | None = None
    host_port_end: int | None = None
    protocol: Literal["tcp", "udp"] = "tcp"

    def __str__(self) -> str:
        host_ip = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        container = _port_range(self.container_port, self.container_port_end)
        if self.host_port is None:
            return f"{host_ip}::{container}/{self.protocol}"
        host = _port_range(self.host_port, self.host_port_end or self.host_port)
        return f"{host_ip}:{host}:{container}/{self.protocol}"


def _port_range(start: int, end: int) -> str:
    return str(start) if start == end else f"{start}-{end}"


@dataclass(frozen=True, slots=True)
class Dependency:
    """One `depends_on` entry: wait for `condition` of the named service; `required=False` tolerates
    that service being absent or failing."""

    condition: Condition = "service_started"
    required: bool = True
    restart: bool = False


@dataclass(frozen=True, slots=True)
class Healthcheck:
    """`healthcheck`, with Compose's defaults. `test` is the argv to run ("CMD-SHELL" already expanded
    to ["/bin/sh", "-c", ...]); `shell` remembers the form it was written in."""

    test: tuple[str, ...]
    shell: bool = False
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0
    start_interval: float = 5.0
    #: "ignore" (Docker's behaviour: report it) or "restart" (stop and start the service again).
    on_unhealthy: Literal["ignore", "restart"] = "ignore"


@dataclass(frozen=True, slots=True)
class Service:
    """One `[services.NAME]` table, validated, with every default filled in."""

    name: str
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    environment: Mapping[str, str] = field(default_factory=frozen_map)  # type: ignore[arg-type]
    working_dir: str | None = None
    user: User | None = None
    hostname: str = ""
    #: More names this service answers to on the stack's network (Compose's networks.*.aliases).
    aliases: tuple[str, ...] = ()
    #: More lines of the service's /etc/hosts: name -> IPv4 address (Compose's extra_hosts).
    extra_hosts: Mapping[str, str] = field(default_factory=frozen_map)  # type: ignore[arg-type]
    rootfs: Rootfs = field(default_factory=Rootfs)
    volumes: tuple[Volume, ...] = ()
    tmpfs: tuple[Tmpfs, ...] = ()
    read_only: bool = False
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    restart_backoff: RestartBackoff = field(default_factory=RestartBackoff)
    stop_signal: str = "SIGTERM"
    stop_grace_period: float = 10.0
    init: bool = False
    cpus: float | None = None
    mem_limit: int | None = None
    memswap_limit: int | None = None
    pids_limit: int | None = None
    ulimits: Mapping[str, Ulimit] = field(default_factory=frozen_map)  # type: ignore[arg-type]
    sysctls: tuple[Sysctl, ...] = ()
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    security_opt: SecurityOptions = field(default_factory=SecurityOptions)
    network_mode: NetworkMode = field(default_factory=NetworkMode)
    ports: tuple[PortMapping, ...] = ()
    depends_on: Mapping[str, Dependency] = field(default_factory=frozen_map)  # type: ignore[arg-type]
    healthcheck: Healthcheck | None = None
    labels: Mapping[str, str] = field(default_factory=frozen_map)  # type: ignore[arg-type]
    #: Clock offsets in seconds ("monotonic", "boottime"); a non-empty table gives a time namespace.
    time_offsets: Mapping[str, float] = field(default_factory=frozen_map)  # type: ignore[arg-type]
    #: "host": the host's users; "private": a user namespace, root inside = an unprivileged host range.
    userns_mode: Literal["host", "private"] = "host"

    @property
    def argv(self) -> tuple[str, ...]:
        """What is executed: entrypoint followed by command, as in Docker."""
        return (self.entrypoint or ()) + (self.command or ())


@dataclass(frozen=True, slots=True)
class Network:
    """`[network]`: the stack's subnet (None: picked from a private pool when the stack comes up), and
    whether services may reach beyond the host (`outbound`: NAT through the host, off by default)."""

    subnet: str | None = None
    outbound: bool = False


@dataclass(frozen=True, slots=True)
class Stack:
    """A whole, validated stack file. `services` keeps the file's order."""

    name: str
    services: Mapping[str, Service]
    network: Network = field(default_factory=Network)
    source: Path | None = field(default=None, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __getitem__(self, name: str) -> Service:
        return self.services[name]
