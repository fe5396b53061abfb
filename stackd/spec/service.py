"""Parsing one `[services.NAME]` table: the table of keys, the checks across keys, and the parsers of
the process, resource and security keys. The others live beside it: `volumes` and `tmpfs` in mounts.py,
`ports` in ports.py, `restart`, `depends_on` and `healthcheck` in lifecycle.py, shared parsers in values.py.

Every parser takes the raw TOML value and a Context and returns the model value, or raises Invalid
(reported at the key's path) or reports element-level problems through the context.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from stackd.spec.capabilities import effective_capabilities, normalise_capability
from stackd.spec.context import Context
from stackd.spec.interpolate import parse_dotenv
from stackd.spec.lifecycle import depends_on, healthcheck, restart, restart_backoff
from stackd.spec.models import (
    NetworkMode,
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
from stackd.spec.mounts import tmpfs_list, volume
from stackd.spec.ports import ports
from stackd.spec.problems import Invalid, did_you_mean, one_of, show, type_name
from stackd.spec.signals import normalise_signal
from stackd.spec.sysctls import check_sysctl, normalise_sysctl_key
from stackd.spec.units import parse_duration, parse_size
from stackd.spec.values import boolean, expect, host_path, integer, key_values, string, working_dir_path

__all__ = ["SERVICE_KEYS", "UNSUPPORTED_SERVICE_KEYS", "parse_service"]

MIN_MEMORY = 6 << 20  # Docker's minimum; below it the kernel OOM-kills almost anything at start
SERVICE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_HOSTNAME_LABEL = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
_ENV_NAME_BAD = re.compile(r"[=\x00]")
_USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*\$?$")


# --- one parser per key ---------------------------------------------------------------------------


def _argv(value: object, ctx: Context) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as error:
            raise Invalid(f"cannot split {show(value)} like a shell would: {error}") from None
    else:
        argv = ctx.each(expect(value, list, "a string or an array of strings"), string)
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
        environment = key_values(value, ctx, "KEY=VALUE")
    for key in environment:
        if not key or _ENV_NAME_BAD.search(key):
            ctx.problem(f'{show(key)} is not a variable name (no "=" and not empty)', (key,))
    return environment


def _env_files(value: object, ctx: Context) -> dict[str, str]:
    """Read every env_file in order (later files win); a missing file is an error unless required=false."""
    entries = [value] if isinstance(value, str | dict) else expect(value, list, "a path or an array of paths")
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
        path = host_path(entry, inner)
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
        text = cast(str, expect(value, (str, int), 'a user name, uid, "uid:gid" or "name:group"'))
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
    name = cast(str, expect(value, str, "a host name"))
    if len(name) > 64 or not all(_HOSTNAME_LABEL.match(label) for label in name.split(".")):
        raise Invalid(
            f"{show(name)} is not a host name (letters, digits and '-', dot-separated labels of at most "
            "63 characters, 64 in all)"
        )
    return name


def _aliases(value: object, ctx: Context) -> tuple[str, ...]:
    names = ctx.each(expect(value, list, "an array of host names"), _hostname)
    return tuple(dict.fromkeys(names))


def _extra_hosts(value: object, ctx: Context) -> dict[str, str]:
    """Compose's `extra_hosts`: ["name:1.2.3.4", ...], ["name=1.2.3.4"] or { name = "1.2.3.4" }."""
    if isinstance(value, list):
        pairs: dict[str, object] = {}
        for index, item in enumerate(value):
            if not isinstance(item, str) or not re.match(r"^[^:=]+[:=].+$", item):
                ctx.problem(f'expected "NAME:ADDRESS", got {show(item)}', (index,))
                continue
            name, _, address = re.split(r"([:=])", item, maxsplit=1)
            pairs[name] = address.strip("[]")
    else:
        pairs = dict(expect(value, dict, 'a table { NAME = "ADDRESS" } or an array of "NAME:ADDRESS" strings'))
    hosts: dict[str, str] = {}
    for name, address in pairs.items():
        if ctx.at(name).attempt(_hostname, name, ctx) is None:
            continue
        if not isinstance(address, str):
            ctx.problem(f"expected an IP address, got {type_name(address)}", (name,))
            continue
        if address == "host-gateway":
            hosts[name] = address  # the stack's gateway: the host as the service reaches it
            continue
        try:
            hosts[name] = str(ipaddress.ip_address(address))
        except ValueError:
            ctx.problem(f'{show(address)} is not an IP address (or "host-gateway")', (name,))
    return hosts


def _rootfs(value: object, ctx: Context) -> Rootfs:
    text = cast(str, expect(value, str, '"host" or a directory'))
    if text == "host":
        return Rootfs()
    path = host_path(text, ctx)
    if not path.is_dir():
        raise Invalid(f'{path} is not a directory (use "host" or a directory holding a root filesystem)')
    return Rootfs("directory", path)


def _signal(value: object, ctx: Context) -> str:
    return normalise_signal(value)


def _duration(value: object, ctx: Context) -> float:
    return parse_duration(value)


