"""The package's own Redis: one client recipe and one policy for a dropped connection.

Redis holds the shared limiter, the fan-out's and the nightly run's books. A
dropped connection there (a failover, a proxy restart, a ``timeout`` setting,
a blip) is transient, like a 503 from sFOX, and is handled in two steps, the
same for every call the package makes:

1. **In place.** Every client made by :func:`redis_client` retries a command
   that met a connection error or a timeout, :data:`REDIS_RETRIES` times with
   backoff (:data:`REDIS_BACKOFF_BASE` doubling up to :data:`REDIS_BACKOFF_CAP`,
   with jitter): about 5 to 11 s in all, enough to ride through a failover or
   a short restart. A retried command may have run once already, so every
   script and write of the package is idempotent: running it twice has the
   effect of running it once (each script says why).
2. **At the broker.** An outage longer than that reaches the task as one of
   :data:`STORE_ERRORS`. The task's base class (:class:`tasks.worker.mint.SfoxTask`)
   sends it back to the broker with its progress, to resume after
   :data:`REDIS_OUTAGE_COUNTDOWN` seconds. It never fails the task. The
   limiter turns the same errors into a wait (:class:`~tasks.budget.ratelimit.LimiterWait`),
   so a mint keeps its tokens.

Celery's own Redis use (publishing, acknowledgements, results) is covered by
Celery's and kombu's settings in ``celeryconfig.py``.
"""

from __future__ import annotations

import functools
import weakref
from importlib.resources import files
from typing import Any

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

__all__ = [
    "REDIS_BACKOFF_BASE",
    "REDIS_BACKOFF_CAP",
    "REDIS_OUTAGE_COUNTDOWN",
    "REDIS_RETRIES",
    "STORE_ERRORS",
    "lua",
    "redis_client",
    "script",
]

#: Retries of one command after a dropped connection or a timeout, before it fails.
REDIS_RETRIES = 8
#: First backoff ceiling in seconds; doubles per retry up to :data:`REDIS_BACKOFF_CAP`.
REDIS_BACKOFF_BASE = 0.1
#: Largest wait between two retries of one command, seconds.
REDIS_BACKOFF_CAP = 2.0
#: Seconds a task waits at the broker when Redis stays away past the retries in place.
REDIS_OUTAGE_COUNTDOWN = 5.0
#: Seconds one command may wait for its answer, and to connect.
REDIS_SOCKET_TIMEOUT = 5.0
REDIS_CONNECT_TIMEOUT = 2.0

#: What Redis raises for an outage (``BusyLoadingError``, a restart loading its data,
#: is a ``ConnectionError``): transient, never a reason to fail a task.
STORE_ERRORS: tuple[type[redis.RedisError], ...] = (redis.ConnectionError, redis.TimeoutError)


def redis_client(url: str) -> redis.Redis[bytes]:
    """A client for ``url`` whose every command rides through a short outage."""
    return redis.Redis.from_url(
        url,
        retry=Retry(
            EqualJitterBackoff(cap=REDIS_BACKOFF_CAP, base=REDIS_BACKOFF_BASE), REDIS_RETRIES
        ),
        retry_on_error=list(STORE_ERRORS),
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        health_check_interval=30,
    )


#: Each client's registered scripts, by source: registered once per client.
_scripts: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def script(client: redis.Redis[bytes], source: str) -> Any:
    """``source`` registered with ``client`` (once); calling it runs EVALSHA.

    redis-py loads the script again by itself when Redis has lost it (a restart).
    """
    registered = _scripts.get(client)
    if registered is None:
        registered = _scripts[client] = {}
    found = registered.get(source)
    if found is None:
        found = registered[source] = client.register_script(source)
    return found


@functools.cache
def lua(package: str, *names: str) -> str:
    """The Lua text of ``names`` (``NAME.lua`` files shipped beside ``package``), joined.

    A script that starts with shared functions names their file first.
    """
    folder = files(package)
    return "\n".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)
