"""What a worker checks at start about each Redis it uses: eviction, and Cluster under the limiter.

A worker's Redis may be its broker, its result backend and the store of the
shared limiter and the run books: one server or several. Redis keeps them only
while it evicts nothing: under any ``maxmemory-policy`` but ``noeviction`` a
full Redis drops keys in silence (queued tasks, results, the limiter's log,
the run books). So each is asked its policy, and a worker says plainly, at
WARNING, which Redis may evict what. A managed Redis that refuses CONFIG and
INFO leaves the policy unknown, and the worker says that too.

The limiter's and the run books' scripts touch several keys at once, which a
Redis Cluster refuses across hash slots: a worker whose limiter is on a
Cluster node refuses to start (:data:`tasks._redis.CLUSTER_REFUSAL`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from .._exceptions import ConfigurationError
from .._redis import CLUSTER_REFUSAL, REDIS_SCHEMES, RedisFacts, inspect_redis
from .._settings import Settings

__all__ = ["RISKS", "STARTUP_CHECK_TIMEOUT", "RedisUse", "check_stores", "redis_in_use"]

logger = logging.getLogger("tasks.stores")

#: Seconds each step of a start-up check of one Redis may take (connect, each command).
STARTUP_CHECK_TIMEOUT = 3.0
#: What each use of a Redis keeps there, that eviction would lose.
RISKS = {
    "broker": "queued and unacknowledged tasks",
    "result backend": "task results (mint tokens among them)",
    "limiter": "the shared rate limiter and the run books of the fan-out and the nightly run",
}


@dataclass
class RedisUse:
    """One Redis a worker uses, and what for."""

    url: str
    #: The Sentinel master's name, for a ``sentinel://`` URL.
    master_name: str | None
    roles: list[str] = field(default_factory=list)

    @property
    def at_risk(self) -> str:
        return ", ".join(RISKS[role] for role in self.roles)


def _master_name(conf: Mapping[str, Any], options: str) -> str | None:
    found = conf.get(options) or {}
    name = found.get("master_name") if isinstance(found, Mapping) else None
    return str(name) if name else None


def _url(conf: Mapping[str, Any], name: str) -> Any:
    # Celery's settings object resolves CELERY_BROKER_URL / CELERY_RESULT_BACKEND here.
    value = getattr(conf, name, None) if hasattr(type(conf), name) else None
    return value if value is not None else conf.get(name)


def redis_in_use(conf: Mapping[str, Any], settings: Settings) -> list[RedisUse]:
    """Every Redis of the app with ``conf``: its broker, result backend and limiter, if Redis."""
    candidates = [
        ("broker", _url(conf, "broker_url"), _master_name(conf, "broker_transport_options")),
        (
            "result backend",
            _url(conf, "result_backend"),
            _master_name(conf, "result_backend_transport_options"),
        ),
        ("limiter", settings.limiter_url, None),  # a Sentinel URL carries its master's name
    ]
    uses: dict[tuple[str, str | None], RedisUse] = {}
    for role, url, master_name in candidates:
        if not isinstance(url, str) or not url.startswith(REDIS_SCHEMES):
            continue
        use = uses.setdefault((url, master_name), RedisUse(url, master_name))
        use.roles.append(role)
    return list(uses.values())


def check_stores(conf: Mapping[str, Any], settings: Settings) -> list[RedisFacts]:
    """Log the eviction policy of every Redis in use, at WARNING unless ``noeviction``.

    Raises :class:`~tasks.ConfigurationError`, in one line, when the limiter's
    Redis is a Cluster node. A Redis that does not answer is reported and
    skipped: the worker's own connections wait for it.
    """
    found = []
    for use in redis_in_use(conf, settings):
        what = " and ".join(use.roles)
        try:
            facts = inspect_redis(
                use.url, master_name=use.master_name, timeout=STARTUP_CHECK_TIMEOUT
            )
        except (redis.RedisError, ValueError, OSError) as exc:
            logger.warning(
                "could not check the %s's Redis for its maxmemory-policy: %s (%s)",
                what,
                type(exc).__name__,
                " ".join(str(exc).split())[:200],
            )
            continue
        found.append(facts)
        if "limiter" in use.roles and facts.cluster:
            raise ConfigurationError(CLUSTER_REFUSAL.format(where=facts.where))
        if facts.policy is None:
            logger.warning(
                "Redis %s (%s): its maxmemory-policy is unknown (it refuses CONFIG GET and "
                "INFO): unless it is noeviction, a full Redis may evict %s; make sure it is "
                "noeviction",
                facts.where,
                what,
                use.at_risk,
            )
        elif facts.evicts:
            logger.warning(
                "Redis %s (%s) has maxmemory-policy %s, not noeviction: when memory fills "
                "it may evict %s; set maxmemory-policy noeviction",
                facts.where,
                what,
                facts.policy,
                use.at_risk,
            )
        else:
            logger.info("Redis %s (%s): maxmemory-policy noeviction", facts.where, what)
    return found
