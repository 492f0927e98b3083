"""A testing kit: a local sFOX stand-in that misbehaves on purpose, and pytest fixtures.

- :mod:`tasks.testing.server`: :class:`FakeSfox`, a threaded HTTP server on loopback that
  answers sFOX's user-token and order endpoints, with its control API under ``/_fake/``.
- :mod:`tasks.testing.faults`: :class:`Fault` (the scripted faults), its records and settings.
- :mod:`tasks.testing.fixtures`: pytest fixtures for a partner's own suite
  (``pytest_plugins = ["tasks.testing.fixtures"]``).
- ``python -m tasks.testing``: the stand-in as a service.

Standard library only (the fixtures need pytest, and only when used). The kit needs no
Redis; what it tests may: minting in place needs the limiter's Redis (``SFOX_LIMITER_URL``,
else a Redis broker) or ``SFOX_LIMITER_URL=memory://``, and a worker needs a shared Redis.
"""

from __future__ import annotations

from .faults import (
    ALGORITHM_IDS,
    CONTROL_PREFIX,
    ORDERS_PATH,
    TOKENS_PATH,
    FakeSfoxConfig,
    Fault,
    FaultKind,
    Order,
    RequestRecord,
    http_date,
)
from .server import FakeSfox

__all__ = [
    "ALGORITHM_IDS",
    "CONTROL_PREFIX",
    "ORDERS_PATH",
    "TOKENS_PATH",
    "FakeSfox",
    "FakeSfoxConfig",
    "Fault",
    "FaultKind",
    "Order",
    "RequestRecord",
    "http_date",
]
