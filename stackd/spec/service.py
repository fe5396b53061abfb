"""Parsing one `[services.NAME]` table: one function per key, and the checks across its keys.

Every parser takes the raw TOML value and a Context and returns the model value, or raises Invalid
(reported at the key's path) or reports element-level problems through the context.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from stackd.spec.capabilities import effective_capabilities, normalise_capability
from stackd.spec.context import Context
from stackd.spec.interpolate import parse_dotenv
from stackd.spec.models import (
    Condition,
    Dependency,
    Healthcheck,
    NetworkMode,
    PortMapping,
    RestartMode,
    RestartPolicy,
    Rootfs,
    SecurityOptions,
    Service,
    Sysctl,
    Tmpfs,
    Ulimit,
    User,
    Volume,
    frozen_map,
)
from stackd.spec.problems import Invalid, did_you_mean, one_of, show, type_name
from stackd.spec.signals import normalise_signal
from stackd.spec.sysctls import check_sysctl, normalise_sysctl_key
from stackd.spec.units import parse_duration, parse_size

__all__ = ["SERVICE_KEYS", "UNSUPPORTED_SERVICE_KEYS", "parse_service"]

MIN_MEMORY = 6 << 20  # Docker's minimum; below it the kernel OOM-kills almost anything at start
SERVICE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_HOSTNAME_LABEL = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
_ENV_NAME_BAD = re.compile(r"[=\x00]")
_USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*\$?$")
_FORBIDDEN_TARGETS = ("/proc", "/sys")


# --- small shared parsers -------------------------------------------------------------------------


def _expect(value: object, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool and (not isinstance(kind, tuple) or bool not in kind):
        raise Invalid(f"expected {what}, got {type_name(value)} ({show(value)})")
    if not isinstance(value, kind):
        raise Invalid(f"expected {what}, got {type_name(value)} ({show(value)})")
    return value


def _boolean(value: object, ctx: Context) -> bool:
    return cast(bool, _expect(value, bool, "true or false"))


def _string(value: object, ctx: Context) -> str:
    return cast(str, _expect(value, str, "a string"))


def _integer(value: object, what: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return cast(int, _expect(value, int, what))


def _string_list(value: object, ctx: Context, what: str = "an array of strings") -> list[str]:
    items = [value] if isinstance(value, str) else _expect(value, list, what)
    return ctx.each(items, lambda item, _ctx: cast(str, _expect(item, str, "a string")))


def _key_values(value: object, ctx: Context, what: str) -> dict[str, str]:
    """A table, or an array of "KEY=VALUE" strings (Compose's two spellings)."""
    result: dict[str, str] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, bool):
                result[key] = "true" if item else "false"
            elif isinstance(item, int | float | str):
                result[key] = str(item)
            else:
                ctx.problem(f"expected a string, number or boolean, got {type_name(item)}", (key,))
        return result
    for index, item in enumerate(_expect(value, list, f"a table or an array of {what} strings")):
        if not isinstance(item, str) or "=" not in item:
            ctx.problem(f'expected "{what}", got {show(item)}', (index,))
            continue
        key, _, val = item.partition("=")
        result[key] = val
    return result


def _container_path(value: object, what: str = "a path") -> str:
    """An absolute, normalised path inside the service; no "..", not /proc or /sys."""
    path = cast(str, _expect(value, str, what))
    if not path.startswith("/"):
        raise Invalid(f'{show(path)} is not an absolute path (write e.g. "/data")')
    if "\x00" in path or ".." in path.split("/"):
        raise Invalid(f'{show(path)} must not contain ".." or NUL characters')
    normal = "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading "//"
    if normal == "/":
        raise Invalid(f"{show(path)}: nothing can be mounted over the service's root")
    for forbidden in _FORBIDDEN_TARGETS:
        if normal == forbidden or normal.startswith(forbidden + "/"):
            raise Invalid(f"{show(path)} is under {forbidden}, which the kernel provides: mount elsewhere")
    return normal


def _working_dir(value: object) -> str:
    """An absolute directory inside the service; not under /proc (the CVE-2024-21626 trick)."""
    if value == "/":
        return "/"
    path = _at_root_or_below(value)
    for forbidden in _FORBIDDEN_TARGETS:
        if path == forbidden or path.startswith(forbidden + "/"):
            raise Invalid(f"{show(value)} is under {forbidden}: a working directory there can lead outside the root")
    return path


