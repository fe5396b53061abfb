"""What `open_stack` accepts as a stack: a file, a plain dict, or the typed models, all validated alike.

A dict has the keys of the stack file; it goes through the stack file's own validation (the same
messages, naming the key path, with `<dict>` in place of the file name). Typed models
(:class:`stackd.spec.Stack` built in code, or loaded and changed with ``dataclasses.replace``) are
written back to the stack file's form and validated again, so a model built by hand cannot skip a check
the file would have had.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stackd.errors import Problem, StackFileError
from stackd.spec import Stack, load_stack, parse_stack, stack_to_dict

__all__ = ["SpecLike", "resolve_spec"]

#: What open_stack takes: a stack file's path, the typed model, or a dict shaped like the file.
SpecLike = str | os.PathLike[str] | Stack | Mapping[str, Any]

_DICT_NAME = "<dict>"


def resolve_spec(
    spec: SpecLike,
    *,
    project: str | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Stack:
    """The validated stack of `spec`; StackFileError listing every problem otherwise.

    `project` overrides the stack's name (its project); `env` is the environment for `${VAR}`
    interpolation (default: the process's); `base_dir` anchors the relative paths of a dict or a
    model (default: the current directory; a file's own directory for a file).
    """
    if isinstance(spec, Stack):
        document = stack_to_dict(spec)
        for service in document["services"].values():
            if not service.get("hostname"):
                service.pop("hostname", None)  # the model's "" means "the service's name"
        if project is not None:
            document["name"] = project
        anchor = Path(base_dir) if base_dir is not None else (spec.source.parent if spec.source else Path.cwd())
        stack = _parse_document(document, anchor, project=project, env={}, shown=str(spec.source or "<Stack>"))
        return dataclasses.replace(stack, source=spec.source)
    if isinstance(spec, Mapping):
        anchor = Path(base_dir) if base_dir is not None else Path.cwd()
        stack = _parse_document(dict(spec), anchor, project=project, env=env, shown=_DICT_NAME)
        return dataclasses.replace(stack, source=None)
    if isinstance(spec, str | os.PathLike):
        path = Path(spec)
        if path.is_dir():
            path = path / "stack.toml"
        return load_stack(path, project=project, env=env)
    raise TypeError(f"open_stack: expected a stack file path, a stackd.spec.Stack or a dict, got {type(spec).__name__}")


def _parse_document(
    document: dict[str, Any], anchor: Path, *, project: str | None, env: Mapping[str, str] | None, shown: str
) -> Stack:
    import tomli_w

    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError) as error:
        raise StackFileError([Problem(shown, "", f"not representable as a stack file: {error}")]) from None
    file = anchor.resolve() / "stack.toml"
    try:
        stack = parse_stack(text, file=file, project=project, env=env)
    except StackFileError as error:
        # Lines of generated TOML mean nothing to the caller: the key path says where.
        problems = [dataclasses.replace(p, file=shown, line=None) if p.file == str(file) else p for p in error.problems]
        raise StackFileError(problems) from None
    return stack
