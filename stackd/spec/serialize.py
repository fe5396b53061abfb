"""A validated Stack back to a plain document: what `stackd config` prints.

The output is itself a valid stack file that loads to the same Stack: defaults are filled in, paths
are absolute, interpolation is done (a literal "$" is written "$$" so it survives a second load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stackd.spec.models import Service, Stack, Tmpfs, Volume
from stackd.spec.units import format_duration, format_size

__all__ = ["stack_to_dict"]


def stack_to_dict(stack: Stack, services: list[str] | None = None) -> dict[str, Any]:
    """The resolved stack as TOML/JSON-ready data, optionally limited to some services."""
    document: dict[str, Any] = {"name": stack.name}
    network: dict[str, Any] = {}
    if stack.network.subnet:
        network["subnet"] = stack.network.subnet
    if stack.network.outbound:
        network["outbound"] = True
    if network:
        document["network"] = network
    document["services"] = {
        name: _service(service) for name, service in stack.services.items() if services is None or name in services
    }
    escaped: dict[str, Any] = _escape(document)
    return escaped


def _service(service: Service) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if service.entrypoint is not None:
        out["entrypoint"] = list(service.entrypoint)
    if service.command is not None:
        out["command"] = list(service.command)
    if service.environment:
        out["environment"] = dict(service.environment)
    if service.working_dir:
        out["working_dir"] = service.working_dir
    if service.user is not None:
        out["user"] = str(service.user)
    out["hostname"] = service.hostname
    if service.aliases:
        out["aliases"] = list(service.aliases)
    if service.extra_hosts:
        out["extra_hosts"] = dict(service.extra_hosts)
    out["rootfs"] = str(service.rootfs)
    if service.volumes:
        out["volumes"] = [_volume(v) for v in service.volumes]
    if service.tmpfs:
        out["tmpfs"] = [_tmpfs(t) for t in service.tmpfs]
    out["read_only"] = service.read_only
    out["restart"] = str(service.restart)
    backoff = service.restart_backoff
    out["restart_backoff"] = {
        "initial": format_duration(backoff.initial),
        "factor": backoff.factor,
        "maximum": format_duration(backoff.maximum),
        "reset_after": format_duration(backoff.reset_after),
    }
    out["stop_signal"] = service.stop_signal
    out["stop_grace_period"] = format_duration(service.stop_grace_period)
    out["init"] = service.init
    if service.cpus is not None:
        out["cpus"] = service.cpus
    if service.mem_limit is not None:
        out["mem_limit"] = format_size(service.mem_limit)
    if service.memswap_limit is not None:
        out["memswap_limit"] = -1 if service.memswap_limit == -1 else format_size(service.memswap_limit)
    if service.pids_limit is not None:
        out["pids_limit"] = service.pids_limit
    if service.ulimits:
        out["ulimits"] = {name: {"soft": u.soft, "hard": u.hard} for name, u in service.ulimits.items()}
    if service.sysctls:
        out["sysctls"] = {
            "/".join(s.parts) if any("." in p for p in s.parts) else s.key: s.value for s in service.sysctls
        }
    if service.cap_add:
        out["cap_add"] = list(service.cap_add)
    if service.cap_drop:
        out["cap_drop"] = list(service.cap_drop)
    security = service.security_opt
    out["security_opt"] = [
        f"no-new-privileges:{'true' if security.no_new_privileges else 'false'}",
        f"seccomp={security.seccomp}",
    ]
    out["network_mode"] = str(service.network_mode)
    if service.ports:
        out["ports"] = [str(p) for p in service.ports]
    if service.depends_on:
        out["depends_on"] = {
            name: {"condition": d.condition, "required": d.required, "restart": d.restart}
            for name, d in service.depends_on.items()
        }
    if service.healthcheck is not None:
        check = service.healthcheck
        test = ["CMD-SHELL", check.test[2]] if check.shell else ["CMD", *check.test]
        out["healthcheck"] = {
            "test": test,
            "interval": format_duration(check.interval),
            "timeout": format_duration(check.timeout),
            "retries": check.retries,
            "start_period": format_duration(check.start_period),
            "start_interval": format_duration(check.start_interval),
            "on_unhealthy": check.on_unhealthy,
        }
    if service.labels:
        out["labels"] = dict(service.labels)
    if service.userns_mode != "host":
        out["userns_mode"] = service.userns_mode
    if service.time_offsets:
        out["time_offsets"] = {
            clock: ("-" if seconds < 0 else "") + format_duration(abs(seconds))
            for clock, seconds in service.time_offsets.items()
        }
    return out


def _volume(volume: Volume) -> str | dict[str, Any]:
    if ":" in str(volume.source) or ":" in volume.target:
        return {
            "type": "bind",
            "source": str(volume.source),
            "target": volume.target,
            "read_only": volume.read_only,
        }
    return f"{volume.source}:{volume.target}" + (":ro" if volume.read_only else "")


def _tmpfs(tmpfs: Tmpfs) -> str:
    options = list(tmpfs.options)
    if tmpfs.size is not None:
        options.append(f"size={format_size(tmpfs.size)}")
    if tmpfs.mode is not None:
        options.append(f"mode={tmpfs.mode:o}")
    return tmpfs.target + (":" + ",".join(options) if options else "")


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, Path):
        return str(value).replace("$", "$$")
    if isinstance(value, dict):
        return {key: _escape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape(item) for item in value]
    return value
