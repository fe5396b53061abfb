"""Restart policies and backoff: Docker's rules, as pure functions."""

from __future__ import annotations

import signal

import pytest

from stackd.spec.models import RestartPolicy
from stackd.supervisor.restart import Backoff, RestartState, should_restart

KILLED = {"code": None, "signal": int(signal.SIGKILL)}
FAILED = {"code": 3, "signal": None}
CLEAN = {"code": 0, "signal": None}


@pytest.mark.parametrize(
    ("mode", "exit", "expected"),
    [
        ("no", FAILED, False),
        ("always", CLEAN, True),
        ("always", FAILED, True),
        ("unless-stopped", CLEAN, True),
        ("on-failure", CLEAN, False),
        ("on-failure", FAILED, True),
        ("on-failure", KILLED, True),
    ],
)
def test_which_exits_restart(mode: str, exit: dict, expected: bool) -> None:
    policy = RestartPolicy(mode)  # type: ignore[arg-type]
    assert should_restart(policy, **exit, restarts=0, stopped_by_user=False) is expected


def test_a_service_the_user_stopped_never_restarts() -> None:
    for mode in ("always", "unless-stopped", "on-failure"):
        assert not should_restart(RestartPolicy(mode), **FAILED, restarts=0, stopped_by_user=True)  # type: ignore[arg-type]


def test_on_failure_stops_after_its_limit() -> None:
    policy = RestartPolicy("on-failure", 3)
    assert [should_restart(policy, **FAILED, restarts=n, stopped_by_user=False) for n in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_backoff_doubles_up_to_its_maximum() -> None:
    backoff = Backoff(initial=0.1, factor=2.0, maximum=1.0)
    assert [backoff.delay(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_the_streak_resets_after_a_stable_run_but_the_count_does_not() -> None:
    state = RestartState(Backoff(initial=0.1, reset_after=10.0))
    delays = []
    for ran_for in (0.5, 0.5, 0.5):
        state.on_exit(ran_for)
        delays.append(state.next_delay())
    state.on_exit(12.0)  # ran long enough: the next restart is quick again
    delays.append(state.next_delay())
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.1])
    assert state.restarts == 4
    state.reset()
    assert (state.streak, state.restarts) == (0, 0)
