"""The pytest plugin: stacks as fixtures, unique per test and per xdist worker, logs in failure reports.

Registered through the ``pytest11`` entry point (``-p stackd.testing.pytest_plugin`` without the
installed package); docs/testing.md is the user's guide. In a conftest.py::

    from stackd.testing.pytest_plugin import stack_fixture

    redis = stack_fixture("stack.toml")                          # a new stack for each test
    shared = stack_fixture({"services": {...}}, scope="session")  # one for the whole run

    async def test_it(redis):
        await redis["redis"].exec(["redis-cli", "ping"], check=True)

or, for one test, a marker and the ``stackd_stack`` fixture::

    @pytest.mark.stackd("stack.toml", wait="healthy")
    def test_it(stackd_stack): ...

A fixture's stack runs on an event loop of its own in a background thread
(:func:`stackd.open_stack_in_thread`), so it serves synchronous and async tests alike, in any fixture
scope, without tying its services to a test's event loop (pytest-asyncio's loop scopes don't matter);
its async methods are awaited from the test's loop.

Names: every stack gets the project ``<prefix>-<worker>-<random>`` (prefix ``pt``, ini
``stackd_project_prefix``; worker ``gw0``... under pytest-xdist, else ``main``): parallel workers and
parallel runs never collide.

Failures: a failed test's report gets a section per stack it used (its fixtures' stacks and those it
opened itself with ``open_stack``): the services' states and the last lines of their logs
(``stackd_log_lines``, default 100).

Cleanup: every stack is torn down at its fixture's teardown, also after a failure or Ctrl-C. A run
killed with SIGKILL leaves its stacks' state records under the state directory; at the start of the next
run, the plugin removes every project of its prefix whose process is gone (``stackd down -p NAME``
does the same for one project by hand; ``stackd ls -a`` lists them).

Leak check (``--stackd-leak-check`` or ini ``stackd_leak_check = true``): each stack's host resources
(cgroups, namespaces, links, mounts, processes, state files) are snapshotted around its life and the
teardown fails if any is left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from stackd.api.specs import SpecLike
    from stackd.api.stack import Stack

__all__ = [
    "StackdSettings",
    "open_test_stack",
    "stack_fixture",
    "stackd_options",
    "stackd_project",
    "stackd_settings",
    "stackd_stack",
    "unique_project",
]

_STACKS = pytest.StashKey[list["Stack"]]()


@dataclass
class StackdSettings:
    """The plugin's settings for this run (options and ini values), as the ``stackd_settings`` fixture
    gives them."""

    #: Projects are named ``<prefix>-<worker>-<random>``.
    prefix: str = "pt"
    #: Where state records go (None: stackd's default, /run/stackd or $STACKD_STATE_DIR).
    state_dir: Path | None = None
    #: Where logs go (default: ``stackd-logs`` in pytest's temporary directory of the run).
    log_dir: Path | None = None
    leak_check: bool = False
    #: Lines of each service's log in a failed test's report.
    log_lines: int = 100
    removed_stale: list[str] = field(default_factory=list)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stackd", "stackd stacks as fixtures")
    group.addoption(
        "--stackd-leak-check",
        action="store_true",
        default=None,
        help="fail a stack fixture's teardown if the stack left a host resource behind",
    )
    group.addoption("--stackd-state-dir", default=None, help="state root of the tests' stacks (default /run/stackd)")
    group.addoption("--stackd-log-dir", default=None, help="log root of the tests' stacks (default: in basetemp)")
    parser.addini("stackd_leak_check", "check each stack fixture for leaked host resources", type="bool", default=False)
    parser.addini("stackd_project_prefix", "prefix of the tests' project names", default="pt")
    parser.addini("stackd_state_dir", "state root of the tests' stacks", default="")
    parser.addini("stackd_log_dir", "log root of the tests' stacks", default="")
    parser.addini("stackd_log_lines", "log lines per service in a failed test's report", default="100")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stackd(spec, **options): the stack of the `stackd_stack` fixture: a stack file, a dict or a "
        "stackd.spec.Stack, with open_stack's options (wait, services, env, timeout...)",
    )
    state = config.getoption("--stackd-state-dir") or config.getini("stackd_state_dir")
    log = config.getoption("--stackd-log-dir") or config.getini("stackd_log_dir")
    leak = config.getoption("--stackd-leak-check")
    config.stash[_CLEANUPS] = _Cleanups()
    config.stash[_SETTINGS] = StackdSettings(
        prefix=str(config.getini("stackd_project_prefix") or "pt"),
        state_dir=Path(state) if state else None,
        log_dir=Path(log) if log else None,
        leak_check=bool(config.getini("stackd_leak_check") if leak is None else leak),
        log_lines=int(config.getini("stackd_log_lines") or 100),
    )


_SETTINGS = pytest.StashKey[StackdSettings]()


class _Cleanups:
    """The stacks whose clean-up goes on in the background: at most MAX_PENDING at a time (the
    oldest is waited for when one more comes), all of them waited for at the end of the session.
    A clean-up that failed fails the session and is printed in its summary."""

    MAX_PENDING = 2

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []
        self.errors: list[str] = []

    def add(self, finish: Callable[[], None]) -> None:
        self.pending.append(finish)
        while len(self.pending) > self.MAX_PENDING:
            self._finish(self.pending.pop(0))

    def finish_all(self) -> None:
        while self.pending:
            self._finish(self.pending.pop(0))

    def _finish(self, finish: Callable[[], None]) -> None:
        try:
            finish()
        except Exception as error:  # reported at the end; the other stacks are still cleaned up
            self.errors.append(f"{type(error).__name__}: {error}")


_CLEANUPS = pytest.StashKey[_Cleanups]()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    cleanups = session.config.stash.get(_CLEANUPS, None)
    if cleanups is None:
        return
    cleanups.finish_all()
    if cleanups.errors and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    cleanups = terminalreporter.config.stash.get(_CLEANUPS, None)
    if cleanups is not None and cleanups.errors:
        terminalreporter.section("stackd: stacks whose clean-up failed", red=True)
        for error in cleanups.errors:
            terminalreporter.write_line(error)


def pytest_unconfigure(config: pytest.Config) -> None:
    cleanups = config.stash.get(_CLEANUPS, None)
    if cleanups is not None:
        cleanups.finish_all()  # a session that ended early (an internal error) still cleans up


def pytest_sessionstart(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        return  # under xdist the controller did it before starting the workers
    settings = session.config.stash[_SETTINGS]
    settings.removed_stale = remove_stale_projects(settings.prefix, settings.state_dir)


def remove_stale_projects(prefix: str, state_dir: Path | None = None) -> list[str]:
    """Remove what every project named ``<prefix>-...`` left behind when its process is gone (a run
    killed by SIGKILL); returns their names. Projects of live processes are left alone."""
    from stackd.runtime.paths import DEFAULT_STATE_ROOT

    root = state_dir or DEFAULT_STATE_ROOT
    try:
        candidates = sorted(p for p in root.iterdir() if p.name.startswith(f"{prefix}-") and p.is_dir())
    except OSError:
        return []
    if not candidates:
        return []
    import anyio

    from stackd.api.stack import supervisor_alive
    from stackd.runtime.paths import StackPaths
    from stackd.supervisor.cleanup import remove_recorded
    from stackd.supervisor.state import StateRecord

    removed = []
    for directory in candidates:
        paths = StackPaths(directory.name, state_root=root)
        record = StateRecord.load(paths)
        if record is None or supervisor_alive(paths) is not None:
            continue
        problems = anyio.run(remove_recorded, record)
        if not problems:
            removed.append(directory.name)
    return removed


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash.get(_SETTINGS, None)
    if settings is None or not settings.removed_stale:
        return []
    return [f"stackd: removed stacks a killed run left behind: {', '.join(settings.removed_stale)}"]


# --- names and options ----------------------------------------------------------------------------------


def unique_project(prefix: str = "pt") -> str:
    """``<prefix>-<worker>-<random>``: unique per test, per xdist worker and per run."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"{prefix}-{worker}-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def stackd_settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> StackdSettings:
    """The plugin's settings; the log directory defaults to ``stackd-logs`` in pytest's basetemp."""
    settings = request.config.stash[_SETTINGS]
    if settings.log_dir is None:
        settings.log_dir = tmp_path_factory.getbasetemp() / "stackd-logs"
    return settings


