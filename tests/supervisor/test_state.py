"""The state record names its supervisor by pid and start time, so that a reused pid is not taken for it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from stackd.runtime.paths import StackPaths
from stackd.supervisor.state import StateRecord, process_start


def test_supervisor_alive_tells_a_reused_pid_apart(tmp_path: Path) -> None:
    paths = StackPaths("st-alive", state_root=tmp_path / "run", log_root=tmp_path / "log")
    # `sleep` has no "stackd" in its command line: what counts is the process, not its name.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        started = process_start(sleeper.pid)
        assert started is not None and started > 0
        record = StateRecord(paths, sleeper.pid, None, supervisor_start=started)
        record.save()
        assert StateRecord.load(paths).supervisor_alive()  # type: ignore[union-attr]

        # The same pid with another start time is another process (the pid was reused).
        assert not StateRecord(paths, sleeper.pid, None, supervisor_start=started + 1).supervisor_alive()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert process_start(sleeper.pid) is None
    assert not StateRecord.load(paths).supervisor_alive()  # type: ignore[union-attr]


def test_a_record_of_this_process() -> None:
    paths = StackPaths("st-self", state_root=Path("/nonexistent"), log_root=Path("/nonexistent"))
    record = StateRecord.for_this_process(paths, "stack.toml")
    assert record.supervisor_alive()
    assert record.supervisor_start == int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
