"""Unit tests of the spec's small pure pieces: sizes, durations, names, signals, capabilities, sysctls,
key paths and line numbers, and the project name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stackd.errors import StackFileError
from stackd.spec import load_stack, parse_stack
from stackd.spec.capabilities import (
    CAPABILITIES,
    DOCKER_DEFAULT_CAPABILITIES,
    effective_capabilities,
    normalise_capability,
)
from stackd.spec.locate import KeyLines
from stackd.spec.problems import Invalid, did_you_mean, format_path, one_of, show, type_name
from stackd.spec.project import normalise_project_name, validate_project_name
from stackd.spec.service import default_hostname
from stackd.spec.signals import normalise_signal, signal_number
from stackd.spec.sysctls import check_sysctl, normalise_sysctl_key
from stackd.spec.units import format_duration, format_size, parse_duration, parse_size

# --- sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("256MiB", 256 << 20),
        ("256m", 256 << 20),
        ("256MB", 256 << 20),
        ("1g", 1 << 30),
        ("1G", 1 << 30),
        ("1gb", 1 << 30),
        ("1GiB", 1 << 30),
        ("1.5g", 3 << 29),
        ("0.5k", 512),
        ("512k", 512 << 10),
        ("2t", 2 << 40),
        ("1p", 1 << 50),
        ("100b", 100),
        ("100", 100),
        (" 64 m ", 64 << 20),
        ("0", 0),
        (1024, 1024),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "gist"),
    [
        ("256XB", 'is not a size (use e.g. "256MiB"'),
        ("1.5.g", "is not a size"),
        ("g", "is not a size"),
        ("", "is not a size"),
        ("-1", "is not a size"),
        ("1e3", "is not a size"),
        ("1 g b", "is not a size"),
        (-1, "sizes are not negative"),
        (1.5, "is not a size"),
        (True, "true is not a size"),
        (["1g"], "an array is not a size"),
        ("9" * 400 + "k", "too large to be a size"),
    ],
)
def test_bad_sizes(value: object, gist: str) -> None:
    with pytest.raises(Invalid) as info:
        parse_size(value)
    assert gist in info.value.message


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, 0), (1, 1), (1000, 1000), (1024, "1KiB"), (1536, 1536), (6 << 20, "6MiB"), (3 << 29, "1536MiB"),
     (3 << 30, "3GiB"), (1 << 40, "1TiB"), (5 << 50, "5PiB"), (1 << 60, "1024PiB")],
)  # fmt: skip
def test_format_size(size: int, text: int | str) -> None:
    assert format_size(size) == text
    assert parse_size(format_size(size)) == size


# --- durations --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1.5s", 1.5),
        ("2m30s", 150.0),
        ("1h", 3600.0),
        ("1h2m3s", 3723.0),
        ("500ms", 0.5),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("10ns", 1e-8),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("0", 0.0),
        ("0s", 0.0),
        (" 3s ", 3.0),
        ("1h1h", 7200.0),
        (10, 10.0),
        (1.5, 1.5),
        (0, 0.0),
    ],
)
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "gist"),
    [
        ("10 s", 'is not a duration (use e.g. "1.5s", "2m30s", "500ms" or a number of seconds)'),
        ("1", "is not a duration"),  # a unit is needed, as in Go (except for "0")
        ("1d", "is not a duration"),
        ("-1s", "is not a duration"),
        ("s", "is not a duration"),
        ("", "is not a duration"),
        ("1.5.s", "is not a duration"),
        (-1, "durations are finite and not negative"),
        (math.nan, "durations are finite and not negative"),
        (math.inf, "is too long for a duration (at most 2562047h0m0s)"),
        (10**400, "is too long for a duration"),
        ("9" * 400 + "h", "is too long for a duration"),
        ("2562048h", "is too long for a duration"),
        (1e10, "is too long for a duration"),
        (True, "true is not a duration"),
        ({"s": 1}, "a table is not a duration"),
    ],
)
def test_bad_durations(value: object, gist: str) -> None:
    with pytest.raises(Invalid) as info:
        parse_duration(value)
    assert gist in info.value.message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (0.0015, "1.5ms"),
        (0.000001, "1us"),
        (1e-7, "100ns"),
        (1, "1s"),
        (1.25, "1.25s"),
        (10, "10s"),
        (90, "1m30s"),
        (150, "2m30s"),
        (3600, "1h0m0s"),
        (3661.5, "1h1m1.5s"),
        (86400 * 3, "72h0m0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["1.5s", "2m30s", "1h", "500ms", "100ms", "1m", "0s", "90s", "1h30m", "3.25ms", "7ns", "1.1h", "0.7ns",
             "2562047h", "1.0000000001s"],
)  # fmt: skip
def test_parse_format_parse_is_stable(text: str) -> None:
    """What `config` prints loads to exactly the same number (models compare floats exactly)."""
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == seconds


# --- project names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directory", "name"),
    [
        ("My_App.v2", "my_appv2"),
        ("shop", "shop"),
        ("Shop Front", "shopfront"),
        ("_hidden", "hidden"),
        ("-dash", "dash"),
        ("ÄÖÜ", "default"),
        ("...", "default"),
        ("a" * 80, "a" * 63),
    ],
)
def test_normalise_project_name(directory: str, name: str) -> None:
    assert normalise_project_name(directory) == name
    assert validate_project_name(name) == name


@pytest.mark.parametrize("name", ["Bad Name", "X!", "UPPER", "-start", "_start", "", "a" * 64, "dots.no"])
def test_bad_project_names(name: str) -> None:
    with pytest.raises(Invalid) as info:
        validate_project_name(name)
    assert "is not a project name" in info.value.message


def _stack_in(directory: Path, text: str = '[services.app]\ncommand = ["x"]\n') -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / "stack.toml"
    file.write_text(text)
    return file


def test_project_name_from_the_directory(tmp_path: Path) -> None:
    file = _stack_in(tmp_path / "My_App.v2")
    assert load_stack(file, env={}, host_cpus=2).name == "my_appv2"


def test_project_name_from_the_file_and_from_p(tmp_path: Path) -> None:
    file = _stack_in(tmp_path / "dir", 'name = "from-file"\n[services.app]\ncommand = ["x"]\n')
    assert load_stack(file, env={}, host_cpus=2).name == "from-file"
    assert load_stack(file, project="from-p", env={}, host_cpus=2).name == "from-p"


def test_a_bad_p_is_refused_even_with_a_good_name(tmp_path: Path) -> None:
    file = _stack_in(tmp_path / "dir", 'name = "good"\n[services.app]\ncommand = ["x"]\n')
    with pytest.raises(StackFileError) as info:
        load_stack(file, project="Bad Name", env={}, host_cpus=2)
    [problem] = info.value.problems
    assert (problem.path, problem.line) == ("", None)
    assert problem.message.startswith('project name (-p): "Bad Name" is not a project name')


def test_a_bad_name_in_the_file_does_not_matter_under_p(tmp_path: Path) -> None:
    """-p replaces `name`, as in Compose: the file's value is not used, so it is not checked."""
    file = _stack_in(tmp_path / "dir", 'name = "X!"\n[services.app]\ncommand = ["x"]\n')
    assert load_stack(file, project="ok", env={}, host_cpus=2).name == "ok"


