"""A partner's own Celery app that runs the package's tasks on its own workers: embedded.

``include=["tasks"]`` registers every ``sfox.*`` task in this app; its worker
consumes Celery's default queue and the package's (``-Q celery,<SFOX_QUEUE>``),
with this app's broker and result backend (``PARTNER_REDIS_URL``, its own
configuration), and reads ``SFOX_*`` from the environment.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from tests.downstream_runs import note_run

app = Celery("partner-embedded", include=["tasks"])
app.conf.update(
    broker_url=os.environ.get("PARTNER_REDIS_URL"),
    result_backend=os.environ.get("PARTNER_REDIS_URL"),
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
)


@app.task(name="partner_embedded.record")
def record(tag: str, user_token: dict[str, Any]) -> str:
    """The partner's downstream task: note one run for the user (a field per run)."""
    user_id = user_token["partner_user_id"]
    note_run(redis.Redis.from_url(app.conf.broker_url), tag, user_id)
    return str(user_id)