def _at_root_or_below(value: object) -> str:
    path = cast(str, _expect(value, str, "an absolute path"))
    if not path.startswith("/"):
        raise Invalid(f'{show(path)} is not an absolute path (write e.g. "/srv")')
    if "\x00" in path or ".." in path.split("/"):
        raise Invalid(f'{show(path)} must not contain ".." or NUL characters')
    return "/" + posixpath.normpath(path).lstrip("/")


def _host_path(value: str, ctx: Context) -> Path:
    if "\x00" in value:
        raise Invalid(f"{show(value)}: a path cannot contain NUL characters")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # "~user" for a user that does not exist, or no home directory
        raise Invalid(f"{show(value)}: cannot expand the ~ (no such user or home directory)") from None
    return path if path.is_absolute() else (ctx.base_dir / path).resolve()


# --- one parser per key ---------------------------------------------------------------------------


def _argv(value: object, ctx: Context) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as error:
            raise Invalid(f"cannot split {show(value)} like a shell would: {error}") from None
    else:
        argv = ctx.each(_expect(value, list, "a string or an array of strings"), _string)
    if any("\x00" in arg for arg in argv):
        raise Invalid("arguments cannot contain NUL characters")
    if not argv:
        raise Invalid("must not be empty")
    return tuple(argv)


def _environment(value: object, ctx: Context) -> dict[str, str]:
    if isinstance(value, list):
        # Compose: "KEY=VALUE", or a bare "KEY" taken from the environment stackd runs in.
        result: dict[str, str] = {}
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                ctx.problem(f'expected "KEY=VALUE" or "KEY", got {show(item)}', (index,))
            elif "=" in item:
                key, _, val = item.partition("=")
                result[key] = val
            elif item in ctx.env:
                result[item] = ctx.env[item]
        environment = result
    else:
        environment = _key_values(value, ctx, "KEY=VALUE")
    for key in environment:
        if not key or _ENV_NAME_BAD.search(key):
            ctx.problem(f'{show(key)} is not a variable name (no "=" and not empty)', (key,))
    return environment


def _env_files(value: object, ctx: Context) -> dict[str, str]:
    """Read every env_file in order (later files win); a missing file is an error unless required=false."""
    entries = [value] if isinstance(value, str | dict) else _expect(value, list, "a path or an array of paths")
    merged: dict[str, str] = {}
    for index, entry in enumerate(entries):
        inner = ctx.at(index) if isinstance(value, list) else ctx
        required = True
        if isinstance(entry, dict):
            unknown = set(entry) - {"path", "required"}
            if unknown:
                inner.problem(f'unknown key "{sorted(unknown)[0]}" (allowed: "path", "required")')
                continue
            required = entry.get("required", True)
            entry = entry.get("path")
        if not isinstance(entry, str) or not isinstance(required, bool):
            inner.problem(f'expected a path or {{ path = "...", required = false }}, got {show(entry)}')
            continue
        path = _host_path(entry, inner)
        try:
            text = path.read_text()
        except FileNotFoundError:
            if required:
                inner.problem(f"{path} does not exist (or write {{ path = ..., required = false }})")
            continue
        except OSError as error:
            inner.problem(f"cannot read {path}: {error.strerror}")
            continue
        except UnicodeDecodeError:
            inner.problem(f"cannot read {path}: it is not UTF-8 text")
            continue
        try:
            merged.update(parse_dotenv(text, ctx.env))
        except Invalid as error:
            inner.problem(f"{path}: {error.message}")
    return merged


def _user(value: object, ctx: Context) -> User:
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        text = cast(str, _expect(value, (str, int), 'a user name, uid, "uid:gid" or "name:group"'))
    user, sep, group = text.partition(":")
    parsed: list[str | int] = []
    for part, what in ((user, "user"), (group, "group")):
        if part.isascii() and part.isdigit():
            number = int(part)
            if number > 0xFFFFFFFE:
                raise Invalid(f"{part} is out of range for a {what} id (0 to 4294967294)")
            parsed.append(number)
        elif _USER_NAME.match(part):
            parsed.append(part)
        elif part or what == "user" or sep:
            raise Invalid(f'{show(text)} is not a user (write "name", "uid", "uid:gid" or "name:group")')
    return User(parsed[0], parsed[1] if len(parsed) > 1 else None)


def _hostname(value: object, ctx: Context) -> str:
    name = cast(str, _expect(value, str, "a host name"))
    if len(name) > 64 or not all(_HOSTNAME_LABEL.match(label) for label in name.split(".")):
        raise Invalid(
            f"{show(name)} is not a host name (letters, digits and '-', dot-separated labels of at most "
            "63 characters, 64 in all)"
        )
    return name