# --- signals and capabilities -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [("SIGTERM", "SIGTERM"), ("TERM", "SIGTERM"), ("sigint", "SIGINT"), ("kill", "SIGKILL"), (9, "SIGKILL"),
     ("15", "SIGTERM"), (" SIGHUP ", "SIGHUP"), ("SIGRTMIN", "SIGRTMIN"), ("usr1", "SIGUSR1")],
)  # fmt: skip
def test_normalise_signal(value: object, name: str) -> None:
    assert normalise_signal(value) == name
    assert signal_number(name) > 0


@pytest.mark.parametrize(
    ("value", "gist"),
    [("SIGTERN", 'did you mean "SIGTERM"?'), ("NOPE", "is not a signal"), (99, "is not a signal number"),
     (0, "is not a signal number"), ("²", "is not a signal"), (True, "true is not a signal"), (1.5, "is not a signal")],
)  # fmt: skip
def test_bad_signals(value: object, gist: str) -> None:
    with pytest.raises(Invalid) as info:
        normalise_signal(value)
    assert gist in info.value.message


def test_capabilities() -> None:
    assert normalise_capability("net_admin") == "CAP_NET_ADMIN"
    assert normalise_capability("CAP_SYS_PTRACE") == "CAP_SYS_PTRACE"
    assert normalise_capability(" all ") == "ALL"
    assert len(DOCKER_DEFAULT_CAPABILITIES) == 14
    assert set(CAPABILITIES) >= DOCKER_DEFAULT_CAPABILITIES
    assert CAPABILITIES["CAP_CHOWN"] == 0
    assert CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40
    with pytest.raises(Invalid, match='did you mean "NET_ADMIN"'):
        normalise_capability("NET_ADMN")
    with pytest.raises(Invalid, match="is not a capability name"):
        normalise_capability(5)


