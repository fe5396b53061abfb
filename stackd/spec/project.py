"""Project names, with Docker Compose's rules."""

from __future__ import annotations

import re

from stackd.spec.problems import Invalid

__all__ = ["normalise_project_name", "validate_project_name"]

_VALID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MAX_LENGTH = 63


def validate_project_name(name: str) -> str:
    """Accept a name given with -p or `name` as it is, or explain what a project name may be."""
    if not _VALID.match(name) or len(name) > MAX_LENGTH:
        raise Invalid(
            f'"{name}" is not a project name: use lowercase letters, digits, "-" and "_", starting with a '
            f"letter or digit, at most {MAX_LENGTH} characters"
        )
    return name


def normalise_project_name(name: str) -> str:
    """A directory's name made a project name the way Compose does: lowercased, other characters dropped."""
    cleaned = re.sub(r"[^a-z0-9_-]", "", name.lower()).lstrip("_-")[:MAX_LENGTH]
    return cleaned or "default"
