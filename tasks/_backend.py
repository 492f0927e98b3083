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
from typing import Any

from celery.backends.redis import RedisBackend

__all__ = ["TokenRedisBackend"]

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