@pytest.fixture
def stackd_project(stackd_settings: StackdSettings) -> str:
    """A unique project name for this test (to pass to ``open_stack`` yourself)."""
    return unique_project(stackd_settings.prefix)


@pytest.fixture
def stackd_options(stackd_project: str, stackd_settings: StackdSettings) -> dict[str, Any]:
    """``open_stack`` keyword arguments for this test: a unique ``project`` and the run's
    ``state_dir`` and ``log_dir``: ``async with open_stack(spec, **stackd_options) as stack``."""
    options: dict[str, Any] = {"project": stackd_project, "log_dir": stackd_settings.log_dir}
    if stackd_settings.state_dir is not None:
        options["state_dir"] = stackd_settings.state_dir
    return options


# --- stacks ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_test_stack(request: pytest.FixtureRequest, spec: SpecLike, **options: Any) -> Iterator[Stack]:
    """The plugin's way to run a stack for a fixture: a unique project, the run's directories, the
    leak check when on, the logs in failed reports. For fixtures of your own::

        @pytest.fixture
        def stack(request, tmp_path):
            with open_test_stack(request, {"services": {...}}, base_dir=tmp_path) as stack:
                yield stack
    """
    from stackd.api.threaded import open_stack_in_thread

    settings: StackdSettings = request.getfixturevalue("stackd_settings")
    project = unique_project(settings.prefix)
    options.setdefault("log_dir", settings.log_dir)
    if settings.state_dir is not None:
        options.setdefault("state_dir", settings.state_dir)
    before = None
    if settings.leak_check:
        from stackd.testing.leaks import take_snapshot

        before = take_snapshot()
    # Without the leak check, a stack's last clean-up (network, cgroups, state) goes on in the background
    # once its services are stopped, while the next test starts; the session waits for it at its end.
    cleanups: _Cleanups = request.config.stash[_CLEANUPS]
    defer = None if before is not None else cleanups.add
    try:
        with open_stack_in_thread(spec, project=project, defer_cleanup=defer, **options) as stack:
            yield stack
    finally:
        if before is not None:
            from stackd.runtime.network.names import link_prefixes
            from stackd.testing.leaks import check_no_leaks

            check_no_leaks(before, projects=[project], link_prefixes=link_prefixes(project))


