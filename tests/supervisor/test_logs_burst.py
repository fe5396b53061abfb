"""A 200 MB burst of output through a real `stackd up` is byte-exact in the service's log files.

The service runs under the StackSupervisor (launcher, namespaces, cgroup, seccomp; the host's root as an
overlay) with its stdout and stderr on the log router's pipes, exactly as `stackd up` runs it. It writes
200 MiB of arbitrary bytes, mixed between stdout and stderr, in writes from 1 byte to 1 MiB, with lines
longer than every buffer on the way (the 256 KiB pipe, the 256 KiB read, the 16 KiB line limit), and ends
each stream with a line that has no newline. The generator is deterministic (a seeded PRNG), so the test
rebuilds the expected bytes of each stream itself and compares sha256 sums, lengths and line counts with
what `read_log` gives back from the files on disk.

Rotation is set to 32 MiB x 100 files: the burst (about 200 MiB of data plus a 37-byte header per
record) rotates 6 or 7 times and no file is deleted, so every byte is still on disk; the test asserts that
it rotated, that every closed file stayed within `max_bytes`, and that nothing was dropped.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from stackd.runtime.paths import StackPaths
from stackd.spec import parse_stack
from stackd.supervisor.logfile import Rotation, log_files, log_path, read_log
from stackd.supervisor.router import DEFAULT_MAX_LINE, DEFAULT_PIPE_SIZE, DEFAULT_READ_SIZE, LogRouter
from stackd.supervisor.stack import StackSupervisor
from stackd.testing.leaks import LeakGuard

TOTAL = 200 << 20
#: The host's own Python, as the service sees it (the host root's /root and /home are hidden from services).
SERVICE_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
SEED = 20261122
ROTATION = Rotation(max_bytes=32 << 20, max_files=100)
#: One line longer than every buffer between the service and the disk, written first, in one write.
LONG_LINE = 3 << 20
assert max(DEFAULT_PIPE_SIZE, DEFAULT_READ_SIZE, DEFAULT_MAX_LINE) < LONG_LINE

# The service's program. `plan(emit)` is shared with the test (exec'd there too), so both sides produce
# the same bytes: `emit(fd, data)` writes them in the service and hashes them in the test.
GENERATOR = r"""
import random

