"""`volumes` and `tmpfs`: bind mounts from the host and tmpfs mounts, with their options."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

from stackd.spec.context import Context
from stackd.spec.models import Tmpfs, Volume
from stackd.spec.problems import Invalid, did_you_mean, show
from stackd.spec.units import parse_size
from stackd.spec.values import at, boolean, container_path, expect, host_path, string


def volume(value: object, ctx: Context) -> Volume | Tmpfs:
    if isinstance(value, dict):
        return _volume_table(value, ctx)
    text = cast(str, expect(value, str, '"SOURCE:TARGET[:ro]" or a table'))
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
    return Volume(_bind_source(source, ctx), container_path(target, "a target path"), read_only)


def _bind_source(source: str, ctx: Context) -> Path:
    if not source.startswith(("/", ".", "~")):
        raise Invalid(
            f'"{source}" looks like a named volume, which stackd does not have: write a path, e.g. '
            f'"./{source}" for a directory beside the stack file'
        )
    return host_path(source, ctx)


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
    target = at(lambda: container_path(table["target"]), "target")
    read_only = at(lambda: boolean(table.get("read_only", False), ctx), "read_only")
    if kind == "tmpfs":
        options = at(lambda: expect(table.get("tmpfs", {}), dict, "a table"), "tmpfs")
        for key in options:
            if key not in ("size", "mode"):
                raise Invalid(
                    f'unknown key "{key}"{did_you_mean(key, ("size", "mode"))} (allowed: "size", "mode")',
                    ("tmpfs", key),
                )
        size = at(lambda: parse_size(options["size"]), "tmpfs", "size") if "size" in options else None
        mode = at(lambda: _mode(options["mode"]), "tmpfs", "mode") if "mode" in options else None
        return Tmpfs(target, size, mode, ("ro",) if read_only else ())
    if "source" not in table:
        raise Invalid('a bind volume needs a "source"')
    source = at(lambda: _bind_source(string(table["source"], ctx), ctx), "source")
    return Volume(source, target, read_only)


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
    text = cast(str, expect(value, str, '"/path[:size=64m,mode=1777,...]"'))
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
    return Tmpfs(container_path(target), size, mode, tuple(flags))


def tmpfs_list(value: object, ctx: Context) -> list[Tmpfs]:
    items = [value] if isinstance(value, str) else expect(value, list, "a path or an array of paths")
    return ctx.each(items, _tmpfs_entry)
