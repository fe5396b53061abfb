"""Property tests: whatever TOML it is given, the loader answers with a Stack or a StackFileError, never
another exception; and every Stack it accepts survives `stack_to_dict` -> TOML -> load unchanged."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackd.errors import StackFileError
from stackd.spec import Stack, parse_stack, stack_to_dict
from stackd.spec.interpolate import interpolate, parse_dotenv
from stackd.spec.loader import NETWORK_KEYS, TOP_LEVEL_KEYS
from stackd.spec.problems import Invalid
from stackd.spec.service import SERVICE_KEYS, UNSUPPORTED_SERVICE_KEYS
from stackd.spec.units import format_duration, format_size, parse_duration, parse_size

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
ENV = {"SET": "value", "EMPTY": "", "NUM": "2", "PORT": "8080"}
SERVICE_NAMES = ("a", "b", "db", "web")

KEYS = (
    TOP_LEVEL_KEYS
    + NETWORK_KEYS
    + tuple(SERVICE_KEYS)
    + tuple(UNSUPPORTED_SERVICE_KEYS)
    + SERVICE_NAMES
    + ("test", "interval", "timeout", "retries", "start_period", "start_interval", "disable")  # healthcheck
    + ("condition", "required", "restart")  # depends_on entries
    + ("target", "published", "host_ip", "protocol", "type", "source", "read_only", "tmpfs", "size", "mode")
    + ("soft", "hard", "nofile", "core", "path", "version", "x-ext", "net.ipv4.ip_forward", "vm.swappiness")
)
INTERESTING = (
    "$", "$$", "${", "${}", "${SET", "$SET", "${SET}", "${UNSET}", "${EMPTY:-d}", "${UNSET:?gone}", "${SET:+x}",
    "${UNSET:-${SET}}", "cost $5", "$$SET",
    "256MiB", "1g", "1.5g", "512k", "5MiB", "256XB", "-1", "0", "1024",
    "1.5s", "2m30s", "1h", "500ms", "0s", "1x", "10 s",
    "80", "8080:80", "0.0.0.0:8080:80", "127.0.0.1:8080:80/udp", "[::1]:80:80", "9000-9001:9000-9001", "8080:80/sctp",
    "-5:80", "70000:80",
    "bridge", "host", "none", "service:a", "service:b", "service:", "container:x",
    "no", "always", "on-failure", "on-failure:3", "unless-stopped",
    "SIGTERM", "KILL", "SIGFOO", "9", "ALL", "NET_ADMIN", "net_raw",
    "healthy", "service_healthy", "started", "completed_successfully",
    "./data:/data", "./data:/data:ro", "/:/x", "./x:/proc", "./x:..", "data:/data", "/tmp", "/tmp:size=1m,mode=1777",
    "postgres", "sh -c 'echo hi'", "echo \"unclosed", "1000:1000", "root", "10.77.0.0/24", "8.8.8.0/24",
    "no-new-privileges", "seccomp=unconfined", "seccomp=./nope.json", "KEY=VALUE", "KEY",
    "~", "~no-such-user-stackd/x", "~no-such-user-stackd/x:/x", "./a\x00b:/x", "a\x00b", "²", "١٢", "\n", "",
)  # fmt: skip

keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=10))
interesting = st.sampled_from(INTERESTING)
scalars = st.one_of(
    interesting,  # the strings the loader cares about; first, so that shrinking goes towards them
    st.lists(interesting, max_size=4),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-2, max_value=70000),
    st.floats(),
    st.text(max_size=16),
    st.dates(),
    st.times(),
    st.datetimes(min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 12, 31)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def service_tables(draw: st.DrawFn) -> dict[str, Any]:
    """A service table with real keys and values of any shape, often with a command."""
    value = st.one_of(interesting, st.lists(interesting, max_size=3), values)
    table: dict[str, Any] = draw(st.dictionaries(st.sampled_from(tuple(SERVICE_KEYS)), value, max_size=8))
    if draw(st.booleans()):
        table["command"] = draw(st.sampled_from((["x"], "sh -c true", ["run", "${SET}"])))
    return table


structured_documents = st.fixed_dictionaries(
    {
        "services": st.dictionaries(
            st.one_of(st.sampled_from(SERVICE_NAMES), st.text(max_size=6)), service_tables(), min_size=1, max_size=3
        )
    },
    optional={
        "name": st.one_of(st.sampled_from(("shop", "Bad Name", "${SET}")), st.text(max_size=8)),
        "network": st.dictionaries(st.sampled_from((*NETWORK_KEYS, "x-a", "gateway")), values, max_size=2),
        "version": scalars,
    },
)
arbitrary_documents = st.dictionaries(keys, values, max_size=5)


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the stack file would be: it anchors relative paths; nothing is written there."""
    return tmp_path_factory.mktemp("hypothesis")


def load_or_refuse(document: dict[str, Any], directory: Path) -> None:
    text = tomli_w.dumps(document)
    try:
        stack = parse_stack(text, file=directory / "stack.toml", env=ENV, host_cpus=2)
    except StackFileError as error:
        assert error.problems
        assert all(problem.message for problem in error.problems)
        str(error)  # the message the CLI prints can be built
        return
    assert isinstance(stack, Stack)
    # Whatever is accepted is printed by `config` as a file that loads to the same stack.
    again = parse_stack(tomli_w.dumps(stack_to_dict(stack)), file=directory / "copy.toml", env={}, host_cpus=2)
    assert again == stack


@SETTINGS
@given(document=arbitrary_documents)
def test_arbitrary_documents(document: dict[str, Any], directory: Path) -> None:
    load_or_refuse(document, directory)


@SETTINGS
@given(document=structured_documents)
def test_structured_documents_with_random_values(document: dict[str, Any], directory: Path) -> None:
    load_or_refuse(document, directory)


TEMPLATE_PIECES = (*INTERESTING, "{", "}", ":-", "?")
DOTENV_PIECES = ("A=1", 'export B="x', "C='y'", "D", "# c", "E=${A}", "\\", '"', "'", "\n", " ", "F=a # b")


@SETTINGS
@given(text=st.one_of(st.text(max_size=40), st.lists(st.sampled_from(TEMPLATE_PIECES), max_size=8).map("".join)))
def test_interpolate_answers_or_refuses(text: str) -> None:
    try:
        result = interpolate(text, ENV)
    except Invalid as error:
        assert error.message
    else:
        assert isinstance(result, str)
        if "$" not in text:
            assert result == text


@SETTINGS
@given(text=st.one_of(st.text(max_size=60), st.lists(st.sampled_from(DOTENV_PIECES), max_size=8).map("".join)))
def test_parse_dotenv_answers_or_refuses(text: str) -> None:
    try:
        result = parse_dotenv(text, ENV)
    except Invalid as error:
        assert error.subpath and isinstance(error.subpath[0], int)
    else:
        assert all(isinstance(key, str) and isinstance(value, str) for key, value in result.items())


@SETTINGS
@given(seconds=st.one_of(st.floats(min_value=0, max_value=1e9), st.integers(min_value=0, max_value=10**9)))
def test_durations_round_trip(seconds: float) -> None:
    parsed = parse_duration(seconds)
    assert parse_duration(format_duration(parsed)) == parsed


@SETTINGS
@given(size=st.integers(min_value=0, max_value=1 << 62))
def test_sizes_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size
