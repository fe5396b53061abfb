"""How the spec layer reports what is wrong: `Invalid` for one value, `Problems` to gather them all."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

KeyPath = tuple[str | int, ...]


class Invalid(ValueError):
    """One value is wrong. `subpath` says where below the key being parsed (e.g. ("nofile", "soft"))."""

    def __init__(self, message: str, subpath: KeyPath = ()) -> None:
        super().__init__(message)
        self.message = message
        self.subpath = subpath


def format_path(path: KeyPath) -> str:
    """Render a key path the way a TOML user writes it: services.db.ports[0]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part and all(c.isascii() and (c.isalnum() or c in "_-") for c in part):  # a TOML bare key
            out += f".{part}" if out else part
        else:
            quoted = quote(part)
            out += f".{quoted}" if out else quoted
    return out


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def quote(text: str) -> str:
    """`text` as a TOML basic string: quotes, backslashes and control characters escaped."""
    out = "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text)
    return f'"{out}"'


def show(value: object) -> str:
    """A short, TOML-like rendering of a bad value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def type_name(value: object) -> str:
    """The TOML name of a value's type."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`' (did you mean "x"?)'` when a close match exists, else ''."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in choices}
        if word.lower() in lowered:
            matches = [lowered[word.lower()]]
    return f' (did you mean "{matches[0]}"?)' if matches else ""


def one_of(choices: Sequence[str]) -> str:
    """'"a", "b" or "c"'."""
    quoted = [f'"{c}"' for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