def test_effective_capabilities() -> None:
    default = effective_capabilities([], [])
    assert default == DOCKER_DEFAULT_CAPABILITIES
    assert "CAP_MKNOD" in default
    assert effective_capabilities(["CAP_NET_ADMIN"], ["CAP_MKNOD"]) == (default - {"CAP_MKNOD"}) | {"CAP_NET_ADMIN"}
    assert effective_capabilities([], ["ALL"]) == frozenset()
    assert effective_capabilities(["CAP_NET_BIND_SERVICE"], ["ALL"]) == {"CAP_NET_BIND_SERVICE"}
    assert effective_capabilities(["ALL"], ["CAP_SYS_ADMIN"]) == set(CAPABILITIES) - {"CAP_SYS_ADMIN"}


# --- sysctls ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "parts"),
    [
        ("net.ipv4.ip_forward", ("net", "ipv4", "ip_forward")),
        ("net/ipv4/ip_forward", ("net", "ipv4", "ip_forward")),
        ("net/ipv4/conf/eth0.100/forwarding", ("net", "ipv4", "conf", "eth0.100", "forwarding")),
        ("kernel.msgmax", ("kernel", "msgmax")),
    ],
)
def test_sysctl_keys(key: str, parts: tuple[str, ...]) -> None:
    assert normalise_sysctl_key(key) == parts


@pytest.mark.parametrize(
    "key",
    ["", ".", "net..x", "net.", ".net", "net//x", "net/../vm", "net/./x", "net x", "net.x\n", "net.\x00", "a\x7f"],
)
def test_bad_sysctl_keys(key: str) -> None:
    with pytest.raises(Invalid) as info:
        normalise_sysctl_key(key)
    assert "is not a sysctl name" in info.value.message
    assert "\n" not in info.value.message and "\x00" not in info.value.message


@pytest.mark.parametrize(
    ("key", "modes_allowed"),
    [
        ("kernel.msgmax", {"bridge", "none", "host", "service:db"}),
        ("kernel.sem", {"bridge", "none", "host", "service:db"}),
        ("kernel.shm_rmid_forced", {"bridge", "host"}),
        ("fs.mqueue.msg_max", {"bridge", "none", "host", "service:db"}),
        ("kernel.domainname", {"bridge", "host"}),
        ("net.core.somaxconn", {"bridge", "none"}),
        ("net.ipv4.conf.eth0.100.forwarding", {"bridge", "none"}),
    ],
)
def test_allowed_sysctls(key: str, modes_allowed: set[str]) -> None:
    for mode in ("bridge", "none", "host", "service:db"):
        if mode in modes_allowed:
            check_sysctl(tuple(key.split(".")), mode)
    if key.startswith("net."):
        for mode in ("host", "service:db"):
            with pytest.raises(Invalid):
                check_sysctl(tuple(key.split(".")), mode)


