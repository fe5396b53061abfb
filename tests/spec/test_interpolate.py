"""Variable interpolation with Docker Compose's semantics, `.env` files, and both through stack files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from stackd.errors import StackFileError
from stackd.spec import load_stack, stack_to_dict
from stackd.spec.interpolate import interpolate, parse_dotenv
from stackd.spec.problems import Invalid

HERE = Path(__file__).parent
REPO = HERE.parent.parent
INTERPOLATION = HERE / "good" / "interpolation" / "stack.toml"
ENV = {"SET": "value", "EMPTY": "", "OTHER": "other"}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("plain text", "plain text"),
        ("${SET}", "value"),
        ("$SET", "value"),
        ("$SET-suffix", "value-suffix"),
        ("$SET.x", "value.x"),
        ("${SET}suffix", "valuesuffix"),
        ("a ${SET} and $OTHER", "a value and other"),
        # :- replaces unset and empty; - replaces only unset.
        ("${SET:-default}", "value"),
        ("${EMPTY:-default}", "default"),
        ("${UNSET:-default}", "default"),
        ("${SET-default}", "value"),
        ("${EMPTY-default}", ""),
        ("${UNSET-default}", "default"),
        ("${UNSET:-}", ""),
        # :? and ? pass a value through when they do not fail.
        ("${SET:?error}", "value"),
        ("${SET?error}", "value"),
        ("${EMPTY?error}", ""),
        # :+ replaces set and non-empty; + replaces set.
        ("${SET:+x}", "x"),
        ("${EMPTY:+x}", ""),
        ("${UNSET:+x}", ""),
        ("${SET+x}", "x"),
        ("${EMPTY+x}", "x"),
        ("${UNSET+x}", ""),
        # $$ is a literal dollar, also before a name or a brace.
        ("$$", "$"),
        ("costs $$5", "costs $5"),
        ("$$SET", "$SET"),
        ("$${SET}", "${SET}"),
        ("$$$SET", "$value"),
        # Defaults may hold interpolations, nested.
        ("${UNSET:-${SET}}", "value"),
        ("${UNSET:-${ALSO_UNSET:-deep}}", "deep"),
        ("${UNSET:-${ALSO_UNSET:-${OTHER}-x}}", "other-x"),
        ("${UNSET:-$$}", "$"),
        ("${SET:+[${OTHER}]}", "[other]"),
        ("${UNSET:-a b c}", "a b c"),
        # A "}" outside a ${...} is just a character.
        ("${SET}}", "value}"),
        ("{$SET}", "{value}"),
    ],
)
def test_interpolate(template: str, expected: str) -> None:
    assert interpolate(template, ENV) == expected


@pytest.mark.parametrize(
    ("template", "gist"),
    [
        ("${UNSET:?please set UNSET}", "required variable UNSET is missing a value: please set UNSET"),
        ("${EMPTY:?must not be empty}", "required variable EMPTY is missing a value: must not be empty"),
        ("${UNSET?set it}", "required variable UNSET is missing a value: set it"),
        ("${UNSET:?}", "required variable UNSET is missing a value"),
        ("${UNSET:-${NESTED:?inner}}", "required variable NESTED is missing a value: inner"),
    ],
)
def test_required_variables(template: str, gist: str) -> None:
    with pytest.raises(Invalid) as info:
        interpolate(template, ENV)
    assert gist in info.value.message


@pytest.mark.parametrize(
    ("template", "gist"),
    [
        ("$", 'invalid interpolation at "$"'),
        ("costs $5", 'invalid interpolation at "$5"'),
        ("a $ b", 'invalid interpolation at "$ b"'),
        ("${", '"${" must be followed by a variable name'),
        ("${}", '"${" must be followed by a variable name'),
        ("${1X}", '"${" must be followed by a variable name'),
        ("${SET", "invalid interpolation"),
        ("${SET:=x}", "after ${SET"),
        ("${SET:-unclosed", 'unclosed "${"'),
        ("${UNSET:-${SET}", 'unclosed "${"'),
    ],
)
def test_malformed_templates(template: str, gist: str) -> None:
    with pytest.raises(Invalid) as info:
        interpolate(template, ENV)
    assert gist in info.value.message


def test_an_unset_variable_is_empty_with_a_warning() -> None:
    warnings: list[str] = []
    assert interpolate("a${UNSET}b$ALSO_UNSET", ENV, warnings.append) == "ab"
    assert warnings == [
        'the "UNSET" variable is not set; defaulting to a blank string',
        'the "ALSO_UNSET" variable is not set; defaulting to a blank string',
    ]
    # A default, or an empty but set variable, is no reason to warn.
    assert interpolate("${UNSET:-x}${UNSET-y}${EMPTY}", ENV, warnings.append) == "xy"
    assert len(warnings) == 2
    # Without a callback nothing is reported, and nothing breaks.
    assert interpolate("${UNSET}", ENV) == ""


# --- .env files -------------------------------------------------------------------------------------


def test_dotenv_syntax() -> None:
    text = "\n".join(
        [
            "# a comment",
            "",
            "PLAIN=value",
            "SPACED = spaced value  ",
            "export EXPORTED=1",
            "EMPTY=",
            "WITH_EQUALS=a=b=c",
            "INLINE=value # a comment",
            "HASH=value#not-a-comment",
            "SINGLE='literal $PLAIN \\n # kept'",
            'DOUBLE="expanded $PLAIN\\tand\\nescapes # kept"',
            'DOLLAR="\\$PLAIN"',
            "BARE_REF=${PLAIN}-x",
            'MULTI="first',
            'second"',
            "dotted.name-ok=1",
        ]
    )
    assert parse_dotenv(text) == {
        "PLAIN": "value",
        "SPACED": "spaced value",
        "EXPORTED": "1",
        "EMPTY": "",
        "WITH_EQUALS": "a=b=c",
        "INLINE": "value",
        "HASH": "value#not-a-comment",
        "SINGLE": "literal $PLAIN \\n # kept",
        "DOUBLE": "expanded value\tand\nescapes # kept",
        "DOLLAR": "$PLAIN",
        "BARE_REF": "value-x",
        "MULTI": "first\nsecond",
        "dotted.name-ok": "1",
    }


def test_dotenv_interpolates_from_the_environment_first() -> None:
    text = "HOST=file-host\nURL=http://${HOST}:${PORT:-80}/\nFROM_ENV\nNOT_IN_ENV\n"
    assert parse_dotenv(text) == {"HOST": "file-host", "URL": "http://file-host:80/"}
    # As in Compose, the process environment wins over values defined earlier in the file.
    assert parse_dotenv(text, {"HOST": "env-host", "PORT": "8080", "FROM_ENV": "x"}) == {
        "HOST": "file-host",
        "URL": "http://env-host:8080/",
        "FROM_ENV": "x",
    }


@pytest.mark.parametrize(
    ("text", "line", "gist"),
    [
        ("A=1\nnot a variable\n", 2, 'expected KEY=VALUE, got "not a variable"'),
        ("A=1\n\n1BAD=2\n", 3, "expected KEY=VALUE"),
        ('A="unterminated\nB=2\n', 1, "unterminated quoted value for A"),
        ("A='also unterminated\n", 1, "unterminated quoted value for A"),
        ("A=1\nB=${UNSET:?needed}\n", 2, "required variable UNSET is missing a value: needed"),
        ("A=1\nB=\nC=costs $5\n", 3, "invalid interpolation"),
    ],
)
def test_bad_dotenv(text: str, line: int, gist: str) -> None:
    with pytest.raises(Invalid) as info:
        parse_dotenv(text)
    assert info.value.subpath == (line,)
    assert info.value.message.startswith(f"line {line}: ")
    assert gist in info.value.message


# --- through stack files ----------------------------------------------------------------------------


def test_variables_from_the_dotenv_beside_the_stack_file() -> None:
    stack = load_stack(INTERPOLATION, env={}, host_cpus=2)
    assert stack.name == "interp"
    app = stack["app"]
    assert app.command == ("app", "--db", "db.internal:5432", "--price", "$5", "${NOT_A_VAR}")
    assert dict(app.environment) == {
        "MODE": "production # not a comment",
        "EMPTY_COLON": "fallback",
        "EMPTY_DASH": "",
        "UNSET_DASH": "fallback",
        "PLUS": "has-host",
        "PLUS_EMPTY": "",
        "PLUS_DASH_EMPTY": "set",
        "REQUIRED": "db.internal",
        "NESTED": "5432",
        "FROM_DOTENV_REF": "db.internal:5432",
    }
    assert app.mem_limit == 128 << 20
    assert app.stop_grace_period == 150.0
    assert stack.warnings == ()


def test_the_process_environment_overrides_the_dotenv() -> None:
    env = {
        "STACKD_TEST_DB_HOST": "from-process",
        "STACKD_TEST_EMPTY": "now-set",
        "STACKD_TEST_PROJECT": "from-env",
        "STACKD_TEST_MEMORY": "1g",
    }
    stack = load_stack(INTERPOLATION, env=env, host_cpus=2)
    assert stack.name == "from-env"
    app = stack["app"]
    assert app.argv[2] == "from-process:5432"
    assert app.environment["EMPTY_COLON"] == "now-set"
    assert app.environment["EMPTY_DASH"] == "now-set"
    assert app.environment["PLUS_EMPTY"] == "x"
    assert app.environment["REQUIRED"] == "from-process"
    # A .env value built from a variable sees the process environment's value, as in Compose.
    assert app.environment["FROM_DOTENV_REF"] == "from-process:5432"
    assert app.mem_limit == 1 << 30


def test_an_unset_variable_warns_through_the_file(tmp_path: Path) -> None:
    file = tmp_path / "stack.toml"
    file.write_text('[services.app]\ncommand = ["echo", "${STACKD_TEST_NOPE}", "$STACKD_TEST_NOPE2"]\n')
    stack = load_stack(file, env={}, host_cpus=2)
    assert stack["app"].command == ("echo", "", "")
    assert stack.warnings == (
        'services.app.command[1]: the "STACKD_TEST_NOPE" variable is not set; defaulting to a blank string',
        'services.app.command[2]: the "STACKD_TEST_NOPE2" variable is not set; defaulting to a blank string',
    )


def test_keys_are_not_interpolated(tmp_path: Path) -> None:
    file = tmp_path / "stack.toml"
    file.write_text('[services.app]\ncommand = ["x"]\nlabels = { "$KEY" = "$$value" }\n')
    stack = load_stack(file, env={"KEY": "no"}, host_cpus=2)
    assert dict(stack["app"].labels) == {"$KEY": "$value"}


def test_numbers_come_out_of_variables(tmp_path: Path) -> None:
    file = tmp_path / "stack.toml"
    file.write_text('[services.app]\ncommand = ["x"]\ncpus = "${CPUS}"\npids_limit = "${PIDS}"\n')
    stack = load_stack(file, env={"CPUS": "0.5", "PIDS": "64"}, host_cpus=2)
    assert (stack["app"].cpus, stack["app"].pids_limit) == (0.5, 64)


def test_dollars_are_written_back_escaped_so_a_reload_is_stable(tmp_path: Path) -> None:
    file = tmp_path / "stack.toml"
    file.write_text(
        '[services.app]\ncommand = ["sh", "-c", "echo $$HOME costs $$5 $${X}"]\n'
        'environment = { PRICE = "$$9", FROM = "${STACKD_TEST_V}" }\n'
    )
    stack = load_stack(file, env={"STACKD_TEST_V": "a$b"}, host_cpus=2)
    assert stack["app"].command == ("sh", "-c", "echo $HOME costs $5 ${X}")
    assert dict(stack["app"].environment) == {"PRICE": "$9", "FROM": "a$b"}
    document = stack_to_dict(stack)
    assert document["services"]["app"]["command"] == ["sh", "-c", "echo $$HOME costs $$5 $${X}"]
    assert document["services"]["app"]["environment"] == {"PRICE": "$$9", "FROM": "a$$b"}
    # Loaded again, and again: the same stack every time, whatever the environment.
    copy = tmp_path / "copy" / "stack.toml"
    copy.parent.mkdir()
    for _ in range(2):
        copy.write_text(tomli_w.dumps(document))
        again = load_stack(copy, env={"HOME": "/root", "X": "x", "b": "B"}, host_cpus=2)
        assert again == stack
        document = stack_to_dict(again)

    # The command line writes it back the same way.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKD_")}
    env |= {"STACKD_TEST_V": "a$b", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "stackd", "-f", str(file), "config", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)["services"]["app"]
    assert printed["command"][2] == "echo $$HOME costs $$5 $${X}"
    assert printed["environment"]["FROM"] == "a$$b"


def test_a_required_variable_stops_the_load(tmp_path: Path) -> None:
    file = tmp_path / "stack.toml"
    file.write_text('[services.app]\ncommand = ["x"]\nuser = "${STACKD_TEST_USER:?run as whom?}"\n')
    with pytest.raises(StackFileError) as info:
        load_stack(file, env={}, host_cpus=2)
    [problem] = info.value.problems
    assert (problem.path, problem.line) == ("services.app.user", 3)
    assert problem.message == "required variable STACKD_TEST_USER is missing a value: run as whom?"
    assert load_stack(file, env={"STACKD_TEST_USER": "nobody"}, host_cpus=2)["app"].user is not None


def test_a_bad_dotenv_is_reported_in_the_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GOOD=1\n\n'bad line\n")
    file = tmp_path / "stack.toml"
    file.write_text('[services.app]\ncommand = ["x"]\n')
    with pytest.raises(StackFileError) as info:
        load_stack(file, env={}, host_cpus=2)
    [problem] = info.value.problems
    assert problem.file == str(tmp_path / ".env")
    assert problem.line == 3
    assert problem.path == ""
    assert "expected KEY=VALUE" in problem.message
    assert not problem.message.startswith("line ")  # the line is in Problem.line, not said twice


def test_a_bad_dotenv_and_a_bad_stack_file_are_reported_together(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("not valid\n")
    file = tmp_path / "stack.toml"
    file.write_text('[services.app]\ncommand = ["x"]\nrestart = "sometimes"\n')
    with pytest.raises(StackFileError) as info:
        load_stack(file, env={}, host_cpus=2)
    assert [(p.file, p.path) for p in info.value.problems] == [
        (str(tmp_path / ".env"), ""),
        (str(file), "services.app.restart"),
    ]


def test_env_file_values_are_not_overridden_by_the_process_environment(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text("MODE=from-file\nURL=http://${HOST}/\n")
    file = tmp_path / "stack.toml"
    file.write_text('[services.app]\ncommand = ["x"]\nenv_file = "app.env"\nenvironment = { EXTRA = "1" }\n')
    stack = load_stack(file, env={"MODE": "from-process", "HOST": "h"}, host_cpus=2)
    assert dict(stack["app"].environment) == {"MODE": "from-file", "URL": "http://h/", "EXTRA": "1"}
