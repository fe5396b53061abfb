"""Run a function in a forked child and bring back its result: how the _sys tests change a process
(namespaces, mounts, capabilities, seccomp) without ever changing the test process itself."""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CHILD_TIMEOUT = 30.0


def read_until_eof(fd: int, pid: int, timeout: float) -> bytes:
    """Everything written to `fd` until EOF; kills `pid` (a child of ours) if that takes too long."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_in_child(fn: Callable[[], T], timeout: float = CHILD_TIMEOUT) -> T:
    """Run `fn` in a forked child and return its (picklable) result; re-raise its failure here."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            try:
                payload = pickle.dumps(("ok", fn()))
            except BaseException:
                payload = pickle.dumps(("error", traceback.format_exc()))
                code = 1
            write_all(write_end, payload)
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        data = read_until_eof(read_end, pid, timeout)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not data:
        raise AssertionError(f"child died without reporting (wait status {status:#x})")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"the child failed:\n{value}")
    assert os.waitstatus_to_exitcode(status) == 0
    result: T = value
    return result
