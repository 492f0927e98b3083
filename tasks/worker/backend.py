"""A Redis result backend with per-task result expiry.

Celery 5 has one ``result_expires`` for every task. Mint results hold sealed
tokens and must go within ``SFOX_TOKEN_RESULT_TTL``, while other results (the
nightly summary) keep the global expiry. Tasks that want a shorter life set a
``result_ttl`` attribute; this backend writes their result keys with that TTL
in the same ``SETEX`` that stores them, so there is no moment when the value
lives without its expiry.
"""

from __future__ import annotations

import contextvars
import os
import threading
from typing import Any

from celery.backends.redis import RedisBackend

__all__ = ["TokenRedisBackend", "backend_with_ttl"]

_expiry: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "sfox_result_ttl", default=None
)


class TokenRedisBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis backend, honouring a task's ``result_ttl``."""

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
        if ttl is None:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        token = _expiry.set(int(ttl))
        try:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        finally:
            _expiry.reset(token)

    def _set(self, key: Any, value: Any, *args: Any) -> Any:
        # Overridden at ``_set``, the one level every supported Celery has: 5.4 to 5.6
        # call ``_set(key, value)`` and take ``self.expires``; 5.7 passes an ``expires``
        # (the failure expiry) as a third argument. ``set`` itself gained that keyword
        # only in 5.7, so passing it there breaks Celery 5.4.
        ttl = _expiry.get()
        if ttl is None:
            return super()._set(key, value, *args)
        wanted = (args[0] if args else None) or self.expires
        if wanted:
            ttl = min(int(wanted), ttl)
        # Celery's own store: the value with its expiry in one command, then the publish
        # that wakes a caller waiting on the result.
        with self.client.pipeline() as pipe:
            pipe.setex(key, ttl, value)
            pipe.publish(key, value)
            pipe.execute()


_lock = threading.Lock()
_ttl_backends: dict[tuple[int, int], TokenRedisBackend] = {}


def backend_with_ttl(backend: Any, app: Any) -> Any:
    """``backend``, or for Celery's plain Redis backend a twin that honours ``result_ttl``.

    A partner's app that runs the mint task has Celery's own Redis backend; the
    twin talks to the same Redis, with the same configuration and keys, and
    writes a mint's result with its short TTL in the same command. One twin per
    app and process.
    """
    if type(backend) is not RedisBackend:
        return backend
    key = (id(app), os.getpid())
    with _lock:
        twin = _ttl_backends.get(key)
        if twin is None:
            twin = _ttl_backends[key] = TokenRedisBackend(app=app, url=backend.url)
        return twin
