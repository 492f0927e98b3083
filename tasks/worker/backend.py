"""Redis result backends with per-task result expiry, that wait out a full Redis.

Celery 5 has one ``result_expires`` for every task. Mint results hold sealed
tokens and must go within ``SFOX_TOKEN_RESULT_TTL``, while other results (the
nightly summary) keep the global expiry. Tasks that want a shorter life set a
``result_ttl`` attribute; these backends write their result keys with that TTL
in the same ``SETEX`` that stores them, so there is no moment when the value
lives without its expiry. :class:`ResultTTL` does it for any of Celery's Redis
backends (``redis://``, ``rediss://``, ``sentinel://``; a partner's own subclass
too): :func:`ttl_backend_class` makes its twin.

Through Sentinel, a result is written so that a failover cannot discard it: a
write that no replica acknowledged (``WAIT``) is written again on the master the
sentinels name once the failover is over (:func:`_written_to_master`).

A Redis that is full (``maxmemory`` reached under ``noeviction``) refuses the
store with ``OOM``. The result then waits, with an ERROR line naming memory,
for up to :data:`FULL_STORE_WAIT` seconds; after that the task's message goes
back to the broker (``Reject(requeue=True)``) rather than being acknowledged
with its result lost, and runs again once memory frees.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from typing import Any

from celery.backends.redis import RedisBackend
from celery.exceptions import Reject

from .._redis import REPLICA_ACK_MS, OutOfMemoryError, masked_url, report_full, stands

__all__ = [
    "FULL_STORE_WAIT",
    "ResultTTL",
    "TokenRedisBackend",
    "backend_with_ttl",
    "ttl_backend_class",
]

#: Seconds a result waits for a full Redis to take it before its task goes back to the broker.
FULL_STORE_WAIT = 60.0
#: Longest pause between two tries to store into a full Redis, seconds.
FULL_STORE_PAUSE = 2.0
#: Seconds a result stored through Sentinel is written again while a failover is under way.
FAILOVER_SETTLE = 15.0

logger = logging.getLogger("tasks.backend")

_expiry: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "sfox_result_ttl", default=None
)


class ResultTTL:
    """Mixed into a Redis backend class: a task's ``result_ttl``, and a full Redis waited out."""

    app: Any
    url: Any
    expires: Any
    client: Any

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        task = self.app.tasks.get(getattr(request, "task", None) or "")
        ttl = getattr(task, "result_ttl", None)
        token = _expiry.set(None if ttl is None else int(ttl))
        try:
            return self._store_when_room(task_id, result, state, traceback, request, **kwargs)
        finally:
            _expiry.reset(token)

    def _store_when_room(self, task_id: str, *args: Any, **kwargs: Any) -> Any:
        """Store; while Redis is full, wait (bounded), then hand the task back to the broker.

        Celery's own retry (``result_backend_always_retry``) covers a dropped
        connection only; a full Redis is handled here, in one place.
        """
        deadline = time.monotonic() + FULL_STORE_WAIT
        pause = 0.1
        while True:
            try:
                return super()._store_result(task_id, *args, **kwargs)  # type: ignore[misc]
            except OutOfMemoryError:
                where = masked_url(str(self.url or ""))
                if time.monotonic() + pause > deadline:
                    raise Reject(
                        f"the result backend {where} stayed out of memory for "
                        f"{FULL_STORE_WAIT:g} s: the task goes back to the broker",
                        requeue=True,
                    ) from None
                report_full(where, f"the result of task {task_id}")
                time.sleep(pause)
                pause = min(pause * 2, FULL_STORE_PAUSE)

    def _set(self, key: Any, value: Any, *args: Any) -> Any:
        # Overridden at ``_set``, the one level every supported Celery has: 5.4 to 5.6
        # call ``_set(key, value)`` and take ``self.expires``; 5.7 passes an ``expires``
        # (the failure expiry) as a third argument. ``set`` itself gained that keyword
        # only in 5.7, so passing it there breaks Celery 5.4.
        ttl = _expiry.get()
        sentinel = _sentinel_pool(self.client)
        if ttl is None and sentinel is None:
            return super()._set(key, value, *args)  # type: ignore[misc]
        wanted = (args[0] if args else None) or self.expires
        if ttl is None:
            ttl = int(wanted) if wanted else None
        elif wanted:
            ttl = min(int(wanted), ttl)
        if sentinel is not None:
            return self._set_past_failover(sentinel, key, value, ttl)
        # Celery's own store: the value with its expiry in one command, then the publish
        # that wakes a caller waiting on the result.
        with self.client.pipeline() as pipe:
            pipe.setex(key, ttl, value)
            pipe.publish(key, value)
            pipe.execute()

    def _set_past_failover(self, pool: Any, key: Any, value: Any, ttl: int | None) -> None:
        """Store so that a Sentinel failover cannot discard it; see :func:`_written_to_master`."""
        deadline = time.monotonic() + FAILOVER_SETTLE
        while True:
            # One connection, no MULTI: WAIT counts the replicas that have this
            # connection's writes, and INFO says which server took them.
            with self.client.pipeline(transaction=False) as pipe:
                if ttl:
                    pipe.setex(key, ttl, value)
                else:
                    pipe.set(key, value)
                pipe.publish(key, value)
                pipe.wait(1, REPLICA_ACK_MS)
                pipe.info("server")
                *_, acked, server = pipe.execute()
            if int(acked) >= 1 or _written_to_master(pool, server, deadline):
                return
            if time.monotonic() > deadline:
                logger.warning(
                    "a result stored during a Sentinel failover (%s) may not survive it: "
                    "no replica took it within %g s",
                    masked_url(str(self.url or "")),
                    FAILOVER_SETTLE,
                )
                return
            time.sleep(0.2)


