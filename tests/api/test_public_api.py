"""The public API is curated: every name in stackd.__all__ imports, is documented, and nothing private
leaks; `import stackd` stays cheap; the docs' code blocks compile and import what exists."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import stackd

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "python-api.md", ROOT / "docs" / "testing.md"]


def test_every_public_name_imports_is_documented_and_is_stackds_own() -> None:
    names = [name for name in stackd.__all__ if name != "__version__"]
    assert names
    api_doc = (ROOT / "docs" / "python-api.md").read_text()
    for name in names:
        value = getattr(stackd, name)
        assert not name.startswith("_")
        assert (value.__module__ or "").startswith("stackd."), name
        assert inspect.getdoc(value), f"stackd.{name} has no docstring"
        assert f"`{name}`" in api_doc or f"stackd.{name}" in api_doc, f"stackd.{name} is not in docs/python-api.md"
        exec(f"from stackd import {name}", {})
    assert isinstance(stackd.__version__, str)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        stackd.nope  # noqa: B018
    assert set(stackd.__all__) <= set(dir(stackd))


def test_public_classes_document_their_public_methods() -> None:
    for name in ("Stack", "Service"):
        cls = getattr(stackd, name)
        for attribute, member in vars(cls).items():
            if attribute.startswith("_"):
                continue
            target = member.fget if isinstance(member, property) else member
            assert inspect.getdoc(target), f"stackd.{name}.{attribute} has no docstring"


def test_importing_stackd_is_cheap_and_imports_nothing_heavy() -> None:
    code = "import sys, stackd; print(sorted(m for m in sys.modules if m.startswith(('stackd', 'anyio', 'pyroute2'))))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "['stackd']"
    timing = subprocess.run([sys.executable, "-X", "importtime", "-c", "import stackd"], capture_output=True, text=True)
    own = [line for line in timing.stderr.splitlines() if line.rstrip().endswith("| stackd")]
    cumulative_us = int(own[-1].split("|")[1])
    assert cumulative_us < 20_000, timing.stderr[-2000:]


def test_the_package_is_typed() -> None:
    assert (ROOT / "stackd" / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["stackd"]
    assert pyproject["project"]["entry-points"]["pytest11"]["stackd"] == "stackd.testing.pytest_plugin"


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [
        (text[: match.start()].count("\n") + 2, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_docs_code_compiles_and_imports_what_exists(doc: Path) -> None:
    blocks = _python_blocks(doc)
    assert len(blocks) >= 4
    for line, source in blocks:
        where = f"{doc.name}:{line}"
        tree = compile(source, where, "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stackd"):
                module = importlib.import_module(node.module or "")
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("stackd"):
                        importlib.import_module(alias.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "stackd":
                assert hasattr(stackd, node.attr), f"{where}: stackd.{node.attr} does not exist"
