"""What the verbs that drive a running stack share: which project, the connection, tables and units."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stackd.cli.config_verbs import stack_file
from stackd.errors import StackdError
from stackd.runtime.paths import StackPaths
from stackd.spec import load_stack
from stackd.spec.project import validate_project_name
from stackd.supervisor.control import ControlClient


def project_paths(args: argparse.Namespace) -> StackPaths:
    """The project named by -p (or $STACKD_PROJECT_NAME), else by the stack file."""
    if args.project_name:
        from stackd.spec.problems import Invalid

        try:
            return StackPaths(validate_project_name(args.project_name))
        except Invalid as error:
            raise StackdError(f"-p: {error.message}") from None
    return StackPaths(load_stack(stack_file(args)).name)


def connect(args: argparse.Namespace) -> ControlClient:
    """A connection to the project's supervisor; a clear StackdError when it is not up or died."""
    return ControlClient.connect(project_paths(args))


class UsageError(StackdError):
    exit_code = 2


def table(rows: Sequence[Sequence[object]], titles: Sequence[str]) -> str:
    """Columns padded to their widest cell, two spaces apart (the last one not padded)."""
    cells = [[str(c) for c in titles], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(titles))]
    lines = []
    for row in cells:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{size}B"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole // 60 % 60:02d}m"
    return f"{whole // 86400}d{whole // 3600 % 24:02d}h"


def warn(message: str) -> None:
    print(f"stackd: {message}", file=sys.stderr)
