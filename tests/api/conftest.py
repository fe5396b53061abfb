"""Fixtures of the Python API's tests: a unique, leak-tracked project and private state/log roots."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from stackd.testing.leaks import LeakGuard


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    name = f"api-{secrets.token_hex(3)}"
    leak_check.track(name)
    return name


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Any]:
    """open_stack's state_dir and log_dir, in the test's temporary directory."""
    return {"state_dir": tmp_path / "state", "log_dir": tmp_path / "log"}
