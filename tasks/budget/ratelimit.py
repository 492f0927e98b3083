"""The request budget towards sFOX, shared by every worker process on every host.

sFOX allows 250 requests per 10 s per IP and answers excess with 429 and a 60 s
penalty. A token bucket or GCRA that allows a burst of N can let 2N requests
through inside one window (a full burst at the end of one window, another at
the start of the next), so the limit here is a *sliding log*: a Redis sorted
set of the send times of the last window, checked and appended in one Lua
script, timed by the Redis server's clock so that hosts with skewed clocks
still agree. No window of ``period`` seconds, wherever it starts, holds more
than ``limit`` acquisitions.

sFOX counts a request when it *arrives*, which is some time after the limiter
admitted it: more so with many senders on a busy host. Requests admitted at
the end of one window that arrive in the next one would let that window hold
more than ``limit`` (one per sender in transit, at worst). So a slot is held
while its request is in flight: it is logged at admission with the latest
time the request could still arrive (``hold`` seconds ahead: the request's
timeouts), and lowered to the moment the request ended when the caller
releases it (:func:`held`). Every request then counts at a time no earlier
than its arrival, and no window of arrivals at sFOX holds more than
``limit`` either. A sender that dies mid-request leaves its slot to expire
``hold`` seconds later.

A 429 seen by any worker sets a shared *pause* key; every acquire honours it,
so all workers wait the penalty, not only the one that was punished.

Two lanes share the budget. On-demand requests (a partner's live mint) take
the next free slot ahead of batch work (the chunks of a fan-out, the nightly
run): one that finds the window full leaves its name among the *waiting*, and
every other request leaves it a free slot until it comes back for it, or until
its place lapses (:data:`WAITING_GRACE` past its wait). Batch work keeps a
share of every window (``SFOX_BATCH_SHARE``): once on-demand requests have
taken the rest of it, they wait like batch work, so a steady stream of them
cannot starve a night.

Batch work is also *paced*: it takes slots evenly, one every ``period /
limit`` (:data:`PACE_AHEAD` ahead at most), never a whole window in one burst.
A window filled in a burst frees in a burst a period later and stays full in
between, so an on-demand request would wait seconds for its next free slot;
paced, slots free one by one and the next is a fraction of a second away. The
pace costs a run nothing past its first window (the window allows no more on
average), and every slot taken, an on-demand one too, moves it on.

Waiting for the limiter is not a failure: :meth:`Limiter.acquire` either
sleeps (up to ``max_wait``) or raises :class:`LimiterWait` with the time left,
which the caller turns into a broker countdown without spending its retry
budget.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

import redis

from .._metrics import limiter_waited
from .._redis import REDIS_OUTAGE_COUNTDOWN, STORE_ERRORS, lua, redis_client, script
from .._settings import DEFAULT_BATCH_SHARE, Rate

__all__ = [
    "BATCH",
    "ON_DEMAND",
    "Lane",
    "Limiter",
    "LimiterUnavailable",
    "LimiterWait",
    "LocalLimiter",
    "RedisLimiter",
    "acquire",
    "held",
    "limiter_for",
    "scope_prefix",
]

logger = logging.getLogger("tasks.ratelimit")

#: Where the limiter's Lua lives: acquire, release and pause .lua, each naming its KEYS and ARGV.
_LUA = __package__ or "tasks.budget"

#: Key prefix in Redis; the rate is part of the key so that a changed limit starts clean.
KEY_PREFIX = "sfox:ratelimit"

#: The lane of a partner's live work: its requests take the next free slot first.
ON_DEMAND: Final = "on_demand"
#: The lane of batch work (a fan-out's chunks, the nightly run): it keeps its share.
BATCH: Final = "batch"
Lane = Literal["on_demand", "batch"]

#: Seconds past its wait that a waiting on-demand request keeps its place in the window.
WAITING_GRACE = 0.25
#: Slots batch work may take ahead of its even pace (after a lull, or to catch up).
PACE_AHEAD = 4


def on_demand_cap(rate: Rate, batch_share: float) -> int:
    """Slots of one window the on-demand lane takes ahead of batch work.

    Rounded down, past the float's own error (100 * (1 - 0.9) is 9.999...).
    """
    return math.floor(rate.limit * (1 - batch_share) + 1e-9)


def scope_prefix(scope: str = "", prefix: str = KEY_PREFIX) -> str:
    """The key prefix of one budget: its sliding log and its 429 pause.

    sFOX counts per IP, so workers that leave through an egress IP of their own
    name a scope (``SFOX_RATE_LIMIT_SCOPE``) and share a budget only with the
    workers of that scope. The default scope ``""`` is the one budget for
    everyone, under the keys it had before scopes existed. Per-account limiters
    (:meth:`Limiter.sibling`) are not scoped: an account's limit holds wherever
    its requests come from.
    """
    return f"{prefix}:scope:{scope}" if scope else prefix


class LimiterWait(Exception):
    """The limiter asks for a wait longer than the caller may sleep."""

    def __init__(self, seconds: float, paused: bool, reason: str = "") -> None:
        super().__init__(f"rate limiter asks for a {seconds:.1f} s wait")
        self.seconds = seconds
        #: True when the wait is the shared pause after a 429, not a full window.
        self.paused = paused
        #: Why, when it is neither a full window nor a pause (the store is unreachable).
        self.reason = reason or (
            "rate-limit pause after a 429" if paused else "rate limit window full"
        )


class LimiterUnavailable(LimiterWait):
    """The limiter's Redis is unreachable past its retries: wait at the broker, send nothing."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(REDIS_OUTAGE_COUNTDOWN, paused=False, reason=_unreachable(exc))


