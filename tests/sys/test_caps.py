"""Tests of stackd._sys.caps on the real kernel, as root.

Every change of capabilities or uids happens in a forked child that reports back through a pipe and
leaves with os._exit (or execs `cat /proc/self/status`, whose output is the report); the test process
keeps its full capability sets.
"""

from __future__ import annotations

import errno
import os
import shutil
import traceback
from collections.abc import Callable
from typing import TypeVar

import pytest
from forkchild import CHILD_TIMEOUT, read_until_eof, run_in_child, write_all

from stackd._sys import caps, linux

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and the real kernel"),
]

T = TypeVar("T")

CAP_CHOWN = 0
CAP_SETGID = 6
CAP_NET_BIND_SERVICE = 10
NOBODY = 65534
KEEP = [CAP_NET_BIND_SERVICE, CAP_CHOWN]
KEEP_MASK = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_CHOWN)


# ---------------------------------------------------------------------------------------------------
# Helpers


_CAT = shutil.which("cat") or "/bin/cat"


def status_after_exec(prepare: Callable[[], None]) -> dict[str, str]:
    """Fork, run `prepare` in the child, exec `cat /proc/self/status` there; its parsed output."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            try:
                prepare()
                os.dup2(write_end, 1)
                os.execv(_CAT, ["cat", "/proc/self/status"])
            except BaseException:
                write_all(write_end, b"CHILD-ERROR\n" + traceback.format_exc().encode())
        finally:
            os._exit(1)
    os.close(write_end)
    try:
        out = read_until_eof(read_end, pid, CHILD_TIMEOUT).decode()
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if out.startswith("CHILD-ERROR"):
        raise AssertionError(f"the child failed before exec:\n{out}")
    assert os.waitstatus_to_exitcode(status) == 0, out
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _caps_of(fields: dict[str, str]) -> dict[str, int]:
    return {key: int(fields[key], 16) for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def _become_nobody() -> None:
    """What the launcher does before apply_capabilities for a non-root user."""
    linux.set_keepcaps(True)
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


# ---------------------------------------------------------------------------------------------------
# Reading


def test_last_cap_matches_proc_and_probe() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        expected = int(f.read())
    assert caps.last_cap() == expected
    assert expected == caps.LAST_CAP
    assert caps._probe_last_cap() == expected
    with pytest.raises(AttributeError, match="NO_SUCH"):
        _ = caps.NO_SUCH  # type: ignore[attr-defined]


def test_mask_helpers() -> None:
    assert caps.mask_of(KEEP) == KEEP_MASK == 0x401
    assert caps.caps_from_mask(KEEP_MASK) == frozenset(KEEP)
    assert caps.caps_from_mask(0) == frozenset()
    assert caps.mask_of([]) == 0
    with pytest.raises(ValueError, match="out of range"):
        caps.mask_of([caps.last_cap() + 1])
    with pytest.raises(ValueError, match="out of range"):
        caps.mask_of([-1])


def test_read_status_caps_and_capget_of_the_test_process() -> None:
    own = caps.read_status_caps()
    assert set(own) == {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}
    assert caps.read_status_caps(os.getpid()) == own
    assert own["CapBnd"] & KEEP_MASK == KEEP_MASK, "the test suite runs as root"
    current = caps.capget()
    assert current == caps.CapSets(own["CapEff"], own["CapPrm"], own["CapInh"])
    assert "effective=" in repr(current)


def test_read_status_caps_error_carries_the_path() -> None:
    with pytest.raises(FileNotFoundError) as caught:
        caps.read_status_caps(2**22 + 1)  # above pid_max's ceiling: never a process
    assert caught.value.filename == f"/proc/{2**22 + 1}/status"


def test_capset_round_trip_and_refusal() -> None:
    def child() -> tuple[caps.CapSets, int | None, str]:
        caps.capset(effective=KEEP_MASK, permitted=KEEP_MASK | 1 << CAP_SETGID, inheritable=0)
        after = caps.capget()
        try:
            caps.capset(effective=0, permitted=KEEP_MASK | 1 << CAP_SETGID | 1 << 1, inheritable=0)  # no growing
        except OSError as exc:
            return after, exc.errno, str(exc)
        raise AssertionError("capset raised the permitted set")

    after, err, text = run_in_child(child)
    assert after == caps.CapSets(KEEP_MASK, KEEP_MASK | 1 << CAP_SETGID, 0)
    assert err == errno.EPERM
    assert "capset" in text


# ---------------------------------------------------------------------------------------------------
# apply_capabilities


def test_apply_capabilities_as_root() -> None:
    before = caps.read_status_caps()

    def child() -> tuple[dict[str, int], bool]:
        linux.set_keepcaps(True)
        caps.apply_capabilities(KEEP, ambient=False)
        return caps.read_status_caps(), linux.get_keepcaps()

    status, keepcaps = run_in_child(child)
    assert status == {"CapInh": 0, "CapPrm": KEEP_MASK, "CapEff": KEEP_MASK, "CapBnd": KEEP_MASK, "CapAmb": 0}
    assert keepcaps is False
    assert caps.read_status_caps() == before  # the test process is untouched


def test_root_keeps_the_capabilities_across_exec() -> None:
    fields = status_after_exec(lambda: caps.apply_capabilities(KEEP, ambient=False))
    assert fields["Uid"].split()[0] == "0"
    assert _caps_of(fields) == {
        "CapInh": 0,
        "CapPrm": KEEP_MASK,
        "CapEff": KEEP_MASK,
        "CapBnd": KEEP_MASK,
        "CapAmb": 0,
    }


def test_ambient_capabilities_survive_exec_as_non_root() -> None:
    def prepare() -> None:
        _become_nobody()
        caps.apply_capabilities(KEEP, ambient=True)

    fields = status_after_exec(prepare)
    assert fields["Uid"].split() == [str(NOBODY)] * 4
    assert fields["Gid"].split() == [str(NOBODY)] * 4
    assert _caps_of(fields) == {
        "CapInh": KEEP_MASK,
        "CapPrm": KEEP_MASK,
        "CapEff": KEEP_MASK,
        "CapBnd": KEEP_MASK,
        "CapAmb": KEEP_MASK,
    }


def test_without_ambient_a_non_root_exec_loses_them_as_in_docker() -> None:
    def prepare() -> None:
        _become_nobody()
        caps.apply_capabilities(KEEP, ambient=False)

    fields = status_after_exec(prepare)
    assert fields["Uid"].split()[0] == str(NOBODY)
    assert _caps_of(fields) == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": KEEP_MASK, "CapAmb": 0}


def test_ambient_with_no_new_privs_still_survives_exec() -> None:
    def prepare() -> None:
        _become_nobody()
        caps.apply_capabilities([CAP_NET_BIND_SERVICE], ambient=True)
        linux.set_no_new_privs()

    fields = status_after_exec(prepare)
    assert fields["NoNewPrivs"] == "1"
    bit = 1 << CAP_NET_BIND_SERVICE
    assert _caps_of(fields) == {"CapInh": bit, "CapPrm": bit, "CapEff": bit, "CapBnd": bit, "CapAmb": bit}


def test_uid_switch_without_keepcaps_is_a_clear_eperm() -> None:
    def child() -> tuple[int | None, str]:
        os.setresuid(NOBODY, NOBODY, NOBODY)
        try:
            caps.apply_capabilities(KEEP, ambient=True)
        except OSError as exc:
            return exc.errno, str(exc)
        raise AssertionError("apply_capabilities kept capabilities that were gone")

    err, text = run_in_child(child)
    assert err == errno.EPERM
    assert "KEEPCAPS" in text
    assert "0, 10" in text


def test_separate_bounding_set() -> None:
    def child() -> dict[str, int]:
        caps.apply_capabilities([CAP_NET_BIND_SERVICE], ambient=False, bounding=[*KEEP, CAP_SETGID])
        return caps.read_status_caps()

    status = run_in_child(child)
    bit = 1 << CAP_NET_BIND_SERVICE
    assert status["CapBnd"] == KEEP_MASK | 1 << CAP_SETGID
    assert status["CapEff"] == status["CapPrm"] == bit
    assert status["CapInh"] == status["CapAmb"] == 0


def test_keep_outside_bounding_is_refused_before_any_change() -> None:
    before = caps.read_status_caps()
    with pytest.raises(ValueError, match="bounding"):
        caps.apply_capabilities(KEEP, ambient=False, bounding=[CAP_CHOWN])
    with pytest.raises(ValueError, match="out of range"):
        caps.apply_capabilities([caps.last_cap() + 1], ambient=False)
    assert caps.read_status_caps() == before


def test_dropping_everything() -> None:
    def child() -> dict[str, int]:
        caps.apply_capabilities([], ambient=True)
        return caps.read_status_caps()

    assert run_in_child(child) == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0}
