"""Small parsers shared by the stack file's keys: types, key/value lists, paths inside and outside."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from stackd.spec.context import Context
from stackd.spec.problems import Invalid, show, type_name

FORBIDDEN_TARGETS = ("/proc", "/sys")


def expect(value: object, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool and (not isinstance(kind, tuple) or bool not in kind):
        raise Invalid(f"expected {what}, got {type_name(value)} ({show(value)})")
    if not isinstance(value, kind):
        raise Invalid(f"expected {what}, got {type_name(value)} ({show(value)})")
    return value


def boolean(value: object, ctx: Context) -> bool:
    return cast(bool, expect(value, bool, "true or false"))


def string(value: object, ctx: Context) -> str:
    return cast(str, expect(value, str, "a string"))


def integer(value: object, what: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return cast(int, expect(value, int, what))


def string_list(value: object, ctx: Context, what: str = "an array of strings") -> list[str]:
    items = [value] if isinstance(value, str) else expect(value, list, what)
    return ctx.each(items, lambda item, _ctx: cast(str, expect(item, str, "a string")))


def key_values(value: object, ctx: Context, what: str) -> dict[str, str]:
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
    for index, item in enumerate(expect(value, list, f"a table or an array of {what} strings")):
        if not isinstance(item, str) or "=" not in item:
            ctx.problem(f'expected "{what}", got {show(item)}', (index,))
            continue
        key, _, val = item.partition("=")
        result[key] = val
    return result


def container_path(value: object, what: str = "a path") -> str:
    """An absolute, normalised path inside the service; no "..", not /proc or /sys."""
    path = cast(str, expect(value, str, what))
    if not path.startswith("/"):
        raise Invalid(f'{show(path)} is not an absolute path (write e.g. "/data")')
    if "\x00" in path or ".." in path.split("/"):
        raise Invalid(f'{show(path)} must not contain ".." or NUL characters')
    normal = "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading "//"
    if normal == "/":
        raise Invalid(f"{show(path)}: nothing can be mounted over the service's root")
    for forbidden in FORBIDDEN_TARGETS:
        if normal == forbidden or normal.startswith(forbidden + "/"):
            raise Invalid(f"{show(path)} is under {forbidden}, which the kernel provides: mount elsewhere")
    return normal


def working_dir_path(value: object) -> str:
    """An absolute directory inside the service; not under /proc (the CVE-2024-21626 trick)."""
    if value == "/":
        return "/"
    path = _at_root_or_below(value)
    for forbidden in FORBIDDEN_TARGETS:
        if path == forbidden or path.startswith(forbidden + "/"):
            raise Invalid(f"{show(value)} is under {forbidden}: a working directory there can lead outside the root")
    return path


def _at_root_or_below(value: object) -> str:
    path = cast(str, expect(value, str, "an absolute path"))
    if not path.startswith("/"):
        raise Invalid(f'{show(path)} is not an absolute path (write e.g. "/srv")')
    if "\x00" in path or ".." in path.split("/"):
        raise Invalid(f'{show(path)} must not contain ".." or NUL characters')
    return "/" + posixpath.normpath(path).lstrip("/")


def host_path(value: str, ctx: Context) -> Path:
    if "\x00" in value:
        raise Invalid(f"{show(value)}: a path cannot contain NUL characters")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # "~user" for a user that does not exist, or no home directory
        raise Invalid(f"{show(value)}: cannot expand the ~ (no such user or home directory)") from None
    return path if path.is_absolute() else (ctx.base_dir / path).resolve()


def at(parse: Callable[[], Any], *sub: str) -> Any:
    try:
        return parse()
    except Invalid as error:
        raise Invalid(error.message, sub + error.subpath) from None
