"""The log pipeline: real child processes writing into real pipes, real files, real inotify and ptys."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from stackd.supervisor import logfile
from stackd.supervisor.logfile import HEADER_LEN, LogLine, LogWriter, Rotation, follow_log, log_files, read_log
from stackd.supervisor.router import (
    DEFAULT_MAX_LINE,
    LogChunk,
    LogRouter,
    Skipped,
    TerminalPrinter,
    use_color,
)

RECORD = re.compile(rb"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z (stdout|stderr) [FPE] ")


async def run_service(router: LogRouter, service: str, argv: Sequence[str]) -> int:
    """Start ``argv`` with its stdout/stderr on the router's pipes, as the launcher does; wait for its
    exit and for all of its output to be on disk."""
    out = router.attach(service)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out.stdout, stderr=out.stderr)
    finally:
        out.close_write_ends()
    try:
        code = await anyio.to_thread.run_sync(proc.wait)
    finally:
        proc.kill()
        proc.wait()
    await out.wait()
    return code


def raw(path: Path, stream: str = "stdout") -> bytes:
    """What the service wrote on ``stream``, rebuilt from its log."""
    return b"".join(line.raw() for line in read_log(path) if line.stream == stream)


def records(path: Path) -> list[bytes]:
    return [rec for f in log_files(path) for rec in f.read_bytes().split(b"\n")[:-1]]


# --- byte-exact under load ---------------------------------------------------------------------------------

BURST = r"""
import hashlib, os, random, sys
total, report, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
sums = {1: hashlib.sha256(), 2: hashlib.sha256()}
sizes = (1, 7, 100, 4096, 65536, 262144, 1 << 20)
sent = 0
while sent < total:
    data = os.urandom(rng.choice(sizes))        # arbitrary bytes: a newline every 256 on average
    if rng.random() < 0.02:
        data = data.replace(b"\n", b"x")       # now and then a long line
    fd = 2 if rng.random() < 0.1 else 1
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    sums[fd].update(data)
    sent += len(data)
with open(report, "w") as f:
    f.write(sums[1].hexdigest() + " " + sums[2].hexdigest())