def _sentinel_pool(client: Any) -> Any:
    """The client's connection pool when it follows a Sentinel master, else None."""
    pool = getattr(client, "connection_pool", None)
    has = getattr(pool, "sentinel_manager", None) is not None
    return pool if has and getattr(pool, "is_master", True) else None


def _written_to_master(pool: Any, server: Any, deadline: float) -> bool:
    """Whether a write no replica acknowledged may stand, given what the sentinels say.

    Redis replicates asynchronously, and a failover promotes the replica while
    the old master goes on taking writes until the sentinels demote it (about
    ten seconds), then throws them away. So a write no replica took stands only
    on the master the sentinels name, outside a failover, when no replica of it
    is up (:func:`tasks._redis.stands`, the rule of the package's own writes).
    Otherwise the pool forgets its connections, to ask the sentinels again, and
    the caller writes it again shortly, up to ``deadline``.
    """
    if stands(pool, run_id=str(server.get("run_id") or "")):
        return True
    pool.disconnect()
    return False


class TokenRedisBackend(ResultTTL, RedisBackend):  # type: ignore[misc]
    """Celery's Redis backend (``redis://``, ``rediss://``), honouring a task's ``result_ttl``."""


_lock = threading.Lock()
_classes: dict[type[Any], type[Any]] = {RedisBackend: TokenRedisBackend}
_ttl_backends: dict[tuple[int, int, type[Any]], Any] = {}


def ttl_backend_class(cls: type[Any]) -> type[Any]:
    """The twin of a Redis backend class that honours ``result_ttl``; other classes as they are.

    Celery's ``SentinelBackend`` (a ``RedisBackend`` subclass) gets
    ``TokenSentinelBackend``, and so on: one twin per class, made once.
    """
    if not issubclass(cls, RedisBackend) or issubclass(cls, ResultTTL):
        return cls
    with _lock:
        twin = _classes.get(cls)
        if twin is None:
            name = "Token" + cls.__name__
            twin = _classes[cls] = type(name, (ResultTTL, cls), {"__module__": __name__})
        return twin


def backend_with_ttl(backend: Any, app: Any) -> Any:
    """``backend``, or for one of Celery's Redis backends a twin that honours ``result_ttl``.

    A partner's app that runs the mint task has Celery's own Redis backend
    (plain, TLS or Sentinel); the twin talks to the same Redis, with the same
    configuration and keys, and writes a mint's result with its short TTL in the
    same command. One twin per app, backend class and process.
    """
    cls = ttl_backend_class(type(backend))
    if cls is type(backend):
        return backend
    key = (id(app), os.getpid(), type(backend))
    with _lock:
        twin = _ttl_backends.get(key)
        if twin is None:
            twin = _ttl_backends[key] = cls(app=app, url=backend.url)
        return twin
