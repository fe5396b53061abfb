"""100 up/down cycles of a 10-service stack's network: never "File exists", nothing left behind.

Every fourth cycle ends like a supervisor killed in the middle of `down`: the namespaces are unpinned
and nothing waits for the kernel, so the next cycle finds the old veths still being destroyed and the
old bridge still there. It measures itself (printed with `pytest -s`): about 10 s here.
"""

from __future__ import annotations

import time

import pytest
from netkit import MakeStack

from stackd.runtime.network import unpin

pytestmark = pytest.mark.root

CYCLES = 100
SERVICES = 10


async def test_a_hundred_up_down_cycles_of_ten_services(make_stack: MakeStack) -> None:
    stack = await make_stack([f"svc{i}" for i in range(SERVICES)])
    started = time.monotonic()
    crashes = 0
    for cycle in range(CYCLES):
        await stack.create()  # raises NetworkError on any failure, "File exists" included
        if cycle % 4 == 3:
            for point in stack.endpoints.values():
                unpin(point.netns)
            crashes += 1
            continue
        report = await stack.teardown()
        assert report.clean, report
        assert report.bridge_deleted
    final = await stack.teardown()
    assert final.clean
    elapsed = time.monotonic() - started
    print(f"\n{CYCLES} cycles of {SERVICES} services ({crashes} ending in a crash): {elapsed:.1f} s")
