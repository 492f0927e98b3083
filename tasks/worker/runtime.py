"""Per-process runtime: the objects a worker process builds once and reuses.

The HTTP session, the limiter's Redis pool and the sealer are made lazily in
each process (after the prefork pool forks, never before), from settings
read once from the Celery configuration.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from tasks._exceptions import ConfigurationError
from tasks._redis import redis_client
from tasks._settings import Settings
from tasks.budget.ratelimit import Limiter, limiter_for
from tasks.budget.retry import RetryPolicy
from tasks.minting import Minter, RequestThreads
from tasks.sealing import Sealer
from tasks.sfox.access import SfoxAccess
from tasks.sfox.client import SfoxClient, Timeouts
from tasks.sfox.orders import OrderPlacer
from tasks.worker.app import app, package_conf

__all__ = ["Runtime", "get_runtime", "reset_runtime", "unseal"]


class Runtime:
    """Settings plus the long-lived objects built from them."""

    def __init__(self, settings: Settings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.sleep = sleep
        self._lock = threading.Lock()
        self._client: SfoxClient | None = None
        self._limiter: Limiter | None = None
        self._sealer: Sealer | None = None
        self._redis: redis.Redis[bytes] | None = None
        #: The minters' request threads, kept for the process's next task.
        self.request_threads = RequestThreads(settings.mint_concurrency)

    @property
    def client(self) -> SfoxClient:
        with self._lock:
            if self._client is None:
                s = self.settings
                self._client = SfoxClient(
                    s.api_url,
                    s.require_api_key(),
                    timeouts=Timeouts(connect=s.connect_timeout, read=s.read_timeout),
                    plain_http_hosts=s.plain_http_hosts,
                    source_address=s.source_address,
                )
            return self._client

    @property
    def limiter(self) -> Limiter:
        with self._lock:
            if self._limiter is None:
                s = self.settings
                self._limiter = limiter_for(s.limiter_url, s.rate, scope=s.rate_limit_scope)
            return self._limiter

    @property
    def sealer(self) -> Sealer:
        with self._lock:
            if self._sealer is None:
                s = self.settings
                self._sealer = Sealer.for_keys(s.seal_keys, s.api_key, s.result_ttl)
            return self._sealer

    @property
    def redis(self) -> redis.Redis[bytes]:
        """Redis for run bookkeeping: the limiter's."""
        with self._lock:
            if self._redis is None:
                url = self.settings.limiter_url
                if not url:
                    raise ConfigurationError(
                        "this needs Redis for its bookkeeping: set SFOX_LIMITER_URL, "
                        "or use a Redis broker or result backend"
                    )
                self._redis = redis_client(url)
            return self._redis

    def policy(self, *, turn: bool = False) -> RetryPolicy:
        """The retry policy; ``turn`` bounds it by one task run's turn (``SFOX_TASK_TURN``)."""
        return RetryPolicy(
            self.settings.retry,
            sleep=self.sleep,
            turn=self.settings.task_turn if turn else None,
        )

    def access(self, *, turn: bool) -> SfoxAccess:
        """This process's client, limiter and sealer, with a retry policy for one task run."""
        return SfoxAccess(
            self.client,
            self.limiter,
            self.policy(turn=turn),
            self.sealer,
            rate_limit_penalty=self.settings.rate_limit_penalty,
            sleep=self.sleep,
        )

    def minter(self, *, turn: bool = True) -> Minter:
        """A minter for one task run: it starts no request after the run's turn."""
        return Minter(
            self.access(turn=turn),
            batch_size=self.settings.batch_size,
            concurrency=self.settings.mint_concurrency,
            threads=self.request_threads,
        )

    def placer(self, on_remint: Callable[[str], None]) -> OrderPlacer:
        return OrderPlacer(self.access(turn=True), on_remint=on_remint)

    def close(self) -> None:
        self.request_threads.close()
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None
            self._limiter = None
            self._redis = None


_lock = threading.Lock()
_current: tuple[int, Runtime] | None = None


def get_runtime(conf: Mapping[str, Any]) -> Runtime:
    """This process's runtime, built on first use (and again after a fork)."""
    global _current
    with _lock:
        if _current is None or _current[0] != os.getpid():
            _current = (os.getpid(), Runtime(Settings.from_conf(package_conf(conf))))
        return _current[1]


def reset_runtime() -> None:
    """Forget this process's runtime (configuration changed, or tests)."""
    global _current
    with _lock:
        if _current is not None and _current[0] == os.getpid():
            _current[1].close()
        _current = None


def unseal(sealed: str) -> str:
    """The plaintext user auth token inside ``sealed``.

    Raises :class:`~tasks.SealError` when it is older than ``SFOX_TOKEN_RESULT_TTL`` or
    was sealed under another key. Use the plaintext at once; do not store it.
    """
    return get_runtime(app.conf).sealer.unseal(sealed)
