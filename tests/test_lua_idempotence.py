"""Every Lua script and write of the package, run twice, has the effect of running it once.

A command retried after a dropped connection may have run already: its answer was
lost, not its effect. So each script here is run, the database is read, the very
same call is made again, and the database must read the same (TTLs aside). Scripts
that hand out chunks must also hand the caller the same chunks the second time,
since the caller never saw the first answer.
"""

from __future__ import annotations

import json
import time
from datetime import date
from typing import Any

import pytest
import redis

from tasks._settings import Rate
from tasks.budget.ratelimit import RedisLimiter
from tasks.fanout.store import Chunk, JitRun
from tasks.nightly.orders import Order
from tasks.nightly.store import NightlyRun
from tasks.sfox.orders import OrderOutcome


def snapshot(client: redis.Redis) -> dict[str, Any]:
    """Every key's value (not its TTL), in a form that compares."""
    out: dict[str, Any] = {}
    for key in sorted(client.scan_iter(count=1000)):
        kind = client.type(key).decode()
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        else:
            value = kind
        out[key.decode()] = (kind, value)
    return out


def twice(client: redis.Redis, call) -> tuple[Any, Any]:
    """Run ``call``, then again; assert the second run changed nothing. Both answers."""
    first = call()
    after_one = snapshot(client)
    second = call()
    assert snapshot(client) == after_one
    return first, second


@pytest.fixture
def limiter(redis_client: redis.Redis) -> RedisLimiter:
    return RedisLimiter(redis_client, Rate(3, 10.0))


def _acquire(limiter: RedisLimiter, slot: str, lane: str = "b") -> int:
    return int(
        limiter._acquire(
            keys=[
                limiter._log_key,
                limiter._pause_key,
                limiter._on_demand_key,
                limiter._waiting_key,
                limiter._pace_key,
            ],
            args=[limiter.rate.limit, 10_000_000, slot, 2_000_000, lane, 3, 250_000, 4],
        )
    )


def test_limiter_acquire_twice_takes_one_slot(redis_client, limiter):
    """A slot taken, then asked for again with its own name: one slot, and 'yours' again."""
    first, second = twice(redis_client, lambda: _acquire(limiter, "slot-a"))
    assert first == second == 0
    assert redis_client.zcard(limiter._log_key) == 1


def test_limiter_acquire_twice_takes_the_last_slot_once(redis_client, limiter):
    """The window's last slot, asked for twice: the second run finds it ours, not a full window."""
    _acquire(limiter, "slot-1"), _acquire(limiter, "slot-2")
    first, second = twice(redis_client, lambda: _acquire(limiter, "slot-3"))
    assert first == second == 0
    assert redis_client.zcard(limiter._log_key) == 3
    assert _acquire(limiter, "slot-4") > 0  # the window is full: no slot was spent twice


def test_limiter_on_demand_wait_twice_keeps_one_place(redis_client, limiter):
    """An on-demand request at a full window, asked twice: one place among the waiting.

    Its place is kept until the same moment (the window's next free slot plus the
    grace): the second run moves it by no more than the script's own rounding.
    """
    _acquire(limiter, "slot-1"), _acquire(limiter, "slot-2"), _acquire(limiter, "slot-3")
    assert _acquire(limiter, "live", "o") > 0
    [(_, kept)] = redis_client.zrange(limiter._waiting_key, 0, -1, withscores=True)
    assert _acquire(limiter, "live", "o") > 0
    [(name, again)] = redis_client.zrange(limiter._waiting_key, 0, -1, withscores=True)
    assert name == b"live" and abs(again - kept) < 10_000
    assert redis_client.zcard(limiter._log_key) == 3


def test_limiter_release_twice(redis_client, limiter):
    """Releasing a slot twice lowers it once."""
    _acquire(limiter, "slot-r")
    twice(redis_client, lambda: limiter._release(keys=[limiter._log_key], args=["slot-r"]))


def test_limiter_pause_twice_is_one_pause(redis_client, limiter):
    """Setting the shared pause twice leaves one pause key (its end at most a retry later)."""
    twice(redis_client, lambda: limiter._pause(keys=[limiter._pause_key], args=[60_000]))
    assert 59_000 < redis_client.pttl(limiter._pause_key) <= 60_000


SPEC = {"total": 6, "budget": 4, "stale_after": 3600, "downstream": "{}"}
CHUNKS = [Chunk(0, ["a", "b"]), Chunk(1, ["c", "d"]), Chunk(2, ["e", "f"])]


def test_stage_twice_stages_once_and_hands_back_the_same_chunks(redis_client):
    """A segment staged twice by its task: queued once, the same two chunks handed out."""
    run = JitRun(redis_client, "idem-stage")
    first, second = twice(redis_client, lambda: run.stage(0, CHUNKS, SPEC, sender="seg"))
    assert [c.index for c in first] == [c.index for c in second] == [0, 1]
    assert redis_client.llen(run.queue) == 1


