"""A fresh Redis for every test: the stackd plugin starts it (healthy) and always removes it."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from stackd.testing.pytest_plugin import stack_fixture

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))  # the application's modules

#: The stack of stack.toml, new for each test (scope="session" would share one).
services = stack_fixture(HERE / "stack.toml")


@pytest.fixture
async def client(services) -> AsyncIterator[redis.Redis]:  # type: ignore[no-untyped-def]
    """A client of this test's Redis, at its address on the stack's bridge."""
    connection = redis.Redis(host=services["redis"].address, port=6379, socket_timeout=5)
    yield connection
    await connection.aclose()
