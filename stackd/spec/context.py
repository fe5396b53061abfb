"""The state a parser needs while it walks one stack file: where it is and where problems go."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from stackd.spec.problems import Invalid, KeyPath

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Findings:
    """Every problem and warning found in one file, in the order found."""

    problems: list[tuple[KeyPath, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Context:
    """Where a parser is (`path`) and what it may consult: the stack file's directory for relative
    paths, the environment for pass-through variables, and the host's CPU count for `cpus`."""

    findings: Findings
    base_dir: Path
    env: Mapping[str, str]
    host_cpus: int
    path: KeyPath = ()

    def at(self, *sub: str | int) -> Context:
        """The same context one or more keys deeper."""
        return Context(self.findings, self.base_dir, self.env, self.host_cpus, self.path + sub)

    def problem(self, message: str, subpath: KeyPath = ()) -> None:
        self.findings.problems.append((self.path + subpath, message))

    def warn(self, message: str) -> None:
        self.findings.warnings.append(message)

    def attempt(self, parse: Callable[..., R], *args: Any) -> R | None:
        """Run `parse(*args)`; report an Invalid it raises here and return None instead."""
        try:
            return parse(*args)
        except Invalid as error:
            self.problem(error.message, error.subpath)
            return None

    def each(self, items: Iterable[T], parse: Callable[[T, Context], R]) -> list[R]:
        """Parse every element of an array, reporting each bad one at its own index."""
        results: list[R] = []
        for index, item in enumerate(items):
            inner = self.at(index)
            value = inner.attempt(parse, item, inner)
            if value is not None:
                results.append(value)
        return results
