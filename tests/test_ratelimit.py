"""The shared limiter on real Redis: the sliding-window guarantee and the shared pause."""

from __future__ import annotations

import threading
import time

import pytest

from tasks._exceptions import ConfigurationError
from tasks._settings import Rate
from tasks.budget.ratelimit import LimiterWait, LocalLimiter, RedisLimiter, acquire
from tests.conftest import REDIS_URL


def surely_in_one_window(grants: list[tuple[float, float]], window: float) -> int:
    """Most grants certainly inside one window, each known only as (sent, answered).

    A grant happened somewhere between its call and its answer, so two grants are
    surely closer than ``window`` when the later answer came less than ``window``
    after the earlier call.
    """
    grants = sorted(grants)
    return max(
        sum(1 for b, a in grants if b >= start and a < start + window) for start, _ in grants
    )


@pytest.mark.parametrize(
    ("text", "limit", "period"),
    [("240/10s", 240, 10.0), ("5/s", 5, 1.0), ("100/500ms", 100, 0.5), ("60/1m", 60, 60.0)],
)
def test_rate_parses(text, limit, period):
    """N/Ss and its unit variants parse to limit and period."""
    assert Rate.parse(text) == Rate(limit, period)


@pytest.mark.parametrize("text", ["", "240", "x/10s", "0/10s", "240/0s", "10/10d"])
def test_bad_rate_is_refused(text):
    """A malformed SFOX_RATE_LIMIT is a configuration error naming the variable."""
    with pytest.raises(ConfigurationError, match="SFOX_RATE_LIMIT"):
        Rate.parse(text)