@pytest.mark.parametrize(
    ("key", "gist"),
    [
        ("vm.swappiness", "is not namespaced: setting it would change the host"),
        ("kernel.pid_max", "is not namespaced: setting it would change the host"),
        ("fs.file-max", "is not namespaced"),
        ("fs.mqueue", "is not namespaced"),  # the directory itself is not a key
        ("kernel.msgmax2", "is not namespaced"),
        ("kernel.hostname", "use the service's `hostname` key"),
    ],
)
def test_refused_sysctls(key: str, gist: str) -> None:
    with pytest.raises(Invalid) as info:
        check_sysctl(tuple(key.split(".")), "bridge")
    assert gist in info.value.message


# --- key paths, messages and line numbers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (("services", "db", "ports", 1), "services.db.ports[1]"),
        (("services", "db", "sysctls", "vm.swappiness"), 'services.db.sysctls."vm.swappiness"'),
        (("services", "my-db_2", "volumes", 0, "target"), "services.my-db_2.volumes[0].target"),
        (("services", "web server"), 'services."web server"'),
        (("services", 'a"b\\c'), 'services."a\\"b\\\\c"'),
        (("services", "a\nb\x01"), 'services."a\\nb\\u0001"'),
        (("services", "café"), 'services."café"'),
        (("services", ""), 'services.""'),
        (("x.y",), '"x.y"'),
        ((), ""),
    ],
)
def test_format_path(path: tuple[str | int, ...], text: str) -> None:
    assert format_path(path) == text


def test_show_and_type_name() -> None:
    assert show(True) == "true"
    assert show('a"b\n') == '"a\\"b\\n"'
    assert show("x" * 100) == '"' + "x" * 57 + '..."'
    assert (show({}), show([]), show(5), show(1.5)) == ("a table", "an array", "5", "1.5")
    samples: tuple[object, ...] = (True, 1, 1.5, "s", [], {})
    assert [type_name(v) for v in samples] == [
        "a boolean",
        "an integer",
        "a float",
        "a string",
        "an array",
        "a table",
    ]
    assert did_you_mean("comand", ["command", "entrypoint"]) == ' (did you mean "command"?)'
    assert did_you_mean("COMMAND", ["command"]) == ' (did you mean "command"?)'
    assert did_you_mean("zzz", ["command"]) == ""
    assert one_of(["a"]) == '"a"'
    assert one_of(["a", "b", "c"]) == '"a", "b" or "c"'


def test_key_lines() -> None:
    source = "\n".join(
        [
            'name = "x"',  # 1
            "[network]",  # 2
            'subnet = "10.0.0.0/24"',  # 3
            "[services.db]",  # 4
            'command = """',  # 5
            "[not.a.table]",  # 6
            'not_a_key = 1"""',  # 7
            "healthcheck.test = 'x'",  # 8
            '"quoted.key" = 1',  # 9
            "[services.web.depends_on]",  # 10
            "db = 'started'",  # 11
            "[[x-list]]",  # 12
            "[[x-list]]",  # 13
            "a = 1",  # 14
        ]
    )
    lines = KeyLines(source)
    assert lines.line_of(("name",)) == 1
    assert lines.line_of(("network", "subnet")) == 3
    assert lines.line_of(("services",)) == 4  # implied by the first [services.*] header
    assert lines.line_of(("services", "db", "command")) == 5
    assert lines.line_of(("not",)) is None  # inside a multi-line string
    assert lines.line_of(("services", "db", "not_a_key")) == 4  # the nearest known prefix
    assert lines.line_of(("services", "db", "healthcheck", "test")) == 8
    assert lines.line_of(("services", "db", "healthcheck", "interval")) == 8
    assert lines.line_of(("services", "db", "quoted.key")) == 9
    assert lines.line_of(("services", "web")) == 10
    assert lines.line_of(("services", "web", "depends_on", "db", "condition")) == 11
    assert lines.line_of(("x-list", 1, "a")) == 14
    assert lines.line_of(("x-list", 0)) == 12
    assert lines.line_of(("nowhere",)) is None


def test_default_hostname() -> None:
    assert default_hostname("db") == "db"
    assert default_hostname("my_db") == "my-db"
    assert default_hostname("web.1") == "web-1"
    assert default_hostname("_x_") == "x"
    assert len(default_hostname("a" * 100)) == 63


# --- no crash on odd input (regressions) ------------------------------------------------------------