"""


async def test_200mb_burst_arrives_byte_exact(tmp_path: Path) -> None:
    report = tmp_path / "sums"
    rotation = Rotation(max_bytes=64 << 20, max_files=100)  # rotates a few times, keeps everything
    async with LogRouter(tmp_path / "logs", rotation=rotation) as router:
        code = await run_service(router, "burst", [sys.executable, "-c", BURST, str(200 << 20), str(report), "7"])
        stats = router.stats("burst")
    assert code == 0
    assert stats.bytes >= 200 << 20 and stats.lost == 0
    path = tmp_path / "logs" / "burst.log"
    assert len(log_files(path)) > 1
    out, err = hashlib.sha256(), hashlib.sha256()
    lines = 0
    for line in read_log(path):
        (out if line.stream == "stdout" else err).update(line.raw())
        lines += 1
    assert report.read_text().split() == [out.hexdigest(), err.hexdigest()]
    assert lines == stats.lines
    shutil.rmtree(tmp_path / "logs")  # 230 MB: not for pytest to keep around


async def test_arbitrary_bytes_round_trip_and_records_are_greppable(tmp_path: Path) -> None:
    data = b"".join(
        [b"plain\n", b"\n", b"\r\n", b"tab\there\n", b"\x00\xff\xfe\x1b[31mred\x1b[0m\n", b"x" * 100_000 + b"\n"]
    )
    source = tmp_path / "in"
    source.write_bytes(data + b"no newline at the end")
    async with LogRouter(tmp_path / "logs") as router:
        await run_service(router, "svc", ["cat", str(source)])
    path = tmp_path / "logs" / "svc.log"
    assert raw(path) == source.read_bytes()
    recs = records(path)
    assert all(RECORD.match(rec) for rec in recs)
    assert recs[-1].endswith(b" stdout E no newline at the end")
    assert b" stdout F tab\there" in recs[3]


# --- crashes, long lines, close -----------------------------------------------------------------------------


async def test_crash_mid_line_keeps_the_partial_line(tmp_path: Path) -> None:
    crash = "import os; os.write(1, b'one\\ntwo\\npart'); os.write(2, b'err-part'); os.kill(os.getpid(), 9)"
    async with LogRouter(tmp_path) as router:
        code = await run_service(router, "crash", [sys.executable, "-c", crash])
    assert code == -9
    lines = list(read_log(tmp_path / "crash.log"))
    assert [(line.stream, line.data, line.complete) for line in lines if line.stream == "stdout"] == [
        ("stdout", b"one", True),
        ("stdout", b"two", True),
        ("stdout", b"part", False),
    ]
    assert [(line.data, line.complete) for line in lines if line.stream == "stderr"] == [(b"err-part", False)]
    assert raw(tmp_path / "crash.log") == b"one\ntwo\npart"
    assert any(rec.endswith(b" stdout E part") for rec in records(tmp_path / "crash.log"))


@pytest.mark.parametrize("newline", [False, True])
async def test_a_1mib_line_survives_in_bounded_records(tmp_path: Path, newline: bool) -> None:
    line = bytes(range(256)).replace(b"\n", b"-") * 4096  # 1 MiB, no newline inside
    writer = "import sys, os\nd = sys.stdin.buffer.read()\nfor i in range(0, len(d), 1000): os.write(1, d[i:i+1000])"
    source = tmp_path / "line"
    source.write_bytes(line + (b"\n" if newline else b""))
    async with LogRouter(tmp_path / "logs") as router:
        out = router.attach("long")
        with source.open("rb") as stdin:
            proc = subprocess.Popen([sys.executable, "-c", writer], stdin=stdin, stdout=out.stdout)
        out.close_write_ends()
        assert await anyio.to_thread.run_sync(proc.wait) == 0
        await out.wait()
    path = tmp_path / "logs" / "long.log"
    lines = list(read_log(path))
    assert [(got.stream, got.data, got.complete) for got in lines] == [("stdout", line, newline)]
    recs = records(path)
    assert len(recs) > 1 and all(rec[35:36] == b"P" for rec in recs[:-1])
    assert recs[-1][35:36] == (b"F" if newline else b"E")
    assert max(len(rec) for rec in recs) <= HEADER_LEN + router.read_size + DEFAULT_MAX_LINE


async def test_close_drains_a_pipe_still_held_open(tmp_path: Path) -> None:
    script = "import os, time; os.write(1, b'line\\nlast words'); time.sleep(30)"
    async with LogRouter(tmp_path, drain_timeout=0.3) as router:
        out = router.attach("hold")
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out.stdout, stderr=out.stderr)
        out.close_write_ends()
        try:
            with anyio.fail_after(10):
                while router.stats("hold").bytes < len(b"line\nlast words"):
                    await anyio.sleep(0.01)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    try:
        assert out.drained
        assert [(line.data, line.complete) for line in read_log(tmp_path / "hold.log")] == [
            (b"line", True),
            (b"last words", False),
        ]
    finally:
        proc.kill()
        proc.wait()


async def test_cancelled_supervisor_still_gets_the_last_words(tmp_path: Path) -> None:
    """Ctrl-C cancels the supervisor's scope: the router keeps reading until the service is done."""
    script = "import os, time; os.write(1, b'a\\n'); time.sleep(0.5); os.write(1, b'stopping\\n')"
    proc = None
    with anyio.move_on_after(0.1):
        async with LogRouter(tmp_path) as router:
            out = router.attach("web")
            proc = subprocess.Popen([sys.executable, "-c", script], stdout=out.stdout, stderr=out.stderr)
            out.close_write_ends()
            await anyio.sleep(10)
    assert proc is not None
    assert proc.wait(5) == 0
    assert raw(tmp_path / "web.log") == b"a\nstopping\n"


async def test_a_failing_disk_never_blocks_the_service(tmp_path: Path) -> None:
    (tmp_path / "full.log").symlink_to("/dev/full")  # every write: ENOSPC
    errors: list[tuple[str, OSError]] = []
    async with LogRouter(tmp_path, on_error=lambda s, e: errors.append((s, e))) as router:
        sub = router.subscribe()
        with anyio.fail_after(10):
            await run_service(router, "full", ["seq", "1", "200000"])
        stats = router.stats("full")
    assert stats.bytes == len(subprocess.check_output(["seq", "1", "200000"]))
    assert stats.lost > stats.bytes
    assert [(s, e.errno) for s, e in errors] == [("full", 28)]
    delivered = [item for item in sub._queue if isinstance(item, LogChunk)]
    assert delivered and delivered[0].data.startswith(b"1\n2\n")


