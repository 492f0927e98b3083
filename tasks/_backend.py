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

    def set(self, key: Any, value: Any, expires: Any = None, **retry_policy: Any) -> Any:
        ttl = _expiry.get()
        if ttl is not None:
            expires = ttl if not expires else min(int(expires), ttl)
        return super().set(key, value, expires=expires, **retry_policy)


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
