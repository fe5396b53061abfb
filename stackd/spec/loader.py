"""Loading a stack file: TOML -> interpolation -> models, with every problem reported at once.

Nothing here touches the host beyond reading the stack file, its `.env`, env files and seccomp profiles,
and checking that the paths it names exist.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stackd.errors import Problem, StackFileError
from stackd.spec.context import Context, Findings
from stackd.spec.interpolate import interpolate, parse_dotenv
from stackd.spec.locate import KeyLines
from stackd.spec.models import Network, PortMapping, Service, Stack, frozen_map
from stackd.spec.problems import Invalid, KeyPath, did_you_mean, format_path, show, type_name
from stackd.spec.project import normalise_project_name, validate_project_name
from stackd.spec.service import parse_service

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DEFAULT_FILENAMES", "find_stack_file", "load_stack", "parse_stack"]

DEFAULT_FILENAMES = ("stack.toml", "stackd.toml")
TOP_LEVEL_KEYS = ("name", "network", "services")
NETWORK_KEYS = ("subnet", "outbound")
_UNSUPPORTED_TOP_LEVEL = {
    "volumes": "named volumes are not supported: bind directories with a service's volumes",
    "networks": "each stack has exactly one network: configure it under [network]",
    "secrets": "use volumes with read-only files",
    "configs": "use volumes with read-only files",
    "include": "one stack, one file",
}
_PRIVATE_V4 = [ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]


def find_stack_file(start: Path | None = None) -> Path:
    """The stack file Compose-style: stack.toml (or stackd.toml) here or in a parent directory."""
    directory = (start or Path.cwd()).resolve()
    for candidate_dir in (directory, *directory.parents):
        for name in DEFAULT_FILENAMES:
            candidate = candidate_dir / name
            if candidate.is_file():
                return candidate
    raise StackFileError(
        [
            Problem(
                str(directory),
                "",
                f"no {' or '.join(DEFAULT_FILENAMES)} here or in any parent directory (use -f FILE)",
            )
        ]
    )


def load_stack(
    path: str | os.PathLike[str],
    *,
    project: str | None = None,
    env: Mapping[str, str] | None = None,
    host_cpus: int | None = None,
) -> Stack:
    """Read and validate a stack file. Raises StackFileError listing every problem found."""
    file = Path(path)
    try:
        source = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StackFileError([Problem(str(file), "", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise StackFileError([Problem(str(file), "", f"cannot read: {error}")]) from None
    return parse_stack(source, file=file, project=project, env=env, host_cpus=host_cpus)


def parse_stack(
    source: str,
    *,
    file: Path,
    project: str | None = None,
    env: Mapping[str, str] | None = None,
    host_cpus: int | None = None,
) -> Stack:
    """Validate the text of a stack file. `file` names it in errors and anchors relative paths."""
    shown = str(file)
    try:
        document = tomllib.loads(source)
    except ValueError as error:  # TOMLDecodeError, or an integer too long for int() (sys.int_info)
        line = _toml_error_line(str(error))
        raise StackFileError([Problem(shown, "", f"not valid TOML: {error}", line)]) from None
    base_dir = file.resolve().parent
    environment, problems = _environment(base_dir, dict(os.environ if env is None else env), shown)
    findings = Findings()
    ctx = Context(findings, base_dir, environment, host_cpus or os.cpu_count() or 1)
    document = _interpolate_all(document, ctx)
    uninterpolated = [path for path, _ in findings.problems]  # these values stay as written, "${X:?...}"
    first_parse_problem = len(findings.problems)
    stack = _build_stack(document, ctx, project, default_name=normalise_project_name(base_dir.name), file=file)
    lines = KeyLines(source)
    reported = findings.problems[:first_parse_problem] + [
        (path, message)
        for path, message in findings.problems[first_parse_problem:]
        if not any(path[: len(value)] == value for value in uninterpolated)  # parsing "${X:?...}" says nothing new
    ]
    found = [Problem(shown, format_path(path), message, lines.line_of(path)) for path, message in reported]
    problems += sorted(found, key=lambda problem: problem.line or 0)
    if problems or stack is None:
        raise StackFileError(problems or [Problem(shown, "", "invalid stack file")])
    return stack


def _toml_error_line(message: str) -> int | None:
    marker = "(at line "
    if marker in message:
        digits = message.split(marker, 1)[1].split(",", 1)[0]
        return int(digits) if digits.isdigit() else None
    return None


def _environment(base_dir: Path, env: dict[str, str], shown: str) -> tuple[dict[str, str], list[Problem]]:
    """The process environment over the `.env` beside the stack file (the environment wins, as in Compose)."""
    dotenv = base_dir / ".env"
    if not dotenv.is_file():
        return env, []
    try:
        values = parse_dotenv(dotenv.read_text(encoding="utf-8"), env)
    except Invalid as error:
        line = error.subpath[0] if error.subpath and isinstance(error.subpath[0], int) else None
        return env, [Problem(str(dotenv), "", error.message.split(": ", 1)[-1], line)]
    except (OSError, UnicodeDecodeError) as error:
        return env, [Problem(str(dotenv), "", f"cannot read: {error}")]
    return {**values, **env}, []


def _interpolate_all(value: Any, ctx: Context, path: KeyPath = ()) -> Any:
    """Interpolate every string value (not keys) of the document."""
    if isinstance(value, str):
        try:
            return interpolate(value, ctx.env, lambda message: ctx.warn(f"{format_path(path)}: {message}"))
        except Invalid as error:
            ctx.at(*path).problem(error.message)
            return value
    if isinstance(value, dict):
        return {key: _interpolate_all(item, ctx, (*path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate_all(item, ctx, (*path, index)) for index, item in enumerate(value)]
    return value


def _build_stack(
    document: dict[str, Any], ctx: Context, project: str | None, *, default_name: str, file: Path
) -> Stack | None:
    for key in document:
        if key.startswith("x-") or key in TOP_LEVEL_KEYS:
            continue
        if key == "version":
            ctx.warn("version: the top-level `version` is obsolete and ignored")
        elif key in _UNSUPPORTED_TOP_LEVEL:
            ctx.at(key).problem(f"not supported: {_UNSUPPORTED_TOP_LEVEL[key]}")
        else:
            ctx.at(key).problem(
                f'unknown key "{key}"{did_you_mean(key, TOP_LEVEL_KEYS)} '
                f"(allowed at the top: {', '.join(TOP_LEVEL_KEYS)} and x-* extensions)"
            )
    name = _project_name(document, ctx, project, default_name)
    network = _network(document.get("network", {}), ctx.at("network"))
    raw_services = document.get("services")
    services = _services(raw_services, ctx)
    if services is not None:
        # Cross-service checks run on the services that parsed, naming the others as known.
        _check_dependencies(services, set(raw_services or ()), ctx)
        _check_ports(services, ctx)
        _check_aliases(services, ctx)
        if network is not None and network.subnet:
            _check_subnet_size(network.subnet, services, ctx)
    if name is None or network is None or services is None or ctx.findings.problems:
        return None
    return Stack(name, frozen_map(services), network, file, tuple(ctx.findings.warnings))  # type: ignore[arg-type]


def _project_name(document: dict[str, Any], ctx: Context, project: str | None, default: str) -> str | None:
    if project is not None:
        try:
            return validate_project_name(project)
        except Invalid as error:
            ctx.problem(f"project name (-p): {error.message}")
            return None
    if "name" in document:
        name = document["name"]
        if not isinstance(name, str):
            ctx.at("name").problem(f"expected a string, got {type_name(name)}")
            return None
        return ctx.at("name").attempt(validate_project_name, name)
    return default


def _network(raw: object, ctx: Context) -> Network | None:
    if not isinstance(raw, dict):
        ctx.problem(f"expected a table [network], got {type_name(raw)}")
        return None
    for key in raw:
        if key not in NETWORK_KEYS and not key.startswith("x-"):
            ctx.at(key).problem(
                f'unknown key "{key}"{did_you_mean(key, NETWORK_KEYS)} (allowed: {", ".join(NETWORK_KEYS)})'
            )
    outbound = raw.get("outbound", False)
    if not isinstance(outbound, bool):
        ctx.at("outbound").problem(f"expected true or false, got {type_name(outbound)}")
        return None
    subnet = raw.get("subnet")
    if subnet is None:
        return Network(outbound=outbound)
    checked = ctx.at("subnet").attempt(_subnet, subnet)
    return Network(checked, outbound) if checked else None


def _subnet(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f'expected a subnet like "10.77.0.0/24", got {type_name(value)}')
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as error:
        raise Invalid(f'{show(value)} is not a subnet ({error}; write e.g. "10.77.0.0/24")') from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise Invalid(f"{show(value)}: only IPv4 subnets are supported")
    if not any(network.subnet_of(private) for private in _PRIVATE_V4):
        raise Invalid(
            f"{show(value)} is not a private range: use a subnet inside 10.0.0.0/8, 172.16.0.0/12 "
            "or 192.168.0.0/16, so the stack cannot shadow addresses outside this host"
        )
    if not 16 <= network.prefixlen <= 29:
        raise Invalid(f"{show(value)}: the prefix must be between /16 and /29")
    return str(network)


def _services(raw: object, ctx: Context) -> dict[str, Service] | None:
    inner = ctx.at("services")
    if raw is None:
        ctx.problem("no services: add at least one [services.NAME] table with a command")
        return None
    if not isinstance(raw, dict):
        inner.problem(f"expected tables [services.NAME], got {type_name(raw)}")
        return None
    if not raw:
        inner.problem("no services: add at least one [services.NAME] table with a command")
        return None
    services: dict[str, Service] = {}
    for name, table in raw.items():
        service = parse_service(name, table, inner.at(name))
        if service is not None:
            services[name] = service
    return services


def _check_dependencies(services: dict[str, Service], names: set[str], ctx: Context) -> None:
    edges: dict[str, list[str]] = {name: [] for name in services}
    via: dict[tuple[str, str], str] = {}  # the key that makes each edge, to report a cycle where it starts
    for name, service in services.items():
        where = ctx.at("services", name)
        for target, dependency in service.depends_on.items():
            if target == name:
                where.problem("a service cannot depend on itself", ("depends_on", target))
            elif target not in names:
                if dependency.required:
                    where.problem(f'unknown service "{target}"{did_you_mean(target, names)}', ("depends_on", target))
            elif target in services:
                edges[name].append(target)
                via[name, target] = "depends_on"
                if dependency.condition == "service_healthy" and services[target].healthcheck is None:
                    where.problem(
                        f'condition "service_healthy" needs a healthcheck on {target}, which has none',
                        ("depends_on", target),
                    )
        if service.network_mode.kind == "service":
            owner = service.network_mode.service or ""
            if owner not in names:
                where.problem(f'unknown service "{owner}"{did_you_mean(owner, names)}', ("network_mode",))
            elif owner in services and services[owner].network_mode.kind == "host":
                where.problem(
                    f'{owner} uses the host\'s network: write network_mode = "host" instead', ("network_mode",)
                )
            elif owner != name and owner in services and (name, owner) not in via:
                edges[name].append(owner)
                via[name, owner] = "network_mode"
    for cycle in _cycles(edges):
        key = via[cycle[0], cycle[1]]
        ctx.at("services", cycle[0]).problem("dependency cycle: " + " -> ".join(cycle), (key,))


def _cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Each cycle once, as a path that returns to its start, found by depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node)
    return found


def _check_ports(services: dict[str, Service], ctx: Context) -> None:
    taken: list[tuple[PortMapping, str, int]] = []
    for name, service in services.items():
        for index, port in enumerate(service.ports):
            if port.host_port is None:
                continue
            for other, other_name, other_index in taken:
                if _ports_overlap(port, other):
                    ctx.at("services", name, "ports", index).problem(
                        f"host port {port.host_port} ({port.protocol} on {port.host_ip}) is already published "
                        f"by services.{other_name}.ports[{other_index}]"
                    )
                    break
            taken.append((port, name, index))


def _check_aliases(services: dict[str, Service], ctx: Context) -> None:
    """An alias names one service: not another service, not another service's alias."""
    owner = {name: f"services.{name}" for name in services}
    for name, service in services.items():
        for index, alias in enumerate(service.aliases):
            taken = owner.get(alias)
            if taken is not None and taken != f"services.{name}":
                ctx.at("services", name, "aliases", index).problem(
                    f'"{alias}" already names {taken}: an alias must name one service only'
                )
            owner.setdefault(alias, f"services.{name}.aliases")


def _ports_overlap(a: PortMapping, b: PortMapping) -> bool:
    if a.protocol != b.protocol or a.host_port is None or b.host_port is None:
        return False
    any_address = {"0.0.0.0", "::"}
    if a.host_ip != b.host_ip and a.host_ip not in any_address and b.host_ip not in any_address:
        return False
    a_end, b_end = a.host_port_end or a.host_port, b.host_port_end or b.host_port
    return a.host_port <= b_end and b.host_port <= a_end


def _check_subnet_size(subnet: str, services: dict[str, Service], ctx: Context) -> None:
    bridged = sum(1 for service in services.values() if service.network_mode.kind == "bridge")
    usable = ipaddress.ip_network(subnet).num_addresses - 3  # network, gateway, broadcast
    if bridged > usable:
        ctx.at("network", "subnet").problem(
            f"{subnet} has room for {usable} services, but {bridged} use the stack's network: pick a larger subnet"
        )
