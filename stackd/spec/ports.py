"""`ports`: published ports in Compose's short syntax ("127.0.0.1:8080:80/tcp") or as tables."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, cast

from stackd.spec.context import Context
from stackd.spec.models import PortMapping
from stackd.spec.problems import Invalid, did_you_mean, show, type_name
from stackd.spec.values import expect

_PORT = re.compile(
    r"^(?:(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<ip4>\d{1,3}(?:\.\d{1,3}){3})):)?"
    r"(?:(?P<host>(?:\d+(?:-\d+)?)?):)?(?P<container>\d+(?:-\d+)?)(?:/(?P<proto>[a-z]+))?$"
)
_PORT_HELP = '"8080:80", "127.0.0.1:5353:53/udp", "9000-9001:9000-9001", "80"'


def _port_range(text: str, what: str) -> tuple[int, int]:
    start_text, _, end_text = text.partition("-")
    start = int(start_text)
    end = int(end_text) if end_text else start
    if not 1 <= start <= 65535 or not 1 <= end <= 65535:
        raise Invalid(f"{what} {text} is out of range (1 to 65535)")
    if end < start:
        raise Invalid(f"{what} range {text} ends before it starts")
    return start, end


def port(value: object, ctx: Context) -> PortMapping:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, dict):
        return _port_table(value)
    text = cast(str, expect(value, str, f"a port like {_PORT_HELP}"))
    match = _PORT.match(text)
    if not match:
        raise Invalid(f"{show(text)} is not a port mapping (e.g. {_PORT_HELP})")
    host_ip = match.group("ip6") or match.group("ip4") or "127.0.0.1"
    check_ip(host_ip)
    container, container_end = _port_range(match.group("container"), "container port")
    protocol = match.group("proto") or "tcp"
    if protocol not in ("tcp", "udp"):
        raise Invalid(f'{show(protocol)} is not a protocol (allowed: "tcp", "udp")')
    host_text = match.group("host")
    if (match.group("ip4") or match.group("ip6")) and host_text is None:
        raise Invalid(
            f'{show(text)} is ambiguous: write "{host_ip}:HOST_PORT:{match.group("container")}", or '
            f'"{host_ip}::{match.group("container")}" for any free host port'
        )
    host = host_end = None
    if host_text:
        host, host_end = _port_range(host_text, "host port")
        span, host_span = container_end - container, host_end - host
        if span and span != host_span:
            raise Invalid(f"{show(text)}: the host range and the container range differ in length")
        if not span and host_span:
            pass  # Compose: one container port published on any free port of the host range
        else:
            host_end = host + span
    return PortMapping(container, container_end, host_ip, host, host_end, cast(Any, protocol))


def check_ip(text: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(f"{show(text)} is not an IP address") from None


_PORT_TABLE_KEYS = ("target", "published", "host_ip", "protocol", "mode", "name", "app_protocol")


def _port_table(table: dict[str, Any]) -> PortMapping:
    for key in table:
        if key not in _PORT_TABLE_KEYS:
            raise Invalid(f'unknown key "{key}"{did_you_mean(key, _PORT_TABLE_KEYS)}', (key,))
    if "target" not in table:
        raise Invalid('a port table needs a "target"')
    host_ip = table.get("host_ip", "127.0.0.1")
    if not isinstance(host_ip, str):
        raise Invalid(f"expected an IP address, got {type_name(host_ip)}", ("host_ip",))
    try:
        check_ip(host_ip)
    except Invalid as error:
        raise Invalid(error.message, ("host_ip",)) from None
    published = table.get("published")
    text = f"{published!s}:" if published is not None else ":"
    bracketed = f"[{host_ip}]" if ":" in host_ip else host_ip
    return port(f"{bracketed}:{text}{table['target']}/{table.get('protocol', 'tcp')}", None)  # type: ignore[arg-type]


def ports(value: object, ctx: Context) -> list[PortMapping]:
    return ctx.each(expect(value, list, "an array of ports"), port)
