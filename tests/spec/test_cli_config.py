"""`python3 -m stackd config` (and friends) as a user runs them: exit codes, output, file discovery."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomli_w

from stackd import __version__
from stackd.cli.main import build_parser
from stackd.spec import load_stack, stack_to_dict

HERE = Path(__file__).parent
REPO = HERE.parent.parent
GOOD = HERE / "good"
BAD = HERE / "bad"
FULL = GOOD / "full" / "stack.toml"

STACK = """\
name = "demo"

[services.db]
command = ["postgres"]
healthcheck = { test = ["pg_isready"] }

[services.web]
command = ["web", "--port", "8000"]
depends_on = { db = "healthy" }

[services.worker]
command = ["worker"]
"""


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run stackd in a clean environment: no STACKD_* variable of the caller leaks in."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("STACKD_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "stackd", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory holding stack.toml."""
    directory = tmp_path / "proj"
    directory.mkdir()
    (directory / "stack.toml").write_text(STACK)
    return directory


def test_config_prints_a_stack_file_that_loads_to_the_same_stack(project: Path, tmp_path: Path) -> None:
    result = run("config", cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    copy = tmp_path / "copy.toml"
    copy.write_text(result.stdout)
    assert load_stack(copy, env={}) == load_stack(project / "stack.toml", env={})
    assert tomllib.loads(result.stdout) == stack_to_dict(load_stack(project / "stack.toml", env={}))


@pytest.mark.parametrize("file", [FULL, GOOD / "compose_spellings.toml"], ids=lambda f: f.parent.name + "/" + f.name)
def test_config_toml_output_reloads(file: Path, tmp_path: Path) -> None:
    env = {"STACKD_TEST_FROM_PROCESS": "from-process"}
    result = run("-f", str(file), "config", "--format", "toml", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "stack.toml"
    copy.write_text(result.stdout)
    assert load_stack(copy, env={}, host_cpus=2) == load_stack(file, env=env, host_cpus=2)


def test_config_json(project: Path) -> None:
    result = run("config", "--format", "json", cwd=project)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == stack_to_dict(load_stack(project / "stack.toml", env={}))


def test_config_services(project: Path) -> None:
    result = run("config", "--services", cwd=project)
    assert (result.returncode, result.stdout) == (0, "db\nweb\nworker\n")
    result = run("config", "--services", "worker", "db", cwd=project)
    assert (result.returncode, result.stdout) == (0, "db\nworker\n")


def test_config_some_services(project: Path) -> None:
    result = run("config", "--format", "json", "web", cwd=project)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    # Like Compose, a named service comes with what it depends on, so the output is a valid stack file.
    assert list(document["services"]) == ["db", "web"]
    assert document["name"] == "demo"
    reloaded = project / "selected.toml"
    reloaded.write_text(tomli_w.dumps(document))
    assert list(load_stack(reloaded, env={}).services) == ["db", "web"]


def test_config_an_unknown_service(project: Path) -> None:
    result = run("config", "web", "nope", cwd=project)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "no such service: nope (services: db, web, worker)" in result.stderr


def test_config_quiet(project: Path) -> None:
    result = run("config", "-q", cwd=project)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    (project / "stack.toml").write_text(STACK + 'restart = "sometimes"\n')
    result = run("config", "--quiet", cwd=project)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "services.worker.restart" in result.stderr


def test_p_overrides_the_name(project: Path) -> None:
    for args in (["-p", "other", "config"], ["config", "-p", "other"], ["config", "--project-name", "other"]):
        result = run(*args, "--format", "json", cwd=project)
        assert result.returncode == 0, (args, result.stderr)
        assert json.loads(result.stdout)["name"] == "other"
    result = run("config", "--format", "json", cwd=project, env={"STACKD_PROJECT_NAME": "from-env"})
    assert json.loads(result.stdout)["name"] == "from-env"
    result = run("-p", "from-p", "config", "--format", "json", cwd=project, env={"STACKD_PROJECT_NAME": "from-env"})
    assert json.loads(result.stdout)["name"] == "from-p"


def test_a_bad_p(project: Path) -> None:
    result = run("-p", "Bad Name", "config", cwd=project)
    assert result.returncode == 2
    assert 'project name (-p): "Bad Name" is not a project name' in result.stderr


def test_f_and_stackd_file(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args, env in (
        (["-f", str(project / "stack.toml"), "config"], {}),
        (["config", "-f", str(project / "stack.toml")], {}),
        (["config", "--file", str(project / "stack.toml")], {}),
        (["config"], {"STACKD_FILE": str(project / "stack.toml")}),
    ):
        result = run(*args, "--services", cwd=elsewhere, env=env)
        assert (result.returncode, result.stdout) == (0, "db\nweb\nworker\n"), (args, env, result.stderr)


def test_f_wins_over_stackd_file(project: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[services.only]\ncommand = ["x"]\n')
    result = run(
        "-f", str(other), "config", "--services", cwd=tmp_path, env={"STACKD_FILE": str(project / "stack.toml")}
    )
    assert (result.returncode, result.stdout) == (0, "only\n")


def test_relative_f_is_relative_to_the_cwd(project: Path) -> None:
    result = run("-f", "proj/stack.toml", "config", "--services", cwd=project.parent)
    assert (result.returncode, result.stdout) == (0, "db\nweb\nworker\n")


def test_the_stack_file_is_found_here_or_in_a_parent(project: Path) -> None:
    deep = project / "a" / "b"
    deep.mkdir(parents=True)
    for cwd in (project, deep):
        result = run("config", "--services", cwd=cwd)
        assert (result.returncode, result.stdout) == (0, "db\nweb\nworker\n"), result.stderr
    # The nearest one wins.
    (project / "a" / "stack.toml").write_text('[services.nearer]\ncommand = ["x"]\n')
    assert run("config", "--services", cwd=deep).stdout == "nearer\n"


def test_stackd_toml_is_found_too(tmp_path: Path) -> None:
    (tmp_path / "stackd.toml").write_text('[services.alt]\ncommand = ["x"]\n')
    assert run("config", "--services", cwd=tmp_path).stdout == "alt\n"


def test_no_stack_file_anywhere(tmp_path: Path) -> None:
    result = run("config", cwd=tmp_path)
    assert result.returncode == 2
    assert "no stack.toml or stackd.toml here or in any parent directory (use -f FILE)" in result.stderr


def test_f_names_a_missing_file(tmp_path: Path) -> None:
    result = run("-f", "nope.toml", "config", cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.toml: no such file" in result.stderr


def test_the_project_name_defaults_to_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "My_App.v2"
    directory.mkdir()
    (directory / "stack.toml").write_text('[services.app]\ncommand = ["x"]\n')
    result = run("config", "--format", "json", cwd=directory)
    assert json.loads(result.stdout)["name"] == "my_appv2"


def test_warnings_go_to_stderr(tmp_path: Path) -> None:
    (tmp_path / "stack.toml").write_text('version = "3"\n[services.app]\ncommand = ["echo", "$STACKD_TEST_UNSET"]\n')
    result = run("config", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0
    assert json.loads(result.stdout)["services"]["app"]["command"] == ["echo", ""]
    assert "stackd: warning: version: the top-level `version` is obsolete and ignored" in result.stderr
    assert 'stackd: warning: services.app.command[1]: the "STACKD_TEST_UNSET" variable is not set' in result.stderr


def test_config_refuses_a_bad_file_with_every_problem_on_stderr(tmp_path: Path) -> None:
    file = BAD / "many_problems.toml"
    result = run("-f", str(file), "config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    first, *rest = result.stderr.splitlines()
    problems = load_problem_count(file)
    assert first == f"stackd: invalid stack file ({problems} problems):"
    assert len(rest) == problems
    first_expected = next(line for line in file.read_text().splitlines() if line.startswith("# expect: "))
    path, gist, line = (part.strip() for part in first_expected.removeprefix("# expect: ").split(" | "))
    assert rest[0].startswith(f"  {file}:{line}: {path}: {gist}")


def load_problem_count(file: Path) -> int:
    return sum(1 for line in file.read_text().splitlines() if line.startswith("# expect: "))


def bad_file_cases() -> list[tuple[Path, dict[str, str], list[str], list[str]]]:
    """(file, environment, -p arguments, expected key paths) for each bad file the CLI can check."""
    header = re.compile(r"^# (expect|env|project|cli): ?(.*)$")
    cases = []
    for file in sorted(BAD.glob("*.toml")) + sorted(BAD.glob("*/stack.toml")):
        env: dict[str, str] = {}
        project: list[str] = []
        paths: list[str] = []
        skip = False
        for line in file.read_text().splitlines():
            match = header.match(line)
            if not match:
                continue
            key, value = match.groups()
            if key == "expect":
                paths.append(value.split(" | ")[0].strip())
            elif key == "env":
                name, _, val = value.partition("=")
                env[name] = val
            elif key == "project":
                project = ["-p", value]
            elif key == "cli":
                skip = value == "skip"
        if not skip:
            cases.append((file, env, project, paths))
    return cases


def test_config_exits_2_on_every_bad_file(tmp_path: Path) -> None:
    cases = bad_file_cases()
    assert len(cases) >= 30

    def check(case: tuple[Path, dict[str, str], list[str], list[str]]) -> str | None:
        file, env, project, paths = case
        result = run(*project, "-f", str(file), "config", cwd=tmp_path, env=env)
        if result.returncode != 2 or result.stdout or not result.stderr.startswith("stackd: invalid stack file"):
            return f"{file.name}: exit {result.returncode}, stdout {result.stdout[:80]!r}, stderr {result.stderr!r}"
        for path in paths:
            if path != "(root)" and f": {path}: " not in result.stderr:
                return f"{file.name}: {path} is not on stderr:\n{result.stderr}"
        return None

    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        failures = [failure for failure in pool.map(check, cases) if failure]
    assert failures == []


def test_version() -> None:
    result = run("--version", cwd=HERE)
    assert (result.returncode, result.stdout.strip()) == (0, f"stackd {__version__}")


def verbs() -> list[str]:
    parser = build_parser()
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


def test_help_for_stackd_and_each_verb() -> None:
    assert {"config", "schema"} <= set(verbs())
    result = run("--help", cwd=HERE)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: stackd")
    for verb in verbs():
        result = run(verb, "--help", cwd=HERE)
        assert result.returncode == 0, (verb, result.stderr)
        assert result.stdout.startswith(f"usage: stackd {verb}"), verb


def test_usage_errors_exit_2(project: Path) -> None:
    assert run(cwd=project).returncode == 2  # no verb
    assert run("frobnicate", cwd=project).returncode == 2
    assert run("config", "--format", "yaml", cwd=project).returncode == 2
