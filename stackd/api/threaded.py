"""A stack on an event loop of its own, in a background thread: for synchronous code and for fixtures.

    with open_stack_in_thread("stack.toml") as stack:     # a plain `with`: no event loop needed here
        stack["db"].address                               # plain methods work from any thread
        await stack["db"].exec([...])                     # async ones from any event loop (handed over)

The stack's supervisor keeps running between calls (health checks, restarts, log pipes), whatever the
caller's thread does: a synchronous test, another event loop, or none. This is how the pytest plugin
runs fixtures of any scope without tying them to a test's event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import anyio
import anyio.abc
from anyio.from_thread import start_blocking_portal

from stackd.api.specs import SpecLike
from stackd.api.stack import Stack, open_stack

__all__ = ["open_stack_in_thread"]


@contextlib.contextmanager
def open_stack_in_thread(
    spec: SpecLike, *, defer_cleanup: Callable[[Callable[[], None]], None] | None = None, **options: Any
) -> Iterator[Stack]:
    """Like :func:`open_stack` (same arguments), as a plain context manager: the stack runs on an
    asyncio event loop in a background thread, from its start to its teardown, which happens on any
    exit of the ``with`` block (an exception, a KeyboardInterrupt too).

    With `defer_cleanup`, leaving the block returns once the services are stopped (their output on
    disk, their ports free); the removal of the rest (network, cgroups, state: tens of milliseconds of
    the kernel's time) goes on in the background, and `defer_cleanup` is handed a function that waits
    for it to end and raises what it raised. The pytest plugin uses this to overlap one test's
    clean-up with the next test; whoever defers must call that function before the process ends."""
    exits = contextlib.ExitStack()
    portal = exits.enter_context(start_blocking_portal("asyncio"))
    deferred = False
    try:
        stop = portal.call(anyio.Event)

        async def hold(*, task_status: anyio.abc.TaskStatus[Stack]) -> None:
            async with open_stack(spec, **options) as stack:
                stack._portal = portal
                task_status.started(stack)
                await stop.wait()

        # Interrupted here (Ctrl-C) or below, the portal cancels `hold`: open_stack's teardown still runs.
        future, stack = portal.start_task(hold)
        try:
            yield stack
        finally:
            with contextlib.suppress(RuntimeError):  # the portal's loop already ended
                portal.call(stop.set)
            if defer_cleanup is not None and _services_stopped(stack, future):

                def finish() -> None:
                    try:
                        future.result()
                    finally:
                        exits.close()

                deferred = True
                defer_cleanup(finish)
            else:
                future.result()
    finally:
        if not deferred:
            exits.close()


def _services_stopped(stack: Stack, future: Future[Any]) -> bool:
    """Wait until the stack's services are stopped; False when its teardown ended (or failed) first."""
    while not stack._services_down.wait(0.05):
        if future.done():
            return False
    return not future.done()
