"""The Redis broker transport that keeps one client object per connection pool."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kombu import Connection

from tasks._kombu import Transport
from tests.conftest import REDIS_URL


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ("redis://127.0.0.1:6379/3", "tasks._kombu.Transport"),
        ("rediss://cache.example:6380/0", "tasks._kombu.Transport"),
        ("amqp://guest:guest@127.0.0.1:5672//", "kombu.transport.pyamqp.Transport"),
    ],
)
def test_the_app_uses_the_transport_for_redis_brokers_only(broker, expected):
    """Its broker URL keeps its scheme (Flower picks its broker client by it)."""
    code = (
        "from tasks import app\n"
        "conn = app.connection_for_write()\n"
        "cls = type(conn.transport)\n"
        "print(cls.__module__ + '.' + cls.__qualname__, conn.as_uri().split(':', 1)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "CELERY_BROKER_URL": broker},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [expected, broker.split(":", 1)[0]]


def test_one_client_per_pool_and_messages_still_flow(redis_client):
    """Commands share one client object; a new pool gets a new one; publish and get work."""
    with Connection(REDIS_URL, transport=Transport) as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        assert channel._create_client(asynchronous=True) is not first
        queue = conn.SimpleQueue("tests-kombu-transport")
        try:
            for i in range(3):
                queue.put({"n": i})
            got = [queue.get(timeout=5) for _ in range(3)]
            assert [m.payload["n"] for m in got] == [0, 1, 2]
            for m in got:
                m.ack()
            channel._pool = None  # as kombu does when it drops its pool
            assert channel._create_client() is not first
            queue.put({"n": 3})
            assert queue.get(timeout=5).payload == {"n": 3}
        finally:
            queue.clear()
            queue.close()


def test_the_app_publishes_through_it(worker):
    """Workers and clients of tasks.app use the transport (the whole suite runs on it)."""
    from tasks import app

    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
