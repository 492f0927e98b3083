"""Countdowns on a RabbitMQ quorum queue: whole seconds, at least 1, only where Celery needs it."""

from __future__ import annotations

import pytest
from celery import Celery
from kombu.entity import Exchange, Queue

from tasks.worker.base import broker_countdown, delays_at_broker


@pytest.mark.parametrize(
    ("countdown", "whole"), [(0.01, 1), (0.4, 1), (1.0, 1), (1.2, 2), (59.99, 60), (60, 60)]
)
def test_a_countdown_is_rounded_up_to_whole_seconds_of_at_least_one(countdown, whole):
    """Native delayed delivery takes int(countdown) and refuses 0: never cut a wait short."""
    assert broker_countdown(countdown) == whole


def app_with(broker: str, queue_type: str) -> Celery:
    app = Celery("countdowns", set_as_current=False)
    app.conf.broker_url = broker
    queue = Queue(
        "sfox",
        Exchange("sfox", type="topic"),
        routing_key="sfox",
        queue_arguments={"x-queue-type": queue_type},
    )
    app.conf.task_queues = [queue]
    return app


@pytest.mark.parametrize(
    ("broker", "queue_type", "delayed"),
    [
        ("amqp://guest:guest@127.0.0.1:1//", "quorum", True),
        ("amqp://guest:guest@127.0.0.1:1//", "classic", False),
        ("redis://127.0.0.1:1/0", "quorum", False),
    ],
)
def test_only_a_quorum_queue_on_amqp_takes_countdowns_to_the_broker(
    broker, queue_type, delayed, monkeypatch
):
    """Celery's own test: an AMQP broker and a quorum queue among the app's queues."""
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    assert delays_at_broker(app_with(broker, queue_type)) is delayed