def _problems(text: str, tmp_path: Path) -> list[tuple[str, str]]:
    with pytest.raises(StackFileError) as info:
        parse_stack(text, file=tmp_path / "stack.toml", env={}, host_cpus=2)
    return [(p.path, p.message) for p in info.value.problems]


@pytest.mark.parametrize(
    ("line", "path", "gist"),
    [
        ('user = "²"', "services.a.user", "is not a user"),
        ('user = "4294967295"', "services.a.user", "out of range for a user id"),
        ('stop_signal = "²"', "services.a.stop_signal", "is not a signal"),
        ('volumes = ["~no-such-user-stackd/x:/x"]', "services.a.volumes[0]", "cannot expand the ~"),
        ('volumes = ["./a\\u0000b:/x"]', "services.a.volumes[0]", "cannot contain NUL"),
        ('rootfs = "./a\\u0000b"', "services.a.rootfs", "cannot contain NUL"),
        ('env_file = "./a\\u0000b"', "services.a.env_file", "cannot contain NUL"),
        ('security_opt = ["seccomp=./a\\u0000b"]', "services.a.security_opt[0]", "cannot contain NUL"),
        ('ports = ["-5:80"]', "services.a.ports[0]", "is not a port mapping"),
        ('mem_limit = "' + "9" * 400 + 'k"', "services.a.mem_limit", "too large"),
        ("cpus = " + "9" * 400, "services.a.cpus", "is not a number of CPUs"),
        ("cpus = nan", "services.a.cpus", "out of range"),
        ("cpus = inf", "services.a.cpus", "out of range"),
        ("stop_grace_period = " + "9" * 400, "services.a.stop_grace_period", "too long for a duration"),
        ('stop_grace_period = "' + "9" * 400 + 's"', "services.a.stop_grace_period", "too long for a duration"),
        ("stop_grace_period = 1979-05-27", "services.a.stop_grace_period", "is not a duration"),
        ('tmpfs = ["//proc"]', "services.a.tmpfs[0]", "is under /proc"),
        ('volumes = ["./x://"]', "services.a.volumes[0]", "nothing can be mounted over the service's root"),
    ],
)
def test_odd_values_are_problems_not_crashes(line: str, path: str, gist: str, tmp_path: Path) -> None:
    problems = _problems(f'[services.a]\ncommand = ["x"]\n{line}\n', tmp_path)
    assert any(p == path and gist in m for p, m in problems), problems


def test_an_integer_too_long_for_python_is_a_toml_problem(tmp_path: Path) -> None:
    [(path, message)] = _problems('[services.a]\ncommand = ["x"]\npids_limit = ' + "9" * 5000 + "\n", tmp_path)
    assert path == ""
    assert message.startswith("not valid TOML: ")


def test_an_env_file_that_is_not_text(tmp_path: Path) -> None:
    (tmp_path / "bin.env").write_bytes(b"A=\xff\xfe\n")
    [(path, message)] = _problems('[services.a]\ncommand = ["x"]\nenv_file = "bin.env"\n', tmp_path)
    assert path == "services.a.env_file"
    assert "not UTF-8" in message


def test_a_duplicate_mount_is_reported_at_its_own_index(tmp_path: Path) -> None:
    """An invalid entry before the duplicates must not shift the index the duplicate is reported at."""
    problems = _problems('[services.a]\ncommand = ["x"]\nvolumes = ["bad", "./a:/a", "./b:/a"]\n', tmp_path)
    assert all(path != "services.a.volumes[1]" for path, _ in problems), problems
    problems = _problems('[services.a]\ncommand = ["x"]\nvolumes = ["./z:/z", "./a:/a", "./b:/a"]\n', tmp_path)
    assert problems == [("services.a.volumes[2]", "/a is already the target of volumes[1]")]


def test_a_failed_interpolation_is_reported_once(tmp_path: Path) -> None:
    problems = _problems('[services.a]\ncommand = ["x"]\nmem_limit = "${STACKD_TEST_MEM:?say how much}"\n', tmp_path)
    assert problems == [("services.a.mem_limit", "required variable STACKD_TEST_MEM is missing a value: say how much")]
