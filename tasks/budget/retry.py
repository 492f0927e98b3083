"""The retry policy: which failures to try again, how long to wait, and where.

One layer retries one failure. Short waits are slept here, inside tenacity's
loop; a wait longer than ``inprocess_wait_max`` is not slept by a worker slot
but raised as :class:`Defer`, which the Celery glue turns into a broker
countdown. The attempt count and the deadline live in a :class:`Budget` that
travels with the task across such countdowns, so the budget is spent once,
whichever way the wait is taken.

Waits: ``Retry-After`` when sFOX sends one (seconds or an HTTP date, capped),
otherwise exponential backoff with full jitter. A 429's wait is not slept
here: the shared limiter's pause holds every worker back instead.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import tenacity

from .._exceptions import RateLimited, RetriesExhausted, TransientError
from .._metrics import rate_limit_paused
from .._settings import RetrySettings
from .ratelimit import Limiter, held

__all__ = ["Budget", "Defer", "RetryPolicy"]


logger = logging.getLogger("tasks.retry")

T = TypeVar("T")


class Defer(Exception):
    """Wait ``countdown`` seconds outside the worker slot, then resume."""

    def __init__(self, countdown: float, reason: str) -> None:
        super().__init__(f"deferring {countdown:.1f} s: {reason}")
        self.countdown = countdown
        self.reason = reason


@dataclass
class Budget:
    """Retry accounting for one request, JSON-able so it survives a broker countdown.

    A task with several requests in flight gives each its own budget, all with
    the task's ``started_at``: they share one deadline, and one request's
    failures are never reset by another's success.
    """

    #: Wall-clock time (epoch seconds) the task first started.
    started_at: float
    #: Consecutive failed attempts of the request now being made.
    failures: int = 0
    #: What the last failure was, for the final error message.
    last_failure: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, *, now: float) -> Budget:
        if not data:
            return cls(started_at=now)
        return cls(
            started_at=float(data.get("started_at", now)),
            failures=int(data.get("failures", 0)),
            last_failure=str(data.get("last_failure", "")),
        )


class RetryPolicy:
    """Runs one sFOX request under the retry rules."""

    def __init__(
        self,
        settings: RetrySettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[float, float], float] = random.uniform,
        turn: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._monotonic = monotonic
        #: When this task's turn with its broker message ends (``SFOX_TASK_TURN``): past it,
        #: no new attempt starts and no wait is slept; the work goes back to the broker.
        self._turn_ends = None if turn is None else monotonic() + turn

    def turn_left(self) -> float:
        """Seconds left of the task's turn (infinite outside a task)."""
        if self._turn_ends is None:
            return float("inf")
        return self._turn_ends - self._monotonic()

    def max_inprocess_wait(self, budget: Budget) -> float:
        """The longest wait to sleep here: bounded by the setting, the deadline and the turn."""
        return max(
            0.0,
            min(self.settings.inprocess_wait_max, self.remaining(budget), self.turn_left()),
        )

    def remaining(self, budget: Budget) -> float:
        """Seconds left before the deadline."""
        return self.settings.deadline - (self._clock() - budget.started_at)

    def check_deadline(self, budget: Budget, doing: str) -> None:
        """Raise :class:`RetriesExhausted` once the deadline has passed."""
        if self.remaining(budget) <= 0:
            last = f"; last failure: {budget.last_failure}" if budget.last_failure else ""
            raise RetriesExhausted(
                f"gave up {doing}: the {self.settings.deadline:g} s deadline "
                f"(SFOX_RETRY_DEADLINE) passed{last}"
            )

    def backoff(self, failures: int) -> float:
        """Full-jitter exponential backoff for the ``failures``-th failure in a row."""
        ceiling = min(self.settings.wait_max, self.settings.wait_initial * 2 ** (failures - 1))
        return self._jitter(0.0, ceiling)

    def delay_for(self, exc: TransientError, failures: int) -> float:
        """Seconds to wait before trying again after ``exc``."""
        if isinstance(exc, RateLimited):
            return 0.0  # the shared limiter's pause does the waiting, for every worker
        if exc.retry_after is not None:
            return min(exc.retry_after, self.settings.retry_after_max)
        return self.backoff(failures)

    @contextmanager
    def turn(
        self,
        limiter: Limiter,
        *,
        max_wait: float,
        hold: float,
        penalty: float,
        what: str,
        sleep: Callable[[float], None],
    ) -> Iterator[str]:
        """One request's turn: a slot of ``limiter`` held while it is in flight.

        A 429 answered inside it pauses every worker sharing ``limiter``
        (:meth:`pause_after_429`) before it propagates.
        """
        with held(limiter, max_wait=max_wait, hold=hold, sleep=sleep) as slot:
            try:
                yield slot
            except RateLimited as exc:
                self.pause_after_429(limiter, exc, penalty, what)
                raise

    def pause_after_429(
        self, limiter: Limiter, exc: RateLimited, penalty: float, what: str
    ) -> None:
        """Pause every worker sharing ``limiter``: ``Retry-After`` if given, else ``penalty``."""
        pause = (
            min(exc.retry_after, self.settings.retry_after_max)
            if exc.retry_after is not None
            else penalty
        )
        logger.warning(
            "sFOX answered 429 to %s: pausing every worker for %.1f s (%s)",
            what,
            pause,
            "Retry-After" if exc.retry_after is not None else "SFOX_RATE_LIMIT_PENALTY",
        )
        limiter.pause(pause)
        rate_limit_paused()

    def call(self, send: Callable[[], T], budget: Budget, *, what: str) -> T:
        """Run ``send`` until it succeeds, fails for good, or the budget runs out.

        Raises the permanent error as is, :class:`Defer` for a long wait, and
        :class:`RetriesExhausted` when attempts or time run out.
        """

        def attempt() -> T:
            self.check_deadline(budget, what)
            if self.turn_left() <= 0:
                raise Defer(0.0, f"{what}: the task's turn is over (SFOX_TASK_TURN)")
            try:
                return send()
            except TransientError as exc:
                budget.failures += 1
                budget.last_failure = exc.message
                raise

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            assert isinstance(exc, TransientError)
            if budget.failures >= self.settings.attempts:
                return 0.0  # tenacity asks before it stops; there is no next attempt
            delay = self.delay_for(exc, budget.failures)
            if delay > self.remaining(budget):
                self.check_deadline(budget, what)
                raise RetriesExhausted(
                    f"gave up {what}: waiting {delay:.1f} s more would pass the "
                    f"{self.settings.deadline:g} s deadline (SFOX_RETRY_DEADLINE); "
                    f"last failure: {budget.last_failure}"
                )
            here = delay <= min(self.settings.inprocess_wait_max, self.turn_left())
            logger.warning(
                "sFOX %s: attempt %d of %d failed (%s); retrying in %.2f s%s",
                what,
                budget.failures,
                self.settings.attempts,
                exc.message,
                delay,
                "" if here else " from the broker",
            )
            if not here:
                raise Defer(delay, f"{what}: {exc.message}")
            return delay

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=lambda _state: budget.failures >= self.settings.attempts,
            wait=wait,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            result = retrying(attempt)
        except TransientError as exc:
            raise RetriesExhausted(
                f"gave up {what} after {budget.failures} failed attempts "
                f"(SFOX_RETRY_ATTEMPTS={self.settings.attempts}); last failure: {exc.message}",
                status=exc.status,
            ) from None
        budget.failures = 0
        budget.last_failure = ""
        return result
