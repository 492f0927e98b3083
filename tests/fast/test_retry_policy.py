"""The retry policy's arithmetic: backoff bounds, Retry-After, the deadline and the turn."""

from __future__ import annotations

import pytest

from tasks import RateLimited, RetriesExhausted, ServerError
from tasks._settings import RetrySettings
from tasks.budget.retry import Budget, RetryPolicy


def policy(**changes):
    clock = changes.pop("clock", lambda: 1000.0)
    return RetryPolicy(RetrySettings(**changes), clock=clock, jitter=lambda lo, hi: hi)


def test_backoff_doubles_up_to_its_ceiling():
    """Full jitter picks within a ceiling that doubles per failure and stops at wait_max."""
    p = policy(wait_initial=0.5, wait_max=3.0)
    assert [p.backoff(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_retry_after_is_honoured_but_bounded():
    """A server's Retry-After wins over backoff, up to retry_after_max."""
    p = policy(retry_after_max=30.0)
    assert p.delay_for(ServerError("x", status=503, retry_after=12.0), 1) == 12.0
    assert p.delay_for(ServerError("x", status=503, retry_after=999.0), 1) == 30.0


def test_a_429_waits_in_the_shared_limiter_not_here():
    """After a 429 the policy itself sleeps nothing: the limiter's pause does."""
    assert policy().delay_for(RateLimited("x", status=429, retry_after=5.0), 3) == 0.0


def test_the_deadline_counts_from_the_first_start():
    """Past the deadline the next attempt raises, naming the setting and the last failure."""
    now = [1000.0]
    p = policy(deadline=60.0, clock=lambda: now[0])
    budget = Budget(started_at=1000.0, failures=2, last_failure="503")
    p.check_deadline(budget, "minting")
    now[0] = 1061.0
    with pytest.raises(RetriesExhausted, match=r"SFOX_RETRY_DEADLINE.*503"):
        p.check_deadline(budget, "minting")


def test_an_in_process_wait_is_bounded_by_setting_and_deadline():
    """No wait slept here is longer than inprocess_wait_max or the time left."""
    p = policy(deadline=100.0, inprocess_wait_max=10.0, clock=lambda: 1095.0)
    assert p.max_inprocess_wait(Budget(started_at=1000.0)) == 5.0


def test_a_budget_survives_a_trip_through_json():
    """A countdown at the broker keeps the failures and the start."""
    budget = Budget(started_at=5.0, failures=3, last_failure="timeout")
    assert Budget.from_json(budget.to_json(), now=99.0) == budget
    assert Budget.from_json(None, now=99.0) == Budget(started_at=99.0)
