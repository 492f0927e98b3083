"""A partner's own Celery app that never imports ``tasks``: the sidecar set-up.

Its worker consumes Celery's default queue and its own orders queue. It sends
the package's tasks by name: to ``SFOX_QUEUE`` with ``queue=``, or through
``task_routes``. Its downstream task counts each of its runs in Redis. Its
broker and result backend are its own configuration (``PARTNER_REDIS_URL``),
never ``CELERY_BROKER_URL``: the tests run it where a default broker is refused.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery, shared_task

from tests.downstream_runs import note_run

app = Celery("partner")
app.conf.update(
    broker_url=os.environ.get("PARTNER_REDIS_URL"),
    result_backend=os.environ.get("PARTNER_REDIS_URL"),
    task_serializer="json",
    accept_content=["json"],
    task_routes={"partner.record": {"queue": "partner-orders"}, "sfox.*": {"queue": "sfox"}},
)


@app.task(name="partner.record")
def record(tag: str, user_token: dict[str, Any]) -> str:
    """The partner's downstream task: note one run for the user (a field per run)."""
    user_id = user_token["partner_user_id"]
    note_run(redis.Redis.from_url(app.conf.broker_url), tag, user_id)
    return str(user_id)


@shared_task(name="partner.ping")
def ping() -> str:
    """A partner's shared task: it must stay on the partner's app once tasks is imported."""
    return "pong"
