"""A whole stack under the supervisor, on the real kernel: order, restarts, stop, cleanup."""

from __future__ import annotations

import itertools
import secrets
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from stackd.runtime.paths import StackPaths
from stackd.spec import parse_stack
from stackd.supervisor.logfile import log_path, read_log
from stackd.supervisor.restart import Backoff
from stackd.supervisor.router import LogRouter
from stackd.supervisor.stack import StackSupervisor
from stackd.testing.leaks import LeakGuard


class Collect:
    """The events of a run, with their times, and each service's output read back from its log file."""

    def __init__(self) -> None:
        self.output: dict[str, bytes] = {}
        self.events: list[tuple[float, str, str, dict[str, Any]]] = []

    def emit(self, event: str, service: str, **fields: Any) -> None:
        self.events.append((time.monotonic(), event, service, fields))

    def of(self, event: str, service: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        return [(t, f) for t, e, s, f in self.events if e == event and (service is None or s == service)]


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    name = f"su-{secrets.token_hex(3)}"
    leak_check.track(name)
    return name


async def run_stack(toml: str, tmp_path: Path, project: str, *, until: float | None = None, **kwargs: Any) -> Collect:
    """Bring the stack up; stop it after `until` seconds (None: when every service has finished)."""
    stack = parse_stack(toml, file=tmp_path / "stack.toml", project=project)
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    sink = Collect()
    async with (
        LogRouter(paths.logs) as router,
        StackSupervisor.open(stack, emit=sink.emit, output=router, paths=paths) as supervisor,
    ):
        for runner in supervisor.runners.values():
            runner.restart.backoff = kwargs.get("backoff", runner.restart.backoff)
        if until is None:
            await supervisor.up()
        else:
            with anyio.move_on_after(until):
                await supervisor.up()
    for name in stack.services:
        if log_path(paths.logs, name).exists():
            sink.output[name] = b"".join(line.raw() for line in read_log(log_path(paths.logs, name)))
    assert not (tmp_path / "state" / project).exists(), "the state directory outlived the stack"
    return sink


async def test_dependencies_start_in_order_and_everything_is_removed(tmp_path: Path, project: str) -> None:
    toml = """
        [services.migrate]
        command = ["sh", "-c", "sleep 0.2; echo migrated"]
        [services.db]
        command = ["sh", "-c", "echo db up"]
        [services.web]
        command = ["sh", "-c", "echo web up"]
        depends_on = { migrate = "completed_successfully", db = "started" }
    """
    sink = await run_stack(toml, tmp_path, project)
    ((migrate_exit, _),) = sink.of("exited", "migrate")
    ((web_start, _),) = sink.of("started", "web")
    ((db_start, _),) = sink.of("started", "db")
    assert web_start > migrate_exit and web_start > db_start
    assert bytes(sink.output["web"]) == b"web up\n"
    assert bytes(sink.output["migrate"]) == b"migrated\n"


async def test_a_failed_one_shot_keeps_its_dependents_down(tmp_path: Path, project: str) -> None:
    toml = """
        [services.migrate]
        command = ["sh", "-c", "exit 4"]
        [services.web]
        command = ["true"]
        depends_on = { migrate = "completed_successfully" }
    """
    sink = await run_stack(toml, tmp_path, project)
    assert sink.of("started", "web") == []
    ((_, fields),) = sink.of("dependency-failed", "web")
    assert fields["dependency"] == "migrate" and "code 4" in fields["reason"]


async def test_on_failure_restarts_with_growing_delays_then_gives_up(tmp_path: Path, project: str) -> None:
    toml = """
        [services.flaky]
        command = ["sh", "-c", "echo try; exit 3"]
        restart = "on-failure:3"
    """
    sink = await run_stack(toml, tmp_path, project, backoff=Backoff(initial=0.1, factor=2.0))
    starts = [t for t, _ in sink.of("started", "flaky")]
    assert len(starts) == 4  # the first start and 3 restarts
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4
    assert gaps[1] > gaps[0] and gaps[2] > gaps[1]
    assert [f["delay"] for _, f in sink.of("restarting", "flaky")] == [0.1, 0.2, 0.4]
    assert bytes(sink.output["flaky"]) == b"try\n" * 4


async def test_down_stops_gracefully_or_kills_after_the_grace_period(tmp_path: Path, project: str) -> None:
    toml = """
        [services.polite]
        command = ["sh", "-c", "trap 'echo bye; exit 0' TERM; while :; do sleep 0.05; done"]
        [services.stubborn]
        command = ["sh", "-c", "trap '' TERM; sh -c 'sleep 300' & while :; do sleep 0.05; done"]
        stop_grace_period = "300ms"
        [services.deaf]
        command = ["sleep", "300"]
        stop_grace_period = "30s"
    """
    started = time.monotonic()
    sink = await run_stack(toml, tmp_path, project, until=0.5)
    # sleep as pid 1 has no SIGTERM handler, so the kernel would drop the signal: killed at once,
    # instead of after its 30 s grace period
    assert time.monotonic() - started < 5
    ((_, deaf),) = sink.of("killing", "deaf")
    assert deaf["after"] == 0 and "no SIGTERM handler" in deaf["reason"]
    assert sink.of("stopping", "deaf") == []
    ((_, polite),) = sink.of("exited", "polite")
    assert polite["code"] == 0 and bytes(sink.output["polite"]).endswith(b"bye\n")
    assert sink.of("killing", "polite") == []
    ((_, stubborn),) = sink.of("exited", "stubborn")
    assert "SIGKILL" in stubborn["reason"]
    assert sink.of("killing", "stubborn")


async def test_a_crash_loop_backs_off_and_a_stable_run_resets_the_delay(tmp_path: Path, project: str) -> None:
    (tmp_path / "count").mkdir()
    toml = """
        [services.loop]
        # runs 1-3 crash at once, run 4 is stable for longer than reset_after and then crashes, run 5 ends well
        command = ["sh", "-c", '''n=$$(ls /count | wc -l); touch /count/$$n; echo run $$n
                                   [ $$n = 3 ] && sleep 0.6; [ $$n = 4 ] && exit 0; exit 1''']
        volumes = ["./count:/count"]
        restart = "on-failure"
        restart_backoff = { initial = "50ms", factor = 2, reset_after = "500ms" }
    """
    sink = await run_stack(toml, tmp_path, project)
    starts = [t for t, _ in sink.of("started", "loop")]
    exits = [t for t, _ in sink.of("exited", "loop")]
    assert len(starts) == 5 and len(exits) == 5
    waits = [start - exit for exit, start in zip(exits, starts[1:], strict=False)]
    assert [f["delay"] for _, f in sink.of("restarting", "loop")] == [0.05, 0.1, 0.2, 0.05]
    assert 0.05 <= waits[0] < waits[1] < waits[2] and waits[2] >= 0.2  # the streak grows...
    assert 0.05 <= waits[3] < 0.2  # ...and the 0.6 s run ended it
    assert exits[3] - starts[3] >= 0.6


async def test_a_cancelled_caller_still_gets_everything_stopped_and_removed(tmp_path: Path, project: str) -> None:
    """A timeout around the whole supervisor (not only around up) cancels it; the teardown still runs to
    the end: the service gets its stop signal and the exit is recorded, and nothing is left."""
    toml = """
        [services.web]
        command = ["sh", "-c", "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done"]
    """
    stack = parse_stack(toml, file=tmp_path / "stack.toml", project=project)
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    sink = Collect()
    started = time.monotonic()
    with anyio.move_on_after(1.0) as scope:
        async with (
            LogRouter(paths.logs) as router,
            StackSupervisor.open(stack, emit=sink.emit, output=router, paths=paths) as supervisor,
        ):
            await supervisor.up()
    assert scope.cancelled_caught
    assert time.monotonic() - started < 5, "the teardown waited for something a cancellation had cut"
    ((_, exited),) = sink.of("exited", "web")
    assert exited.get("code") == 0 and not sink.of("killing", "web")
    lines = [line.raw() for line in read_log(log_path(paths.logs, "web"))]
    assert lines == [b"up\n", b"bye\n"]
    assert not (tmp_path / "state" / project).exists()


async def test_a_service_under_init_gets_its_stop_signal(tmp_path: Path, project: str) -> None:
    """tini (`init = true`) blocks every signal and takes them with sigtimedwait: no handler in
    SigCgt, yet the stop signal reaches it and it passes it on; no kill at once."""
    toml = """
        [services.web]
        command = ["sh", "-c", "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done"]
        init = true
    """
    sink = await run_stack(toml, tmp_path, project, until=1.0)
    assert not sink.of("killing", "web"), sink.of("killing", "web")
    ((_, exited),) = sink.of("exited", "web")
    assert exited.get("code") == 0
    # tini -g signals the whole process group: the shell's `sleep` too (which the shell reports)
    assert bytes(sink.output["web"]).startswith(b"up\n") and bytes(sink.output["web"]).endswith(b"bye\n")
