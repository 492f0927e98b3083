"""Every wait has a named bound: the resume deadline, and an order's carried retry budget."""

from __future__ import annotations

import pytest

from tasks import ServerError
from tasks._settings import Rate, RetrySettings
from tasks.budget.ratelimit import LocalLimiter
from tasks.budget.retry import Defer, RetryPolicy
from tasks.fanout.tasks import BOOKS_DEADLINE, jit_done, jit_segment
from tasks.nightly.tasks import RUN_DEADLINE, NightlyTask
from tasks.sealing import Sealer, derive_seal_key
from tasks.sfox.access import SfoxAccess
from tasks.sfox.client import IssuedToken, Timeouts
from tasks.sfox.orders import OrderPlacer, TokenHolder
from tasks.worker.base import RESUME_DEADLINE, SfoxTask, resume_refusal


def test_a_resume_within_the_deadline_goes_ahead():
    """A resume that starts before the deadline is not refused."""
    assert (
        resume_refusal(
            "sfox.x", first_run=1000.0, now=1500.0, countdown=99.0, deadline=600.0, reason="a wait"
        )
        is None
    )


def test_a_resume_past_the_deadline_fails_naming_its_bound_and_what_it_waited_for():
    """Past the deadline the task fails with RetriesExhausted: elapsed time, bound, reason."""
    refused = resume_refusal(
        "sfox.jit_done",
        first_run=1000.0,
        now=4600.0,
        countdown=5.0,
        deadline=3600.0,
        reason="Redis (ConnectionError)",
    )
    assert refused is not None
    assert refused.message == (
        "sfox.jit_done gave up after 3600 s: resuming in 5 s would pass its 3600 s resume "
        "deadline (resume_deadline); it was waiting for: Redis (ConnectionError)"
    )


def test_every_package_task_has_a_bounded_resume_deadline():
    """The base's bound; the books' tasks their own; the coordinator's above its run's."""
    assert SfoxTask.resume_deadline == RESUME_DEADLINE == 3600.0
    assert SfoxTask.max_retries is None  # the time bound replaces Celery's count
    assert jit_segment.resume_deadline == jit_done.resume_deadline == BOOKS_DEADLINE
    assert RUN_DEADLINE < NightlyTask.resume_deadline <= RUN_DEADLINE + 3600.0


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class BusySfox:
    """Answers every order with 503 and a long Retry-After."""

    timeouts = Timeouts()

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        self.orders = 0

    def create_order(self, token, side, body):
        self.orders += 1
        raise ServerError("sFOX answered 503", status=503, retry_after=self.retry_after)

    def create_user_token(self, user_id):
        return IssuedToken(user_id, f"tok-{user_id}", "2099-01-01T00:00:00Z")


def placer_for(stub: BusySfox, clock: Clock, deadline: float) -> tuple[OrderPlacer, Sealer]:
    sealer = Sealer([derive_seal_key("ek")], 900)
    settings = RetrySettings(deadline=deadline, inprocess_wait_max=10.0, retry_after_max=300.0)
    policy = RetryPolicy(settings, sleep=lambda s: None, clock=clock, jitter=lambda a, b: 0)
    access = SfoxAccess(
        stub,  # type: ignore[arg-type]
        LocalLimiter(Rate.parse("1000/1s")),
        policy,
        sealer,
        rate_limit_penalty=0.0,
        sleep=lambda s: None,
        clock=clock,
    )
    return OrderPlacer(access), sealer


@pytest.mark.parametrize("carried", [True, False])
def test_a_long_retry_after_does_not_restart_the_order_deadline(carried):
    """Resumed with its carried budget, an order fails at its first deadline; anew, it waits on."""
    clock, stub = Clock(), BusySfox(retry_after=300.0)
    placer, sealer = placer_for(stub, clock, deadline=400.0)
    holder = TokenHolder("u1", {"token": sealer.seal("tok-u1"), "expires": "2099-01-01T00:00:00Z"})
    body = {"client_order_id": "coid-1", "currency_pair": "btcusd", "algorithm_id": 100}
    budget = placer.budget()
    with pytest.raises(Defer) as first:
        placer.place(holder, "buy", body, budget)
    assert first.value.countdown == 300.0
    carried_json = budget.to_json()  # what place_user_order checkpoints in its _resume
    clock.now += first.value.countdown  # back from the broker
    resumed = placer.budget(carried_json if carried else None)
    if carried:
        outcome = placer.place(holder, "buy", body, resumed)
        assert outcome.status == "failed"
        assert "400 s deadline (SFOX_RETRY_DEADLINE)" in outcome.reason
    else:  # what a new budget on each resume did: the 400 s start again
        with pytest.raises(Defer):
            placer.place(holder, "buy", body, resumed)
    assert stub.orders == 2