def plan(emit, total, seed):
    rng = random.Random(seed)
    sizes = (1, 7, 100, 4096, 65536, 262144, 1 << 20)
    long_line = rng.randbytes(LONG_LINE).replace(b"\n", b"x")
    emit(1, long_line[: LONG_LINE // 3])        # a line longer than any buffer, in several writes
    emit(2, b"stderr starts here\n")            # ... with stderr in between
    emit(1, long_line[LONG_LINE // 3 :] + b"\n")
    sent = LONG_LINE + 19
    while sent < total:
        data = rng.randbytes(rng.choice(sizes))  # arbitrary bytes: a newline every 256 on average
        if rng.random() < 0.02:
            data = data.replace(b"\n", b"x")     # now and then a long line
        emit(2 if rng.random() < 0.1 else 1, data)
        sent += len(data)
    emit(2, b"stderr ends without a newline")
    emit(1, b"stdout ends without a newline")
"""

SERVICE_MAIN = r"""
import os, sys

def emit(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

plan(emit, int(sys.argv[1]), int(sys.argv[2]))
"""


def expected_streams() -> dict[str, tuple[str, int, int]]:
    """(sha256, bytes, lines) of what the service writes on each stream, computed here."""
    sums = {1: hashlib.sha256(), 2: hashlib.sha256()}
    sizes = {1: 0, 2: 0}
    newlines = {1: 0, 2: 0}

    def emit(fd: int, data: bytes) -> None:
        sums[fd].update(data)
        sizes[fd] += len(data)
        newlines[fd] += data.count(b"\n")

    namespace: dict[str, Any] = {"LONG_LINE": LONG_LINE}
    exec(GENERATOR, namespace)
    namespace["plan"](emit, TOTAL, SEED)
    # each stream ends with an unterminated line: one line more than its newlines
    return {name: (sums[fd].hexdigest(), sizes[fd], newlines[fd] + 1) for name, fd in (("stdout", 1), ("stderr", 2))}


@pytest.fixture
def project(leak_check: LeakGuard) -> str:
    name = f"lb-{secrets.token_hex(3)}"
    leak_check.track(name)
    return name


def stack_toml() -> str:
    program = f"LONG_LINE = {LONG_LINE}\n" + GENERATOR + SERVICE_MAIN
    command = [SERVICE_PYTHON, "-I", "-S", "-c", program, str(TOTAL), str(SEED)]
    quoted = ", ".join(f"'''{part}'''" for part in command)
    return f'[services.burst]\ncommand = [{quoted}]\nrestart = "no"\n'


@pytest.mark.skipif(not Path(SERVICE_PYTHON).exists(), reason="no python3 in /usr/bin or /bin")
async def test_200mb_burst_through_up_is_byte_exact_on_disk(tmp_path: Path, project: str) -> None:
    stack = parse_stack(stack_toml(), file=tmp_path / "stack.toml", project=project)
    paths = StackPaths(project, state_root=tmp_path / "state", log_root=tmp_path / "log")
    events: list[tuple[str, str, dict[str, Any]]] = []

    def emit(event: str, service: str, **fields: Any) -> None:
        events.append((event, service, fields))

    try:
        started = time.monotonic()
        async with (
            LogRouter(paths.logs, rotation=ROTATION) as router,
            StackSupervisor.open(stack, emit=emit, output=router, paths=paths) as supervisor,
        ):
            await supervisor.up()  # returns when the service has exited and its output is on disk
        elapsed = time.monotonic() - started
        stats = router.stats("burst")
        exits = [fields for event, service, fields in events if event == "exited"]
        assert [fields.get("code") for fields in exits] == [0], events

        expected = expected_streams()
        assert stats.bytes == sum(size for _, size, _ in expected.values()) >= TOTAL
        assert stats.lost == 0

        path = log_path(paths.logs, "burst")
        files = log_files(path)
        # about 200 MiB of data and 37 bytes of header per record: rotated, nothing deleted
        assert 6 <= len(files) <= 9, [f.name for f in files]
        assert files[-1] == path and files[0].name == f"burst.log.{len(files) - 1}"
        assert all(f.stat().st_size <= ROTATION.max_bytes for f in files)
        assert sum(f.stat().st_size for f in files) == stats.written
        with files[0].open("rb") as oldest:  # the first line, longer than any buffer, went as P records
            assert oldest.read(LONG_LINE).count(b" stdout P ") >= LONG_LINE // (DEFAULT_MAX_LINE + DEFAULT_READ_SIZE)

        sums = {"stdout": hashlib.sha256(), "stderr": hashlib.sha256()}
        sizes = {"stdout": 0, "stderr": 0}
        lines = {"stdout": 0, "stderr": 0}
        last: dict[str, Any] = {}
        for line in read_log(path):
            data = line.raw()
            sums[line.stream].update(data)
            sizes[line.stream] += len(data)
            lines[line.stream] += 1
            last[line.stream] = line
        got = {stream: (sums[stream].hexdigest(), sizes[stream], lines[stream]) for stream in sums}
        assert got == expected
        assert sum(lines.values()) == stats.lines
        for stream in ("stdout", "stderr"):  # the unterminated last line, kept as such (an E record)
            assert last[stream].data.endswith(f"{stream} ends without a newline".encode())
            assert not last[stream].complete
        assert elapsed < 15, f"the burst took {elapsed:.1f} s through up"
    finally:
        shutil.rmtree(tmp_path / "log", ignore_errors=True)  # 230 MB: not for pytest to keep around


def test_the_generator_is_deterministic() -> None:
    """The expected sums depend only on the seed (so a failure reproduces)."""
    namespace: dict[str, Any] = {"LONG_LINE": 1000}
    exec(GENERATOR, namespace)
    runs = []
    for _ in range(2):
        out: list[tuple[int, bytes]] = []
        namespace["plan"](lambda fd, data, out=out: out.append((fd, data)), 50_000, 1)
        runs.append(out)
    assert runs[0] == runs[1]
    assert runs[0][-1] == (1, b"stdout ends without a newline")