def test_redis_limiter_never_exceeds_its_window_under_contention(redis_client):
    """Eight threads with their own connections never get more than N slots in any window."""
    rate = Rate(20, 0.5)
    granted: list[tuple[float, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 2.0

    def hammer() -> None:
        limiter = RedisLimiter.from_url(REDIS_URL, rate)
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            wait, _, _ = limiter.try_acquire()
            if wait == 0:
                with lock:
                    granted.append((sent, time.monotonic()))
            else:
                time.sleep(min(wait, 0.01))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert surely_in_one_window(granted, rate.period) <= rate.limit
    # It is not starving either: about four windows' worth went through.
    assert len(granted) >= 3 * rate.limit


def test_no_burst_of_twice_the_limit_across_a_window_edge(redis_client):
    """N at the end of one window and N more at the start of the next is impossible.

    One lane, never paced (on demand, no share kept for batch work): the window alone.
    """
    rate = Rate(10, 1.0)
    limiter = RedisLimiter.from_url(REDIS_URL, rate, batch_share=0.0)
    assert all(limiter.try_acquire()[0] == 0 for _ in range(10))
    wait, paused, _ = limiter.try_acquire()
    assert not paused and 0.9 < wait <= 1.0
    time.sleep(0.3)
    assert limiter.try_acquire()[0] > 0.5  # still the same sliding window


def test_pause_is_shared_and_only_extended(redis_client):
    """A pause set by one limiter holds every other; a shorter pause cannot cut it short."""
    rate = Rate(100, 1.0)
    one, two = RedisLimiter.from_url(REDIS_URL, rate), RedisLimiter.from_url(REDIS_URL, rate)
    one.pause(3.0)
    two.pause(1.0)
    wait, paused, _ = two.try_acquire()
    assert paused and 2.5 < wait <= 3.0


def test_acquire_sleeps_short_waits_and_raises_long_ones():
    """acquire() sleeps waits up to max_wait; a longer wait raises LimiterWait, taking no slot."""
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = LocalLimiter(Rate(2, 1.0), clock=lambda: now[0])
    acquire(limiter, max_wait=5, sleep=sleep)
    acquire(limiter, max_wait=5, sleep=sleep)
    acquire(limiter, max_wait=5, sleep=sleep)
    assert slept and abs(slept[0] - 1.0) < 1e-3
    limiter.pause(30)
    with pytest.raises(LimiterWait) as caught:
        acquire(limiter, max_wait=5, sleep=sleep)
    assert caught.value.paused and caught.value.seconds == pytest.approx(30)


def test_a_slot_counts_until_its_request_ends():
    """A slot in flight counts at its hold time; released, it counts from its release."""
    now = [0.0]
    limiter = LocalLimiter(Rate(2, 1.0), clock=lambda: now[0])
    first, second = limiter.try_acquire(30.0)[2], limiter.try_acquire(30.0)[2]
    assert first and second
    now[0] = 5.0  # both requests still in flight, long after their admission
    wait, paused, slot = limiter.try_acquire(30.0)
    assert (paused, slot) == (False, "") and wait == pytest.approx(1.0, abs=1e-5)
    limiter.release(first)  # ended at 5.0: it counts there, for one period
    now[0] = 5.5
    assert limiter.try_acquire(30.0)[0] == pytest.approx(0.5, abs=1e-5)
    now[0] = 6.01
    third = limiter.try_acquire(30.0)[2]
    assert third
    limiter.release(third)
    # A slot never released (its sender died) leaves the window after its hold.
    now[0] = 30.5
    assert limiter.try_acquire()[2]  # the one free slot
    assert limiter.try_acquire()[0] > 0  # the other is still the dead sender's
    now[0] = 31.01
    assert limiter.try_acquire()[2]


def test_redis_slot_in_flight_holds_the_window_until_released(redis_client):
    """The same on Redis, on the server's clock: release() is what frees a held slot."""
    limiter = RedisLimiter.from_url(REDIS_URL, Rate(2, 0.4))
    slots = [limiter.try_acquire(5.0)[2] for _ in range(2)]
    assert all(slots)
    time.sleep(0.5)  # a full period later, still in flight
    wait, paused, slot = limiter.try_acquire(5.0)
    assert not paused and not slot and 0.35 < wait <= 0.41
    for slot in slots:
        limiter.release(slot)
    assert 0.3 < limiter.try_acquire(5.0)[0] <= 0.41  # counted from the release
    time.sleep(0.45)
    assert limiter.try_acquire(5.0)[2]


def test_senders_delayed_after_admission_never_overrun_the_servers_window(fake_sfox, redis_client):
    """Sixteen senders that stall between admission and sending stay within sFOX's own count.

    sFOX counts a request when it arrives. Had the limiter counted it at
    admission, requests admitted at a window's end and arriving in the next
    would pack more than the limit into one window at sFOX.
    """
    import random

    from tasks.budget.ratelimit import held
    from tasks.sfox.client import SfoxClient, Timeouts
    from tests.conftest import ENTERPRISE_KEY

    fake_sfox.configure(rate_limit=10, rate_window=1.0, rate_penalty=0.2)
    rate = Rate(10, 1.0)  # no margin: the limiter alone keeps sFOX's count
    stop_at = time.monotonic() + 3.5
    errors: list[Exception] = []

    def sender(index: int) -> None:
        limiter = RedisLimiter.from_url(REDIS_URL, rate)
        client = SfoxClient(fake_sfox.url, ENTERPRISE_KEY, timeouts=Timeouts(1.0, 1.0))
        n = 0
        try:
            while time.monotonic() < stop_at:
                with held(limiter, max_wait=5.0, hold=client.timeouts.longest):
                    time.sleep(random.uniform(0.0, 0.25))  # descheduled before sending
                    client.create_user_tokens([f"held-{index}-{n}"])
                n += 1
        except Exception as exc:  # a 429 ends the sender: RateLimited
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert fake_sfox.rate_limited_count == 0
    assert fake_sfox.max_requests_in_window(1.0) <= 10
    assert fake_sfox.count("/v1/enterprise/user-tokens") >= 25  # it kept going at the limit