# --- rotation ---------------------------------------------------------------------------------------------


async def test_rotation_keeps_every_line_in_order(tmp_path: Path) -> None:
    rotation = Rotation(max_bytes=64 * 1024, max_files=1000)
    async with LogRouter(tmp_path, rotation=rotation, read_size=8192) as router:
        await run_service(router, "seq", ["seq", "1", "100000"])
    files = log_files(tmp_path / "seq.log")
    assert len(files) > 50
    assert [line.data for line in read_log(tmp_path / "seq.log")] == [b"%d" % i for i in range(1, 100001)]
    assert all(f.stat().st_size <= rotation.max_bytes for f in files)
    assert router.stats("seq").lines == 100000


async def test_rotation_is_bounded_and_keeps_the_newest_lines(tmp_path: Path) -> None:
    rotation = Rotation(max_bytes=64 * 1024, max_files=3)
    async with LogRouter(tmp_path, rotation=rotation, read_size=8192) as router:
        await run_service(router, "seq", ["seq", "1", "100000"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.log", "seq.log.1", "seq.log.2"]
    numbers = [int(line.data) for line in read_log(tmp_path / "seq.log")]
    assert numbers[-1] == 100000
    assert numbers == list(range(numbers[0], 100001))
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 3 * rotation.max_bytes


def test_writer_rotation_with_one_file_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    writer = LogWriter(path, Rotation(max_bytes=100, max_files=1))
    rec = b"2026-01-01T00:00:00.000000Z stdout F " + b"x" * 40 + b"\n"
    for _ in range(5):
        writer.write([rec], len(rec))
    writer.close()
    assert os.listdir(tmp_path) == ["a.log"] and path.read_bytes() == rec  # 2 records > 100 bytes
    again = LogWriter(path, Rotation(max_bytes=1000))
    again.write([rec], len(rec))
    again.close()
    assert path.read_bytes() == rec * 2
    with pytest.raises(ValueError):
        Rotation(max_bytes=0)


# --- following ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("watch", ["inotify", "poll"])
async def test_follow_across_rotations(tmp_path: Path, watch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if watch == "poll":

        def no_inotify() -> None:
            raise OSError("no inotify here")

        monkeypatch.setattr(logfile, "_libc", no_inotify)
    rotation = Rotation(max_bytes=32 * 1024, max_files=10_000)
    seen: list[bytes] = []

    async def follow() -> None:
        async with contextlib.aclosing(follow_log(tmp_path / "seq.log", poll=0.01)) as lines:
            async for line in lines:
                seen.append(line.data)
                if line.data == b"50000":
                    return

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)  # before the log exists
            await anyio.sleep(0.05)
            async with LogRouter(tmp_path, rotation=rotation, read_size=4096) as router:
                await run_service(router, "seq", ["seq", "1", "50000"])
    assert len(log_files(tmp_path / "seq.log")) > 10
    assert seen == [b"%d" % i for i in range(1, 50001)]


async def test_follow_with_tail_then_new_lines(tmp_path: Path) -> None:
    async with LogRouter(tmp_path) as router:
        await run_service(router, "web", ["seq", "1", "100"])
        got: list[bytes] = []
        with anyio.fail_after(10):
            async with contextlib.aclosing(follow_log(tmp_path / "web.log", tail=3)) as lines:
                async for line in lines:
                    got.append(line.data)
                    if line.data == b"98":
                        await run_service(router, "web", ["printf", "more\\npartial"])
                    if line.data == b"partial":
                        break
    assert got == [b"98", b"99", b"100", b"more", b"partial"]


# --- subscribers and the terminal ---------------------------------------------------------------------------


async def test_slow_subscriber_drops_with_a_marker_while_the_file_gets_everything(tmp_path: Path) -> None:
    async with LogRouter(tmp_path) as router:
        slow = router.subscribe(max_bytes=64 * 1024)
        await run_service(router, "web", ["seq", "1", "1000000"])  # 6.9 MB while nobody reads `slow`
        assert slow.queued <= max(64 * 1024, router.read_size + router.max_line + 256)
        batch = await slow.receive_batch()
    expected = subprocess.check_output(["seq", "1", "1000000"])
    assert raw(tmp_path / "web.log") == expected
    chunks = [item for item in batch if isinstance(item, LogChunk)]
    markers = [item for item in batch if isinstance(item, Skipped)]
    assert markers and slow.skipped == sum(m.nbytes for m in markers) > 0
    assert sum(len(c.data) for c in chunks) + slow.skipped == len(expected)
    text = TerminalPrinter(["web"], color=False).render(batch)
    assert b"web | 1\nweb | 2\n" in text
    assert re.search(rb"web \| \.\.\. \d+ bytes of web's output skipped on the terminal; all of it is in the log", text)


async def test_a_stuck_terminal_never_blocks_the_disk(tmp_path: Path) -> None:
    term_r, term_w = os.pipe()  # nobody reads it: the printer's write blocks once 64 KiB are in it
    rotation = Rotation(max_bytes=1 << 30)
    try:
        async with anyio.create_task_group() as tg, LogRouter(tmp_path, rotation=rotation) as router:
            sub = router.subscribe(max_bytes=256 * 1024)
            tg.start_soon(TerminalPrinter(["web"], fd=term_w).run, sub)
            with anyio.fail_after(10):
                await run_service(router, "web", ["seq", "1", "1000000"])  # 6.9 MB
            assert raw(tmp_path / "web.log") == subprocess.check_output(["seq", "1", "1000000"])
            assert sub.skipped > 0 and sub.queued <= max(256 * 1024, router.read_size + router.max_line + 256)
            os.close(term_r)  # the terminal goes away: the printer stops, the router does not mind
            term_r = -1
    finally:
        if term_r >= 0:
            os.close(term_r)
        os.close(term_w)


async def test_printer_through_the_router(tmp_path: Path) -> None:
    term_r, term_w = os.pipe()
    try:
        async with anyio.create_task_group() as tg, LogRouter(tmp_path) as router:
            tg.start_soon(TerminalPrinter(["db", "web"], fd=term_w, color=False).run, router.subscribe())
            await run_service(router, "web", ["printf", "hello\\nworld\\nno newline"])
        os.set_blocking(term_r, False)
        assert os.read(term_r, 65536) == b"web | hello\nweb | world\nweb | no newline\n"
    finally:
        os.close(term_r)
        os.close(term_w)


def chunk(service: str, data: bytes, *, stream: str = "stdout", partial: bool = False, eof: bool = False) -> LogChunk:
    return LogChunk(service, stream, b"2026-11-22T09:40:00.123456Z", data, partial, eof)  # type: ignore[arg-type]


def test_printer_prefix_padding_timestamps_and_no_prefix() -> None:
    items = [chunk("db", b"a\nb\n"), chunk("frontend", b"c\n")]
    assert TerminalPrinter(["db", "frontend"], color=False).render(items) == (
        b"db       | a\ndb       | b\nfrontend | c\n"
    )
    assert TerminalPrinter(["db"], color=False, timestamps=True).render(items[:1]) == (
        b"db | 2026-11-22T09:40:00.123456Z a\ndb | 2026-11-22T09:40:00.123456Z b\n"
    )
    assert TerminalPrinter(["db"], no_prefix=True, color=True).render(items) == b"a\nb\nc\n"
    assert TerminalPrinter(["db"], no_prefix=True, timestamps=True, color=False).render(items[1:]) == (
        b"2026-11-22T09:40:00.123456Z c\n"
    )


def test_printer_long_and_interrupted_lines() -> None:
    printer = TerminalPrinter(["web"], color=False)
    assert printer.render([chunk("web", b"aaa", partial=True), chunk("web", b"bbb\nc\n")]) == b"web | aaabbb\nweb | c\n"
    # another stream interrupts an unfinished line: it is ended, and goes on after a new prefix
    assert printer.render(
        [chunk("web", b"xx", partial=True), chunk("web", b"err\n", stream="stderr"), chunk("web", b"yy\n")]
    ) == (b"web | xx\nweb | err\nweb | yy\n")
    # a stream that ends mid-line
    assert printer.render([chunk("web", b"last", partial=True, eof=True), chunk("web", b"", eof=True)]) == (
        b"web | last\n"
    )
    assert printer.render([chunk("web", b"zz", partial=True), Skipped("web", 10)]) == (
        b"web | zz\nweb | ... 10 bytes of web's output skipped on the terminal; all of it is in the log file\n"
    )


def test_colours_are_stable_and_follow_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    master, slave = os.openpty()
    r, w = os.pipe()
    try:
        assert use_color(slave) and not use_color(w)
        assert TerminalPrinter(["db"], fd=slave).color and not TerminalPrinter(["db"], fd=w).color
        monkeypatch.setenv("NO_COLOR", "1")
        assert not use_color(slave) and not TerminalPrinter(["db"], fd=slave).color
        monkeypatch.setenv("NO_COLOR", "")  # no-color.org: only a non-empty value counts
        assert use_color(slave)
    finally:
        for fd in (master, slave, r, w):
            os.close(fd)
    services = ["db", "web", "cache"]
    first = TerminalPrinter(services, color=True).render([chunk(s, b"x\n") for s in services])
    again = TerminalPrinter(services, color=True).render([chunk(s, b"x\n") for s in services])
    colours = re.findall(rb"\x1b\[(\d+)m", first)
    assert first == again and colours[::2] == [b"36", b"33", b"32"] and set(colours[1::2]) == {b"0"}
    assert first.startswith(b"\x1b[36mdb    | \x1b[0mx\n")


# --- tail and since -----------------------------------------------------------------------------------------


def write_records(path: Path, recs: list[tuple[int, str, str, bytes]], rotation: Rotation) -> None:
    """(second, stream, flag, data) records written with the real writer, one batch each."""
    writer = LogWriter(path, rotation)
    for second, stream, flag, data in recs:
        rec = b"2026-11-22T09:%02d:%02d.000000Z %s %s %s\n" % (
            second // 60,
            second % 60,
            stream.encode(),
            flag.encode(),
            data,
        )
        writer.write([rec], len(rec))
    writer.close()


def test_tail_and_since_across_rotations_and_partial_lines(tmp_path: Path) -> None:
    recs = []
    for i in range(60):
        if i % 7 == 3:  # a long stdout line in pieces, with stderr lines in between
            recs += [(i, "stdout", "P", b"long%d-a" % i), (i, "stderr", "F", b"e%d" % i)]
            recs += [(i, "stdout", "P", b"-b"), (i, "stdout", "F", b"-c")]
        elif i % 11 == 5:
            recs += [(i, "stderr", "P", b"err%d-" % i), (i, "stdout", "F", b"o%d" % i), (i, "stderr", "E", b"end")]
        else:
            recs.append((i, "stdout" if i % 2 else "stderr", "F", b"line%d" % i))
    recs.append((60, "stdout", "P", b"still being written"))
    path = tmp_path / "svc.log"
    write_records(path, recs, Rotation(max_bytes=200, max_files=1000))
    assert len(log_files(path)) > 20
    every = list(read_log(path))
    assert b"long3-a-b-c" in [line.data for line in every] and b"err5-end" in [line.data for line in every]
    assert every[-1] == LogLine(b"2026-11-22T09:01:00.000000Z", "stdout", b"still being written", False)
    for n in range(len(every) + 3):
        expected = every[max(len(every) - n, 0) :] if n else []
        assert list(read_log(path, tail=n)) == expected, n
    since = datetime(2026, 11, 22, 9, 0, 30, tzinfo=UTC).timestamp()
    assert list(read_log(path, since=since)) == [line for line in every if line.stamp >= b"2026-11-22T09:00:30"]
    assert list(read_log(path, tail=5, since=since)) == every[-5:]
    until = since + 10
    assert list(read_log(path, since=since, until=until)) == [
        line for line in every if b"2026-11-22T09:00:30" <= line.stamp < b"2026-11-22T09:00:40"
    ]
    assert every[0].time.isoformat() == "2026-11-22T09:00:00+00:00"


async def test_tail_of_a_real_log(tmp_path: Path) -> None:
    async with LogRouter(tmp_path, rotation=Rotation(max_bytes=100_000, max_files=100)) as router:
        await run_service(router, "web", ["seq", "1", "100000"])
    assert [line.data for line in read_log(tmp_path / "web.log", tail=5)] == [b"%d" % i for i in range(99996, 100001)]
    assert list(read_log(tmp_path / "nothing.log")) == []
    assert list(read_log(tmp_path / "web.log", since=time.time() + 60)) == []
