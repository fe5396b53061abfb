"""The plain values the Python API hands out: exec results, log lines, events, published ports, errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from stackd.errors import StackdError

__all__ = [
    "Event",
    "ExecError",
    "ExecResult",
    "LogLine",
    "NotReadyError",
    "PublishedPort",
    "parse_published_ports",
]


class NotReadyError(StackdError):
    """Services did not become ready (started, or healthy) in time, or failed on the way.

    ``services`` maps each service that is not ready to why (``"exited with code 1"``,
    ``"unhealthy"``, ``"health: starting"`` at a timeout...); the message also carries the last lines
    of their logs.
    """

    def __init__(self, message: str, services: Mapping[str, str]) -> None:
        super().__init__(message)
        self.services = dict(services)


class ExecError(StackdError):
    """A command run with ``exec(..., check=True)`` failed, or could not be started at all.

    ``result`` is the :class:`ExecResult` when the command ran (None when it could not start).
    """

    def __init__(self, message: str, result: ExecResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What a command run inside a service gave: its exit code and its whole output."""

    #: The exit code; 128 + N when signal N killed it (as a shell reports it).
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        """Whether the command exited with code 0."""
        return self.exit_code == 0

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced), surrounding white space stripped."""
        return self.stdout.decode(errors="replace").strip()


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line a service wrote, as stored in its log file."""

    service: str
    #: "stdout" or "stderr"
    stream: str
    #: When stackd read the line (UTC).
    time: datetime
    #: The line's bytes, without its newline.
    data: bytes
    #: False for a line the service never ended with a newline (yet).
    complete: bool = True

    @property
    def text(self) -> str:
        """The line decoded as UTF-8, undecodable bytes replaced."""
        return self.data.decode(errors="replace")

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to the stack or one of its services, as `stackd events` shows it.

    ``name`` is e.g. ``network``, ``started``, ``healthy``, ``unhealthy``, ``exited``, ``restarting``,
    ``oom``, ``stopping``, ``killing``, ``failed``; ``fields`` holds its details (``pid``, ``code``,
    ``reason``, ...).
    """

    time: datetime
    name: str
    #: The service it concerns; None for the stack as a whole.
    service: str | None
    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Event:
        """From the supervisor's event record (the control protocol's JSON form)."""
        data = dict(record)
        when = str(data.pop("time"))
        name = str(data.pop("event"))
        service = data.pop("service", None)
        return cls(datetime.fromisoformat(when.replace("Z", "+00:00")), name, service, MappingProxyType(data))


@dataclass(frozen=True, slots=True)
class PublishedPort:
    """One published port: ``host_ip:host_port`` on the host forwards to ``container_port`` of the service."""

    host_ip: str
    host_port: int
    container_port: int
    protocol: str = "tcp"

    @property
    def address(self) -> tuple[str, int]:
        """``(host_ip, host_port)``, ready for a client's ``connect``."""
        return self.host_ip, self.host_port

    def __str__(self) -> str:
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{host}:{self.host_port}->{self.container_port}/{self.protocol}"


_PORT = re.compile(
    r"^(?:\[(?P<ip6>[^\]]+)\]|(?P<ip>[^:\[\]]+)):(?P<host>\d+)(?:-(?P<host_end>\d+))?"
    r"->(?P<cont>\d+)(?:-(?P<cont_end>\d+))?(?:/(?P<proto>tcp|udp))?$"
)


def parse_published_ports(texts: tuple[str, ...] | list[str]) -> tuple[PublishedPort, ...]:
    """``("127.0.0.1:8080->80/tcp", "0.0.0.0:9000-9001->90-91/udp")`` as :class:`PublishedPort`s, one per
    port (a range gives one per port). Text that does not parse is skipped."""
    out: list[PublishedPort] = []
    for text in texts:
        match = _PORT.match(text.strip())
        if match is None:
            continue
        ip = match["ip6"] or match["ip"]
        host, cont = int(match["host"]), int(match["cont"])
        host_end = int(match["host_end"] or host)
        cont_end = int(match["cont_end"] or cont)
        count = min(host_end - host, cont_end - cont) + 1
        out += [PublishedPort(ip, host + i, cont + i, match["proto"] or "tcp") for i in range(max(count, 1))]
    return tuple(out)
