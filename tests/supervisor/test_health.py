"""Health checks run inside the service and gate its dependents; unhealthy services restart when asked."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from test_stack_up import run_stack

from stackd.testing.leaks import LeakGuard


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    name = f"hc-{secrets.token_hex(3)}"
    leak_check.track(name)
    return name


async def test_a_dependent_starts_once_its_dependency_is_healthy(tmp_path: Path, project: str) -> None:
    toml = """
        [services.db]
        command = ["sh", "-c", "sleep 0.4; touch /tmp/ready; sleep 30"]
        user = "nobody"
        hostname = "dbhost"
        stop_grace_period = "100ms"
        # The probe runs inside db: its /tmp, its user, its host name.
        [services.db.healthcheck]
        test = "test -f /tmp/ready && test $$(id -u) = 65534 && test $$(hostname) = dbhost"
        interval = "100ms"
        retries = 1
        [services.web]
        command = ["sh", "-c", "echo web up"]
        depends_on = { db = "healthy" }
    """
    sink = await run_stack(toml, tmp_path, project, until=2.0)
    ((db_start, _),) = sink.of("started", "db")
    ((healthy, _),) = sink.of("healthy", "db")
    ((web_start, _),) = sink.of("started", "web")
    assert healthy - db_start >= 0.4
    assert web_start > healthy
    assert bytes(sink.output["web"]) == b"web up\n"


async def test_an_unhealthy_service_is_restarted_when_asked(tmp_path: Path, project: str) -> None:
    toml = """
        [services.stuck]
        command = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done"]
        restart = "no"
        healthcheck = { test = ["CMD", "false"], interval = "100ms", retries = 2, on_unhealthy = "restart" }
    """
    sink = await run_stack(toml, tmp_path, project, until=1.5)
    assert len(sink.of("unhealthy", "stuck")) >= 2
    assert len(sink.of("started", "stuck")) >= 2, "restart = 'no', yet on_unhealthy restarts it"
    (_, first_exit), *_ = sink.of("exited", "stuck")
    assert first_exit["code"] == 0, "stopped with its stop_signal, not killed"


async def test_an_unhealthy_service_is_only_reported_by_default(tmp_path: Path, project: str) -> None:
    toml = """
        [services.stuck]
        command = ["sleep", "30"]
        stop_grace_period = "100ms"
        healthcheck = { test = ["CMD", "false"], interval = "100ms", retries = 2 }
    """
    sink = await run_stack(toml, tmp_path, project, until=1.0)
    assert len(sink.of("unhealthy", "stuck")) == 1
    assert len(sink.of("started", "stuck")) == 1


async def test_a_probe_cut_short_by_the_stop_is_not_reported_unhealthy(tmp_path: Path, project: str) -> None:
    """Probes run every 10 ms and last about as long: at the stop one is usually in flight, and the
    cgroup kill ends it with a failure that says nothing about the service's health."""
    toml = """
        [services.a]
        command = ["sleep", "30"]
        healthcheck = { test = ["CMD", "sh", "-c", "sleep 0.005"], interval = "10ms", retries = 1 }
        [services.b]
        command = ["sleep", "30"]
        healthcheck = { test = ["CMD", "sh", "-c", "sleep 0.005"], interval = "10ms", retries = 1 }
    """
    for _ in range(5):
        sink = await run_stack(toml, tmp_path, project, until=0.3)
        assert len(sink.of("healthy")) == 2
        assert sink.of("unhealthy") == [], sink.of("unhealthy")
