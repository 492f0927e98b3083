"""The Redis broker transport that keeps one client object per connection pool."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kombu import Connection

from tasks.worker.transport import Transport
from tests.conftest import REDIS_URL


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ("redis://127.0.0.1:6379/3", "tasks.worker.transport.Transport"),
        ("rediss://cache.example:6380/0", "tasks.worker.transport.Transport"),
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


QUEUE = "tests-kombu-take"


@pytest.fixture
def take_queue(redis_client):
    """A kombu connection on the transport, a simple queue on it, and an empty start."""
    with Connection(REDIS_URL, transport=Transport) as conn:
        queue = conn.SimpleQueue(QUEUE)
        queue.clear()
        try:
            yield conn, queue
        finally:
            queue.clear()
            queue.close()
            redis_client.delete("unacked", "unacked_index")


def celery_like(conn, task_id: str, retries: int = 0, **headers) -> None:
    """Publish a message with Celery's id and retries headers, as a task message has."""
    with conn.Producer() as producer:
        producer.publish(
            {"n": task_id},
            routing_key=QUEUE,
            headers={"id": task_id, "retries": retries, **headers},
            serializer="json",
        )


def take_all(queue, count: int) -> list[tuple[str, int]]:
    """Take ``count`` messages and ack them, check none is left: their (id, retries)."""
    got = [queue.get(timeout=5) for _ in range(count)]
    with pytest.raises(queue.Empty):
        queue.get(timeout=0.5)
    for message in got:
        message.ack()
    return [(m.headers["id"], m.headers["retries"]) for m in got]


def test_a_taken_message_is_unacked_in_the_same_step(take_queue, redis_client):
    """Consuming records the message as unacked; acking removes it; nothing left in the queue."""
    _conn, queue = take_queue
    queue.put({"n": 1})
    message = queue.get(timeout=5)
    tag = message.delivery_tag
    assert redis_client.hexists("unacked", tag)
    assert redis_client.zscore("unacked_index", tag) is not None
    assert redis_client.llen(QUEUE) == 0
    message.ack()
    assert not redis_client.hexists("unacked", tag)


def test_a_take_whose_answer_was_lost_hands_the_same_message_over_again(take_queue, redis_client):
    """The script ran, its answer never arrived: the next take gives that message, once."""
    from tasks.worker.transport import TAKE

    conn, queue = take_queue
    queue.put({"n": "lost"})
    queue.put({"n": "next"})
    channel = conn.default_channel
    keys, args = channel._take_keys([QUEUE])
    lost = redis_client.eval(TAKE, len(keys), *keys, *args)  # the answer that never arrived
    lost_tag = lost[2].decode()
    first = queue.get(timeout=5)
    assert (first.payload, first.delivery_tag) == ({"n": "lost"}, lost_tag)
    second = queue.get(timeout=5)
    assert second.payload == {"n": "next"}
    first.ack()
    second.ack()
    assert redis_client.hlen("unacked") == 0
    with pytest.raises(queue.Empty):
        queue.get(timeout=0.5)


def test_a_second_delivery_of_a_retried_publish_is_dropped(take_queue, redis_client):
    """Two publishes of one task id and retry count run once; a retry (retries + 1) runs."""
    conn, queue = take_queue
    celery_like(conn, "task-a")
    celery_like(conn, "task-a")  # the publish retried after its answer was lost
    celery_like(conn, "task-a", retries=1)
    assert take_all(queue, 2) == [("task-a", 0), ("task-a", 1)]
    assert redis_client.hlen("unacked") == 0


def test_the_same_task_sent_again_by_another_process_runs_once(take_queue, redis_client):
    """One task id and body from two publishers (``origin``, ``reply_to``) is one message.

    A chunk task that resumed in another process sends a user's downstream task again,
    under its fixed id, when its first publish was refused but had landed.
    """
    conn, queue = take_queue
    with conn.Producer() as producer:
        for origin, reply_to in (("gen1@a", "r-1"), ("gen2@b", "r-2")):
            producer.publish(
                {"n": "task-e"},
                routing_key=QUEUE,
                headers={"id": "task-e", "retries": 0, "origin": origin},
                reply_to=reply_to,
                serializer="json",
            )
        producer.publish(  # another body under the same id is another message
            {"n": "task-e", "user_token": "other"},
            routing_key=QUEUE,
            headers={"id": "task-e", "retries": 0, "origin": "gen1@a"},
            reply_to="r-1",
            serializer="json",
        )
    got = [queue.get(timeout=5) for _ in range(2)]
    with pytest.raises(queue.Empty):
        queue.get(timeout=0.5)
    assert [m.payload for m in got] == [{"n": "task-e"}, {"n": "task-e", "user_token": "other"}]
    for message in got:
        message.ack()


