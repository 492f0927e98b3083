"""Per-process runtime: the objects a worker process builds once and reuses.

The HTTP session, the limiter's Redis pool and the sealer are made lazily in
each process (after the prefork pool forks, never before), one runtime per
Celery app that runs the package, from that app's settings
(:func:`tasks.worker.host.settings_for`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable

import redis
from celery import Celery

from .._redis import redis_client
from .._settings import Settings
from ..budget.ratelimit import Lane, Limiter, limiter_for
from ..budget.retry import RetryPolicy
from ..minting import Minter, RequestThreads
from ..sealing import Sealer
from ..sfox.access import SfoxAccess
from ..sfox.client import SfoxClient, Timeouts
from ..sfox.orders import OrderPlacer
from .host import calling_app, forget_settings, settings_for
from .lanes import lane_at_hand

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
                self._limiter = limiter_for(
                    s.require_limiter_url(),
                    s.rate,
                    scope=s.rate_limit_scope,
                    batch_share=s.batch_share,
                )
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
                self._redis = redis_client(self.settings.require_limiter_url(shared=True))
            return self._redis

    def policy(self, *, turn: bool = False) -> RetryPolicy:
        """The retry policy; ``turn`` bounds it by one task run's turn (``SFOX_TASK_TURN``)."""
        return RetryPolicy(
            self.settings.retry,
            sleep=self.sleep,
            turn=self.settings.task_turn if turn else None,
        )

    def access(self, *, turn: bool, lane: Lane | None = None) -> SfoxAccess:
        """This process's client, limiter and sealer, with a retry policy for one task run.

        Requests wait at the limiter in ``lane``: by default the lane of the task at hand.
        """
        return SfoxAccess(
            self.client,
            self.limiter.in_lane(lane or lane_at_hand()),
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
_runtimes: weakref.WeakKeyDictionary[Celery, tuple[int, Runtime]] = weakref.WeakKeyDictionary()


def get_runtime(app: Celery) -> Runtime:
    """This process's runtime for ``app``, built on first use (and again after a fork)."""
    with _lock:
        found = _runtimes.get(app)
        if found is None or found[0] != os.getpid():
            found = _runtimes[app] = (os.getpid(), Runtime(settings_for(app)))
        return found[1]


def reset_runtime() -> None:
    """Forget this process's runtimes and settings (configuration changed, or tests)."""
    with _lock:
        for pid, runtime in list(_runtimes.values()):
            if pid == os.getpid():
                runtime.close()
        _runtimes.clear()
    forget_settings()


def unseal(sealed: str) -> str:
    """The plaintext user auth token inside ``sealed``.

    Opened with the seal key of the app at hand (the running task's, the
    caller's own, else the package's). Raises :class:`~tasks.SealError` when it
    is older than ``SFOX_TOKEN_RESULT_TTL`` or was sealed under another key. Use
    the plaintext at once; do not store it.
    """
    return get_runtime(calling_app()).sealer.unseal(sealed)