def _rootfs(value: object, ctx: Context) -> Rootfs:
    text = cast(str, _expect(value, str, '"host" or a directory'))
    if text == "host":
        return Rootfs()
    path = _host_path(text, ctx)
    if not path.is_dir():
        raise Invalid(f'{path} is not a directory (use "host" or a directory holding a root filesystem)')
    return Rootfs("directory", path)


def _volume(value: object, ctx: Context) -> Volume | Tmpfs:
    if isinstance(value, dict):
        return _volume_table(value, ctx)
    text = cast(str, _expect(value, str, '"SOURCE:TARGET[:ro]" or a table'))
    parts = text.split(":")
    if len(parts) == 1:
        raise Invalid(
            f'{show(text)} has no source: anonymous volumes are not supported; write "SOURCE:TARGET" '
            "or use tmpfs for scratch space"
        )
    if len(parts) > 3:
        raise Invalid(f'{show(text)} has too many ":" (write "SOURCE:TARGET[:ro|rw]")')
    source, target = parts[0], parts[1]
    options = parts[2].split(",") if len(parts) == 3 else []
    read_only = False
    for option in options:
        if option not in ("ro", "rw"):
            raise Invalid(f'{show(option)} is not a volume option (allowed: "ro", "rw")')
        read_only = option == "ro"
    return Volume(_bind_source(source, ctx), _container_path(target, "a target path"), read_only)


def _bind_source(source: str, ctx: Context) -> Path:
    if not source.startswith(("/", ".", "~")):
        raise Invalid(
            f'"{source}" looks like a named volume, which stackd does not have: write a path, e.g. '
            f'"./{source}" for a directory beside the stack file'
        )
    return _host_path(source, ctx)


_VOLUME_TABLE_KEYS = ("type", "source", "target", "read_only", "tmpfs")


def _volume_table(table: dict[str, Any], ctx: Context) -> Volume | Tmpfs:
    for key in table:
        if key not in _VOLUME_TABLE_KEYS:
            raise Invalid(f'unknown key "{key}"{did_you_mean(key, _VOLUME_TABLE_KEYS)}', (key,))
    kind = table.get("type", "bind")
    if kind not in ("bind", "tmpfs"):
        raise Invalid(f'{show(kind)} is not a volume type (allowed: "bind", "tmpfs")', ("type",))
    if "target" not in table:
        raise Invalid('a volume needs a "target"')
    target = _at(lambda: _container_path(table["target"]), "target")
    read_only = _at(lambda: _boolean(table.get("read_only", False), ctx), "read_only")
    if kind == "tmpfs":
        options = _at(lambda: _expect(table.get("tmpfs", {}), dict, "a table"), "tmpfs")
        for key in options:
            if key not in ("size", "mode"):
                raise Invalid(
                    f'unknown key "{key}"{did_you_mean(key, ("size", "mode"))} (allowed: "size", "mode")',
                    ("tmpfs", key),
                )
        size = _at(lambda: parse_size(options["size"]), "tmpfs", "size") if "size" in options else None
        mode = _at(lambda: _mode(options["mode"]), "tmpfs", "mode") if "mode" in options else None
        return Tmpfs(target, size, mode, ("ro",) if read_only else ())
    if "source" not in table:
        raise Invalid('a bind volume needs a "source"')
    source = _at(lambda: _bind_source(_string(table["source"], ctx), ctx), "source")
    return Volume(source, target, read_only)


def _at(parse: Callable[[], Any], *sub: str) -> Any:
    try:
        return parse()
    except Invalid as error:
        raise Invalid(error.message, sub + error.subpath) from None