def test_a_producer_whose_channel_was_closed_under_it_sends_again(take_queue, redis_client):
    """A publish on a channel closed while its connection went on retries on a new one.

    Kombu's Redis channel failed such a publish with ``AttributeError``, which no retry
    catches: around a failover a chunk task failed so, and its run stalled.
    """
    _conn, queue = take_queue
    with Connection(REDIS_URL, transport=Transport) as conn, conn.Producer() as producer:
        producer.publish({"n": 1}, routing_key=QUEUE, serializer="json", retry=True)
        conn.default_channel.close()
        producer.publish(
            {"n": 2},
            routing_key=QUEUE,
            serializer="json",
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0},
        )
    assert [m.payload for m in (queue.get(timeout=5), queue.get(timeout=5))] == [
        {"n": 1},
        {"n": 2},
    ]


def test_a_message_put_back_is_handed_over_again(take_queue, redis_client):
    """A requeued message keeps its delivery tag, so the duplicate check lets it through."""
    conn, queue = take_queue
    celery_like(conn, "task-b")
    message = queue.get(timeout=5)
    message.requeue()
    again = queue.get(timeout=5)
    assert (again.headers["id"], again.delivery_tag) == ("task-b", message.delivery_tag)
    again.ack()


def test_waiting_leaves_the_queue_alone_and_wakes_for_a_message(take_queue, redis_client):
    """An idle consumer waits without taking; a message published later still arrives."""
    import threading

    _conn, queue = take_queue
    with pytest.raises(queue.Empty):
        queue.get(timeout=1.5)  # a take that found nothing, then a wait
    timer = threading.Timer(0.3, lambda: celery_like(conn2, "task-c"))
    with Connection(REDIS_URL, transport=Transport) as conn2:
        timer.start()
        try:
            message = queue.get(timeout=5)
        finally:
            timer.cancel()
    assert message.headers["id"] == "task-c"
    message.ack()


def test_taking_survives_redis_forgetting_its_scripts(take_queue, redis_client):
    """After SCRIPT FLUSH (as after a restart) the channel loads the take script again."""
    _conn, queue = take_queue
    queue.put({"n": 1})
    queue.get(timeout=5).ack()
    redis_client.script_flush()
    queue.put({"n": 2})
    message = queue.get(timeout=5)
    assert message.payload == {"n": 2}
    message.ack()


def test_the_transport_hands_over_every_task_whatever_work_it_names(take_queue, redis_client):
    """Two task ids for one user's work both run: whether work may run again is the books'.

    The nightly run sends a lost user's order task again under a new id; the transport
    once dropped it (the retired ``sfox_once`` header) while the log said it was sent.
    """
    conn, queue = take_queue
    celery_like(conn, "first", sfox_jit=["run-1", "user-1"])
    celery_like(conn, "again", sfox_jit=["run-1", "user-1"], sfox_once="run-1:user-1")
    celery_like(conn, "first", retries=1, sfox_jit=["run-1", "user-1"])
    assert take_all(queue, 3) == [("first", 0), ("again", 0), ("first", 1)]
    assert not redis_client.keys("sfox:once:*")


def test_the_same_bytes_pushed_twice_run_once_and_each_return_runs(take_queue, redis_client):
    """redis-py resending an LPUSH (same tag) is one message; each requeue is handed over."""
    conn, queue = take_queue
    celery_like(conn, "task-d")
    raw = redis_client.lindex(QUEUE, 0)
    redis_client.lpush(QUEUE, raw)  # the resent LPUSH whose first answer was lost
    message = queue.get(timeout=5)
    for _ in range(2):  # put back twice (two lost connections): handed over both times
        message.requeue()
        message = queue.get(timeout=5)
        assert message.headers["id"] == "task-d"
    message.ack()
    with pytest.raises(queue.Empty):
        queue.get(timeout=0.5)


class _Running:
    """A request in Celery's active requests (a weak set), as a running task's is."""

    def __init__(self, message) -> None:
        self.message = message


def test_a_running_tasks_reject_after_its_channel_closed_is_put_back_by_a_sweep(
    take_queue, redis_client
):
    """A task that goes back to the broker after a reconnect: owed, not a crash; put back."""
    from celery.worker import state

    from tasks.worker import transport

    conn, queue = take_queue
    queue.put({"n": 1})
    consumer = conn.SimpleQueue(QUEUE, channel=conn.channel())
    message = consumer.get(timeout=5)
    running = _Running(message)
    state.active_requests.add(running)  # its task runs: the close leaves its message alone
    try:
        message.channel.close()  # the consumer's connection was lost and made again
    finally:
        state.active_requests.discard(running)
    assert redis_client.llen(QUEUE) == 0 and redis_client.hexists("unacked", message.delivery_tag)
    message.reject(requeue=True)  # the task went back to the broker (Deferred, an outage)
    assert message.delivery_tag in transport._unrestored
    conn.default_channel.qos.restore_visible()  # the next channel's sweep
    again = queue.get(timeout=5)
    assert again.payload == {"n": 1}
    again.ack()
    assert redis_client.hlen("unacked") == 0


def test_the_apps_publish_pool_hands_out_the_packages_transport():
    """Every publish goes through ``app.pool``: its connections use the package's transport,
    whether kombu's pool makes connections of its own class (5.5+) or clones (5.4)."""
    from tasks import app
    from tasks.worker.transport import Transport

    with app.pool.acquire(block=True) as connection:
        assert connection.get_transport_cls() is Transport
