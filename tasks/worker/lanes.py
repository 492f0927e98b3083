"""Lanes: a partner's live work goes ahead of batch work, at the broker and at the limiter.

On-demand work (a ``sfox.mint_user_tokens`` call) and batch work (the chunks of
``with_user_tokens``, the nightly run's tasks) share sFOX's budget. Two things
keep on-demand work from waiting behind batch work:

- **Queues.** Batch tasks go to a queue of their own, ``SFOX_BATCH_QUEUE``
  (``SFOX_QUEUE`` + ``.batch`` by default), declared as the running app declares
  ``SFOX_QUEUE`` (its exchange, its queue type and arguments). A worker that
  consumes ``SFOX_QUEUE`` also consumes the batch queue (:func:`_consume_batch_too`,
  Celery's ``celeryd_after_setup``), and the package's Redis transport takes from
  ``SFOX_QUEUE`` first; kombu's own Redis transport and RabbitMQ take from the two
  in turn. An on-demand message never waits behind queued batch messages: at most
  behind the one a worker process is taking as it arrives.
- **The limiter.** Each task's requests wait in its lane
  (:mod:`tasks.budget.ratelimit`): an on-demand request takes the next free slot.

A task's lane is its class's (:attr:`SfoxTask.lane <tasks.worker.base.SfoxTask>`),
or the one its message names in the :data:`LANE_HEADER` header: a partner marks a
bulk mint as batch work with ``headers={"sfox_lane": "batch"}``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, current_task, signals
from kombu.entity import Queue

from .._exceptions import ConfigurationError
from ..budget.ratelimit import BATCH, ON_DEMAND, Lane
from .host import settings_for
from .transport import LAST_QUEUES

__all__ = ["LANES", "LANE_HEADER", "batch_queue", "lane_at_hand", "lane_of", "queue_for"]

#: Message header naming a package task's lane: ``"on_demand"`` or ``"batch"``.
LANE_HEADER = "sfox_lane"
LANES: tuple[Lane, ...] = (ON_DEMAND, BATCH)


def lane_of(marked: Any, default: Lane) -> Lane:
    """The lane a message's :data:`LANE_HEADER` names, else ``default``."""
    return marked if marked in LANES else default


def lane_at_hand() -> Lane:
    """The lane of the task this process runs now; on demand outside any task."""
    task = current_task
    if not task:
        return ON_DEMAND
    return lane_of(task.request.get(LANE_HEADER), getattr(task, "lane", ON_DEMAND))


def queue_for(app: Celery, lane: Lane) -> Queue | str:
    """Where ``app`` sends a package task of ``lane``."""
    return settings_for(app).queue if lane == ON_DEMAND else batch_queue(app)


def batch_queue(app: Celery) -> Queue | str:
    """The batch queue, declared as ``app`` declares ``SFOX_QUEUE``.

    The app's own declaration of the batch queue, if it has one; else a copy of
    its ``SFOX_QUEUE`` declaration (exchange, type, arguments), or of the one it
    would create for it, under the batch queue's name and routing key: every
    process sends batch work the same way, through ``SFOX_QUEUE``'s exchange.
    """
    settings = settings_for(app)
    name = settings.batch_queue_name
    queues = app.amqp.queues
    if name in queues:
        return queues[name]  # type: ignore[no-any-return]
    if name == settings.queue:
        return name
    # SFOX_QUEUE as the app declares it, or as it would create it (a missing queue).
    model = queues.get(settings.queue) or queues.new_missing(settings.queue)
    attrs = {k: getattr(model, k) for k, _ in Queue.attrs if k not in ("name", "routing_key")}
    attrs.pop("bindings", None)
    return Queue(name, routing_key=name, **attrs)  # type: ignore[no-untyped-call]


@signals.celeryd_after_setup.connect
def _consume_batch_too(instance: Any = None, **_: Any) -> None:
    """A worker that consumes ``SFOX_QUEUE`` consumes the batch queue too, taking it last."""
    app = getattr(instance, "app", None)
    if app is None:
        return
    try:
        settings = settings_for(app)
    except ConfigurationError:
        return  # the worker's start checks say what is wrong, for the workers that mint
    queues = app.amqp.queues
    if settings.queue not in queues.consume_from or settings.batch_queue_name == settings.queue:
        return
    queue = batch_queue(app)
    queues.select_add(queue)
    LAST_QUEUES.add(queue if isinstance(queue, str) else queue.name)
