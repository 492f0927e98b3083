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

Waiting for the limiter is not a failure: :meth:`Limiter.acquire` either
sleeps (up to ``max_wait``) or raises :class:`LimiterWait` with the time left,
which the caller turns into a broker countdown without spending its retry
budget.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import redis

from .._metrics import limiter_waited
from .._redis import REDIS_OUTAGE_COUNTDOWN, STORE_ERRORS, lua, redis_client, script
from .._settings import Rate

__all__ = [
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

    def try_acquire(self, hold: float = 0.0) -> tuple[float, bool, str]:
        """Take a slot held ``hold`` s ahead: ``(0, False, slot)``, or ``(wait, paused?, "")``."""
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
    while True:
        wait, paused, slot = limiter.try_acquire(hold)
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
    ) -> None:
        self.rate = rate
        #: The budget this limiter counts against; ``""`` is the one everyone shares.
        self.scope = scope
        self._client = client
        prefix = scope_prefix(scope, prefix)
        self._log_key = f"{prefix}:{rate.limit}/{rate.period:g}:log"
        self._pause_key = f"{prefix}:pause"
        self._acquire = script(client, lua(_LUA, "acquire"))
        self._release = script(client, lua(_LUA, "release"))
        self._pause = script(client, lua(_LUA, "pause"))

    @classmethod
    def from_url(cls, url: str, rate: Rate, *, scope: str = "") -> RedisLimiter:
        """A limiter of ``scope`` on the Redis at ``url`` (its own connection pool)."""
        return cls(redis_client(url), rate, scope=scope)

    def sibling(self, rate: Rate, name: str) -> RedisLimiter:
        """Another limiter on the same Redis connections, e.g. one per sFOX account.

        Not scoped: an account's own limit holds wherever its requests come from.
        """
        return RedisLimiter(self._client, rate, prefix=f"{KEY_PREFIX}:{name}")

    def try_acquire(self, hold: float = 0.0) -> tuple[float, bool, str]:
        slot = uuid.uuid4().hex
        try:
            wait_us = int(
                self._acquire(
                    keys=[self._log_key, self._pause_key],
                    args=[
                        self.rate.limit,
                        int(self.rate.period * 1_000_000),
                        slot,
                        max(0, int(hold * 1_000_000)),
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


class LocalLimiter:
    """The same sliding log in process memory, for the embedded (single-process) mode."""

    def __init__(self, rate: Rate, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        #: slot -> the time it counts at (in the future while its request is in flight)
        self._log: dict[str, float] = {}
        self._paused_until = 0.0
        self._siblings: dict[str, LocalLimiter] = {}

    def try_acquire(self, hold: float = 0.0) -> tuple[float, bool, str]:
        with self._lock:
            now = self._clock()
            if self._paused_until > now:
                return self._paused_until - now, True, ""
            cutoff = now - self.rate.period
            self._log = {slot: at for slot, at in self._log.items() if at > cutoff}
            if len(self._log) < self.rate.limit:
                slot = uuid.uuid4().hex
                self._log[slot] = now + max(0.0, hold)
                return 0.0, False, slot
            oldest = min(self._log.values())
            return min(oldest + self.rate.period - now, self.rate.period) + 1e-6, False, ""

    def release(self, slot: str) -> None:
        with self._lock:
            now = self._clock()
            if self._log.get(slot, now) > now:
                self._log[slot] = now

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def sibling(self, rate: Rate, name: str) -> LocalLimiter:
        """Another in-process limiter, e.g. one per sFOX account (kept, so it remembers)."""
        with self._lock:
            limiter = self._siblings.get(name)
            if limiter is None:
                limiter = self._siblings[name] = LocalLimiter(rate, clock=self._clock)
            return limiter


#: ``SFOX_LIMITER_URL`` for a limiter of this process alone: tests and eager mode only.
IN_PROCESS_URL = "memory://"


def limiter_for(url: str, rate: Rate, *, scope: str = "") -> Limiter:
    """The shared Redis limiter of ``scope`` at ``url``; ``memory://`` is this process's own.

    An in-process limiter is one process's own budget: it has no scope to share,
    and workers refuse it (several processes would each spend the whole budget).
    """
    if url == IN_PROCESS_URL:
        return LocalLimiter(rate)
    return RedisLimiter.from_url(url, rate, scope=scope)
