"""Every file in tests/spec/bad/ is refused with exactly the problems its header announces.

A bad file is `bad/NAME.toml`, or `bad/NAME/stack.toml` when it needs files beside it (a `.env`, an
env_file). Its comment lines say what to expect:

    # expect: services.db.ports[1] | already published by services.db.ports[0] | 7
              <exact key path>      | <gist of the message>                     | <line, or "none">
    # env: NAME=VALUE      the environment the file is loaded with (nothing else is set)
    # project: NAME        passed as -p / project=
    # host_cpus: N         passed as host_cpus= (default 2, so no test depends on this machine)
    # file: .env           the problems are reported in this file (relative), not the stack file
    # cli: skip            not checked through the command line (its result depends on the host)

The path `(root)` stands for the empty path (a problem with the file itself). The load must raise
StackFileError, each expectation must match a distinct problem, and no other problem may be reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stackd.errors import Problem, StackFileError
from stackd.spec import load_stack
from stackd.spec.service import UNSUPPORTED_SERVICE_KEYS

BAD = Path(__file__).parent / "bad"
_HEADER = re.compile(r"^# (expect|env|project|host_cpus|file|cli): ?(.*)$")


@dataclass(frozen=True)
class Expectation:
    path: str
    gist: str
    line: int | None


@dataclass
class BadFile:
    file: Path
    expectations: list[Expectation] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    project: str | None = None
    host_cpus: int = 2
    problem_file: Path | None = None
    cli: bool = True

    @property
    def name(self) -> str:
        return str(self.file.relative_to(BAD))

    def load(self) -> None:
        load_stack(self.file, project=self.project, env=self.env, host_cpus=self.host_cpus)


def read_bad_file(file: Path) -> BadFile:
    case = BadFile(file)
    for line in file.read_text(encoding="utf-8").splitlines():
        match = _HEADER.match(line)
        if not match:
            continue
        key, value = match.groups()
        if key == "expect":
            path, gist, where = (part.strip() for part in value.split(" | "))
            path = "" if path == "(root)" else path
            case.expectations.append(Expectation(path, gist, None if where == "none" else int(where)))
        elif key == "env":
            name, _, val = value.partition("=")
            case.env[name] = val
        elif key == "project":
            case.project = value
        elif key == "host_cpus":
            case.host_cpus = int(value)
        elif key == "file":
            case.problem_file = file.parent / value
        elif key == "cli":
            case.cli = value != "skip"
    return case


def all_bad_files() -> list[BadFile]:
    files = sorted(BAD.glob("*.toml")) + sorted(BAD.glob("*/stack.toml"))
    return [read_bad_file(file) for file in files]


BAD_FILES = all_bad_files()


def describe(problems: list[Problem]) -> str:
    return "\n".join(f"  {p.path!r} (line {p.line}): {p.message}" for p in problems)


def match_problems(case: BadFile, problems: list[Problem]) -> None:
    """Assert that `problems` are exactly the ones `case` announces."""
    unmatched = list(problems)
    expected_file = str(case.problem_file or case.file)
    for expected in case.expectations:
        found = next((p for p in unmatched if p.path == expected.path and expected.gist in p.message), None)
        assert found is not None, (
            f"{case.name}: no problem at {expected.path!r} saying {expected.gist!r}; got:\n{describe(problems)}"
        )
        assert found.line == expected.line, f"{case.name}: {expected.path!r} reported at line {found.line}"
        assert found.file == expected_file, f"{case.name}: {expected.path!r} reported in {found.file}"
        unmatched.remove(found)
    assert not unmatched, f"{case.name}: problems nobody announced:\n{describe(unmatched)}"


def test_there_are_enough_distinct_bad_files() -> None:
    assert len(BAD_FILES) >= 30
    texts = {case.file.read_text(encoding="utf-8") for case in BAD_FILES}
    assert len(texts) == len(BAD_FILES), "two bad files are identical"
    for case in BAD_FILES:
        assert case.expectations, f"{case.name} announces no problem"


@pytest.mark.parametrize("case", BAD_FILES, ids=lambda case: case.name)
def test_bad_file_is_refused_with_its_problems(case: BadFile) -> None:
    with pytest.raises(StackFileError) as info:
        case.load()
    match_problems(case, info.value.problems)


@pytest.mark.parametrize("case", BAD_FILES, ids=lambda case: case.name)
def test_error_message_lists_every_problem(case: BadFile) -> None:
    with pytest.raises(StackFileError) as info:
        case.load()
    text = str(info.value)
    count = len(info.value.problems)
    assert text.startswith("invalid stack file" if count == 1 else f"invalid stack file ({count} problems)")
    for problem in info.value.problems:
        where = f"{problem.file}:{problem.line}" if problem.line else problem.file
        assert f"  {where}: " in text
        assert problem.message in text


def test_many_problems_are_reported_at_once() -> None:
    case = read_bad_file(BAD / "many_problems.toml")
    assert len(case.expectations) >= 10
    with pytest.raises(StackFileError) as info:
        case.load()
    match_problems(case, info.value.problems)
    # In the order of the file, so a reader can walk down it.
    lines = [p.line or 0 for p in info.value.problems]
    assert lines == sorted(lines)
    # Problems in different services, at the top level and across services all came in one error.
    paths = {p.path.split(".")[0] for p in info.value.problems} | {
        ".".join(p.path.split(".")[:2]) for p in info.value.problems
    }
    assert {"nmae", "network", "services.db", "services.web", "services.worker"} <= paths


def test_dependency_cycle_is_reported_once() -> None:
    with pytest.raises(StackFileError) as info:
        load_stack(BAD / "cycle_three.toml", env={}, host_cpus=2)
    cycles = [p for p in info.value.problems if "cycle" in p.message]
    assert len(cycles) == 1


def test_tcp_and_udp_on_the_same_port_do_not_conflict(tmp_path: Path) -> None:
    file = tmp_path / "stack.toml"
    file.write_text(
        '[services.dns]\ncommand = ["dns"]\nports = ["5353:53/udp", "5353:53", "0.0.0.0:5354:54/udp"]\n'
        '[services.other]\ncommand = ["other"]\nports = ["127.0.0.1:5354:54"]\n'
    )
    stack = load_stack(file, env={}, host_cpus=2)
    assert [str(p) for p in stack["dns"].ports] == [
        "127.0.0.1:5353:53/udp",
        "127.0.0.1:5353:53/tcp",
        "0.0.0.0:5354:54/udp",
    ]


def test_a_file_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(StackFileError) as info:
        load_stack(tmp_path / "nope.toml", env={})
    [problem] = info.value.problems
    assert problem.file == str(tmp_path / "nope.toml")
    assert problem.path == ""
    assert "no such file" in problem.message


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_SERVICE_KEYS))
def test_each_unsupported_service_key_says_what_to_do_instead(key: str, tmp_path: Path) -> None:
    file = tmp_path / "stack.toml"
    file.write_text(f'[services.app]\ncommand = ["x"]\n{key} = "anything"\n')
    with pytest.raises(StackFileError) as info:
        load_stack(file, env={}, host_cpus=2)
    [problem] = info.value.problems
    assert (problem.path, problem.line) == (f"services.app.{key}", 3)
    assert problem.message == f"not supported: {UNSUPPORTED_SERVICE_KEYS[key]}"
    assert "not supported: not supported" not in problem.message


@pytest.mark.parametrize("key", ["volumes", "networks", "secrets", "configs", "include"])
def test_each_unsupported_top_level_key_says_what_to_do_instead(key: str, tmp_path: Path) -> None:
    file = tmp_path / "stack.toml"
    file.write_text(f'[services.app]\ncommand = ["x"]\n[{key}.thing]\nfile = "x"\n')
    with pytest.raises(StackFileError) as info:
        load_stack(file, env={}, host_cpus=2)
    [problem] = info.value.problems
    assert (problem.path, problem.line) == (key, 3)
    assert problem.message.startswith("not supported: ")
    assert "not supported: not supported" not in problem.message
