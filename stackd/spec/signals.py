"""Signal names as Compose writes them ("SIGTERM", "TERM", "sigint", 15)."""

from __future__ import annotations

import signal

from stackd.spec.problems import Invalid, did_you_mean, show

__all__ = ["normalise_signal", "signal_number"]

_BY_NAME = {s.name: s for s in signal.Signals if not s.name.startswith("SIG_")}
_EXAMPLES = "SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1"


def normalise_signal(value: object) -> str:
    """The canonical name ("SIGTERM") of a signal given by name, short name or number."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value).name
        except ValueError:
            raise Invalid(f"{value} is not a signal number (e.g. {_EXAMPLES})") from None
    if not isinstance(value, str):
        raise Invalid(f"{show(value)} is not a signal (e.g. {_EXAMPLES})")
    name = value.strip().upper()
    if name.isascii() and name.isdigit():
        return normalise_signal(int(name))
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in _BY_NAME:
        raise Invalid(f"{show(value)} is not a signal{did_you_mean(name, _BY_NAME)} (e.g. {_EXAMPLES})")
    return name


def signal_number(name: str) -> int:
    """The number of a canonical signal name."""
    return int(_BY_NAME[name])
