"""Behaviour settled in review: working_dir "/", integer tmpfs modes, dependencies in `config SERVICE`."""

from __future__ import annotations

from pathlib import Path

from stackd.spec import parse_stack
from stackd.spec.graph import with_dependencies


def load(text: str, tmp_path: Path):
    return parse_stack(text, file=tmp_path / "stack.toml", project="t", host_cpus=2)


def test_working_dir_may_be_the_root(tmp_path: Path) -> None:
    assert load('[services.a]\ncommand = "x"\nworking_dir = "/"\n', tmp_path)["a"].working_dir == "/"


def test_a_toml_integer_mode_is_the_mode_itself(tmp_path: Path) -> None:
    stack = load(
        '[services.a]\ncommand = "x"\nvolumes = [{ type = "tmpfs", target = "/t", tmpfs = { mode = 0o1777 } }]\n'
        'tmpfs = ["/u:mode=0755"]\n',
        tmp_path,
    )
    modes = {t.target: t.mode for t in stack["a"].tmpfs}
    assert modes == {"/t": 0o1777, "/u": 0o755}


def test_dependencies_come_with_the_services_named(tmp_path: Path) -> None:
    stack = load(
        '[services.db]\ncommand = "x"\n[services.cache]\ncommand = "x"\n'
        '[services.web]\ncommand = "x"\ndepends_on = ["db"]\n'
        '[services.side]\ncommand = "x"\nnetwork_mode = "service:web"\n',
        tmp_path,
    )
    assert with_dependencies(stack, ["side"]) == ["db", "web", "side"]
    assert with_dependencies(stack, ["cache"]) == ["cache"]