def _unreachable(exc: Exception) -> str:
    return f"the limiter's Redis is unreachable ({type(exc).__name__})"


class Limiter(Protocol):
    """What the minting code needs from a limiter."""

    rate: Rate
    lane: Lane

    def try_acquire(self, hold: float = 0.0, slot: str = "") -> tuple[float, bool, str]:
        """Take a slot held ``hold`` s ahead: ``(0, False, slot)``, or ``(wait, paused?, "")``.

        ``slot`` names the request across its tries (a new name when empty): an
        on-demand request keeps its place among the waiting by it.
        """
        ...

    def in_lane(self, lane: Lane) -> Limiter:
        """This limiter, for requests of ``lane``."""
        ...

    def release(self, slot: str) -> None:
        """The slot's request has ended: count it from now, not from its hold."""
        ...

    def pause(self, seconds: float) -> None:
        """Make every user of this limiter wait at least ``seconds``."""
        ...

    def sibling(self, rate: Rate, name: str) -> Limiter:
        """A separate limiter named ``name`` on the same store."""
        ...


def acquire(
    limiter: Limiter,
    *,
    max_wait: float,
    hold: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Take a slot, sleeping while each wait is at most ``max_wait``; its name.

    Raises :class:`LimiterWait` when the next wait is longer than ``max_wait``.
    """
    name = uuid.uuid4().hex
    while True:
        wait, paused, slot = limiter.try_acquire(hold, name)
        if wait <= 0:
            return slot
        limiter_waited(wait)  # slept here, or as the broker countdown LimiterWait asks for
        if wait > max_wait:
            raise LimiterWait(wait, paused)
        if paused:
            logger.info("sFOX rate-limit pause: waiting %.1f s before the next request", wait)
        sleep(wait)


@contextmanager
def held(
    limiter: Limiter,
    *,
    max_wait: float,
    hold: float,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[str]:
    """A slot for one request, held as in flight until the block ends.

    ``hold`` bounds how long after admission the request may still reach sFOX
    (its connect and read timeouts): the slot counts at that time until the
    block ends, then at the time it ended.
    """
    slot = acquire(limiter, max_wait=max_wait, hold=hold, sleep=sleep)
    try:
        yield slot
    finally:
        try:
            limiter.release(slot)
        except Exception:  # the slot then counts at its hold time: later, never too early
            logger.warning(
                "could not release a rate-limit slot; it expires by itself", exc_info=True
            )


class RedisLimiter:
    """The shared limiter: one sliding log in Redis for all workers of one scope."""

    def __init__(
        self,
        client: redis.Redis[bytes],
        rate: Rate,
        *,
        prefix: str = KEY_PREFIX,
        scope: str = "",
        lane: Lane = ON_DEMAND,
        batch_share: float = DEFAULT_BATCH_SHARE,
        grace: float = WAITING_GRACE,
    ) -> None:
        self.rate = rate
        #: The budget this limiter counts against; ``""`` is the one everyone shares.
        self.scope = scope
        #: The lane this limiter's requests wait in.
        self.lane: Lane = lane
        self.batch_share = batch_share
        #: Seconds past its wait a waiting on-demand request keeps its place.
        self.grace = grace
        self._client = client
        prefix = scope_prefix(scope, prefix)
        window = f"{prefix}:{rate.limit}/{rate.period:g}"
        self._log_key = f"{window}:log"
        self._pause_key = f"{prefix}:pause"
        self._on_demand_key = f"{window}:on-demand"
        self._waiting_key = f"{window}:waiting"
        self._pace_key = f"{window}:pace"
        self._acquire = script(client, lua(_LUA, "acquire"))
        self._release = script(client, lua(_LUA, "release"))
        self._pause = script(client, lua(_LUA, "pause"))

    @classmethod
    def from_url(
        cls, url: str, rate: Rate, *, scope: str = "", batch_share: float = DEFAULT_BATCH_SHARE
    ) -> RedisLimiter:
        """A limiter of ``scope`` on the Redis at ``url`` (its own connection pool)."""
        return cls(redis_client(url), rate, scope=scope, batch_share=batch_share)

    def in_lane(self, lane: Lane) -> RedisLimiter:
        """The same limiter (its connections, its keys) for requests of ``lane``."""
        view = copy.copy(self)
        view.lane = lane
        return view

    def sibling(self, rate: Rate, name: str) -> RedisLimiter:
        """Another limiter on the same Redis connections, e.g. one per sFOX account.

        Not scoped: an account's own limit holds wherever its requests come from.
        """
        return RedisLimiter(
            self._client,
            rate,
            prefix=f"{KEY_PREFIX}:{name}",
            lane=self.lane,
            batch_share=self.batch_share,
            grace=self.grace,
        )

    def try_acquire(self, hold: float = 0.0, slot: str = "") -> tuple[float, bool, str]:
        slot = slot or uuid.uuid4().hex
        try:
            wait_us = int(
                self._acquire(
                    keys=[
                        self._log_key,
                        self._pause_key,
                        self._on_demand_key,
                        self._waiting_key,
                        self._pace_key,
                    ],
                    args=[
                        self.rate.limit,
                        int(self.rate.period * 1_000_000),
                        slot,
                        max(0, int(hold * 1_000_000)),
                        "o" if self.lane == ON_DEMAND else "b",
                        on_demand_cap(self.rate, self.batch_share),
                        int(self.grace * 1_000_000),
                        PACE_AHEAD,
                    ],
                )
            )
        except STORE_ERRORS as exc:
            # Redis stayed away past the client's retries: no slot is known to be ours,
            # so no request may go. A wait, not a failure (a slot the lost answer took
            # counts for nothing and expires with its hold).
            raise LimiterUnavailable(exc) from None
        if wait_us == 0:
            return 0.0, False, slot
        return abs(wait_us) / 1_000_000, wait_us < 0, ""

    def release(self, slot: str) -> None:
        if slot:
            self._release(keys=[self._log_key], args=[slot])

    def pause(self, seconds: float) -> None:
        if seconds > 0:
            try:
                self._pause(keys=[self._pause_key], args=[max(1, int(seconds * 1000))])
            except STORE_ERRORS as exc:
                # The other workers cannot be told; this one waits the pause at the broker.
                raise LimiterWait(seconds, paused=True, reason=_unreachable(exc)) from None


@dataclass
class _Window:
    """One in-process budget's state, shared by its lanes (``acquire.lua``'s keys)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: slot -> the time it counts at (in the future while its request is in flight)
    log: dict[str, float] = field(default_factory=dict)
    on_demand: dict[str, float] = field(default_factory=dict)
    #: waiting on-demand slot -> until when its place is kept
    waiting: dict[str, float] = field(default_factory=dict)
    paused_until: float = 0.0
    #: when the next slot is due by the pace
    due: float = 0.0

    def prune(self, now: float, period: float) -> None:
        for book, cutoff in ((self.log, now - period), (self.on_demand, now - period)):
            for slot in [s for s, at in book.items() if at <= cutoff]:
                del book[slot]
        for slot in [s for s, until in self.waiting.items() if until <= now]:
            del self.waiting[slot]


