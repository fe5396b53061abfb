"""`stackd up` (foreground, or detached with -d), `stackd down` and `stackd ls`.

The supervisor is the process that runs `up`: in the foreground it prints every line of every service;
with -d it is started as a detached process (its own session, stdin /dev/null, its events in
`<logs>/<project>/_supervisor.log`) and the `up -d` that started it returns once the services are up.
Either way it serves the stack's control socket (stackd.supervisor.control) until the stack is down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import time
from typing import Any

import anyio

from stackd.cli import detached
from stackd.cli.config_verbs import stack_file
from stackd.cli.events import configure_events, event_logger, log_event
from stackd.cli.progress import ProgressLine
from stackd.cli.remote import project_paths, table
from stackd.errors import StackdError
from stackd.runtime.paths import DEFAULT_STATE_ROOT, StackPaths
from stackd.spec import load_stack
from stackd.spec.graph import with_dependencies
from stackd.supervisor.cleanup import remove_recorded
from stackd.supervisor.control import ControlClient, ControlServer, EventHub, wait_ready
from stackd.supervisor.notify import sd_notify
from stackd.supervisor.router import LogRouter, TerminalPrinter
from stackd.supervisor.stack import StackSupervisor
from stackd.supervisor.state import StateRecord


def register(verbs: Any, stack_options: argparse.ArgumentParser) -> None:
    up = verbs.add_parser(
        "up",
        parents=[stack_options],
        help="start the stack in the foreground",
        description="Start the services (default: all) and what they depend on, in dependency order, and "
        "stream their output. Ctrl-C or SIGTERM stops them in reverse order (a second Ctrl-C kills at once) "
        "and removes everything of the stack.",
    )
    up.add_argument("service", nargs="*", metavar="SERVICE", help="start only these services (and their dependencies)")
    up.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="run the stack in the background; return once its services are started (again on a running "
        "stack: recreate only what changed in the file)",
    )
    up.add_argument(
        "--wait",
        action="store_true",
        help="with -d: return once the services are running and healthy (one-shots: completed); implies -d",
    )
    up.add_argument(
        "--wait-timeout", type=float, default=None, metavar="SECONDS", help="with --wait: give up after SECONDS"
    )
    up.add_argument("--no-color", action="store_true", help="no colours (also with NO_COLOR set)")
    up.add_argument("--supervise-fd", type=int, default=None, help=argparse.SUPPRESS)  # the detached supervisor
    up.add_argument("--no-log-prefix", action="store_true", help="print the services' lines without `name |`")
    up.add_argument("--timestamps", action="store_true", help="prefix each line with the time it was read")
    up.add_argument("--log-format", choices=("console", "json"), default="console", help="stackd's own events")
    up.add_argument(
        "--abort-on-container-exit",
        action="store_true",
        help="stop the whole stack as soon as one service has ended (and will not restart)",
    )
    up.add_argument(
        "--exit-code-from",
        metavar="SERVICE",
        help="exit with this service's exit code (implies --abort-on-container-exit)",
    )
    up.add_argument(
        "-t",
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="grace period before SIGKILL when stopping (default: each service's stop_grace_period)",
    )
    up.set_defaults(run=run_up)

    down = verbs.add_parser(
        "down",
        parents=[stack_options],
        help="stop the stack and remove everything of it",
        description="Stop the stack's services (through its supervisor if it runs, else through their cgroups) "
        "and remove every host resource recorded for the project: also after a supervisor died by SIGKILL.",
    )
    down.add_argument(
        "-t",
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="grace period before SIGKILL (default: each service's stop_grace_period)",
    )
    down.set_defaults(run=run_down)

    ls = verbs.add_parser(
        "ls",
        help="list the running stacks",
        description="List the projects whose supervisor runs (with -a also those whose supervisor died and "
        "that `stackd down` should clean up).",
    )
    ls.add_argument("-a", "--all", action="store_true", help="also projects whose supervisor is gone")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.add_argument("-q", "--quiet", action="store_true", help="only the project names")
    ls.set_defaults(run=run_ls)


def run_up(args: argparse.Namespace) -> int:
    stack = load_stack(stack_file(args), project=args.project_name)
    unknown = [name for name in [*args.service, args.exit_code_from or ""] if name and name not in stack.services]
    if unknown:
        services = ", ".join(stack.services)
        print(f"stackd: no such service: {', '.join(unknown)} (services: {services})", file=sys.stderr)
        return 2
    if args.supervise_fd is not None:
        return detached.run_supervisor(stack, args)
    if args.detach or args.wait:
        if args.abort_on_container_exit or args.exit_code_from:
            print("stackd: -d cannot be combined with --abort-on-container-exit or --exit-code-from", file=sys.stderr)
            return 2
        return detached.up_detached(stack, args)
    configure_events(args.log_format)
    log = event_logger()
    for warning in stack.warnings:
        log.warning("stack file", warning=warning)
    progress = None
    if args.log_format == "console" and sys.stderr.isatty():
        selected = with_dependencies(stack, args.service or list(stack.services))
        checked = [name for name in selected if stack[name].healthcheck is not None]
        progress = ProgressLine(selected, checked=checked, stream=sys.stderr)
    printer = TerminalPrinter(
        list(stack.services),
        no_prefix=args.no_log_prefix,
        timestamps=args.timestamps,
        overlay=progress,
        color=False if args.no_color else None,
    )
    return anyio.run(_up, stack, args, printer, log, progress)


async def _up(
    stack: Any, args: argparse.Namespace, printer: TerminalPrinter, log: Any, progress: ProgressLine | None
) -> int:
    hub = EventHub()

    def emit(event: str, service: str, **fields: Any) -> None:
        hub.publish(event, service, fields)
        if progress is not None and progress.active:
            if event in ("stopping", "killing", "aborting"):
                progress.finish()
            elif progress.on_event(event, service, fields):
                return
        events.info(event, service=service or None, **fields)

    events = _AroundProgress(log, progress)

    # The printer outlives the router (it prints what is queued, then ends); the router outlives the
    # supervisor, so the services' last lines reach the disk and the terminal.
    async with (
        anyio.create_task_group() as printing,
        LogRouter(StackPaths(stack.name).logs) as router,
    ):
        printing.start_soon(printer.run, router.subscribe())
        try:
            code = await supervise(stack, args, router, events, emit, hub)
        finally:
            if progress is not None:
                progress.finish()
    return code


class _AroundProgress:
    """The event logger, hiding the progress line (when one is drawn) while it prints."""

    def __init__(self, log: Any, progress: ProgressLine | None) -> None:
        self.log, self.progress = log, progress

    def info(self, event: str, **fields: Any) -> None:
        if self.progress is None or not self.progress.active:
            log_event(self.log, event, **fields)
            return
        if event in ("stopping", "killing", "aborting"):
            self.progress.finish()
            log_event(self.log, event, **fields)
            return
        self.progress.hide()
        try:
            log_event(self.log, event, **fields)
        finally:
            self.progress.show()


async def supervise(
    stack: Any,
    args: argparse.Namespace,
    router: LogRouter,
    log: Any,
    emit: Any,
    hub: EventHub,
    *,
    detached: bool = False,
    on_listening: Any = None,
) -> int:
    """Run the stack until it ends (foreground: every service finished), a signal, or `down`; serve
    its control socket meanwhile; tell a service manager when it is up (sd_notify READY=1)."""
    down_requested = anyio.Event()
    grace: list[float | None] = [args.timeout]

    def on_down(timeout: float | None) -> None:
        if timeout is not None:
            grace[0] = timeout
        down_requested.set()

    async with (
        StackSupervisor.open(stack, emit=emit, output=router) as supervisor,
        ControlServer.serve(supervisor, hub, on_down=on_down),
    ):
        if on_listening is not None:
            on_listening(supervisor)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as group:

                async def run_until_done() -> None:
                    await supervisor.up(args.service or None)
                    if detached:
                        return  # a detached stack stays up (its services can be started again) until `down`
                    # Until every service has finished, also those `up -d` or `start` added meanwhile.
                    while active := [r for r in supervisor.runners.values() if r.active]:
                        async with anyio.create_task_group() as any_of:
                            for runner in active:

                                async def finished(runner: Any = runner) -> None:
                                    await runner.finished.wait()
                                    any_of.cancel_scope.cancel()

                                any_of.start_soon(finished)
                    group.cancel_scope.cancel()

                async def abort_when_one_ends(runner: Any) -> None:
                    await runner.finished.wait()
                    log.info("aborting", project=stack.name, because=runner.name)
                    group.cancel_scope.cancel()

                if args.abort_on_container_exit or args.exit_code_from:
                    for runner in supervisor.runners.values():
                        group.start_soon(abort_when_one_ends, runner)

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        log.info("stopping", project=stack.name, hint="press Ctrl-C again to kill at once")
                        group.cancel_scope.cancel()
                        return

                async def stop_on_down() -> None:
                    await down_requested.wait()
                    log.info("stopping", project=stack.name, reason="down requested")
                    group.cancel_scope.cancel()

                async def notify_ready() -> None:
                    names = with_dependencies(stack, args.service or list(stack.services))
                    states = await wait_ready(supervisor, names, hub, healthy=True)
                    ready = sum(1 for state, _ in states.values() if state == "ready")
                    failed = [f"{name} {detail}" for name, (state, detail) in states.items() if state == "failed"]
                    status = f"{ready}/{len(states)} services ready" + (
                        f"; failed: {', '.join(failed)}" if failed else ""
                    )
                    sd_notify(f"READY=1\nSTATUS={status}")

                group.start_soon(run_until_done)
                group.start_soon(stop_on_signal)
                group.start_soon(stop_on_down)
                if os.environ.get("NOTIFY_SOCKET"):
                    group.start_soon(notify_ready)

            sd_notify(f"STOPPING=1\nSTATUS=stopping {stack.name}")

            async def kill_on_second_signal() -> None:
                async for _ in signals:
                    log.info("killing", project=stack.name)
                    for runner in supervisor.runners.values():
                        if runner.instance is not None:
                            with contextlib.suppress(Exception):
                                runner.instance.cgroup.kill()
                    return

            async with anyio.create_task_group() as stopping:
                stopping.start_soon(kill_on_second_signal)
                await supervisor.down(grace=grace[0])
                stopping.cancel_scope.cancel()
    if args.exit_code_from:
        exit = supervisor.runners[args.exit_code_from].last_exit
        if exit is None:
            return 1
        return exit.code if exit.code is not None else 128 + (exit.signal or 0)
    # Like Compose: 0 when the stack was asked to stop; 1 when a service could not be started at all.
    failed = [r.name for r in supervisor.runners.values() if r.last_exit is None and r.last_reason]
    return 1 if failed else 0


def run_down(args: argparse.Namespace) -> int:
    paths = project_paths(args)
    record = StateRecord.load(paths)
    if record is None:
        print(f"stackd: project {paths.project} is not up (nothing recorded in {paths.state})", file=sys.stderr)
        return 0
    if record.supervisor_alive() and record.supervisor_pid:
        _stop_supervisor(record.supervisor_pid, args.timeout)
        record = StateRecord.load(paths)
        if record is None:
            print(f"stopped {paths.project}")
            return 0
    problems = anyio.run(remove_recorded, record)
    for problem in problems:
        print(f"stackd: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"removed {paths.project}")
    return 0


def _stop_supervisor(pid: int, timeout: float | None) -> None:
    """SIGTERM the supervisor and wait for it (through a pidfd), SIGKILL it if it does not finish."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + (timeout if timeout is not None else 10.0) + 5.0
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pidfd], [], [], max(deadline - time.monotonic(), 0))
            if ready:
                return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], 5.0)
    finally:
        os.close(pidfd)


