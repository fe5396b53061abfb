"""Sizes and durations written the way Docker Compose writes them."""

from __future__ import annotations

import math
import re

from stackd.spec.problems import Invalid, show

__all__ = ["MAX_DURATION", "format_duration", "format_size", "parse_duration", "parse_size"]

# Docker (go-units RAMInBytes) treats every unit as binary: "1g", "1gb" and "1GiB" are all 2**30.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
    "p": 1 << 50, "pb": 1 << 50, "pib": 1 << 50,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
SIZE_HINT = 'use e.g. "256MiB", "1g" or a number of bytes'


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as "256MiB", "1.5g", "512k"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise Invalid(f"{show(value)} is not a size ({SIZE_HINT})")
    if isinstance(value, int):
        if value < 0:
            raise Invalid(f"{value} is not a size: sizes are not negative")
        return value
    match = _SIZE_RE.match(value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise Invalid(f"{show(value)} is not a size ({SIZE_HINT})")
    number, unit = match.groups()
    size = float(number) * _SIZE_UNITS[unit.lower()]
    if not math.isfinite(size):
        raise Invalid(f"{show(value)} is too large to be a size")
    return int(size)


def format_size(size: int) -> int | str:
    """The shortest exact spelling of a size: "256MiB" when it divides evenly, else the integer."""
    for unit, factor in (
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return size


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
DURATION_HINT = 'use e.g. "1.5s", "2m30s", "500ms" or a number of seconds'
MAX_DURATION = 2562047 * 3600.0  # 2562047h: Go's time.Duration (int64 nanoseconds) holds a little more


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a Go duration string ("1.5s", "2m30s", "1h", "250ms").

    Rounded to whole nanoseconds and at most Go's longest duration, as Compose has them, so that
    format_duration writes back exactly the same number.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Invalid(f"{show(value)} is not a duration ({DURATION_HINT})")
    if isinstance(value, int | float):
        if not value >= 0:  # negative, or NaN
            raise Invalid(f"{show(value)} is not a duration: durations are finite and not negative")
        seconds = float(value) if value <= MAX_DURATION else math.inf
    else:
        seconds = _parse_duration_text(value)
    if seconds > MAX_DURATION:
        raise Invalid(f"{show(value)} is too long for a duration (at most {format_duration(MAX_DURATION)})")
    return round(seconds, 9)


def _parse_duration_text(value: str) -> float:
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match:
            raise Invalid(f"{show(value)} is not a duration ({DURATION_HINT})")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise Invalid(f"{show(value)} is not a duration ({DURATION_HINT})")
    return total


def format_duration(seconds: float) -> str:
    """The Go spelling of a duration: 90.0 -> "1m30s", 0.5 -> "500ms", 1.25 -> "1.25s"."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        for unit, factor in (("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
            scaled = round(seconds / factor, 6)
            if scaled >= 1:
                return _trim(scaled) + unit
        return _trim(seconds) + "s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if minutes or hours:
        out += f"{int(minutes)}m"
    return out + _trim(round(secs, 9)) + "s"


def _trim(number: float) -> str:
    return f"{number:.9f}".rstrip("0").rstrip(".")
