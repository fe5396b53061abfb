"""`stackd up -d`: the supervisor as a detached process, and `up -d` again on a running stack.

The `up -d` the user runs starts `stackd up --supervise-fd N` in a new session (stdin /dev/null, stdout
and stderr appended to `<logs>/<project>/_supervisor.log`, which no service name can clash with: service
names start with a letter or digit). That process writes "ready" on fd N once its control socket
listens (or "error MESSAGE" when it could not start), and the first process then asks it, over the
socket, to say when the services are started (healthy with --wait), prints their status and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import tomli_w

from stackd.cli.events import configure_events, event_logger, log_event
from stackd.cli.remote import warn
from stackd.errors import StackdError
from stackd.runtime.paths import StackPaths
from stackd.spec import Stack, stack_to_dict
from stackd.spec.graph import with_dependencies
from stackd.supervisor.control import ControlClient, ControlError, EventHub
from stackd.supervisor.router import LogRouter
from stackd.supervisor.state import StateRecord

SUPERVISOR_LOG = "_supervisor.log"
_LOG_KEPT = 10 * 1024 * 1024  # the supervisor's own log: rotated once past this, at each start


def supervisor_log(paths: StackPaths) -> Path:
    return paths.logs / SUPERVISOR_LOG


# --- the detached supervisor ---------------------------------------------------------------------------


def run_supervisor(stack: Stack, args: argparse.Namespace) -> int:
    """The detached supervisor (`up --supervise-fd N`): no terminal; events as JSON lines on stderr."""
    fd: int = args.supervise_fd
    configure_events("json")
    log = event_logger()
    hub = EventHub()

    def emit(event: str, service: str, **fields: Any) -> None:
        hub.publish(event, service, fields)
        log_event(log, event, service=service or None, **fields)

    def listening(supervisor: Any) -> None:
        nonlocal fd
        with contextlib.suppress(OSError):
            os.write(fd, f"ready {os.getpid()}\n".encode())
            os.close(fd)
        fd = -1

    async def run() -> int:
        from stackd.cli.stack_verbs import supervise

        async with LogRouter(StackPaths(stack.name).logs) as router:
            return await supervise(stack, args, router, log, emit, hub, detached=True, on_listening=listening)

    try:
        return anyio.run(run)
    except StackdError as error:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, f"error {error}\n".encode())
        raise


# --- the `up -d` the user runs -------------------------------------------------------------------------


def up_detached(stack: Stack, args: argparse.Namespace) -> int:
    paths = StackPaths(stack.name)
    record = StateRecord.load(paths)
    if record is not None and record.supervisor_alive():
        return _up_again(stack, args, paths)
    log_path = supervisor_log(paths)
    paths.logs.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > _LOG_KEPT:
            os.replace(log_path, log_path.with_name(SUPERVISOR_LOG + ".1"))
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    argv = [sys.executable, "-m", "stackd", "-p", stack.name]
    if stack.source is not None:
        argv += ["-f", str(stack.source.resolve())]
    argv += ["up", "--supervise-fd", str(write_fd)]
    if args.timeout is not None:
        argv += ["--timeout", str(args.timeout)]
    argv += list(args.service)
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=[write_fd],
                start_new_session=True,  # no terminal: Ctrl-C and hang-ups here do not reach it
                close_fds=True,
            )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if not line.startswith("ready"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if line.startswith("error "):
            warn(line[len("error ") :])
        else:
            _show_log_tail(log_path)
        return 1
    print(
        f"stackd: {stack.name} runs in the background (supervisor pid {process.pid}, log {log_path})", file=sys.stderr
    )
    try:
        with ControlClient.connect(paths) as client:
            return wait_and_show(client, stack, args)
    except ControlError:  # it ended while the stack came up (a port in use, ...): say why
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        _show_log_tail(log_path)
        return 1


def _show_log_tail(log_path: Path) -> None:
    tail = b""
    with contextlib.suppress(OSError):
        tail = log_path.read_bytes()[-2000:]
    warn(f"the supervisor exited before the stack was up; its log ({log_path}) ends with:")
    sys.stderr.write(tail.decode(errors="replace"))


def _up_again(stack: Stack, args: argparse.Namespace, paths: StackPaths) -> int:
    """The project is up: send it the (resolved) stack file; it recreates what changed."""
    text = tomli_w.dumps(stack_to_dict(stack))
    file = str(stack.source.resolve()) if stack.source is not None else str(Path.cwd() / "stack.toml")
    with ControlClient.connect(paths) as client:
        changes = client.call("up", stack=text, file=file, services=list(args.service))
        for name in changes["removed"]:
            print(f"stackd: {name} removed", file=sys.stderr)
        for name in changes["recreated"]:
            print(f"stackd: {name} recreated ({changes['reasons'].get(name, 'changed')})", file=sys.stderr)
        for name in changes["created"]:
            print(f"stackd: {name} created", file=sys.stderr)
        if not (changes["removed"] or changes["recreated"] or changes["created"]):
            print(f"stackd: {stack.name} is up to date", file=sys.stderr)
        return wait_and_show(client, stack, args)


def wait_and_show(client: ControlClient, stack: Stack, args: argparse.Namespace) -> int:
    """Wait until the services are started (or healthy with --wait), print their status; 1 when one failed."""
    from stackd.cli.service_verbs import print_ps

    names = with_dependencies(stack, args.service or list(stack.services))
    try:
        answer = client.call(
            "wait",
            services=names,
            condition="healthy" if args.wait else "started",
            timeout=args.wait_timeout if args.wait else None,
        )
    except KeyboardInterrupt:
        warn(
            f"stopped waiting; {stack.name} keeps running (`stackd ps -p {stack.name}`, `stackd down -p {stack.name}`)"
        )
        return 130
    services = [s for s in client.call("ps", services=names)["services"]]
    print_ps(services, show_all=True)
    code = 0
    for row in answer["services"]:
        if row["readiness"] == "failed":
            warn(f"service {row['name']} failed: {row['detail']}")
            code = 1
        elif row["readiness"] == "waiting":
            warn(f"service {row['name']} is not ready after {args.wait_timeout:g} s: {row['detail']}")
            code = 1
    return code