def run_ls(args: argparse.Namespace) -> int:
    rows = []
    gone = 0
    root = DEFAULT_STATE_ROOT
    for file in sorted(root.glob("*/state.json")):
        record = StateRecord.load(StackPaths(file.parent.name))
        if record is None:
            continue
        alive = record.supervisor_alive()
        status = "supervisor gone: run `stackd down -p " + record.paths.project + "`"
        if alive:
            try:
                with ControlClient.connect(record.paths, timeout=1.0) as client:
                    services = client.call("ps")["services"]
                running = sum(1 for s in services if s["state"] in ("running", "paused", "starting"))
                status = f"running({running}/{len(services)})"
            except StackdError as error:
                status = f"unknown ({error})"
        elif not args.all:
            gone += 1
            continue
        rows.append(
            {
                "name": record.paths.project,
                "status": status,
                "supervisor_pid": record.supervisor_pid if alive else None,
                "config_file": record.stack_file or "",
            }
        )
    if args.quiet:
        for row in rows:
            print(row["name"])
    elif args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(
            table(
                [[r["name"], r["status"], r["supervisor_pid"] or "-", r["config_file"]] for r in rows],
                ["NAME", "STATUS", "SUPERVISOR", "CONFIG FILE"],
            )
        )
    if gone:
        print(f"stackd: {gone} project(s) whose supervisor is gone are not shown: `stackd ls -a`", file=sys.stderr)
    return 0
