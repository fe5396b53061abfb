"""The layers of design.md §2 point one way: cli, testing -> api -> supervisor -> runtime -> _sys.

`spec`, `errors` and `_sys` are the floor: they import nothing of stackd above them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stackd"

# Higher number, higher layer. A module may import its own layer or lower ones.
RANKS = {
    "errors": 0,
    "spec": 0,
    "_sys": 0,
    "runtime": 1,
    "supervisor": 2,
    "api": 3,
    "stackd": 3,  # the package itself re-exports the public API
    "cli": 4,
    "testing": 4,
    "__main__": 5,
}
# The floor is split three ways: spec is pure, _sys is the kernel; neither imports the other.
FLOOR_ALLOWED = {"errors": {"errors"}, "spec": {"spec", "errors"}, "_sys": {"_sys", "errors"}}


def layer_of(module: str) -> str:
    """ "stackd.runtime.cgroups" -> "runtime"; "stackd" -> "stackd"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "stackd"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stackd_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a stackd module in `path`, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "stackd"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "stackd":
                if target == "stackd":
                    # `from stackd import x`: x may be a subpackage (a layer) or a name of the package.
                    for alias in node.names:
                        sub = PACKAGE / alias.name
                        is_module = sub.is_dir() or sub.with_suffix(".py").exists()
                        found.append((node.lineno, f"stackd.{alias.name}" if is_module else "stackd"))
                else:
                    found.append((node.lineno, target))
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        importer = layer_of(module_name(path))
        if importer not in RANKS:
            problems.append(f"{path}: unknown layer {importer!r}: add it to RANKS in {__file__}")
            continue
        for line, imported in stackd_imports(path):
            target = layer_of(imported)
            if target not in RANKS:
                problems.append(f"{path}:{line}: imports {imported}, of unknown layer {target!r}")
            elif importer in FLOOR_ALLOWED and target not in FLOOR_ALLOWED[importer]:
                problems.append(f"{path}:{line}: {importer} imports {imported}: {importer} is the floor")
            elif RANKS[target] > RANKS[importer]:
                problems.append(f"{path}:{line}: {importer} imports {imported}, a higher layer ({target})")
    return problems


def test_no_layer_imports_a_higher_one() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("layer", "source", "expected"),
    [
        ("runtime", "from stackd.supervisor import graph\n", "a higher layer"),
        ("spec", "import stackd.runtime.cgroups\n", "is the floor"),
        ("_sys", "from stackd.spec import load_stack\n", "is the floor"),
        ("runtime", "from ..cli import main\n", "a higher layer"),
        ("supervisor", "from stackd.runtime import cgroups\nfrom stackd.spec import Stack\n", None),
    ],
)
def test_the_checker_catches_an_upward_import(tmp_path: Path, layer: str, source: str, expected: str | None) -> None:
    package = tmp_path / "stackd"
    (package / layer).mkdir(parents=True)
    for name in ("runtime", "supervisor", "cli", "spec"):
        (package / name).mkdir(exist_ok=True)
        (package / name / "__init__.py").write_text("")
    (package / layer / "mod.py").write_text(source)
    global PACKAGE
    saved, PACKAGE = PACKAGE, package
    try:
        found = violations(package)
    finally:
        PACKAGE = saved
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0]
