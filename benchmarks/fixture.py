"""Per-test overhead of a stack fixture: a 3-service stack with health checks, up and torn down per test.

    python3 benchmarks/fixture.py [--tests 30] [--profile]

Runs pytest in this process on a generated suite of N trivial tests that each use a function-scoped
`stack_fixture` (the plugin's default way), and times each test's setup and teardown phases (the
fixture's whole cost: the stack up to healthy, then down and cleaned up), next to the same suite without
the fixture. Prints the medians and the ratio to the budget: <= 150 ms per test (issue 7), and the
whole session's wall time per test (a stack's last clean-up overlaps the next test: the session's time
is what that saves, and the final wait is in it).
`--profile` writes a cProfile of the run to fixture.prof and prints its top functions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BUDGET_MS = 150.0

CONFTEST = """
from stackd.testing.pytest_plugin import stack_fixture

HEALTH = {"test": ["CMD", "true"], "interval": "10ms", "retries": 1}
stack = stack_fixture({"services": {
    "db": {"command": ["sleep", "60"], "healthcheck": HEALTH},
    "cache": {"command": ["sleep", "60"], "healthcheck": HEALTH},
    "app": {"command": ["sleep", "60"], "healthcheck": HEALTH, "depends_on": {"db": "healthy", "cache": "healthy"}},
}})
"""


class Timer:
    """Times the setup and teardown phase of every test (pytest's own hooks)."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self.loop_started = self.session_ended = 0.0

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        self.loop_started = time.perf_counter()

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Iterator[None]:
        try:
            return (yield)  # the plugin's wait for the background clean-ups is in here
        finally:
            self.session_ended = time.perf_counter()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Iterator[None]:
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            self.phases.setdefault(item.nodeid, {})["setup"] = (time.perf_counter() - start) * 1000

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            self.phases.setdefault(item.nodeid, {})["teardown"] = (time.perf_counter() - start) * 1000


def _plugin_option() -> list[str]:
    """`-p stackd.testing.pytest_plugin` unless the installed package registers it (pytest11)."""
    from importlib.metadata import entry_points

    registered = any(e.value == "stackd.testing.pytest_plugin" for e in entry_points(group="pytest11"))
    return [] if registered else ["-p", "stackd.testing.pytest_plugin"]


def run_suite(directory: Path, tests: int, with_stack: bool, extra: list[str]) -> tuple[list[float], float]:
    """Each test's setup + teardown (ms), and the session's time from its first test to its end (ms),
    the clean-ups that went on in the background and were waited for at its end included."""
    suite = directory / ("with" if with_stack else "without")
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST if with_stack else "")
    argument = "stack" if with_stack else ""
    body = "\n".join(f"def test_{i}({argument}):\n    pass\n" for i in range(tests))
    (suite / f"test_overhead_{suite.name}.py").write_text(body)
    (suite / "pytest.ini").write_text(
        textwrap.dedent(
            f"""
            [pytest]
            stackd_state_dir = {directory / "state"}
            stackd_log_dir = {directory / "log"}
            """
        )
    )
    timer = Timer()
    code = pytest.main([str(suite), "-q", "-p", "no:cacheprovider", *_plugin_option(), *extra], plugins=[timer])
    wall = (timer.session_ended - timer.loop_started) * 1000  # from the first test to the session's end
    if code != 0:
        raise SystemExit(f"the generated suite failed (exit {code})")
    return [phases.get("setup", 0.0) + phases.get("teardown", 0.0) for phases in timer.phases.values()], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: stacks need namespaces and cgroups")
    with tempfile.TemporaryDirectory(prefix="stackd-bench-") as tmp:
        directory = Path(tmp)
        baseline, baseline_wall = run_suite(directory, args.tests, False, [])
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            with_stack, wall = run_suite(directory, args.tests, True, [])
            profiler.disable()
            profiler.dump_stats("fixture.prof")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        else:
            with_stack, wall = run_suite(directory, args.tests, True, [])
    base = statistics.median(baseline)
    median = statistics.median(with_stack)
    overhead = median - base
    print()
    print(f"3-service stack with health checks, function-scoped fixture, {args.tests} tests:")
    p90 = statistics.quantiles(with_stack, n=10)[-1]
    print(f"  setup+teardown per test, median: {median:7.1f} ms   (p90 {p90:.1f} ms)")
    print(f"  same tests without the stack:    {base:7.1f} ms")
    ratio = overhead / BUDGET_MS
    print(f"  overhead per test, median:       {overhead:7.1f} ms   budget {BUDGET_MS:.0f} ms   ratio {ratio:.2f}")
    per_test = (wall - baseline_wall) / args.tests
    print(f"  whole session, per test:         {per_test:7.1f} ms   ratio {per_test / BUDGET_MS:.2f}")
    print(
        f"    (first test to the session's end: {wall:.0f} ms, against {baseline_wall:.0f} ms without the stack;"
        " the background clean-ups, waited for at the end, included)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
