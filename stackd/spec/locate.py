"""Best-effort line numbers for key paths in a TOML document (tomllib keeps no positions)."""

from __future__ import annotations

import re

from stackd.spec.problems import KeyPath

__all__ = ["KeyLines"]

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_BASIC = re.compile(r'"((?:[^"\\]|\\.)*)"')
_LITERAL = re.compile(r"'([^']*)'")


def _read_key(text: str, pos: int) -> tuple[list[str], int] | None:
    """Read a dotted key at `pos`; return its parts and the position after it."""
    parts: list[str] = []
    while True:
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        for pattern in (_BARE, _BASIC, _LITERAL):
            match = pattern.match(text, pos)
            if match:
                part = match.group(1) if match.groups() else match.group()
                if pattern is _BASIC:
                    part = part.encode().decode("unicode_escape") if "\\" in part else part
                parts.append(part)
                pos = match.end()
                break
        else:
            return None
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == ".":
            pos += 1
            continue
        return parts, pos


class KeyLines:
    """Maps key paths to the 1-based line where they are defined, scanning headers and `key =` lines.

    Inline tables and arrays map to the line of their key; array-of-tables entries get their index.
    """

    def __init__(self, source: str) -> None:
        self._lines: dict[tuple[str | int, ...], int] = {}
        table: tuple[str | int, ...] = ()
        counts: dict[tuple[str | int, ...], int] = {}
        in_multiline: str | None = None
        for number, line in enumerate(source.splitlines(), start=1):
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            stripped = line.strip()
            if stripped.startswith("[["):
                parsed = _read_key(stripped, 2)
                if parsed:
                    base = tuple(parsed[0])
                    counts[base] = counts.get(base, -1) + 1
                    table = (*base, counts[base])
                    self._define(base, number)
                    self._lines[table] = number
                continue
            if stripped.startswith("["):
                parsed = _read_key(stripped, 1)
                if parsed:
                    table = tuple(parsed[0])
                    self._define(table, number)
                continue
            parsed = _read_key(stripped, 0)
            if parsed and parsed[1] < len(stripped) and stripped[parsed[1]] == "=":
                self._define((*table, *parsed[0]), number)
                for quote in ('"""', "'''"):
                    if stripped.count(quote) % 2 == 1:
                        in_multiline = quote

    def _define(self, key: tuple[str | int, ...], number: int) -> None:
        """Record the first line of `key` and of every table it implies ([a.b] defines a, too)."""
        for end in range(1, len(key) + 1):
            self._lines.setdefault(key[:end], number)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of the longest known prefix of `path`, or None."""
        for end in range(len(path), 0, -1):
            line = self._lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None