def test_sent_twice(redis_client):
    """Confirming a chunk sent twice ends its taking once; it is nobody's to resend."""
    run = JitRun(redis_client, "idem-sent")
    taken = run.stage(0, CHUNKS, SPEC, sender="seg")
    twice(redis_client, lambda: run.sent(taken, sender="seg"))
    assert run.stage(0, CHUNKS, SPEC, sender="seg") == []


def test_claim_twice(redis_client):
    """A chunk task claims its chunk twice: both answers yes; another task's claim is no."""
    run = JitRun(redis_client, "idem-claim")
    run.stage(0, CHUNKS, SPEC, sender="seg")
    first, second = twice(redis_client, lambda: run.claim(CHUNKS[0], sender="chunk-0"))
    assert first is second is True
    assert run.claim(CHUNKS[0], sender="a-second-copy") is False


def test_finish_twice_counts_once(redis_client):
    """A chunk finished twice moves the counters once."""
    run = JitRun(redis_client, "idem-finish")
    taken = run.stage(0, CHUNKS, SPEC, sender="seg")
    run.sent(taken, sender="seg")
    first, second = twice(redis_client, lambda: run.finish_chunk(taken[0], 2, 1, sender="chunk-0"))
    assert first == second == []  # two users still downstream: no room for chunk 2 yet
    progress = run.progress()
    assert (progress.dispatched, progress.failed, progress.inflight) == (2, 1, 2)


def test_user_done_twice_counts_once(redis_client):
    """A user marked done twice is done once; the chunk it releases is handed out once."""
    run = JitRun(redis_client, "idem-done")
    taken = run.stage(0, CHUNKS, SPEC, sender="seg")
    run.sent(taken, sender="seg")
    run.finish_chunk(taken[0], 2, 0)
    run.finish_chunk(taken[1], 2, 0)
    first, second = twice(redis_client, lambda: run.user_done("a", sender="down-a"))
    assert [c.index for c in first] == [c.index for c in second] == [2]
    assert run.progress().done == 1


def test_sweep_twice_resends_a_lost_chunk_once(redis_client):
    """A sweep that hands back a lost chunk, run twice: the same chunk, taken once."""
    run = JitRun(redis_client, "idem-sweep")
    spec = {**SPEC, "stale_after": 0.001}
    taken = run.stage(0, CHUNKS, spec, sender="seg")
    run.sent(taken, sender="seg")
    time.sleep(0.01)  # past stale_after
    first = run.sweep(sender="coordinator")
    second = run.sweep(sender="coordinator")
    assert [c.index for c in first] == [c.index for c in second] == [0, 1]


ORDER = Order("u1", "buy", "btcusd", 100, None, None, None, "#1", 2)


def test_staging_an_order_twice_stages_it_once(redis_client):
    """Orders staged twice (the same rows): each order once, each user once."""
    run = NightlyRun(redis_client, date(2026, 11, 1))
    twice(redis_client, lambda: run.stage([ORDER]))
    assert run.user_count() == 1


@pytest.mark.parametrize("status", ["placed", "failed"])
def test_recording_an_outcome_twice(redis_client, status):
    """An order's outcome written twice is the same outcome."""
    run = NightlyRun(redis_client, date(2026, 11, 2))
    twice(redis_client, lambda: run.record("coid-1", "u1", OrderOutcome(status, "why")))
    assert json.loads(redis_client.hget(run.outcomes, "coid-1"))["status"] == status


def test_lease_twice_is_still_ours(redis_client):
    """Taking the lease twice with one token: ours both times; another token's is refused."""
    run = NightlyRun(redis_client, date(2026, 11, 3))
    first, second = twice(redis_client, lambda: run.lease_for("token-1", 30))
    assert first is second is True
    assert run.lease_for("token-2", 30) is False
    twice(redis_client, lambda: run.drop_lease("token-1"))
    assert run.lease_for("token-2", 30) is True


def test_a_remint_noted_twice_counts_once(redis_client):
    """A user's re-mint noted twice is one re-mint."""
    run = NightlyRun(redis_client, date(2026, 11, 4))
    twice(redis_client, lambda: run.count_remint("u1"))
    assert run.remints() == 1


def test_refused_users_recorded_twice(redis_client):
    """The refused users of a chunk recorded twice are the same entries."""
    run = JitRun(redis_client, "idem-failed")
    entries = [{"user_id": "u9", "status": 404, "error": "not found"}]
    twice(redis_client, lambda: run.record_failed(entries))
    assert run.failed() == {"u9": entries[0]}
