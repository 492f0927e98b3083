"""The limiter's lanes, on the in-process limiter and a clock the test moves.

The same rules as ``acquire.lua`` (tests/test_lanes.py runs those on Redis):
an on-demand request that finds the window full keeps its place, and batch
work leaves it the next free slot; the place lapses if it does not come back;
once the on-demand lane has had its share of a window, it waits like batch work.
"""

from __future__ import annotations

import pytest

from tasks._settings import Rate
from tasks.budget.ratelimit import (
    BATCH,
    ON_DEMAND,
    PACE_AHEAD,
    WAITING_GRACE,
    LocalLimiter,
    on_demand_cap,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limiters(rate: str, batch_share: float = 0.5) -> tuple[Clock, LocalLimiter, LocalLimiter]:
    clock = Clock()
    on_demand = LocalLimiter(Rate.parse(rate), clock=clock, batch_share=batch_share)
    return clock, on_demand, on_demand.in_lane(BATCH)


def fill(clock: Clock, limiter: LocalLimiter, count: int) -> None:
    """``count`` slots, one a second."""
    for _ in range(count):
        assert limiter.try_acquire(slot=f"{limiter.lane}-{clock.now}")[0] == 0
        clock.now += 1


def test_the_next_free_slot_goes_to_the_on_demand_request_that_waits_for_it():
    clock, on_demand, batch = limiters("3/10s")
    fill(clock, batch, 3)  # slots at 0, 1, 2; now 3
    wait, paused, _ = on_demand.try_acquire(slot="live")
    assert not paused and wait == pytest.approx(7, abs=1e-3)
    assert batch.try_acquire(slot="b")[0] > wait  # behind the place kept
    clock.now += wait  # the slot taken at 0 leaves the window
    wait_b, _, _ = batch.try_acquire(slot="b")
    assert wait_b > 0, "batch work took the slot kept for the on-demand request"
    assert on_demand.try_acquire(slot="live") == (0.0, False, "live")
    clock.now += 1  # the slot taken at 1 leaves: nobody waits ahead of batch now
    assert batch.try_acquire(slot="b")[0] == 0


def test_a_place_that_is_not_taken_lapses_after_its_grace():
    clock, on_demand, batch = limiters("3/10s")
    fill(clock, batch, 3)
    wait, _, _ = on_demand.try_acquire(slot="gone")
    clock.now += wait
    assert batch.try_acquire(slot="b")[0] == pytest.approx(WAITING_GRACE, abs=1e-3)
    clock.now += WAITING_GRACE + 1e-3
    assert batch.try_acquire(slot="b")[0] == 0


def test_past_its_share_of_a_window_the_on_demand_lane_waits_like_batch_work():
    clock, on_demand, batch = limiters("4/10s", batch_share=0.5)
    assert on_demand_cap(on_demand.rate, 0.5) == 2
    fill(clock, on_demand, 2)  # the lane's share, at 0 and 1
    fill(clock, batch, 2)  # at 2 and 3; the window is full
    on_demand.try_acquire(slot="third")  # over its share: no place kept
    clock.now = 10.0  # the slot taken at 0 leaves
    assert batch.try_acquire(slot="b") == (0.0, False, "b")


def test_with_no_share_kept_for_batch_work_on_demand_always_goes_first():
    clock, on_demand, batch = limiters("2/10s", batch_share=0.0)
    fill(clock, batch, 2)
    wait, _, _ = on_demand.try_acquire(slot="live")
    clock.now += wait
    assert batch.try_acquire(slot="b")[0] > 0
    assert on_demand.try_acquire(slot="live")[0] == 0


def test_lanes_share_one_window_and_one_pause():
    clock, on_demand, batch = limiters("2/10s")
    assert on_demand.lane == ON_DEMAND and batch.lane == BATCH
    batch.pause(5)
    assert on_demand.try_acquire()[1] is True
    clock.now += 5
    fill(clock, on_demand, 1)
    fill(clock, batch, 1)
    assert on_demand.try_acquire()[0] > 0 and batch.try_acquire()[0] > 0


# ---- the lanes' settings -----------------------------------------------------------------


def settings(**environ: str):
    from tasks._settings import Settings

    return Settings.from_conf({}, environ, app_name="test")


def test_the_batch_queue_follows_sfox_queue_unless_named():
    assert settings().batch_queue_name == "sfox.batch"
    assert settings(SFOX_QUEUE="ours").batch_queue_name == "ours.batch"
    assert settings(SFOX_BATCH_QUEUE="bulk").batch_queue_name == "bulk"
    assert settings(SFOX_BATCH_QUEUE="sfox").batch_queue_name == "sfox"  # one queue again


@pytest.mark.parametrize("share", ["-0.1", "0.95", "1"])
def test_a_batch_share_out_of_bounds_is_refused_naming_the_setting(share):
    from tasks._exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="SFOX_BATCH_SHARE"):
        settings(SFOX_BATCH_SHARE=share)


def test_the_on_demand_lane_goes_first_for_the_rest_of_the_window():
    def cap(**environ: str) -> int:
        s = settings(**environ)
        return on_demand_cap(s.rate, s.batch_share)

    assert cap() == 120  # 240/10s, half kept for batch work
    assert cap(SFOX_BATCH_SHARE="0") == 240
    assert cap(SFOX_BATCH_SHARE="0.9", SFOX_RATE_LIMIT="100/10s") == 10


# ---- the pace of batch work ---------------------------------------------------------------


def test_batch_work_takes_its_slots_evenly_not_the_window_at_once():
    """240/10s: after PACE_AHEAD slots at once, batch work gets one slot every 1/24 s."""
    clock, _, batch = limiters("240/10s")
    interval = 10 / 240
    taken = [batch.try_acquire()[0] == 0 for _ in range(PACE_AHEAD + 1)]
    assert all(taken)
    wait, paused, _ = batch.try_acquire()
    assert not paused and wait == pytest.approx(interval, abs=1e-3)
    clock.now += wait
    assert batch.try_acquire()[0] == 0
    assert batch.try_acquire()[0] > 0


def test_on_demand_requests_are_not_paced_but_move_the_pace_on():
    _, on_demand, batch = limiters("240/10s")
    for _ in range(20):
        assert on_demand.try_acquire()[0] == 0  # a burst of live mints goes at once
    wait, _, _ = batch.try_acquire()
    # batch work waits for the slots the burst took: 20 - 4 ahead, one every 1/24 s
    assert wait == pytest.approx((20 - PACE_AHEAD) * 10 / 240, abs=1e-3)


def test_a_paced_night_keeps_the_window_free_one_slot_at_a_time():
    """A full minute of batch work at its pace: never more than the window allows, and
    at any moment the next slot frees within one interval, for an on-demand request."""
    clock, on_demand, batch = limiters("240/10s")
    interval = 10 / 240
    times = []
    while clock.now < 60:
        wait, _, _ = batch.try_acquire()
        if wait == 0:
            times.append(clock.now)
        else:
            clock.now += wait
    assert len(times) == pytest.approx(60 / interval, abs=PACE_AHEAD + 2)
    assert max(sum(1 for t in times if s <= t < s + 10) for s in times) <= 240
    wait, _, _ = on_demand.try_acquire(slot="live")
    assert wait <= interval + 1e-3
