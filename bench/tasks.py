"""Tasks the benchmark's workers load (``--include bench.tasks``): a no-op downstream.

``bench.noop`` stands in for a partner's per-user job behind
``with_user_tokens``: it only counts arrivals in Redis, so the benchmark
knows when all N users got through. A ``worker_ready`` hook marks each
worker ready in Redis, because at ``-l WARNING`` the worker logs nothing
when it is.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import signals

from tasks import app

#: Redis key ``bench.noop`` increments unless told another.
COUNTER_KEY = "bench:noop:count"
#: ``worker_ready`` sets ``READY_PREFIX + hostname``.
READY_PREFIX = "bench:ready:"

_redis: redis.Redis[bytes] | None = None


def _client() -> redis.Redis[bytes]:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(app.conf.broker_url)
    return _redis


@app.task(name="bench.noop", ignore_result=True)
def noop(user_token: dict[str, Any], counter: str = COUNTER_KEY) -> None:
    """Count one user's arrival; refuse an entry that carries no sealed token."""
    if not isinstance(user_token, dict) or not user_token.get("token"):
        raise ValueError("bench.noop expected a token entry with a sealed token")
    _client().incr(counter)


@app.task(name="bench.fanout", ignore_result=True)
def fanout(first: int, count: int, counter: str = COUNTER_KEY) -> None:
    """Send ``count`` ``bench.noop`` tasks the way a with_user_tokens chunk does, minting nothing.

    Celery's own pace for one tiny task per user on these workers: the ceiling
    ``with_user_tokens`` into a no-op downstream can approach.
    """
    downstream = noop.s(counter=counter)
    for index in range(first, first + count):
        entry = {"partner_user_id": f"celery-{index:07d}", "token": "-", "expires": ""}
        downstream.clone(kwargs={"user_token": entry}).apply_async()


@signals.worker_ready.connect
def _mark_ready(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or "unknown"
    _client().set(READY_PREFIX + hostname, "1", ex=3600)


@signals.worker_process_init.connect
def _fresh_client(**_: Any) -> None:
    """A forked pool process opens its own Redis connections."""
    global _redis
    _redis = None
