"""RabbitMQ as the broker (Redis for results and the limiter): every end-to-end path.

Each test gets a vhost of its own. RabbitMQ's ``consumer_timeout`` is lowered
for the long run and put back afterwards: a task that held its message past it
would make RabbitMQ close the channel and the worker die.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from tasks import run_progress, with_user_tokens
from tests.conftest import REDIS_URL
from tests.test_nightly import children, write_orders
from tests.testtasks import record_token, runs_by_user
from tests.workers import Caller, WorkerProcess

QUEUE = "sfox-rabbit"
DEFAULT_CONSUMER_TIMEOUT = 1800000


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def rabbitmq_answers() -> bool:
    try:
        rabbitmqctl("status")
        return True
    except (OSError, subprocess.SubprocessError):
        return False


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not rabbitmq_answers(), reason="no RabbitMQ")]


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    """A vhost of its own for one test, deleted afterwards (with its queues), even on failure."""
    name = f"sfox-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


@pytest.fixture
def vhost():
    with private_vhost() as name:
        yield name


@pytest.fixture
def short_consumer_timeout():
    """consumer_timeout of 15 s (RabbitMQ checks it about once a minute); put back after."""
    rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 15000).")
    yield 15
    rabbitmqctl(
        "eval", f"application:set_env(rabbit, consumer_timeout, {DEFAULT_CONSUMER_TIMEOUT})."
    )


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


def rabbit_worker(tmp_path, fake_sfox, vhost, name, **env):
    return WorkerProcess(
        name,
        tmp_path,
        env={
            "CELERY_BROKER_URL": amqp_url(vhost),
            "CELERY_RESULT_BACKEND": REDIS_URL,
            "SFOX_API_URL": fake_sfox.url,
            "SFOX_QUEUE": QUEUE,
            **env,
        },
        concurrency=4,
        queues=QUEUE,
        loglevel="INFO",
    ).start()


def test_a_long_night_on_rabbitmq_outlasts_its_consumer_timeout(
    vhost, short_consumer_timeout, fake_sfox, redis_client, tmp_path
):
    """A nightly run five times the consumer_timeout, with a mint and a fan-out beside it.

    The worker stays alive, every order is placed once, the summary comes back,
    and with no crash no chunk is minted twice and no sender is said to have died.
    """
    fake_sfox.configure(latency=0.01)
    worker = rabbit_worker(
        tmp_path, fake_sfox, vhost, "rabbit", SFOX_RATE_LIMIT="10/1s", SFOX_TASK_TURN="5"
    )
    caller = Caller(amqp_url(vhost), QUEUE)
    try:
        users = [f"rmq-{i}" for i in range(700)]
        nightly = caller.send(
            "sfox.run_nightly_orders",
            kwargs={"run_date": "2026-08-08", "orders_file": write_orders(tmp_path, users)},
        )
        mint = caller.send("sfox.mint_user_tokens", args=[[f"rmq-mint-{i}" for i in range(30)]])
        fan = [f"rmq-fan-{i}" for i in range(60)]
        canvas = with_user_tokens(
            fan, record_token.s("rabbit").set(queue=QUEUE), chunk_size=10, ahead=2
        )
        for segment in canvas.tasks:
            caller.send(segment.task, args=segment.args)
        assert len(mint.get(timeout=120)["tokens"]) == 30
        started = time.monotonic()
        summary = nightly.get(timeout=300)
        took = time.monotonic() - started
        assert worker.proc.poll() is None, worker.log()[-3000:]
    finally:
        caller.close()
        worker.stop()
    assert took > 4 * short_consumer_timeout  # the night really outlasted the timeout
    assert summary["status"] == "done"
    assert summary["placed"] == 700 and summary["failed_orders"] == 0
    placed = Counter(o.user_id for o in fake_sfox.orders if o.user_id.startswith("rmq-"))
    assert set(placed) == set(users) and set(placed.values()) == {1}
    assert run_progress(canvas.run_id).finished
    assert set(runs_by_user(redis_client, "rabbit").values()) == {1}
    log = worker.log()
    assert "PRECONDITION_FAILED" not in log and "Unrecoverable error" not in log
    # Nothing twice without a crash: no chunk sent again, no user minted twice.
    assert "again" not in log
    minted = Counter(user for user, _ in fake_sfox.issued_tokens.values())
    assert {u: n for u, n in minted.items() if n > 1} == {}


def test_killed_pool_processes_on_rabbitmq_leave_every_order_exactly_once(
    vhost, fake_sfox, redis_client, tmp_path
):
    """SIGKILL the pool processes mid-run on RabbitMQ: each order exists once, none missing."""
    fake_sfox.configure(latency=0.01)
    worker = rabbit_worker(tmp_path, fake_sfox, vhost, "rabbit-kill", SFOX_RATE_LIMIT="5000/1s")
    caller = Caller(amqp_url(vhost), QUEUE)
    users = [f"rmqkill-{i}" for i in range(300)]
    try:
        result = caller.send(
            "sfox.run_nightly_orders",
            kwargs={"run_date": "2026-08-09", "orders_file": write_orders(tmp_path, users)},
        )
        deadline = time.monotonic() + 60
        while len(fake_sfox.orders) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in children(worker.proc.pid):
            os.kill(child, signal.SIGKILL)
        summary = result.get(timeout=240)
    finally:
        caller.close()
        worker.stop()
    placed = Counter(o.user_id for o in fake_sfox.orders)
    assert set(placed) == set(users) and set(placed.values()) == {1}
    assert summary["placed"] + summary["already_placed"] == 300