def stack_fixture(
    spec: SpecLike,
    *,
    scope: str = "function",
    autouse: bool = False,
    name: str | None = None,
    **options: Any,
) -> Any:
    """A pytest fixture that yields a running :class:`stackd.Stack` of `spec` (a stack file, a dict, or a
    :class:`stackd.spec.Stack`), new for each test with the default ``scope="function"``, or shared by a
    ``"class"``, ``"module"``, ``"package"`` or ``"session"``. `options` are :func:`stackd.open_stack`'s
    (``wait``, ``services``, ``env``, ``timeout``, ``base_dir``...). Assign it in a conftest or a
    test module; the variable's name (or `name`) is the fixture's name."""

    def fixture(request: pytest.FixtureRequest) -> Iterator[Stack]:
        with open_test_stack(request, spec, **options) as stack:
            yield stack

    fixture.__doc__ = f"A running stackd stack of {spec if isinstance(spec, str | os.PathLike) else 'a spec'}."
    return pytest.fixture(scope=scope, autouse=autouse, name=name)(fixture)  # type: ignore[call-overload]


@pytest.fixture
def stackd_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack declared by the closest ``@pytest.mark.stackd(spec, **options)`` marker (on the test,
    its class or its module), new for this test."""
    marker = request.node.get_closest_marker("stackd")
    if marker is None or not marker.args:
        raise pytest.UsageError("the stackd_stack fixture needs a @pytest.mark.stackd(spec, ...) marker")
    with open_test_stack(request, marker.args[0], **marker.kwargs) as stack:
        yield stack


# --- failure reports ------------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Collect the stacks the test opens itself (open_stack in its body)."""
    from stackd.api import stack as api_stack

    opened = item.stash.setdefault(_STACKS, [])
    hook: Callable[[Stack], None] = opened.append
    api_stack._on_open.append(hook)
    try:
        return (yield)
    finally:
        with contextlib.suppress(ValueError):
            api_stack._on_open.remove(hook)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed and call.when in ("call", "setup", "teardown"):
        settings = item.config.stash.get(_SETTINGS, None)
        lines = settings.log_lines if settings is not None else 100
        for stack in _stacks_of(item):
            with contextlib.suppress(Exception):
                report.sections.append((f"stackd {stack.project}", _report_text(stack, lines)))
    return report


def _stacks_of(item: pytest.Item) -> list[Stack]:
    if "stackd.api.stack" not in sys.modules:
        return []  # no stack was ever opened in this process
    from stackd.api.stack import Stack

    found: list[Stack] = []
    for value in [*getattr(item, "funcargs", {}).values(), *item.stash.get(_STACKS, [])]:
        if isinstance(value, Stack) and value not in found:
            found.append(value)
    return found


def _report_text(stack: Stack, lines: int) -> str:
    rows = []
    for status in stack.status():
        health = f" ({status.health})" if status.health else ""
        ended = f", {status.exit_reason}" if status.exit_reason else ""
        rows.append(f"  {status.name}: {status.state}{health}{ended} address={status.address or '-'}")
    text = stack.log_text(tail=lines, prefix=True)
    return (
        f"project {stack.project}{' (closed)' if stack.closed else ''}; logs in {stack.log_dir}\n"
        + "\n".join(rows)
        + f"\n--- last {lines} lines of each service's log:\n"
        + (text or "(no output)\n")
    )
