"""Lanes: on-demand mints go ahead of batch work, at the broker and at the limiter.

With real Redis, real workers and the stand-in. How long anything takes is the
benchmark's business (bench/README.md); these tests prove the order of things.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from celery import Celery
from celery import _state as celery_state

from tasks._settings import Rate
from tasks.budget.ratelimit import BATCH, RedisLimiter
from tasks.fanout.store import Chunk, JitRun
from tasks.fanout.tasks import send_chunks
from tests.conftest import REDIS_URL
from tests.services import eventually
from tests.workers import WorkerProcess

pytestmark = pytest.mark.slow

#: Queues of these tests' own, so that the session's worker takes nothing of theirs.
QUEUE = "lanes"
BATCH_QUEUE = f"{QUEUE}.batch"


def partner_app(broker: str = REDIS_URL) -> Celery:
    """A partner's app that sends the package's tasks to the lanes' queue."""
    app = Celery("lanes-partner", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        result_backend=REDIS_URL,
        task_serializer="json",
        accept_content=["json"],
        sfox_queue=QUEUE,
    )
    return app


@contextmanager
def current(app: Celery) -> Iterator[None]:
    """``app`` is this thread's current app, as in a partner's process, then no longer."""
    before = getattr(celery_state._tls, "current_app", None)
    app.set_current()
    try:
        yield
    finally:
        celery_state._tls.current_app = before


def succeeded(log: str) -> list[str]:
    """The names of the tasks a worker's log says succeeded, in order."""
    return re.findall(r"Task ([\w.]+)\[[0-9a-f-]+\] succeeded", log)


def test_batch_tasks_go_to_the_batch_queue_and_a_mint_to_sfox_queue(redis_client):
    """A package task's lane picks its queue; the sfox_lane header overrides it."""
    from tasks import mint_user_tokens
    from tests.testtasks import batch_step

    app = partner_app()
    with app.connection_for_write() as conn:
        app.tasks[batch_step.name].apply_async((1,), connection=conn)
        app.tasks[mint_user_tokens.name].apply_async((["u-1"],), connection=conn)
        app.tasks[mint_user_tokens.name].apply_async(
            (["u-2"],), connection=conn, headers={"sfox_lane": "batch"}
        )
    assert redis_client.llen(QUEUE) == 1
    assert redis_client.llen(BATCH_QUEUE) == 2


def test_a_fan_out_is_batch_work_unless_marked_on_demand(redis_client):
    """with_user_tokens' segments go to the batch queue; lane="on_demand" sends them to
    SFOX_QUEUE, and the chunk tasks a run sends later follow the lane its books keep."""
    from tasks import with_user_tokens
    from tasks._exceptions import InvalidArgument
    from tests.testtasks import record_token

    app = partner_app()
    with current(app):
        with_user_tokens(["a", "b"], record_token.s("x"), run_id="bulk").apply_async()
        assert (redis_client.llen(QUEUE), redis_client.llen(BATCH_QUEUE)) == (0, 1)
        live = with_user_tokens(["c"], record_token.s("x"), run_id="live", lane="on_demand")
        live.apply_async()
        assert (redis_client.llen(QUEUE), redis_client.llen(BATCH_QUEUE)) == (1, 1)
        with pytest.raises(InvalidArgument, match="lane"):
            with_user_tokens(["d"], record_token.s("x"), lane="urgent")  # type: ignore[arg-type]
        redis_client.delete(QUEUE, BATCH_QUEUE)
        for run_id, lane in (("bulk", "batch"), ("live", "on_demand")):
            run = JitRun(redis_client, run_id)
            redis_client.hset(run.state, "lane", lane)
            send_chunks(run, [Chunk(0, ["a"])])
        assert (redis_client.llen(QUEUE), redis_client.llen(BATCH_QUEUE)) == (1, 1)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request) -> Iterator[str]:
    """The broker URL: the tests' Redis database, or a RabbitMQ vhost of the test's own."""
    if request.param == "redis":
        yield REDIS_URL
        return
    from tests.test_rabbitmq import amqp_url, private_vhost, rabbitmq_answers

    if not rabbitmq_answers():
        pytest.skip("no RabbitMQ")
    with private_vhost() as vhost:
        yield amqp_url(vhost)


