"""The services' output on the terminal: `name | line`, a stable colour per service."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TextIO

import anyio
import anyio.abc

_COLOURS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)  # cyan yellow green magenta blue, then bright


class PrefixPrinter:
    """An OutputSink that prints every line of every service, prefixed, as Compose does."""

    def __init__(
        self, services: list[str], *, prefix: bool = True, timestamps: bool = False, stream: TextIO = sys.stdout
    ) -> None:
        self._out = stream.buffer
        self._flush = stream.flush
        colour = stream.isatty() and not os.environ.get("NO_COLOR")
        width = max((len(name) for name in services), default=0)
        self._prefixes: dict[str, bytes] = {}
        for index, name in enumerate(services):
            text = f"{name.ljust(width)} | " if prefix else ""
            if colour and text:
                text = f"\x1b[{_COLOURS[index % len(_COLOURS)]}m{text}\x1b[0m"
            self._prefixes[name] = text.encode()
        self._timestamps = timestamps
        self._group: anyio.abc.TaskGroup | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[PrefixPrinter]:
        """Drain every attached pipe until EOF before leaving (no line that reached us is lost)."""
        async with anyio.create_task_group() as group:
            self._group = group
            yield self

    def attach(self, service: str, stream: str, fd: int) -> None:
        assert self._group is not None, "use `async with printer.running()`"
        self._group.start_soon(self._pump, service, fd)

    async def _pump(self, service: str, fd: int) -> None:
        prefix = self._prefixes.get(service, f"{service} | ".encode())
        os.set_blocking(fd, False)
        partial = b""
        try:
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    await anyio.wait_readable(fd)
                    continue
                if not chunk:
                    break
                data = partial + chunk
                cut = data.rfind(b"\n") + 1
                partial = data[cut:]
                if cut:
                    self._write(prefix, data[:cut])
        finally:
            if partial:
                self._write(prefix, partial + b"\n")
            os.close(fd)

    def _write(self, prefix: bytes, lines: bytes) -> None:
        if self._timestamps:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()).encode() + b"Z "
            prefix = prefix + stamp
        body = prefix + lines[:-1].replace(b"\n", b"\n" + prefix) + b"\n"
        self._out.write(body)
        self._flush()