def _cpus(value: object, ctx: Context) -> float:
    try:
        cpus = float(value) if isinstance(value, str) else float(expect(value, (int, float), "a number"))
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
    pids = integer(value, "a number of processes")
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
    number = integer(value, 'a number or "unlimited"')
    if number < 0:
        raise Invalid(f'{number} is not a limit (a number >= 0, or -1 / "unlimited")')
    return number


def _ulimits(value: object, ctx: Context) -> dict[str, Ulimit]:
    result: dict[str, Ulimit] = {}
    for name, raw in expect(value, dict, "a table of limits").items():
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
    for key, val in key_values(value, ctx, "KEY=VALUE").items():
        parts = ctx.at(key).attempt(normalise_sysctl_key, key)
        if parts is not None:
            result[key] = Sysctl(parts, val)
    return result


def _capability_list(value: object, ctx: Context) -> list[str]:
    items = [value] if isinstance(value, str) else expect(value, list, "an array of capability names")
    return ctx.each(items, lambda item, _ctx: normalise_capability(item))


_SECURITY_OPT_HELP = '"no-new-privileges", "no-new-privileges:false", "seccomp=unconfined", "seccomp=PATH"'


def _security_opt(value: object, ctx: Context) -> SecurityOptions:
    options = SecurityOptions()
    for index, item in enumerate(expect(value, list, "an array of strings")):
        if not isinstance(item, str):
            ctx.problem(f"expected a string, got {type_name(item)}", (index,))
            continue
        name, _, arg = re.split(r"([=:])", item, maxsplit=1) if re.search(r"[=:]", item) else (item, "", "")
        if name == "no-new-privileges" and arg in ("", "true", "false"):
            options = SecurityOptions(arg != "false", options.seccomp)
        elif name == "seccomp" and arg:
            seccomp: Any = arg if arg in ("unconfined", "default") else ctx.at(index).attempt(host_path, arg, ctx)
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
    text = cast(str, expect(value, str, '"bridge", "none", "host" or "service:NAME"'))
    if text in ("bridge", "none", "host"):
        return NetworkMode(cast(Any, text))
    if text.startswith("service:") and text != "service:":
        return NetworkMode("service", text.removeprefix("service:"))
    if text.startswith("container:"):
        raise Invalid(f'{show(text)}: stackd has no containers by name; use "service:NAME"')
    raise Invalid(f'{show(text)} is not a network mode (allowed: "bridge", "none", "host", "service:NAME")')


def _userns_mode(value: object, ctx: Context) -> str:
    """ "host" (the default, Compose's only value) or "private": root inside maps to an unprivileged range."""
    if value not in ("host", "private"):
        raise Invalid(f'{show(value)} is not a user namespace mode (allowed: "host", "private")')
    return value


_CLOCKS = ("monotonic", "boottime")


def _time_offsets(value: object, ctx: Context) -> dict[str, float]:
    """Offsets of the service's CLOCK_MONOTONIC and CLOCK_BOOTTIME (a time namespace): durations, "-" allowed."""
    offsets: dict[str, float] = {}
    for clock, raw in expect(value, dict, "a table { monotonic = DURATION, boottime = DURATION }").items():
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
    return key_values(value, ctx, "KEY=VALUE")


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
    "working_dir": Key(lambda v, c: working_dir_path(v), "working_dir"),
    "user": Key(_user, "user"),
    "hostname": Key(_hostname, "hostname"),
    "aliases": Key(_aliases, "aliases"),
    "extra_hosts": Key(_extra_hosts, "extra_hosts"),
    "rootfs": Key(_rootfs, "rootfs"),
    "volumes": Key(lambda v, c: c.each(expect(v, list, "an array of volumes"), volume), "volumes"),
    "tmpfs": Key(tmpfs_list, "tmpfs"),
    "read_only": Key(boolean, "read_only"),
    "restart": Key(restart, "restart"),
    "restart_backoff": Key(restart_backoff, "restart_backoff"),
    "stop_signal": Key(_signal, "stop_signal"),
    "stop_grace_period": Key(_duration, "stop_grace_period"),
    "init": Key(boolean, "init"),
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
    "ports": Key(ports, "ports"),
    "depends_on": Key(depends_on, "depends_on"),
    "healthcheck": Key(healthcheck, "healthcheck"),
    "labels": Key(_labels, "labels"),
    "time_offsets": Key(_time_offsets, "time_offsets"),
    "userns_mode": Key(_userns_mode, "userns_mode"),
}

#: Compose keys a user may bring along, with what to do instead.
UNSUPPORTED_SERVICE_KEYS: dict[str, str] = {
    "image": 'stackd runs no images: use rootfs = "host" (the default) or rootfs = "DIR" with a root filesystem',
    "build": 'stackd builds no images: use rootfs = "DIR" with a root filesystem you built',
    "container_name": "names are derived from the project and the service; use hostname for the host name",
    "deploy": "use cpus, mem_limit, memswap_limit and pids_limit directly on the service",
    "privileged": "grant what the service needs with cap_add and security_opt",
    "networks": 'each stack has one network; use network_mode for "none", "host" or "service:NAME"',
    "links": "not needed: every service resolves every other service of its stack by name (and its aliases)",
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
        extra_hosts=frozen_map(values.pop("extra_hosts", {})),  # type: ignore[arg-type]
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