class LocalLimiter:
    """The same sliding log and lanes in process memory, for one process alone."""

    def __init__(
        self,
        rate: Rate,
        *,
        clock: Callable[[], float] = time.monotonic,
        lane: Lane = ON_DEMAND,
        batch_share: float = DEFAULT_BATCH_SHARE,
    ) -> None:
        self.rate = rate
        self.lane: Lane = lane
        self.batch_share = batch_share
        self._clock = clock
        self._window = _Window()
        self._siblings: dict[str, LocalLimiter] = {}

    def in_lane(self, lane: Lane) -> LocalLimiter:
        view = copy.copy(self)
        view.lane = lane
        return view

    def try_acquire(self, hold: float = 0.0, slot: str = "") -> tuple[float, bool, str]:
        slot = slot or uuid.uuid4().hex
        w, period, limit = self._window, self.rate.period, self.rate.limit
        with w.lock:
            now = self._clock()
            if slot in w.log:
                return 0.0, False, slot
            if w.paused_until > now:
                return w.paused_until - now, True, ""
            w.prune(now, period)
            on_demand = self.lane == ON_DEMAND
            first = on_demand and len(w.on_demand) < on_demand_cap(self.rate, self.batch_share)
            ahead = 0 if first else len(w.waiting) - (slot in w.waiting)
            interval = period / limit
            due = max(w.due, now)
            paced = 0.0 if first else due - PACE_AHEAD * interval - now
            if len(w.log) + ahead < limit and paced <= 0:
                w.due = due + interval
                w.log[slot] = now + max(0.0, hold)
                if on_demand:
                    w.on_demand[slot] = w.log[slot]
                    w.waiting.pop(slot, None)
                return 0.0, False, slot
            wait = 0.0
            leave = len(w.log) + ahead - limit
            if leave >= 0:
                times = sorted(w.log.values())
                wait = min(times[leave] + period - now, period) if leave < len(times) else period
                if ahead > 0 and w.waiting:
                    wait = min(wait, min(w.waiting.values()) - now)
            wait = max(wait, paced, 0.0) + 1e-6
            if first:
                w.waiting[slot] = now + wait + WAITING_GRACE
            return wait, False, ""

    def release(self, slot: str) -> None:
        w = self._window
        with w.lock:
            now = self._clock()
            if w.log.get(slot, now) > now:
                w.log[slot] = now

    def pause(self, seconds: float) -> None:
        w = self._window
        with w.lock:
            w.paused_until = max(w.paused_until, self._clock() + seconds)

    def sibling(self, rate: Rate, name: str) -> LocalLimiter:
        """Another in-process limiter, e.g. one per sFOX account (kept, so it remembers)."""
        with self._window.lock:
            limiter = self._siblings.get(name)
            if limiter is None:
                limiter = self._siblings[name] = LocalLimiter(
                    rate, clock=self._clock, lane=self.lane, batch_share=self.batch_share
                )
            return limiter.in_lane(self.lane)


#: ``SFOX_LIMITER_URL`` for a limiter of this process alone: tests and eager mode only.
IN_PROCESS_URL = "memory://"


def limiter_for(
    url: str, rate: Rate, *, scope: str = "", batch_share: float = DEFAULT_BATCH_SHARE
) -> Limiter:
    """The shared Redis limiter of ``scope`` at ``url``; ``memory://`` is this process's own.

    An in-process limiter is one process's own budget: it has no scope to share,
    and workers refuse it (several processes would each spend the whole budget).
    """
    if url == IN_PROCESS_URL:
        return LocalLimiter(rate, batch_share=batch_share)
    return RedisLimiter.from_url(url, rate, scope=scope, batch_share=batch_share)