def test_an_on_demand_mint_sent_after_500_queued_batch_tasks_runs_first(
    broker, fake_sfox, redis_client, tmp_path
):
    """500 batch tasks wait in the batch queue; a mint sent after them runs before them.

    A worker of one process, taking one message at a time. On Redis, the package's
    transport takes from ``SFOX_QUEUE`` first: the mint runs first. RabbitMQ hands a
    worker one message of each queue it consumes: the mint runs first or second.
    """
    app = partner_app(broker)
    # Named, since Celery prefers CELERY_BROKER_URL (the suite's Redis) to the app's own.
    with app.connection_for_write(broker) as conn:
        for index in range(500):
            app.send_task("tests.batch_step", (index,), queue=BATCH_QUEUE, connection=conn)
        mint = app.send_task("sfox.mint_user_tokens", (["u-1"],), queue=QUEUE, connection=conn)
    if broker == REDIS_URL:
        assert redis_client.llen(BATCH_QUEUE) == 500
    worker = WorkerProcess(
        "lanes-order",
        tmp_path,
        concurrency=1,
        env={"SFOX_API_URL": fake_sfox.url, "SFOX_QUEUE": QUEUE, "CELERY_BROKER_URL": broker},
    )
    try:
        worker.start()
        assert mint.get(timeout=60)["tokens"][0]["partner_user_id"] == "u-1"
        assert eventually(lambda: succeeded(worker.log()).count("tests.batch_step") == 500, 90)
    finally:
        worker.stop()
    order = succeeded(worker.log())
    assert order.index("sfox.mint_user_tokens") <= (0 if broker == REDIS_URL else 1), order[:5]


def test_at_a_full_window_an_on_demand_request_takes_the_next_slot(redis_client):
    """Batch work waiting at a full window leaves the next free slot to on-demand.

    Slots spaced over the window free one at a time. The on-demand request that
    found the window full keeps its place (its grace is long, so a slow machine
    does not lose it); batch work asking first is refused, the on-demand
    request then gets the slot.
    """
    rate = Rate.parse("3/2s")
    on_demand = RedisLimiter(redis.Redis.from_url(REDIS_URL), rate, grace=5.0)
    batch = on_demand.in_lane(BATCH)
    for n in range(3):
        assert batch.try_acquire(slot=f"b{n}")[0] == 0
        time.sleep(0.4)
    wait, paused, _ = on_demand.try_acquire(slot="od")
    assert wait > 0 and not paused
    assert batch.try_acquire(slot="b3")[0] > 0
    time.sleep(wait + 0.05)
    assert batch.try_acquire(slot="b3")[0] > 0, "batch work took the slot kept for on-demand"
    assert on_demand.try_acquire(slot="od")[0] == 0
    assert redis_client.zscore("sfox:ratelimit:3/2:log", "od") is not None


def test_batch_work_finishes_under_a_steady_stream_of_on_demand_mints(
    fake_sfox, redis_client, tmp_path
):
    """A 300-user fan-out finishes while on-demand mints arrive at half the budget's rate."""
    from tasks import with_user_tokens
    from tests.testtasks import record_token

    app = partner_app()
    worker = WorkerProcess(
        "lanes-stream",
        tmp_path,
        concurrency=4,
        env={"SFOX_API_URL": fake_sfox.url, "SFOX_QUEUE": QUEUE, "SFOX_RATE_LIMIT": "20/1s"},
    )
    stop = threading.Event()
    mints = []

    def stream() -> None:
        with app.connection_for_write() as conn:
            n = 0
            while not stop.is_set():
                mints.append(
                    app.send_task(
                        "sfox.mint_user_tokens", ([f"od-{n}"],), queue=QUEUE, connection=conn
                    )
                )
                n += 1
                stop.wait(0.1)

    sender = threading.Thread(target=stream, daemon=True)
    try:
        worker.start()
        sender.start()
        ids = [f"night-{i}" for i in range(300)]
        run_id = "lanes-stream"
        downstream = record_token.s("lanes").set(queue=QUEUE)
        with current(app):
            with_user_tokens(ids, downstream, run_id=run_id, chunk_size=10).apply_async()
        run = JitRun(redis_client, run_id)
        assert eventually(lambda: run.progress().finished, timeout=120), run.progress()
        stop.set()
        sender.join(10)
        assert all(m.get(timeout=60)["tokens"] for m in mints)
    finally:
        stop.set()
        worker.stop()
    assert len(redis_client.hgetall("tests:downstream:lanes")) == 300
    assert len(mints) > 20
