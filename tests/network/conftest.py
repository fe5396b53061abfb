"""Fixtures of the network tests: `make_stack` makes stack networks under unique projects, tells the
leak check their names, and tears every one of them down at the end, also when the test failed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from netkit import MakeStack, NetStack, new_stack

from stackd.testing.leaks import LeakGuard


@pytest.fixture
async def make_stack(tmp_path: Path, leak_check: LeakGuard) -> AsyncIterator[MakeStack]:
    made: list[NetStack] = []

    async def make(services: Iterable[str], **options: Any) -> NetStack:
        taken = [stack.network.subnet for stack in made]
        stack = await new_stack(tmp_path / f"stack{len(made)}", list(services), taken=taken, **options)
        made.append(stack)
        leak_check.track(stack.project, link_prefixes=stack.link_names)
        return stack

    yield make
    errors = []
    for stack in made:
        try:
            await stack.teardown(timeout=2.0)
        except Exception as error:  # keep going: the others must go too
            errors.append(error)
    if errors:
        raise errors[0]
