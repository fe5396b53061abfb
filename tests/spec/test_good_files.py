"""Good stack files load, fill in every default, and round-trip through `stack_to_dict` and `stackd config`.

The files are tests/spec/good/*.toml, tests/spec/good/*/stack.toml (those with files beside them), and
the repository's own examples (examples/**/*.toml and stack.toml.example, when present).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from stackd.spec import (
    Dependency,
    Healthcheck,
    NetworkMode,
    PortMapping,
    RestartPolicy,
    Rootfs,
    SecurityOptions,
    Stack,
    Sysctl,
    Tmpfs,
    Ulimit,
    User,
    Volume,
    load_stack,
    stack_to_dict,
)
from stackd.spec.service import SERVICE_KEYS

HERE = Path(__file__).parent
GOOD = HERE / "good"
REPO = HERE.parent.parent
#: The environment every good file is loaded with, in-process and by the CLI.
ENV = {"STACKD_TEST_FROM_PROCESS": "from-process"}


def good_files() -> list[Path]:
    return sorted(GOOD.glob("*.toml")) + sorted(GOOD.glob("*/stack.toml"))


def example_files() -> list[Path]:
    examples = sorted((REPO / "examples").glob("**/*.toml"))
    root_example = REPO / "stack.toml.example"
    return examples + ([root_example] if root_example.is_file() else [])


ALL_FILES = good_files() + example_files()


def file_id(file: Path) -> str:
    return str(file.relative_to(REPO))


def load(file: Path) -> Stack:
    return load_stack(file, env=ENV, host_cpus=2)


def cli_env() -> dict[str, str]:
    """The process environment without any STACKD_* variable of the caller, plus ENV."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STACKD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **ENV}


def stackd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stackd", *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=60
    )


def test_the_good_files_are_there() -> None:
    assert len(good_files()) >= 6
    assert (REPO / "examples" / "hello" / "stack.toml") in ALL_FILES or not (REPO / "examples").is_dir()


def test_every_service_key_appears_in_a_good_file() -> None:
    """A new key needs a good file that uses it, so the round trip covers it."""
    used: set[str] = set()
    for file in good_files():
        for service in tomllib.loads(file.read_text()).get("services", {}).values():
            used |= set(service)
    assert set(SERVICE_KEYS) - used == set()


@pytest.mark.parametrize("file", ALL_FILES, ids=file_id)
def test_round_trip_through_toml(file: Path, tmp_path: Path) -> None:
    stack = load(file)
    document = stack_to_dict(stack)
    copy = tmp_path / "elsewhere" / "stack.toml"
    copy.parent.mkdir()
    copy.write_text(tomli_w.dumps(document))
    # Elsewhere, with no variables at all: the output is resolved and needs nothing from its directory.
    again = load_stack(copy, env={}, host_cpus=2)
    assert again == stack
    assert again.warnings == ()
    assert stack_to_dict(again) == document


@pytest.mark.parametrize("file", ALL_FILES, ids=file_id)
def test_round_trip_through_json(file: Path, tmp_path: Path) -> None:
    """JSON is a subset of what TOML can hold here: the same document, written from its JSON form."""
    stack = load(file)
    document = json.loads(json.dumps(stack_to_dict(stack)))
    copy = tmp_path / "stack.toml"
    copy.write_text(tomli_w.dumps(document))
    assert load_stack(copy, env={}, host_cpus=2) == stack


