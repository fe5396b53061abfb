"""sd_notify (readiness to systemd) with sockets bound here: a path and the abstract namespace; and
`stackd up` in the foreground (what the systemd unit runs) reporting READY=1 and STOPPING=1."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
from pathlib import Path

from clirun import Cli

from stackd.supervisor.notify import sd_notify


def test_sd_notify_to_a_path_and_to_the_abstract_namespace(tmp_path: Path) -> None:
    name = f"stackd-test-{secrets.token_hex(4)}"
    for bind, variable in ((str(tmp_path / "notify"), str(tmp_path / "notify")), ("\0" + name, "@" + name)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(bind)
            assert sd_notify("READY=1\nSTATUS=up", environ={"NOTIFY_SOCKET": variable})
            assert server.recv(4096) == b"READY=1\nSTATUS=up"
    assert not sd_notify("READY=1", environ={})
    assert not sd_notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not sd_notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})


def test_foreground_up_reports_ready_then_stopping(cli: Cli, tmp_path: Path) -> None:
    cli.write(
        """
[services.db]
command = ["sh", "-c", "sleep 0.3; touch /tmp/ok; exec sleep 300"]
init = true
healthcheck = { test = ["CMD", "test", "-e", "/tmp/ok"], interval = "100ms" }
[services.web]
command = ["sleep", "300"]
init = true
depends_on = { db = "healthy" }
"""
    )
    name = f"stackd-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(20)
        cli.env["NOTIFY_SOCKET"] = "@" + name
        process = cli.popen("up", "--no-color", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            ready = server.recv(4096).decode()
            assert ready.startswith("READY=1\n") and "STATUS=2/2 services ready" in ready
            states = cli("ps", "--format", "json")
            assert states.returncode == 0 and '"health": "healthy"' in states.stdout
            process.send_signal(signal.SIGTERM)
            assert server.recv(4096).decode().startswith("STOPPING=1")
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
            assert process.stderr is not None
            process.stderr.close()


def test_the_systemd_unit_runs_commands_stackd_accepts() -> None:
    import configparser
    import shlex

    from stackd.cli.main import build_parser

    unit = Path(__file__).resolve().parents[2] / "examples" / "systemd" / "stackd@.service"
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    service = parser["Service"]
    assert service["Type"] == "notify" and service["KillMode"] == "mixed" and service["NotifyAccess"] == "main"
    for key in ("ExecStart", "ExecStopPost"):
        argv = shlex.split(service[key].replace("%i", "shop"))
        assert argv[0].endswith("/stackd")
        args = build_parser().parse_args(argv[1:])
        assert args.verb == ("up" if key == "ExecStart" else "down")
        assert getattr(args, "project_name", None) == "shop"
