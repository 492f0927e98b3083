"""What every caller of sFOX works with: the client, the request budget and the sealer.

:class:`~tasks.minting.Minter` and :class:`~tasks.sfox.orders.OrderPlacer` take one
:class:`SfoxAccess` instead of the same seven collaborators each. No Celery here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..budget.ratelimit import Limiter
from ..budget.retry import RetryPolicy
from ..sealing import Sealer
from .client import SfoxClient

__all__ = ["SfoxAccess"]


@dataclass(frozen=True)
class SfoxAccess:
    """One client, the limiter and retry policy its requests go through, and the sealer."""

    client: SfoxClient
    limiter: Limiter
    policy: RetryPolicy
    sealer: Sealer
    #: Seconds every worker pauses after a 429 that carries no ``Retry-After``.
    rate_limit_penalty: float
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time
