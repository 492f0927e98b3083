"""pytest fixtures that put a misbehaving sFOX under a partner's own tests.

Load them with ``pytest_plugins = ["tasks.testing.fixtures"]`` in a ``conftest.py``:

- ``fake_sfox``: a :class:`~tasks.testing.FakeSfox` on a free loopback port, for one test,
  accepting :data:`FAKE_ENTERPRISE_KEY`;
- ``sfox_env``: ``SFOX_API_URL`` and ``SFOX_ENTERPRISE_API_KEY`` pointed at it, for code that
  reads the environment (a worker started by the test, say).

Neither fixture needs or starts Redis; the code under test may. A process that mints in
place (``sfox-tokens mint --local``, eager tasks) needs the rate limiter's Redis:
``SFOX_LIMITER_URL``, else the app's Redis broker or result backend (``CELERY_BROKER_URL``,
``redis://localhost:6379/0`` by default), or ``SFOX_LIMITER_URL=memory://`` for its own
budget and no Redis at all. A worker needs a Redis every worker shares (it refuses
``memory://``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import FakeSfox

__all__ = ["FAKE_ENTERPRISE_KEY", "fake_sfox", "sfox_env"]

#: The enterprise key the fixture's stand-in accepts.
FAKE_ENTERPRISE_KEY = "fake-enterprise-key"


@pytest.fixture
def fake_sfox() -> Iterator[FakeSfox]:
    """A running stand-in; stopped, with its port, when the test ends."""
    with FakeSfox(FAKE_ENTERPRISE_KEY, "127.0.0.1", 0) as fake:
        yield fake


@pytest.fixture
def sfox_env(fake_sfox: FakeSfox, monkeypatch: pytest.MonkeyPatch) -> FakeSfox:
    """The environment points at ``fake_sfox``; returns it.

    It sets no Redis: set ``SFOX_LIMITER_URL`` (``memory://`` for a test with no Redis)
    for code that mints in this process.
    """
    monkeypatch.setenv("SFOX_API_URL", fake_sfox.url)
    monkeypatch.setenv("SFOX_ENTERPRISE_API_KEY", FAKE_ENTERPRISE_KEY)
    return fake_sfox
