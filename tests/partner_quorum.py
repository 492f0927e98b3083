"""A partner's app that runs ``SFOX_QUEUE`` as a RabbitMQ quorum queue on a topic exchange.

Embedded like :mod:`tests.partner_embedded` (``include=["tasks"]``), on RabbitMQ
(``PARTNER_AMQP_URL``) with Redis results (``PARTNER_REDIS_URL``), both read
from its own module. Every queue it declares is a quorum queue on a topic
exchange, as Celery's documentation asks for native delayed delivery, and it
publishes with confirms.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue

from tests.downstream_runs import note_run

SFOX_QUEUE = os.environ.get("SFOX_QUEUE", "sfox")
QUORUM = {"x-queue-type": "quorum"}


def _quorum(name: str) -> Queue:
    return Queue(name, Exchange(name, type="topic"), routing_key=name, queue_arguments=QUORUM)


app = Celery("partner-quorum", include=["tasks"])
app.conf.update(
    broker_url=os.environ.get("PARTNER_AMQP_URL"),
    result_backend=os.environ.get("PARTNER_REDIS_URL"),
    task_queues=[_quorum("partner"), _quorum(SFOX_QUEUE)],
    task_default_queue="partner",
    task_default_exchange="partner",
    task_default_exchange_type="topic",
    task_default_routing_key="partner",
    task_default_queue_type="quorum",
    broker_transport_options={"confirm_publish": True},
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
)


@app.task(name="partner_quorum.record")
def record(tag: str, user_token: dict[str, Any]) -> str:
    """The partner's downstream task: note one run for the user (a field per run)."""
    user_id = user_token["partner_user_id"]
    note_run(redis.Redis.from_url(str(app.conf.result_backend)), tag, user_id)
    return str(user_id)
