"""The verbs that drive the services of a running stack through its control socket:
`ps`, `start`, `stop`, `restart`, `kill`, `pause`, `unpause`, `top`, `stats`, `events`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from stackd.cli.remote import UsageError, connect, human_duration, human_size, table
from stackd.spec.problems import Invalid
from stackd.spec.signals import normalise_signal


def register(verbs: Any, stack_options: argparse.ArgumentParser) -> None:
    ps = verbs.add_parser(
        "ps",
        parents=[stack_options],
        help="list the services of a running stack",
        description="The services of the stack: state, health, pid, restarts, uptime, CPU, memory, address, "
        "ports; with -a also those not running, with their exit code and why they stopped.",
    )
    ps.add_argument("-a", "--all", action="store_true", help="also the services that are not running")
    ps.add_argument("--format", choices=("table", "json"), default="table")
    ps.add_argument("-q", "--quiet", action="store_true", help="only the pids of the running services")
    ps.add_argument("--services", action="store_true", help="only the names of the services")
    ps.add_argument("service", nargs="*", metavar="SERVICE")
    ps.set_defaults(run=run_ps)

    for verb, text in (
        ("start", "start services that are not running (and what they depend on)"),
        ("stop", "stop services (their stop_signal, then SIGKILL after the grace period); they stay stopped"),
        ("restart", "stop and start services again"),
        ("pause", "freeze every process of services (cgroup freezer)"),
        ("unpause", "thaw paused services"),
    ):
        parser = verbs.add_parser(
            verb, parents=[stack_options], help=text, description=text[0].upper() + text[1:] + "."
        )
        parser.add_argument("service", nargs="*", metavar="SERVICE", help="default: every service")
        if verb in ("stop", "restart"):
            parser.add_argument(
                "-t",
                "--timeout",
                type=float,
                default=None,
                metavar="SECONDS",
                help="grace period before SIGKILL (default: each service's stop_grace_period)",
            )
        parser.set_defaults(run=run_simple, verb=verb)

    kill = verbs.add_parser(
        "kill",
        parents=[stack_options],
        help="send a signal to services' main processes",
        description="Send a signal (default SIGKILL) to the main process of services (default: every running "
        "one); their restart policy applies to the exit, as in Compose.",
    )
    kill.add_argument("-s", "--signal", default="SIGKILL", help="the signal: name (SIGHUP, HUP) or number")
    kill.add_argument("service", nargs="*", metavar="SERVICE")
    kill.set_defaults(run=run_kill)

    top = verbs.add_parser(
        "top", parents=[stack_options], help="the processes of services", description="The processes of services."
    )
    top.add_argument("service", nargs="+", metavar="SERVICE")
    top.set_defaults(run=run_top)

    stats = verbs.add_parser(
        "stats",
        parents=[stack_options],
        help="live resource use of services",
        description="CPU, memory, network and pids of the services, from their cgroups and network "
        "namespaces, refreshed every second (like `docker stats`).",
    )
    stats.add_argument("--no-stream", action="store_true", help="print one sample and exit")
    stats.add_argument("--format", choices=("table", "json"), default="table")
    stats.add_argument("-a", "--all", action="store_true", help="also services that are not running")
    stats.add_argument("service", nargs="*", metavar="SERVICE")
    stats.set_defaults(run=run_stats)

    events = verbs.add_parser(
        "events",
        parents=[stack_options],
        help="stream the stack's events",
        description="Print the stack's events as they happen (started, exited with code, oom, healthy, "
        "unhealthy, restarting, stopping, ...) until the stack goes down or Ctrl-C.",
    )
    events.add_argument("--json", action="store_true", help="one JSON object a line")
    events.add_argument("service", nargs="*", metavar="SERVICE")
    events.set_defaults(run=run_events)


# --- ps ---------------------------------------------------------------------------------------------------


def _state_text(row: dict[str, Any]) -> str:
    state = str(row["state"])
    if state in ("exited", "stopped") and (row.get("exit_code") is not None or row.get("exit_reason")):
        reason = row.get("exit_reason") or ""
        code = row.get("exit_code")
        label = f"{state} ({code})" if code is not None else state
        if row.get("oom"):
            label += " OOM"
        return f"{label}: {reason}" if reason and reason != f"exited with code {code}" else label
    return state


def print_ps(rows: Sequence[dict[str, Any]], *, show_all: bool) -> None:
    titles = ["SERVICE", "STATE", "HEALTH", "PID", "RESTARTS", "UPTIME", "CPU %", "MEM / LIMIT", "ADDRESS", "PORTS"]
    lines = []
    for row in rows:
        if not show_all and row["state"] in ("created", "exited", "stopped"):
            continue
        memory = "-"
        if row.get("memory") is not None:
            limit = human_size(row["memory_limit"]) if row.get("memory_limit") else "-"
            memory = f"{human_size(row['memory'])} / {limit}"
        cpu = "-" if row.get("cpu_percent") is None else f"{row['cpu_percent']:.1f}%"
        lines.append(
            [
                row["name"],
                _state_text(row),
                row.get("health") or "-",
                row.get("pid") or "-",
                row.get("restarts", 0),
                human_duration(row.get("uptime")),
                cpu,
                memory,
                row.get("address") or ("host" if row.get("network_mode") == "host" else "-"),
                ", ".join(row.get("ports") or ()) or "-",
            ]
        )
    print(table(lines, titles))


def run_ps(args: argparse.Namespace) -> int:
    with connect(args) as client:
        rows = client.call("ps", services=args.service)["services"]
    if args.services:
        print("\n".join(r["name"] for r in rows if args.all or r["state"] not in ("created", "exited", "stopped")))
    elif args.quiet:
        print("\n".join(str(r["pid"]) for r in rows if r.get("pid")))
    elif args.format == "json":
        print(json.dumps([r for r in rows if args.all or r["state"] not in ("created", "exited", "stopped")], indent=2))
    else:
        print_ps(rows, show_all=args.all)
    return 0


# --- start, stop, restart, pause, unpause, kill ----------------------------------------------------------------


_DONE = {"start": "started", "stop": "stopped", "restart": "restarted", "pause": "paused", "unpause": "unpaused"}


def run_simple(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"services": args.service}
    if getattr(args, "timeout", None) is not None:
        fields["timeout"] = args.timeout
    with connect(args) as client:
        answer = client.call(args.verb, **fields)
    code = 0
    if "services" in answer and args.verb in ("start", "restart"):
        for row in answer["services"]:
            if row["readiness"] == "failed":
                print(f"stackd: service {row['name']} failed: {row['detail']}", file=sys.stderr)
                code = 1
            else:
                print(f"{row['name']} {_DONE[args.verb]}")
    else:
        key = {"stop": "stopped", "pause": "paused", "unpause": "unpaused"}[args.verb]
        for name in answer.get(key, []):
            print(f"{name} {_DONE[args.verb]}")
    return code


def run_kill(args: argparse.Namespace) -> int:
    try:
        name = normalise_signal(args.signal)
    except Invalid as error:
        raise UsageError(f"kill: -s {args.signal}: {error.message}") from None
    with connect(args) as client:
        answer = client.call("kill", services=args.service, signal=name)
    for service in answer["killed"]:
        print(f"{service} killed ({answer['signal']})")
    return 0


# --- top, stats, events ---------------------------------------------------------------------------------


def run_top(args: argparse.Namespace) -> int:
    with connect(args) as client:
        for index, name in enumerate(args.service):
            answer = client.call("top", services=[name])
            if len(args.service) > 1:
                print(("\n" if index else "") + name)
            print(table(answer["processes"], answer["titles"]))
    return 0


def _rates(now: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    row = dict(now)
    if before is None or now["time"] <= before["time"]:
        row["cpu_percent"] = None
    else:
        elapsed = now["time"] - before["time"]
        row["cpu_percent"] = round(
            max(0.0, (now["cpu_usage_usec"] - before["cpu_usage_usec"]) / 1e6 / elapsed * 100), 2
        )
    limit = row.get("memory_limit")
    row["memory_percent"] = round(row["memory"] / limit * 100, 2) if limit else None
    return row


def _stats_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        [
            r["name"],
            "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.2f}%",
            f"{human_size(r['memory'])} / {human_size(r['memory_limit']) if r.get('memory_limit') else '-'}",
            "-" if r["memory_percent"] is None else f"{r['memory_percent']:.2f}%",
            f"{human_size(r['net_rx_bytes'])} / {human_size(r['net_tx_bytes'])}",
            r["pids"],
        ]
        for r in rows
    ]
    return table(lines, ["SERVICE", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "PIDS"])


def run_stats(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    with connect(args) as client:

        def sample() -> dict[str, dict[str, Any]]:
            rows = client.call("stats", services=args.service)["stats"]
            return {r["name"]: r for r in rows if args.all or r["running"]}

        before = sample()
        time.sleep(0.5)  # CPU % needs two samples
        try:
            while True:
                now = sample()
                rows = [_rates(row, before.get(name)) for name, row in now.items()]
                out = "\n".join(json.dumps(r) for r in rows) if args.format == "json" else _stats_table(rows)
                if tty and not args.no_stream:
                    sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: redraw in place
                print(out, flush=True)
                if args.no_stream:
                    return 0
                before = now
                time.sleep(1.0)
        except KeyboardInterrupt:
            return 0


def _event_line(event: dict[str, Any]) -> str:
    fields = " ".join(
        f"{key}={value}"
        for key, value in event.items()
        if key not in ("time", "event", "service") and value is not None
    )
    service = event.get("service") or "-"
    return f"{event['time']} {service} {event['event']}" + (f" {fields}" if fields else "")


def run_events(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            for message in client.stream("events", services=args.service):
                event = message.get("event")
                if event is None:
                    continue
                print(json.dumps(event) if args.json else _event_line(event), flush=True)
        except KeyboardInterrupt:
            return 0
    return 0
