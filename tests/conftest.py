"""Shared fixtures: a dedicated Redis database, the sFOX stand-in, real Celery workers.

The environment is set before ``tasks`` is imported, so the test process and
every worker it starts resolve the same settings from it.
"""

from __future__ import annotations

import os
import secrets

# Tests own one Redis database; nothing else may live there.
REDIS_URL = os.environ.get("SFOX_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ENTERPRISE_KEY = "ek-" + secrets.token_hex(20)

TEST_ENV = {
    "CELERY_BROKER_URL": REDIS_URL,
    "CELERY_RESULT_BACKEND": REDIS_URL,
    "SFOX_ENTERPRISE_API_KEY": ENTERPRISE_KEY,
    # No real backoff in tests: every wait is shrunk, none is skipped.
    "SFOX_RETRY_WAIT_INITIAL": "0.01",
    "SFOX_RETRY_WAIT_MAX": "0.05",
    "SFOX_RATE_LIMIT_PENALTY": "0.5",
    "SFOX_READ_TIMEOUT": "0.5",
    "SFOX_CONNECT_TIMEOUT": "0.5",
    "SFOX_RETRY_INPROCESS_WAIT_MAX": "1",
    "SFOX_RETRY_DEADLINE": "60",
}
for _name in ("ENTERPRISE_API_KEY", "SFOX_TOKEN_SEAL_KEY", "SFOX_LIMITER_URL"):
    os.environ.pop(_name, None)
os.environ.update(TEST_ENV)
# The stand-in's URL is fixed per session; workers are started after it listens.
os.environ.setdefault("SFOX_API_URL", "http://127.0.0.1:1")

import pytest  # noqa: E402
import redis  # noqa: E402

from tasks.testing import FakeSfox  # noqa: E402
from tests.workers import WorkerProcess, start_event_recorder  # noqa: E402


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    """The tests' Redis database, emptied at the start and the end of the session."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.exit(f"Redis is not answering at {REDIS_URL}; start it first", returncode=3)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(autouse=True)
def _clean_keys(request: pytest.FixtureRequest) -> None:
    """Each test starts without the previous test's limiter state and results.

    Kombu's own bindings stay: a running worker needs them to keep receiving.
    """
    if "redis_client" not in request.fixturenames and "worker" not in request.fixturenames:
        return
    client = request.getfixturevalue("redis_client")
    for key in client.scan_iter(count=1000):
        if not key.startswith(b"_kombu.binding."):
            client.delete(key)


@pytest.fixture(scope="session")
def fake_sfox_server() -> FakeSfox:
    """One stand-in for the session; its URL is what every worker is told."""
    server = FakeSfox(ENTERPRISE_KEY).start()
    os.environ["SFOX_API_URL"] = server.url
    import tasks
    from tasks.worker.runtime import reset_runtime

    tasks.app.conf.sfox_api_url = server.url
    reset_runtime()
    yield server
    server.stop()


@pytest.fixture
def fake_sfox(fake_sfox_server: FakeSfox) -> FakeSfox:
    """The stand-in, reset to its default behaviour for this test."""
    fake_sfox_server.reset()
    fake_sfox_server.configure(
        latency=0.0, rate_limit=None, rate_window=10.0, rate_penalty=60.0, shuffle=True
    )
    yield fake_sfox_server
    fake_sfox_server.reset()


@pytest.fixture(scope="session")
def worker(fake_sfox_server: FakeSfox, redis_client: redis.Redis, tmp_path_factory):
    """A real ``celery -A tasks worker`` (prefork, 2 processes) for the session."""
    proc = WorkerProcess(
        name="main",
        log_dir=tmp_path_factory.mktemp("worker"),
        env={"SFOX_API_URL": fake_sfox_server.url},
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def events(worker):
    """Every Celery event the workers send, recorded from the broker."""
    recorder = start_event_recorder()
    yield recorder
    recorder.stop()
