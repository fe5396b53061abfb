"""What open_stack accepts: a file, a dict, typed models; validated as the stack file is."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stackd.api.specs import resolve_spec
from stackd.errors import StackFileError
from stackd.spec import Dependency, Healthcheck, Service, Stack, load_stack


def test_a_dict_is_validated_like_the_file_with_every_problem_and_its_key_path(tmp_path: Path) -> None:
    bad = {"services": {"db": {"command": ["true"], "mem_limit": "256XB"}, "web": {"comand": "x"}}}
    with pytest.raises(StackFileError) as caught:
        resolve_spec(bad, base_dir=tmp_path)
    text = str(caught.value)
    assert "<dict>: services.db.mem_limit:" in text and '"256XB"' in text
    assert '<dict>: services.web.comand: unknown key "comand" (did you mean "command"?)' in text
    assert all(p.line is None for p in caught.value.problems)
    # The same words as the same document in a file.
    (tmp_path / "stack.toml").write_text('[services.db]\ncommand = ["true"]\nmem_limit = "256XB"\n')
    with pytest.raises(StackFileError) as from_file:
        load_stack(tmp_path / "stack.toml")
    assert from_file.value.problems[0].message == caught.value.problems[0].message


def test_a_dict_gives_the_stack_the_file_would(tmp_path: Path) -> None:
    document = {
        "name": "shop",
        "services": {
            "db": {"command": "sleep 5", "healthcheck": {"test": ["CMD", "true"], "interval": "50ms"}},
            "web": {"command": ["true"], "depends_on": {"db": "healthy"}, "volumes": ["./data:/data"]},
        },
    }
    (tmp_path / "data").mkdir()
    stack = resolve_spec(document, base_dir=tmp_path)
    assert stack.name == "shop" and list(stack.services) == ["db", "web"]
    assert stack["web"].volumes[0].source == tmp_path / "data"
    assert stack["web"].depends_on["db"].condition == "service_healthy"
    assert resolve_spec(document, base_dir=tmp_path, project="other").name == "other"
    assert resolve_spec({"services": {"a": {"command": ["echo", "${V}"]}}}, env={"V": "1"})["a"].command == (
        "echo",
        "1",
    )


def test_typed_models_are_checked_again(tmp_path: Path) -> None:
    good = Stack(
        "typed",
        {
            "db": Service("db", command=("sleep", "5"), healthcheck=Healthcheck(test=("true",), interval=0.05)),
            "web": Service("web", command=("true",), depends_on={"db": Dependency("service_healthy")}),
        },
    )
    stack = resolve_spec(good, project="typed-2")
    assert (
        stack.name == "typed-2" and stack["db"].hostname == "db" and stack["db"].healthcheck == good["db"].healthcheck
    )
    bad = dataclasses.replace(
        good, services={**good.services, "web": Service("web", command=("true",), depends_on={"nope": Dependency()})}
    )
    with pytest.raises(StackFileError, match=r"services\.web\.depends_on"):
        resolve_spec(bad)


def test_a_directory_means_its_stack_toml_and_other_types_are_refused(tmp_path: Path) -> None:
    (tmp_path / "stack.toml").write_text('name = "dir"\n[services.a]\ncommand = ["true"]\n')
    assert resolve_spec(tmp_path).name == "dir"
    assert resolve_spec(str(tmp_path / "stack.toml")).source == tmp_path / "stack.toml"
    with pytest.raises(TypeError, match="expected a stack file path"):
        resolve_spec(42)  # type: ignore[arg-type]
    with pytest.raises(StackFileError, match="no such file"):
        resolve_spec(tmp_path / "missing.toml")