@pytest.mark.parametrize("file", ALL_FILES, ids=file_id)
def test_config_prints_the_resolved_stack_as_json(file: Path, tmp_path: Path) -> None:
    result = stackd("-f", str(file), "config", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == stack_to_dict(load(file))


def test_defaults_are_filled_in() -> None:
    stack = load(GOOD / "minimal.toml")
    assert stack.name == "good"  # the directory's name
    assert stack.network.subnet is None
    app = stack["app"]
    assert app.command == ("sleep", "infinity")
    assert app.entrypoint is None
    assert app.argv == ("sleep", "infinity")
    assert app.restart == RestartPolicy("no", None)
    assert app.stop_signal == "SIGTERM"
    assert app.stop_grace_period == 10.0
    assert app.hostname == "app"
    assert app.rootfs == Rootfs("host", None)
    assert app.network_mode == NetworkMode("bridge", None)
    assert app.security_opt == SecurityOptions(no_new_privileges=True, seccomp="default")
    assert (app.read_only, app.init) == (False, False)
    assert (app.cpus, app.mem_limit, app.memswap_limit, app.pids_limit) == (None, None, None, None)
    assert (app.user, app.working_dir, app.healthcheck) == (None, None, None)
    assert not (app.environment or app.volumes or app.tmpfs or app.ports or app.sysctls or app.depends_on)
    assert not (app.cap_add or app.cap_drop or app.ulimits or app.labels)
    assert stack.warnings == ()

    printed = stack_to_dict(stack)["services"]["app"]
    assert printed["restart"] == "no"
    assert printed["stop_signal"] == "SIGTERM"
    assert printed["stop_grace_period"] == "10s"
    assert printed["hostname"] == "app"
    assert printed["rootfs"] == "host"
    assert printed["network_mode"] == "bridge"
    assert printed["security_opt"] == ["no-new-privileges:true", "seccomp=default"]
    assert (printed["read_only"], printed["init"]) == (False, False)


def test_healthcheck_defaults_are_compose_defaults() -> None:
    db = load(GOOD / "design_example.toml")["db"]
    assert db.healthcheck == Healthcheck(
        ("pg_isready",), shell=False, interval=1.0, timeout=30.0, retries=30, start_period=0.0, start_interval=5.0
    )
    printed = stack_to_dict(load(GOOD / "design_example.toml"))["services"]["db"]["healthcheck"]
    assert printed == {
        "test": ["CMD", "pg_isready"],
        "interval": "1s",
        "timeout": "30s",
        "retries": 30,
        "start_period": "0s",
        "start_interval": "5s",
        "on_unhealthy": "ignore",
    }


def test_design_example() -> None:
    stack = load(GOOD / "design_example.toml")
    assert stack.name == "shop"
    assert stack.network.subnet == "10.77.0.0/24"
    assert list(stack.services) == ["db", "web"]
    db, web = stack["db"], stack["web"]
    assert db.user == User("postgres")
    assert db.volumes == (Volume(GOOD / "data", "/data"),)
    assert db.restart == RestartPolicy("on-failure")
    assert db.stop_signal == "SIGINT"
    assert (db.cpus, db.mem_limit, db.pids_limit) == (0.5, 256 << 20, 128)
    assert db.sysctls == (Sysctl(("net", "core", "somaxconn"), "1024"),)
    assert web.depends_on == {"db": Dependency("service_healthy")}
    assert web.ports == (PortMapping(8000, 8000, "127.0.0.1", 8080, 8080, "tcp"),)


def test_every_key_of_the_full_file() -> None:
    stack = load(GOOD / "full" / "stack.toml")
    full = GOOD / "full"
    assert stack.name == "full-stack_1"
    assert stack.network.subnet == "172.20.8.0/22"
    assert stack.warnings == ("version: the top-level `version` is obsolete and ignored",)
    db = stack["db"]
    assert db.argv == ("/usr/bin/env", "postgres", "-c", "shared_buffers=128MB")
    assert dict(db.environment) == {
        # env_file first, `environment` over it; single quotes keep a "$" literal.
        "APP_MODE": "production",
        "APP_QUOTED": "two words",
        "APP_LITERAL": "$NOT_EXPANDED",
        "PGDATA": "/var/lib/postgresql/data",
        "EMPTY": "",
        "NUMBER": "5",
        "FLAG": "true",
        "RATIO": "0.5",
    }
    assert db.working_dir == "/var/lib/postgresql"
    assert db.user == User(999, 999)
    assert db.hostname == "database.internal"
    assert db.rootfs == Rootfs("directory", full)
    assert db.volumes == (
        Volume(full / "data", "/var/lib/postgresql/data"),
        Volume(Path("/etc/ssl/certs"), "/etc/ssl/certs", read_only=True),
        Volume(full / "conf", "/etc/postgresql", read_only=True),
    )
    assert db.tmpfs == (
        Tmpfs("/tmp", 64 << 20, 0o1777, ("noexec", "nosuid")),
        Tmpfs("/scratch"),
        Tmpfs("/var/run/postgresql", 16 << 20, 0o1777),
    )
    assert db.read_only is True
    assert db.restart == RestartPolicy("on-failure", 5)
    assert db.stop_grace_period == 90.0
    assert db.init is True
    assert (db.cpus, db.mem_limit, db.memswap_limit, db.pids_limit) == (0.75, 3 << 29, 2 << 30, 256)
    assert dict(db.ulimits) == {"nofile": Ulimit(1024, 65536), "core": Ulimit(0, 0), "memlock": Ulimit(-1, -1)}
    assert {s.key: s.value for s in db.sysctls} == {
        "net.core.somaxconn": "4096",
        "kernel.shmmax": "68719476736",
        "fs.mqueue.msg_max": "100",
    }
    assert db.cap_add == ("CAP_SYS_NICE", "CAP_IPC_LOCK")
    assert db.cap_drop == ("CAP_NET_RAW", "CAP_MKNOD")
    assert db.security_opt == SecurityOptions(False, full / "profile.json")
    assert [str(p) for p in db.ports] == [
        "127.0.0.1:5432:5432/tcp",
        "0.0.0.0:15432:5432/tcp",
        "[::1]:25432:5432/tcp",
        "127.0.0.1:5433:5432/udp",
    ]
    assert dict(db.labels) == {"com.example.tier": "data", "com.example.backup": "nightly"}
    assert db.healthcheck == Healthcheck(("pg_isready", "-U", "postgres"), False, 0.5, 2.0, 10, 60.0, 0.1)

    assert stack["migrate"].command == ("sh", "-c", "migrate --to latest")
    assert stack["migrate"].depends_on == {"db": Dependency("service_healthy", True, True)}
    web = stack["web"]
    assert dict(web.depends_on) == {
        "db": Dependency("service_healthy"),
        "migrate": Dependency("service_completed_successfully"),
        "cache": Dependency("service_started", required=False),
    }
    assert [str(p) for p in web.ports] == [
        "0.0.0.0:8080:8000/tcp",
        "127.0.0.1::8001/tcp",
        "127.0.0.1:9000-9002:9000-9002/tcp",
        "127.0.0.1:9100-9110:80/tcp",
        "127.0.0.1::8443/tcp",
    ]
    assert web.healthcheck is not None
    assert web.healthcheck.test == ("/bin/sh", "-c", "curl -fsS http://localhost:8000/health || exit 1")
    assert web.healthcheck.shell is True
    assert web.restart == RestartPolicy("unless-stopped")
    sidecar = stack["sidecar"]
    assert sidecar.network_mode == NetworkMode("service", "web")
    assert sidecar.healthcheck is None  # disable = true
    batch = stack["batch"]
    assert batch.network_mode == NetworkMode("none")
    assert [s.parts for s in batch.sysctls] == [
        ("net", "ipv4", "conf", "eth0.100", "forwarding"),
        ("net", "ipv4", "ip_forward"),
    ]
    assert batch.security_opt == SecurityOptions(True, "unconfined")
    assert batch.cap_drop == ("ALL",)
    assert stack["host-tool"].hostname == "host-tool"
    assert stack["host-tool"].cap_add == ("ALL",)


def test_compose_spellings() -> None:
    stack = load(GOOD / "compose_spellings.toml")
    a, b = stack["a"], stack["b"]
    # A bare "NAME" takes the variable from the environment, and is left out when it is not set.
    assert dict(a.environment) == {"A": "1", "B": "two=2", "STACKD_TEST_FROM_PROCESS": "from-process"}
    assert dict(a.labels) == {"com.example.a": "1"}
    assert [(s.key, s.value) for s in a.sysctls] == [
        ("net.ipv4.ip_forward", "1"),
        ("kernel.domainname", "example.org"),
    ]
    assert a.restart == RestartPolicy("no")
    assert (a.stop_signal, a.stop_grace_period) == ("SIGINT", 90.0)
    assert a.user == User(1000)
    assert (a.cpus, a.mem_limit, a.memswap_limit, a.pids_limit) == (0.25, 256 << 20, -1, -1)
    assert a.cap_add == ("CAP_NET_ADMIN", "CAP_SYS_PTRACE")
    assert a.tmpfs == (Tmpfs("/run"),)
    assert dict(a.ulimits) == {"nproc": Ulimit(512, 512)}
    assert a.healthcheck == Healthcheck(("/bin/sh", "-c", "test -f /tmp/ready"), shell=True, timeout=1.5)
    assert b.entrypoint == ("/bin/sh", "-c")
    assert b.command is None
    assert b.depends_on == {"a": Dependency()}
    assert [str(p) for p in b.ports] == [
        "127.0.0.1::80/tcp",
        "127.0.0.1::81/tcp",
        "127.0.0.1:8081:81/udp",
        "127.0.0.1:8081:81/tcp",
    ]
    assert b.stop_signal == "SIGTERM"
    assert b.healthcheck is None  # ["NONE"]
    printed = stack_to_dict(stack)["services"]
    assert printed["a"]["memswap_limit"] == -1
    assert printed["a"]["stop_grace_period"] == "1m30s"
    assert printed["a"]["user"] == "1000"


def test_allowed_sysctls() -> None:
    stack = load(GOOD / "sysctls.toml")
    assert len(stack["ipc"].sysctls) == 11
    net = {s.proc_path: s.value for s in stack["net"].sysctls}
    assert net["/proc/sys/net/ipv4/conf/eth0.100/forwarding"] == "1"
    assert net["/proc/sys/net/ipv4/ping_group_range"] == "0 2147483647"
    # Written back with slashes when a component holds a dot, so it stays one component.
    printed = stack_to_dict(stack)["services"]["net"]["sysctls"]
    assert "net/ipv4/conf/eth0.100/forwarding" in printed
    assert "net.ipv4.ip_unprivileged_port_start" in printed


def test_services_keep_the_file_order() -> None:
    stack = load(GOOD / "full" / "stack.toml")
    assert list(stack.services) == ["db", "migrate", "web", "sidecar", "batch", "host-tool"]
    assert list(stack_to_dict(stack)["services"]) == list(stack.services)


def test_stack_to_dict_can_limit_the_services() -> None:
    stack = load(GOOD / "full" / "stack.toml")
    document = stack_to_dict(stack, ["web", "db"])
    assert list(document["services"]) == ["db", "web"]
    assert document["name"] == "full-stack_1"
    assert document["network"] == {"subnet": "172.20.8.0/22", "outbound": True}


def test_the_models_are_frozen() -> None:
    stack = load(GOOD / "minimal.toml")
    with pytest.raises(AttributeError):
        stack.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        stack["app"].command = ("x",)  # type: ignore[misc]
    with pytest.raises(TypeError):
        stack.services["b"] = stack["app"]  # type: ignore[index]
    with pytest.raises(TypeError):
        stack["app"].environment["X"] = "1"  # type: ignore[index]
