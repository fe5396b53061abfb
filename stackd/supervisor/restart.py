"""Restart policies and their backoff, as pure functions (the runner asks; nothing here waits or acts).

Docker's rules: `no` never restarts; `always` restarts after any exit; `on-failure[:N]` after a
non-zero exit or a kill by signal, at most N times; `unless-stopped` like `always`. A service that
the user stopped (`stackd stop`, `down`) is never restarted. The delay before a restart doubles from
`initial` up to `maximum`, and goes back to `initial` once the service has run `reset_after` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from stackd.spec.models import RestartPolicy

__all__ = ["Backoff", "RestartState", "should_restart"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff between restarts (Docker's defaults: 100 ms doubling to 1 min, reset after 10 s)."""

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 60.0
    reset_after: float = 10.0

    def delay(self, attempt: int) -> float:
        """The wait before restart number `attempt` (1 for the first restart of a streak)."""
        return min(self.initial * self.factor ** max(attempt - 1, 0), self.maximum)


def should_restart(
    policy: RestartPolicy, *, code: int | None, signal: int | None, restarts: int, stopped_by_user: bool
) -> bool:
    """Whether a service that just ended should be started again.

    `code`/`signal` describe the exit; `restarts` counts the restarts already made under on-failure's
    limit (Docker counts them since the service was last started by the user).
    """
    if stopped_by_user or policy.mode == "no":
        return False
    if policy.mode in ("always", "unless-stopped"):
        return True
    failed = signal is not None or (code is not None and code != 0)
    if not failed:
        return False
    return policy.max_retries is None or restarts < policy.max_retries


@dataclass(slots=True)
class RestartState:
    """One service's restart bookkeeping: the streak for the backoff and the count for on-failure:N."""

    backoff: Backoff = Backoff()
    streak: int = 0
    restarts: int = 0

    def on_exit(self, ran_for: float) -> None:
        """Record an exit after `ran_for` seconds of running: a long enough run ends the streak."""
        if ran_for >= self.backoff.reset_after:
            self.streak = 0

    def next_delay(self) -> float:
        """Count one more restart and return how long to wait before it."""
        self.streak += 1
        self.restarts += 1
        return self.backoff.delay(self.streak)

    def reset(self) -> None:
        """The user started the service again: counts start from zero."""
        self.streak = 0
        self.restarts = 0
