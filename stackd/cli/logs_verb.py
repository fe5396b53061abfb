"""`stackd logs`: the services' output, read from their log files (docs/logs.md).

The files are the source, whether the supervisor runs or not: the supervisor writes every line there
before anyone reads it, so `logs` (even twenty `logs -f` at once) never sits in the services' output
path and cannot slow it down. With a running supervisor its control socket says where the logs are and
which services exist; `-f` follows each file across restarts and rotations (inotify) until the stack
goes down (the supervisor's pidfd) or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from stackd.cli.config_verbs import stack_file
from stackd.cli.remote import UsageError, project_paths
from stackd.errors import StackdError
from stackd.runtime.paths import StackPaths
from stackd.spec import load_stack
from stackd.spec.units import parse_duration
from stackd.supervisor.control import ControlClient, ControlError, NotUp, SupervisorGone
from stackd.supervisor.logfile import LogLine, follow_log, log_path, read_log
from stackd.supervisor.router import LogChunk, TerminalPrinter


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def register(verbs: Any, stack_options: argparse.ArgumentParser) -> None:
    # -f after `logs` is --follow, as in Compose: the stack file is -f before the verb, or --file.
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--file", default=argparse.SUPPRESS, metavar="FILE", help="the stack file")
    options.add_argument("-p", "--project-name", default=argparse.SUPPRESS, metavar="NAME", help="the project name")
    logs = verbs.add_parser(
        "logs",
        parents=[options],
        help="print the services' output",
        description="Print the output of services (default: all) from their log files, interleaved in time "
        "order; also after the stack is down. -f follows them as they are written, across restarts and "
        "log rotations, until the stack goes down.",
    )
    logs.add_argument("service", nargs="*", metavar="SERVICE")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the output")
    logs.add_argument("-n", "--tail", default="all", metavar="N", help='the last N lines of each service ("all")')
    logs.add_argument(
        "--since",
        metavar="TIME",
        help="only lines since TIME: a duration before now (10m, 1h30m) or a timestamp (2026-11-22T09:40:00Z, "
        "seconds since the epoch)",
    )
    logs.add_argument("--until", metavar="TIME", help="only lines before TIME (same forms as --since)")
    logs.add_argument("-t", "--timestamps", action="store_true", help="show the time each line was read")
    logs.add_argument("--no-log-prefix", action="store_true", help="no `name |` prefix")
    logs.add_argument("--no-color", action="store_true", help="no colours")
    logs.set_defaults(run=run_logs)


def parse_time(text: str, option: str) -> float:
    """Seconds since the epoch, from Docker's --since forms: a duration back from now, or a timestamp."""
    value = text.strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        return float(value)
    try:
        return time.time() - parse_duration(value)
    except Exception:
        pass
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{option}: {text!r} is neither a duration (10m, 1h30m) nor a timestamp (2026-11-22T09:40:00Z)"
        ) from None
    return when.timestamp()  # a naive time is local time, as with docker logs


def _target(args: argparse.Namespace) -> tuple[StackPaths, Path, list[str], int | None]:
    """(project paths, log directory, the services known, the live supervisor's pid or None)."""
    paths = project_paths(args)
    try:
        with ControlClient.connect(paths, timeout=1.0) as client:
            hello = client.call("hello")
        return paths, Path(hello["log_dir"]), list(hello["services"]), int(hello["pid"])
    except (NotUp, SupervisorGone):
        pass
    except ControlError:
        pass
    services: list[str] = []
    if args.file or not args.project_name:
        with contextlib.suppress(StackdError):
            services = list(load_stack(stack_file(args), project=args.project_name).services)
    if not services:
        with contextlib.suppress(OSError):
            services = sorted(
                p.name[: -len(".log")]
                for p in paths.logs.iterdir()
                if p.name.endswith(".log") and not p.name.startswith("_")
            )
    return paths, paths.logs, services, None


def run_logs(args: argparse.Namespace) -> int:
    tail: int | None
    if args.tail in ("all", "-1"):
        tail = None
    else:
        try:
            tail = int(args.tail)
        except ValueError:
            raise UsageError(f'--tail: {args.tail!r} is not a number of lines (or "all")') from None
        if tail < 0:
            raise UsageError(f"--tail: {tail} is negative")
    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    paths, directory, known, pid = _target(args)
    unknown = [name for name in args.service if name not in known]
    if unknown:
        raise UsageError(f"no such service: {', '.join(unknown)} (services: {', '.join(known) or 'none'})")
    services = args.service or known
    if not services and not directory.is_dir():
        raise StackdError(f"project {paths.project} has no logs (nothing in {directory})")
    printer = TerminalPrinter(
        known, no_prefix=args.no_log_prefix, timestamps=args.timestamps, color=False if args.no_color else None
    )
    if not args.follow or pid is None:
        _print_files(printer, directory, services, tail=tail, since=since, until=until)
        return 0
    try:
        anyio.run(_follow, printer, directory, services, tail, since, pid)
    except KeyboardInterrupt:
        return 0
    return 0


def _chunk(service: str, line: LogLine) -> LogChunk:
    stream: Any = line.stream
    return LogChunk(service, stream, line.stamp, line.raw(), partial=not line.complete, eof=not line.complete)


def _print_files(
    printer: TerminalPrinter,
    directory: Path,
    services: Iterable[str],
    *,
    tail: int | None,
    since: float | None,
    until: float | None,
) -> None:
    """Every service's lines on disk now, merged in time order."""

    def lines(index: int, service: str) -> Iterator[tuple[bytes, int, str, LogLine]]:
        for line in read_log(log_path(directory, service), tail=tail, since=since, until=until):
            yield line.stamp, index, service, line

    streams = [lines(index, service) for index, service in enumerate(services)]
    batch: list[LogChunk] = []
    for _stamp, _index, service, line in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
        batch.append(_chunk(service, line))
        if len(batch) >= 512:
            _write_fully(1, printer.render(batch))
            batch.clear()
    if batch:
        _write_fully(1, printer.render(batch))


async def _follow(
    printer: TerminalPrinter, directory: Path, services: list[str], tail: int | None, since: float | None, pid: int
) -> None:
    send, receive = anyio.create_memory_object_stream[LogChunk](max_buffer_size=1024)

    async def follow(service: str, send: Any) -> None:
        async with send, contextlib.aclosing(follow_log(log_path(directory, service), tail=tail, since=since)) as lines:
            async for line in lines:
                await send.send(_chunk(service, line))

    async def until_the_supervisor_exits(group: Any) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1
        try:
            if pidfd >= 0:
                await anyio.wait_readable(pidfd)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        await anyio.sleep(0.3)  # its last lines are on disk: let the followers reach them
        group.cancel_scope.cancel()

    async def write() -> None:
        async with receive:
            while True:
                try:
                    batch = [await receive.receive()]
                except anyio.EndOfStream:
                    return
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                data = printer.render(batch)
                if data:
                    await anyio.to_thread.run_sync(_write_fully, 1, data)

    async with anyio.create_task_group() as group:
        group.start_soon(write)
        async with send:
            for service in services:
                group.start_soon(follow, service, send.clone())
        group.start_soon(until_the_supervisor_exits, group)