_TMPFS_FLAGS = ("ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "relatime")


def _mode(value: object) -> int:
    """A file mode: a TOML integer is the mode itself (write 0o1777), a string is octal ("1777")."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 0o7777:
            raise Invalid(f'{value} is not a file mode (write 0o1777 or "1777")')
        return value
    text = str(value)
    if isinstance(value, bool) or not re.fullmatch(r"0?[0-7]{3,4}", text):
        raise Invalid(f'{show(value)} is not a file mode (write octal, e.g. "1777", "0755" or 0o755)')
    return int(text, 8)


def _tmpfs_entry(value: object, ctx: Context) -> Tmpfs:
    text = cast(str, _expect(value, str, '"/path[:size=64m,mode=1777,...]"'))
    target, _, raw = text.partition(":")
    size: int | None = None
    mode: int | None = None
    flags: list[str] = []
    for option in filter(None, raw.split(",")):
        name, eq, val = option.partition("=")
        if name == "size" and eq:
            size = parse_size(val)
        elif name == "mode" and eq:
            mode = _mode(val)
        elif name in _TMPFS_FLAGS and not eq:
            flags.append(name)
        else:
            raise Invalid(
                f"{show(option)} is not a tmpfs option (allowed: size=SIZE, mode=OCTAL, {', '.join(_TMPFS_FLAGS)})"
            )
    return Tmpfs(_container_path(target), size, mode, tuple(flags))


def _tmpfs(value: object, ctx: Context) -> list[Tmpfs]:
    items = [value] if isinstance(value, str) else _expect(value, list, "a path or an array of paths")
    return ctx.each(items, _tmpfs_entry)


_RESTART = re.compile(r"^(no|always|unless-stopped|on-failure)(?::(\d+))?$")


def _restart(value: object, ctx: Context) -> RestartPolicy:
    text = "no" if value is False else cast(str, _expect(value, str, "a restart policy"))
    match = _RESTART.match(text)
    if not match or (match.group(2) is not None and match.group(1) != "on-failure"):
        raise Invalid(
            f'{show(value)} is not a restart policy (allowed: "no", "always", "on-failure", '
            '"on-failure:N", "unless-stopped")'
        )
    retries = int(match.group(2)) if match.group(2) is not None else None
    return RestartPolicy(cast(RestartMode, match.group(1)), retries)


def _signal(value: object, ctx: Context) -> str:
    return normalise_signal(value)


def _duration(value: object, ctx: Context) -> float:
    return parse_duration(value)


def _cpus(value: object, ctx: Context) -> float:
    try:
        cpus = float(value) if isinstance(value, str) else float(_expect(value, (int, float), "a number"))
    except (ValueError, OverflowError):
        raise Invalid(f"{show(value)} is not a number of CPUs (e.g. 0.5 or 2)") from None
    if not 0 < cpus <= ctx.host_cpus:
        raise Invalid(
            f"{show(value)} is out of range: cpus must be more than 0 and at most {ctx.host_cpus} (this host's CPUs)"
        )
    return cpus


def _memory(value: object, ctx: Context) -> int:
    size = parse_size(value)
    if size < MIN_MEMORY:
        raise Invalid(f"{show(value)} is too small: the minimum is 6MiB")
    return size


def _memswap(value: object, ctx: Context) -> int:
    if value == -1 or value == "-1":
        return -1
    return parse_size(value)


def _pids(value: object, ctx: Context) -> int:
    pids = _integer(value, "a number of processes")
    if pids == 0 or pids < -1:
        raise Invalid(f"{pids} is not a pids limit (a positive number, or -1 for unlimited)")
    return pids


#: The rlimit names `ulimits` accepts (Docker's, without the RLIMIT_ prefix).
ULIMITS = (
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
)


def _rlimit_value(value: object) -> int:
    if value == "unlimited" or value == -1:
        return -1
    number = _integer(value, 'a number or "unlimited"')
    if number < 0:
        raise Invalid(f'{number} is not a limit (a number >= 0, or -1 / "unlimited")')
    return number


def _ulimits(value: object, ctx: Context) -> dict[str, Ulimit]:
    result: dict[str, Ulimit] = {}
    for name, raw in _expect(value, dict, "a table of limits").items():
        inner = ctx.at(name)
        if name not in ULIMITS:
            inner.problem(f'"{name}" is not a ulimit{did_you_mean(name, ULIMITS)} (allowed: {", ".join(ULIMITS)})')
            continue
        if isinstance(raw, dict):
            unknown = set(raw) - {"soft", "hard"}
            if unknown or not {"soft", "hard"} <= set(raw):
                inner.problem("expected { soft = N, hard = N } with both keys and no others")
                continue
            soft = inner.at("soft").attempt(_rlimit_value, raw["soft"])
            hard = inner.at("hard").attempt(_rlimit_value, raw["hard"])
        else:
            soft = hard = inner.attempt(_rlimit_value, raw)
        if soft is None or hard is None:
            continue
        if hard != -1 and (soft == -1 or soft > hard):
            inner.problem(f"soft limit {soft} is above the hard limit {hard}")
            continue
        result[name] = Ulimit(soft, hard)
    return result


def _sysctls(value: object, ctx: Context) -> dict[str, Sysctl]:
    """Keyed by the key as written, so later checks report it where the user wrote it."""
    result: dict[str, Sysctl] = {}
    for key, val in _key_values(value, ctx, "KEY=VALUE").items():
        parts = ctx.at(key).attempt(normalise_sysctl_key, key)
        if parts is not None:
            result[key] = Sysctl(parts, val)
    return result


def _capability_list(value: object, ctx: Context) -> list[str]:
    items = [value] if isinstance(value, str) else _expect(value, list, "an array of capability names")
    return ctx.each(items, lambda item, _ctx: normalise_capability(item))


_SECURITY_OPT_HELP = '"no-new-privileges", "no-new-privileges:false", "seccomp=unconfined", "seccomp=PATH"'


def _security_opt(value: object, ctx: Context) -> SecurityOptions:
    options = SecurityOptions()
    for index, item in enumerate(_expect(value, list, "an array of strings")):
        if not isinstance(item, str):
            ctx.problem(f"expected a string, got {type_name(item)}", (index,))
            continue
        name, _, arg = re.split(r"([=:])", item, maxsplit=1) if re.search(r"[=:]", item) else (item, "", "")
        if name == "no-new-privileges" and arg in ("", "true", "false"):
            options = SecurityOptions(arg != "false", options.seccomp)
        elif name == "seccomp" and arg:
            seccomp: Any = arg if arg in ("unconfined", "default") else ctx.at(index).attempt(_host_path, arg, ctx)
            if seccomp is None:
                continue
            if isinstance(seccomp, Path) and not seccomp.is_file():
                ctx.problem(f"seccomp profile {seccomp} does not exist", (index,))
                continue
            options = SecurityOptions(options.no_new_privileges, seccomp)
        elif name in ("apparmor", "label", "systempaths"):
            ctx.problem(
                f"{show(item)}: {name} options are not supported by stackd (allowed: {_SECURITY_OPT_HELP})",
                (index,),
            )
        else:
            ctx.problem(f"{show(item)} is not a security option (allowed: {_SECURITY_OPT_HELP})", (index,))
    return options


def _network_mode(value: object, ctx: Context) -> NetworkMode:
    text = cast(str, _expect(value, str, '"bridge", "none", "host" or "service:NAME"'))
    if text in ("bridge", "none", "host"):
        return NetworkMode(cast(Any, text))
    if text.startswith("service:") and text != "service:":
        return NetworkMode("service", text.removeprefix("service:"))
    if text.startswith("container:"):
        raise Invalid(f'{show(text)}: stackd has no containers by name; use "service:NAME"')
    raise Invalid(f'{show(text)} is not a network mode (allowed: "bridge", "none", "host", "service:NAME")')


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


def _port(value: object, ctx: Context) -> PortMapping:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, dict):
        return _port_table(value)
    text = cast(str, _expect(value, str, f"a port like {_PORT_HELP}"))
    match = _PORT.match(text)
    if not match:
        raise Invalid(f"{show(text)} is not a port mapping (e.g. {_PORT_HELP})")
    host_ip = match.group("ip6") or match.group("ip4") or "127.0.0.1"
    _check_ip(host_ip)
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


def _check_ip(text: str) -> None:
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
        _check_ip(host_ip)
    except Invalid as error:
        raise Invalid(error.message, ("host_ip",)) from None
    published = table.get("published")
    text = f"{published!s}:" if published is not None else ":"
    bracketed = f"[{host_ip}]" if ":" in host_ip else host_ip
    return _port(f"{bracketed}:{text}{table['target']}/{table.get('protocol', 'tcp')}", None)  # type: ignore[arg-type]


def _ports(value: object, ctx: Context) -> list[PortMapping]:
    return ctx.each(_expect(value, list, "an array of ports"), _port)


_CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


def _condition(value: object) -> Condition:
    text = cast(str, _expect(value, str, "a condition"))
    full = text if text.startswith("service_") else f"service_{text}"
    if full not in _CONDITIONS:
        raise Invalid(
            f"{show(text)} is not a condition{did_you_mean(full, _CONDITIONS)} (allowed: {one_of(_CONDITIONS)})"
        )
    return cast(Condition, full)


def _depends_on(value: object, ctx: Context) -> dict[str, Dependency]:
    if isinstance(value, list):
        names = ctx.each(value, _string)
        return {name: Dependency() for name in names}
    result: dict[str, Dependency] = {}
    for name, raw in _expect(value, dict, "an array of service names or a table").items():
        inner = ctx.at(name)
        if isinstance(raw, str):
            condition = inner.attempt(_condition, raw)
            if condition:
                result[name] = Dependency(condition)
            continue
        if not isinstance(raw, dict):
            inner.problem(f'expected a condition or {{ condition = "service_healthy" }}, got {type_name(raw)}')
            continue
        unknown = [key for key in raw if key not in ("condition", "required", "restart")]
        for key in unknown:
            inner.problem(f'unknown key "{key}"{did_you_mean(key, ("condition", "required", "restart"))}', (key,))
        condition = inner.at("condition").attempt(_condition, raw.get("condition", "service_started"))
        required = inner.at("required").attempt(_boolean, raw.get("required", True), inner)
        restart = inner.at("restart").attempt(_boolean, raw.get("restart", False), inner)
        if condition is not None and required is not None and restart is not None and not unknown:
            result[name] = Dependency(condition, required, restart)
    return result


_HEALTH_KEYS = ("test", "interval", "timeout", "retries", "start_period", "start_interval", "disable")


def _healthcheck(value: object, ctx: Context) -> Healthcheck | None:
    table = _expect(value, dict, "a table")
    for key in table:
        if key not in _HEALTH_KEYS:
            ctx.problem(
                f'unknown key "{key}"{did_you_mean(key, _HEALTH_KEYS)} (allowed: {one_of(_HEALTH_KEYS)})',
                (key,),
            )
    if ctx.at("disable").attempt(_boolean, table.get("disable", False), ctx):
        return None
    if "test" not in table:
        raise Invalid('a healthcheck needs a "test" (or disable = true)')
    test = ctx.at("test").attempt(_health_test, table["test"], ctx.at("test"))
    durations = {}
    for key, default, minimum in (
        ("interval", 30.0, 0.001),
        ("timeout", 30.0, 0.001),
        ("start_period", 0.0, 0.0),
        ("start_interval", 5.0, 0.001),
    ):
        seconds = ctx.at(key).attempt(parse_duration, table.get(key, default))
        if seconds is not None and seconds < minimum:
            ctx.problem(f"must be at least {minimum * 1000:g}ms", (key,))
        durations[key] = seconds
    retries = ctx.at("retries").attempt(_integer, table.get("retries", 3), "a number of retries")
    if retries is not None and retries < 1:
        ctx.problem(f"{retries} is not a number of retries (at least 1)", ("retries",))
    if test is None or retries is None or None in durations.values():
        return None
    argv, shell = test
    return Healthcheck(argv, shell, retries=retries, **cast(dict[str, float], durations))


def _health_test(value: object, ctx: Context) -> tuple[tuple[str, ...], bool] | None:
    if isinstance(value, str):
        if not value.strip():
            raise Invalid("must not be empty")
        return ("/bin/sh", "-c", value), True
    items = ctx.each(_expect(value, list, 'a string or ["CMD", ...] / ["CMD-SHELL", "..."]'), _string)
    if not items:
        raise Invalid("must not be empty")
    if items[0] == "NONE":
        return None
    if items[0] == "CMD-SHELL":
        if len(items) != 2:
            raise Invalid('["CMD-SHELL", "..."] takes exactly one command string')
        if not items[1].strip():
            raise Invalid("the CMD-SHELL command must not be empty")
        return ("/bin/sh", "-c", items[1]), True
    argv = items[1:] if items[0] == "CMD" else items
    if not argv:
        raise Invalid('["CMD"] needs a command after it')
    return tuple(argv), False


_CLOCKS = ("monotonic", "boottime")


def _time_offsets(value: object, ctx: Context) -> dict[str, float]:
    """Offsets of the service's CLOCK_MONOTONIC and CLOCK_BOOTTIME (a time namespace): durations, "-" allowed."""
    offsets: dict[str, float] = {}
    for clock, raw in _expect(value, dict, "a table { monotonic = DURATION, boottime = DURATION }").items():
        if clock not in _CLOCKS:
            ctx.problem(
                f'"{clock}" is not a clock{did_you_mean(clock, _CLOCKS)} (allowed: {one_of(_CLOCKS)})', (clock,)
            )
            continue
        negative = isinstance(raw, str) and raw.strip().startswith("-")
        text = raw.strip()[1:] if negative else raw
        seconds = ctx.at(clock).attempt(parse_duration, text)
        if seconds is not None:
            offsets[clock] = -seconds if negative else seconds
    return offsets


def _labels(value: object, ctx: Context) -> dict[str, str]:
    return _key_values(value, ctx, "KEY=VALUE")


# --- the table of keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """How one service key is parsed, and under which model field it lands."""

    parse: Callable[[Any, Context], Any]
    field: str


SERVICE_KEYS: dict[str, Key] = {
    "command": Key(_argv, "command"),
    "entrypoint": Key(_argv, "entrypoint"),
    "environment": Key(_environment, "environment"),
    "env_file": Key(_env_files, "env_file"),
    "working_dir": Key(lambda v, c: _working_dir(v), "working_dir"),
    "user": Key(_user, "user"),
    "hostname": Key(_hostname, "hostname"),
    "rootfs": Key(_rootfs, "rootfs"),
    "volumes": Key(lambda v, c: c.each(_expect(v, list, "an array of volumes"), _volume), "volumes"),
    "tmpfs": Key(_tmpfs, "tmpfs"),
    "read_only": Key(_boolean, "read_only"),
    "restart": Key(_restart, "restart"),
    "stop_signal": Key(_signal, "stop_signal"),
    "stop_grace_period": Key(_duration, "stop_grace_period"),
    "init": Key(_boolean, "init"),
    "cpus": Key(_cpus, "cpus"),
    "mem_limit": Key(_memory, "mem_limit"),
    "memswap_limit": Key(_memswap, "memswap_limit"),
    "pids_limit": Key(_pids, "pids_limit"),
    "ulimits": Key(_ulimits, "ulimits"),
    "sysctls": Key(_sysctls, "sysctls"),
    "cap_add": Key(_capability_list, "cap_add"),
    "cap_drop": Key(_capability_list, "cap_drop"),
    "security_opt": Key(_security_opt, "security_opt"),
    "network_mode": Key(_network_mode, "network_mode"),
    "ports": Key(_ports, "ports"),
    "depends_on": Key(_depends_on, "depends_on"),
    "healthcheck": Key(_healthcheck, "healthcheck"),
    "labels": Key(_labels, "labels"),
    "time_offsets": Key(_time_offsets, "time_offsets"),
}

#: Compose keys a user may bring along, with what to do instead.
UNSUPPORTED_SERVICE_KEYS: dict[str, str] = {
    "image": 'stackd runs no images: use rootfs = "host" (the default) or rootfs = "DIR" with a root filesystem',
    "build": 'stackd builds no images: use rootfs = "DIR" with a root filesystem you built',
    "container_name": "names are derived from the project and the service; use hostname for the host name",
    "deploy": "use cpus, mem_limit, memswap_limit and pids_limit directly on the service",
    "privileged": "grant what the service needs with cap_add and security_opt",
    "networks": 'each stack has one network; use network_mode for "none", "host" or "service:NAME"',
    "links": "not needed: every service resolves every other service of its stack by name",
    "expose": "not needed: services reach every port of each other on the stack's network",
    "devices": "device nodes are not supported yet",
    "logging": "stackd keeps every service's log itself (see docs/stack-file.md)",
    "secrets": "use volumes with read-only files",
    "configs": "use volumes with read-only files",
    "profiles": "name the services to start on the command line",
    "extends": "write the service out in full",
    "mem_reservation": "use mem_limit",
    "cpu_shares": "use cpus",
    "cpuset": "use cpus",
}


def parse_service(name: str, raw: object, ctx: Context) -> Service | None:
    """Build one Service from its table, reporting every problem through `ctx`. None when invalid."""
    if not isinstance(raw, dict):
        ctx.problem(f"expected a table [services.{name}], got {type_name(raw)}")
        return None
    if not SERVICE_NAME.match(name) or len(name) > 63:
        ctx.problem(
            f'"{name}" is not a service name (letters, digits, "_", "." and "-", starting with a '
            "letter or digit, at most 63 characters)"
        )
    before = len(ctx.findings.problems)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        inner = ctx.at(key)
        if key.startswith("x-"):
            continue  # Compose extension fields: free for the user, ignored by stackd
        spec = SERVICE_KEYS.get(key)
        if spec is None:
            if key in UNSUPPORTED_SERVICE_KEYS:
                inner.problem(f"not supported: {UNSUPPORTED_SERVICE_KEYS[key]}")
            else:
                allowed = sorted(SERVICE_KEYS)
                hint = did_you_mean(key, [*allowed, *UNSUPPORTED_SERVICE_KEYS])
                inner.problem(f'unknown key "{key}"{hint}; see docs/stack-file.md for the keys')
            continue
        parsed = inner.attempt(spec.parse, value, inner)
        if parsed is not None or key == "healthcheck":
            values[spec.field] = parsed
    _check_service(name, raw, values, ctx)
    if len(ctx.findings.problems) > before:
        return None
    return _build_service(name, values)


def _check_service(name: str, raw: dict[str, Any], values: dict[str, Any], ctx: Context) -> None:
    """Checks that need more than one key."""
    if "command" not in raw and "entrypoint" not in raw:
        ctx.problem("a service needs a command (or an entrypoint): stackd has no image to take one from")
    memory, memswap = values.get("mem_limit"), values.get("memswap_limit")
    if memswap is not None and memswap != -1:
        if memory is None:
            ctx.problem("memswap_limit needs mem_limit too (memswap_limit is memory plus swap)", ("memswap_limit",))
        elif memswap < memory:
            ctx.problem(
                f"{memswap} is below mem_limit ({memory}): memswap_limit counts memory plus swap, so it "
                "must be at least mem_limit (or -1 for unlimited swap)",
                ("memswap_limit",),
            )
    mode: NetworkMode = values.get("network_mode") or NetworkMode()
    for key, sysctl in values.get("sysctls", {}).items():
        ctx.at("sysctls", key).attempt(check_sysctl, sysctl.parts, str(mode))
    if values.get("ports") and mode.kind != "bridge":
        target = f" (publish them on service {mode.service})" if mode.service else ""
        ctx.problem(f'ports can be published only with network_mode = "bridge", not "{mode}"{target}', ("ports",))
    if mode.kind == "service" and mode.service == name:
        ctx.problem("a service cannot share its own network namespace", ("network_mode",))
    both = set(values.get("cap_add", [])) & set(values.get("cap_drop", [])) - {"ALL"}
    for cap in sorted(both):
        ctx.problem(f"{cap} is both added and dropped", ("cap_drop",))
    if set(values.get("cap_add", [])) & set(values.get("cap_drop", [])) == {"ALL"}:
        ctx.problem("ALL cannot be both added and dropped", ("cap_drop",))
    seen: dict[str, str] = {}
    for key in ("volumes", "tmpfs"):
        written = raw.get(key)
        if len(values.get(key, [])) != (len(written) if isinstance(written, list) else 1):
            continue  # an entry is invalid (and reported): the indices of the others would be wrong
        for index, mount in enumerate(values.get(key, [])):
            if mount.target in seen:
                ctx.problem(f"{mount.target} is already the target of {seen[mount.target]}", (key, index))
            seen[mount.target] = f"{key}[{index}]"


def _build_service(name: str, values: dict[str, Any]) -> Service:
    environment = dict(values.pop("env_file", {}))
    environment.update(values.pop("environment", {}))
    mounts = values.pop("volumes", [])
    volumes = [m for m in mounts if isinstance(m, Volume)]
    tmpfs = list(values.pop("tmpfs", [])) + [m for m in mounts if isinstance(m, Tmpfs)]
    return Service(
        name=name,
        environment=frozen_map(environment),  # type: ignore[arg-type]
        volumes=tuple(volumes),
        tmpfs=tuple(tmpfs),
        hostname=values.pop("hostname", None) or default_hostname(name),
        ulimits=frozen_map(values.pop("ulimits", {})),  # type: ignore[arg-type]
        sysctls=tuple(values.pop("sysctls", {}).values()),
        cap_add=tuple(values.pop("cap_add", ())),
        cap_drop=tuple(values.pop("cap_drop", ())),
        ports=tuple(values.pop("ports", ())),
        depends_on=frozen_map(values.pop("depends_on", {})),  # type: ignore[arg-type]
        labels=frozen_map(values.pop("labels", {})),  # type: ignore[arg-type]
        time_offsets=frozen_map(values.pop("time_offsets", {})),  # type: ignore[arg-type]
        **values,
    )


def default_hostname(service: str) -> str:
    """The service's name, made a valid host name ("my_db" -> "my-db")."""
    name = re.sub(r"[^a-zA-Z0-9-]", "-", service).strip("-")[:63]
    return name or "service"


def capabilities_of(service: Service) -> frozenset[str]:
    """The final capability set of a service (Docker's default 14, changed by cap_add / cap_drop)."""
    return effective_capabilities(service.cap_add, service.cap_drop)
