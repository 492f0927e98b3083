"""The configuration of the package's own Celery app (``celery -A tasks``), from the environment.

Every Celery setting a careful operator would pin is here with the reason for
it. It configures ``tasks.app`` only: the package loads it by its full name
(``tasks.celeryconfig``), so no ``celeryconfig`` module on ``sys.path`` (a
partner's, in the working directory) changes it, and a partner's app is never
configured from it. The repository's top-level ``celeryconfig.py`` is this file.

The package's own ``SFOX_*`` settings are not here: every part of the package
resolves them the same way, from the running app's configuration, then the
environment (:class:`tasks._settings.Settings`). See docs/reference/configuration.md.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery.schedules import crontab
from kombu.entity import Exchange, Queue

from ._exceptions import ConfigurationError
from ._redis import REDIS_CONNECT_TIMEOUT, REDIS_SOCKET_TIMEOUT
from ._settings import DEFAULT_NIGHTLY_CRON, DEFAULT_QUEUE


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or default


# -- broker and results ------------------------------------------------------------

broker_url = _env("CELERY_BROKER_URL", "redis://localhost:6379/0")
# A Redis backend gets mint results their own short TTL (see tasks.worker.backend).
result_backend = _env("CELERY_RESULT_BACKEND", broker_url)

#: Seconds a message may stay unacknowledged before Redis hands it to another worker.
#: It bounds recovery after a worker dies; it must exceed the longest a task holds its
#: message: one turn (SFOX_TASK_TURN) with its requests in flight, or a countdown of at
#: most SFOX_RETRY_AFTER_MAX (see tasks.worker.mint.longest_hold; a worker warns if it is not).
_visibility_timeout = int(_env("SFOX_VISIBILITY_TIMEOUT", "1800") or 1800)
# Workers sweep for abandoned messages every few seconds (kombu's default is every 100 s),
# so a dead worker's messages come back within visibility_timeout plus this interval.
_restore_interval = max(1, min(10, _visibility_timeout // 6))
broker_transport_options = {
    "visibility_timeout": _visibility_timeout,
    "unacked_restore_interval": _restore_interval,
    "unacked_restore_throttle": 1,
    # Kombu's own Redis options stay at their defaults: with retry_on_timeout,
    # socket_timeout or health_check_interval set here, a worker whose connections Redis
    # dropped went on waiting in silence and consumed nothing more (measured, kombu 5.7).
    # Celery's consumer reconnects by itself (below), and restores what was unacked.
}
result_backend_transport_options: dict[str, Any] = {"visibility_timeout": _visibility_timeout}


def _json_options(name: str) -> dict[str, Any]:
    """The JSON object in the environment variable ``name`` (none: empty)."""
    text = _env(name)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigurationError(
            f'{name} must be a JSON object, for example {{"master_name": "mymaster"}}'
        )
    return value


# The operator's own transport options, over the ones above: for sentinel:// URLs,
# kombu and Celery take the master's name (``master_name``) and the sentinels' own
# credentials (``sentinel_kwargs``) only from here, never from the URL.
broker_transport_options.update(_json_options("CELERY_BROKER_TRANSPORT_OPTIONS"))
result_backend_transport_options.update(_json_options("CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS"))
# A Sentinel result backend on the broker's own URL (the default) follows the broker's
# master, unless its own options name one.
if result_backend == broker_url and "master_name" in broker_transport_options:
    for _key in ("master_name", "sentinel_kwargs", "min_other_sentinels"):
        if _key in broker_transport_options:
            result_backend_transport_options.setdefault(_key, broker_transport_options[_key])
# Retry the broker connection at start-up instead of dying while Redis comes up, and
# reconnect for ever after a drop (Celery's default gives up after 100 tries).
broker_connection_retry_on_startup = True
broker_connection_retry = True
broker_connection_max_retries = None

# -- riding through a dropped Redis connection -----------------------------------------
# Celery's own Redis calls, next to the package's (tasks._redis): a dropped connection
# must not turn into lost work.
# Publishing a task (a chunk, a downstream task, a retry's countdown): kombu reconnects
# and publishes again for up to ~20 s (Celery's default gives up after ~0.6 s, and the
# task that published then fails).
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": 12,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2,
}
# Storing a result (a mint's tokens, a nightly summary): retried on a connection error
# rather than lost; bounded, with backoff from 50 ms to 2 s.
result_backend_always_retry = True
result_backend_max_retries = 15
result_backend_base_sleep_between_retries_ms = 50
result_backend_max_sleep_between_retries_ms = 2000
# The result backend's own Redis connections: retry a timed-out command, notice dead ones.
redis_retry_on_timeout = True
redis_socket_timeout = REDIS_SOCKET_TIMEOUT
redis_socket_connect_timeout = REDIS_CONNECT_TIMEOUT
redis_backend_health_check_interval = 30

# -- queues ------------------------------------------------------------------------

#: The package's queue. Every package task is sent here from any app (tasks.worker.base), and
#: `celery -A tasks worker` consumes it alone by default, so it neither takes a partner's
#: tasks nor is taken from by a partner's workers on Celery's default queue.
task_default_queue = _env("SFOX_QUEUE", DEFAULT_QUEUE) or DEFAULT_QUEUE

#: SFOX_QUEUE_TYPE: how this app declares its queue on RabbitMQ. A queue's type is fixed
#: when RabbitMQ first declares it, and a declaration of another type is refused
#: (PRECONDITION_FAILED, "inequivalent arg 'x-queue-type'"): this must match the vhost.
QUEUE_TYPES = ("classic", "quorum")
_queue_type = (_env("SFOX_QUEUE_TYPE", "classic") or "classic").lower()
if _queue_type not in QUEUE_TYPES:
    raise ConfigurationError(
        f"SFOX_QUEUE_TYPE={os.environ.get('SFOX_QUEUE_TYPE', '').strip()!r} must be "
        "'classic' or 'quorum' (how the package's own app declares SFOX_QUEUE on RabbitMQ; "
        "read from the environment)"
    )
if _queue_type == "quorum":
    # Quorum: declared as such, on a topic exchange, since Celery's native delayed
    # delivery (5.5+), which holds countdowns in RabbitMQ rather than in a worker's
    # memory, skips direct exchanges. Publisher confirms, as Celery's docs advise for
    # quorum queues: a publish cut by a dropped connection is retried, not lost.
    task_default_queue_type = "quorum"
    task_default_exchange = task_default_queue
    task_default_exchange_type = "topic"
    task_default_routing_key = task_default_queue
    task_queues = (
        Queue(  # type: ignore[no-untyped-call]
            task_default_queue,
            Exchange(task_default_queue, type="topic"),  # type: ignore[no-untyped-call]
            routing_key=task_default_queue,
            queue_arguments={"x-queue-type": "quorum"},
        ),
    )
    broker_transport_options.setdefault("confirm_publish", True)

# -- serialisation -----------------------------------------------------------------

# JSON only: no pickle, so no code execution from a forged message.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# -- delivery guarantees -----------------------------------------------------------

# Ack after the task ran, so a crash mid-task redelivers it instead of losing it.
task_acks_late = True
# A worker killed mid-task (OOM, SIGKILL) must not ack: the message goes back.
task_reject_on_worker_lost = True
# Take one message at a time, so long tasks don't hoard work other workers could do.
worker_prefetch_multiplier = 1
# After a lost broker connection Celery lowers the prefetch count while tasks still run and
# raises it as they end; before Celery 5.7, on Redis, it could stay low and the worker took
# no more tasks (seen here with Celery 5.4 to 5.6 after CLIENT KILL). Off, a reconnected
# worker may reserve a few messages more than it runs, briefly.
worker_enable_prefetch_count_reduction = False
# Results of other tasks (the nightly summary) live a day; mint results far less (below).
result_expires = 86400
# Store the task's name and args with its result, so Flower and callers can tell runs apart.
result_extended = True
# Record STARTED so an operator can tell queued from running.
task_track_started = True
# No global task_time_limit: the prefork pool arms a timer for every task that has one,
# and a cancelled timer stays in the worker's heap until it would have fired, so a limit
# of an hour on every per-user task held ~0.5 KB per task for an hour (about 100 MB at
# 100,000 users). Long-running tasks of the package carry their own limits instead, and
# every sFOX call is bounded by its timeouts and the retry deadline.
# Recycle pool processes now and then to cap slow leaks, without churning per-user tasks.
worker_max_tasks_per_child = 10000

# -- monitoring --------------------------------------------------------------------

# Send task events so Flower sees every state change, including "sent".
worker_send_task_events = True
task_send_sent_event = True

# -- time --------------------------------------------------------------------------

# One clock for schedules and expiry everywhere: UTC.
timezone = "UTC"
enable_utc = True


def _cron(text: str) -> crontab:
    fields = text.split()
    if len(fields) != 5:
        raise ConfigurationError(
            f"SFOX_NIGHTLY_CRON={text!r} must have 5 fields: minute hour day month weekday"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except ValueError as exc:
        raise ConfigurationError(f"SFOX_NIGHTLY_CRON={text!r} is not valid cron: {exc}") from None


# Beat fires the nightly run when orders are configured (a second firing for a finished
# date does nothing); with none configured there is nothing to schedule.
beat_schedule = (
    {
        "sfox-nightly-orders": {
            "task": "sfox.run_nightly_orders",
            "schedule": _cron(_env("SFOX_NIGHTLY_CRON", DEFAULT_NIGHTLY_CRON) or ""),
        },
    }
    if _env("SFOX_NIGHTLY_ORDERS_FILE") or _env("SFOX_NIGHTLY_ORDERS_SOURCE")
    else {}
)
