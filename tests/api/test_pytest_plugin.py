"""The pytest plugin, run on inner test suites with pytester: scopes, names, reports, cleanup."""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

import pytest

from stackd.testing.leaks import LeakGuard

pytest_plugins = ["pytester"]

CONFTEST = """
from stackd.testing.pytest_plugin import stack_fixture

SPEC = {"services": {
    "db": {"command": ["sh", "-c", "echo db ready; exec sleep 60"],
           "healthcheck": {"test": ["CMD", "true"], "interval": "20ms", "retries": 1}},
    "web": {"command": ["sleep", "60"], "depends_on": {"db": "healthy"}},
}}
fresh = stack_fixture(SPEC)
shared = stack_fixture(SPEC, scope="module")
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, tmp_path: Path, leak_check: LeakGuard) -> tuple[pytest.Pytester, str]:
    prefix = f"plg{secrets.token_hex(3)}"
    leak_check.track(prefix)
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        stackd_project_prefix = {prefix}
        stackd_state_dir = {tmp_path / "state"}
        stackd_log_dir = {tmp_path / "log"}
        stackd_leak_check = true
        """
    )
    pytester.makeconftest(CONFTEST)
    return pytester, prefix


def test_fixtures_of_each_scope_in_sync_and_async_tests(
    inner: tuple[pytest.Pytester, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester, prefix = inner
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw7")
    pytester.makepyfile(
        test_inner="""
        import stackd
        seen = {}

        def test_sync(fresh, shared):
            assert fresh["db"].health == "healthy" and fresh["web"].address
            seen["fresh"], seen["shared"] = fresh.project, shared.project

        async def test_async(fresh, shared):
            assert (await fresh["db"].exec(["echo", "hi"])).stdout == b"hi\\n"
            assert (await shared["db"].wait_for_log("db ready", timeout=5)).text == "db ready"
            assert fresh.project != seen["fresh"] and shared.project == seen["shared"]
            assert fresh.project.startswith("PREFIX-gw7-")
            await fresh.restart("web")
        """.replace("PREFIX", prefix)
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_a_failed_test_reports_its_stacks_logs(inner: tuple[pytest.Pytester, str]) -> None:
    pytester, _ = inner
    pytester.makepyfile(
        test_inner="""
        import pytest

        def test_fails(fresh):
            assert fresh["web"].status.state == "exited"

        JOB = {"services": {"job": {"command": ["sh", "-c", "echo marker works; sleep 60"]}}}

        @pytest.mark.stackd(JOB, wait="started")
        async def test_marker(stackd_stack):
            line = await stackd_stack["job"].wait_for_log("marker", timeout=5)
            assert line.text == "marker works"
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str()
    assert re.search(r"-+ stackd \S+ -+", output), output
    assert "db: running (healthy)" in output and "db  | db ready" in output


def test_a_killed_run_is_cleaned_up_by_the_next_one(inner: tuple[pytest.Pytester, str], tmp_path: Path) -> None:
    pytester, prefix = inner
    pytester.makepyfile(
        test_killed="""
        import os, signal

        def test_killed(fresh):
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == -9
    (left,) = [p for p in (tmp_path / "state").iterdir() if p.name.startswith(prefix)]
    pids = [
        int(pid)
        for file in Path("/sys/fs/cgroup").glob(f"*/stackd/{left.name}/db/cgroup.procs")
        for pid in file.read_text().split()
    ]
    assert pids, "the killed run's services should still run"
    (pytester.path / "test_killed.py").unlink()
    pytester.makepyfile(test_next="def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"stackd: removed stacks a killed run left behind: {left.name}"])
    assert not left.exists()
    deadline = time.monotonic() + 5  # killed through its cgroup; reaped by whoever is its parent now
    while [pid for pid in pids if os.path.exists(f"/proc/{pid}")]:
        assert time.monotonic() < deadline, "a service of the killed run survived"
        time.sleep(0.02)


def test_a_stacks_last_cleanup_overlaps_the_next_test_and_ends_with_the_session(
    inner: tuple[pytest.Pytester, str],
) -> None:
    """Without the leak check, a test's stack is left once its services are stopped; its network,
    cgroups and state go in the background, and the session waits for them at its end (the outer
    leak check then finds nothing)."""
    pytester, _ = inner
    pytester.makepyfile(
        test_inner="""
        import os
        seen = []

        def test_1(fresh):
            seen.append(fresh["db"].pid)

        def test_2(fresh):
            seen.append(fresh["db"].pid)
            assert not os.path.exists(f"/proc/{seen[0]}"), "the previous test's services are stopped"

        def test_3(fresh):
            assert not any(os.path.exists(f"/proc/{pid}") for pid in seen)
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-o", "stackd_leak_check=false")
    result.assert_outcomes(passed=3)
