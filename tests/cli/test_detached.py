"""`up -d` again with a changed file (only what changed is recreated), a dead supervisor, `--wait` failures."""

from __future__ import annotations

import json
import os
import signal
import socket

from clirun import Cli, processes_in, wait_for

from stackd.runtime.network.names import veth_name

BASE = """
[services.db]
command = ["sleep", "300"]
init = true

[services.web]
command = ["sleep", "301"]
init = true
depends_on = ["db"]

[services.sidecar]
command = ["sleep", "302"]
init = true
network_mode = "service:web"

[services.cache]
command = ["sleep", "303"]
init = true
environment = { SIZE = "1" }

[services.old]
command = ["sleep", "304"]
init = true
"""


def pids(cli: Cli) -> dict[str, int]:
    result = cli("ps", "--format", "json")
    assert result.returncode == 0, result.stderr
    return {row["name"]: row["pid"] for row in json.loads(result.stdout)}


def test_up_again_recreates_only_what_changed(cli: Cli) -> None:
    cli.write(BASE)
    first = cli("up", "-d")
    assert first.returncode == 0, first.stderr
    before = pids(cli)
    assert set(before) == {"db", "web", "sidecar", "cache", "old"}
    # web changes (and sidecar, which lives in web's network namespace, must follow); cache is only
    # reformatted (same resolved definition); old leaves the file; new arrives.
    changed = BASE.replace('"sleep", "301"', '"sleep", "311"').replace('{ SIZE = "1" }', '{SIZE="1"}')
    changed = changed.split("[services.old]")[0] + '[services.new]\ncommand = ["sleep", "305"]\ninit = true\n'
    cli.write(changed)
    again = cli("up", "-d")
    assert again.returncode == 0, again.stderr
    assert "stackd: old removed" in again.stderr
    assert "stackd: web recreated (changed)" in again.stderr
    assert "stackd: sidecar recreated (depends on web)" in again.stderr
    assert "stackd: new created" in again.stderr
    after = pids(cli)
    assert set(after) == {"db", "web", "sidecar", "cache", "new"}
    assert after["db"] == before["db"] and after["cache"] == before["cache"], "unchanged services keep running"
    assert after["web"] != before["web"] and after["sidecar"] != before["sidecar"]
    assert not os.path.exists(f"/proc/{before['old']}")
    # old's network left with it: its veth and pinned namespace, its line in the stack's hosts file.
    names = {name for _, name in socket.if_nameindex()}
    assert veth_name(cli.project, "old") not in names and veth_name(cli.project, "db") in names, names
    assert not (cli.state / "netns" / "old").exists() and (cli.state / "netns" / "db").exists()
    hosts = (cli.state / "network" / "hosts").read_text()  # what every service sees as /etc/hosts
    named = {name for line in hosts.splitlines() if not line.startswith("#") for name in line.split()[1:]}
    assert "new" in named and "old" not in named
    ns = {name: os.readlink(f"/proc/{after[name]}/ns/net") for name in ("web", "sidecar")}
    assert ns["web"] == ns["sidecar"]
    assert "up to date" in cli("up", "-d").stderr
    network = cli("up", "-d")
    cli.write('[network]\nsubnet = "10.250.7.0/24"\n' + changed)
    network = cli("up", "-d")
    assert network.returncode == 1 and "the [network] table changed" in network.stderr
    assert pids(cli) == after


def test_a_dead_supervisor_is_reported_with_what_to_do(cli: Cli) -> None:
    cli.write('[services.app]\ncommand = ["sh", "-c", "echo hello; exec sleep 300"]\n')
    assert cli("up", "-d").returncode == 0
    wait_for(lambda: "hello" in cli("logs", "app").stdout, what="the line on disk")
    pid = cli.supervisor_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the supervisor to go")
    hint = f"stackd: project {cli.project}: its supervisor (pid {pid}) is gone; run `stackd down -p {cli.project}`"
    for verb in (["ps"], ["exec", "app", "true"], ["stop", "app"], ["events"], ["top", "app"]):
        result = cli(*verb)
        assert result.returncode == 1, verb
        assert result.stderr.startswith(hint), (verb, result.stderr)
    logs = cli("logs", "app")
    assert logs.returncode == 0 and logs.stdout.strip() == "app | hello", "logs still read the files"
    assert processes_in(cli.project), "the service outlives its supervisor until down"
    down = cli("down")
    assert down.returncode == 0, down.stderr
    assert processes_in(cli.project) == []
    not_up = cli("ps")
    assert not_up.returncode == 1
    assert not_up.stderr.startswith(f"stackd: project {cli.project} is not up")


def test_wait_names_the_service_that_failed_and_times_out(cli: Cli) -> None:
    cli.write(
        """
[services.migrate]
command = ["sh", "-c", "echo migration failed >&2; exit 4"]
[services.app]
command = ["sleep", "300"]
init = true
depends_on = { migrate = "completed_successfully" }
[services.slow]
command = ["sleep", "300"]
init = true
healthcheck = { test = ["CMD", "false"], interval = "100ms", retries = 1000 }
"""
    )
    result = cli("up", "-d", "--wait", "--wait-timeout", "1.5")
    assert result.returncode == 1
    assert "stackd: service migrate failed: exited with code 4" in result.stderr
    assert "stackd: service app failed: not started: migrate failed" in result.stderr
    assert "stackd: service slow is not ready after 1.5 s: health: starting" in result.stderr
    assert cli("ps").returncode == 0, "the stack keeps running, as with Compose"


def test_up_detached_refuses_what_foreground_up_refuses(cli: Cli) -> None:
    cli.write('[services.app]\ncommand = ["true"]\n')
    bad = cli("up", "-d", "nope")
    assert bad.returncode == 2 and "no such service: nope" in bad.stderr
    both = cli("up", "-d", "--abort-on-container-exit")
    assert both.returncode == 2
    assert cli.supervisor_pid() is None


def test_a_port_in_use_fails_up_with_its_reason_in_front_and_detached(cli: Cli) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        cli.write(f'[services.web]\ncommand = ["sleep", "30"]\nports = ["{port}:80"]\n')
        reason = (
            f'stackd: service web: ports "127.0.0.1:{port}:80/tcp": cannot listen on 127.0.0.1:{port}/tcp: '
            "address already in use (EADDRINUSE)"
        )
        for args in (["up"], ["up", "-d"]):
            result = cli(*args)
            assert result.returncode == 1, (args, result.stderr)
            assert reason in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
            assert processes_in(cli.project) == [] and not cli.state.exists(), args  # nothing stays
