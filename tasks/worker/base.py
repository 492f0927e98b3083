"""The base of every package task: its queue, bounded runs, and waits taken at the broker.

Each task of the package is a :class:`SfoxTask`, in ``tasks.app`` or in a
partner's app that imports ``tasks`` (registered with every app, bound to each:
:mod:`tasks.worker.host`). The class owns what they have in common:

- **the queue and the lane.** A task of the on-demand lane is sent to ``SFOX_QUEUE``
  (default ``sfox``) as the app at hand resolves it, batch work to the batch queue
  declared like it (:mod:`tasks.worker.lanes`), so a partner's workers on Celery's
  default queue never receive one; the app's own declaration of that queue
  (``task_queues``) applies. A message's ``sfox_lane`` header overrides the class's lane;
- **acks late, one bound on resuming.** A crash redelivers the message. Every
  return to the broker counts against one deadline in time, ``resume_deadline``
  (:data:`RESUME_DEADLINE` unless a task sets its own), from the task's first
  run (carried in the :data:`FIRST_RUN_HEADER` header): a resume that would
  start past it fails the task with :class:`~tasks._exceptions.RetriesExhausted`,
  naming what it waited for. Celery's count (``max_retries``) is not used: a
  count bounds nothing when countdowns range from one second to minutes;
- **waits at the broker.** A run that must wait longer than a worker slot
  should (:class:`~tasks.minting.Deferred`: a long ``Retry-After``, the limiter,
  the end of its turn) or whose Redis or broker stayed away past the retries
  in place (:data:`~tasks._redis.STORE_ERRORS`) goes back to the broker with
  its progress (``_resume``) and a countdown. Such an outage never fails the
  task: if even the retry cannot be published, the message is rejected with
  requeue, so the broker keeps it;
- **countdowns a quorum queue can hold.** Where the app's queues include a
  RabbitMQ quorum queue, Celery (5.5+) hands a countdown to RabbitMQ's native
  delayed delivery, in whole seconds (``int(countdown)``; below 1 it fails to
  publish). Every countdown of a package task is then rounded up to a whole
  number of seconds, at least 1 (:func:`broker_countdown`).

A task records progress it must not lose across such a return with
:meth:`SfoxTask.checkpoint`; it comes back as the ``_resume`` keyword.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, cast

from celery import Celery, Task
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

try:  # Celery 5.5+: native delayed delivery on quorum queues, and how it is detected
    from celery.utils.quorum_queues import detect_quorum_queues
except ImportError:  # Celery 5.4: countdowns stay in the worker, fractions and all
    detect_quorum_queues = None

from .._exceptions import RetriesExhausted
from .._redis import REDIS_OUTAGE_COUNTDOWN, STORE_ERRORS
from ..budget.ratelimit import BATCH, Lane
from ..minting import Deferred
from .lanes import LANE_HEADER, LANES, queue_for

__all__ = [
    "FIRST_RUN_HEADER",
    "OUTAGE_ERRORS",
    "RESUME_DEADLINE",
    "SfoxTask",
    "broker_countdown",
    "delays_at_broker",
    "resume_refusal",
]

logger = logging.getLogger("tasks.outage")

#: Outages of Redis or the broker that outlived the retries in place: waits, never failures.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (*STORE_ERRORS, OperationalError)

#: Attribute of a task's request holding its last checkpoint.
_CHECKPOINT = "sfox_checkpoint"

#: Seconds from a task's first run within which it may go back to the broker to wait (a
#: long ``Retry-After``, the limiter, the end of its turn, Redis or the broker away); a
#: resume that would start later fails the task instead. An hour: sFOX's own waits end
#: sooner (``SFOX_RETRY_DEADLINE``, 900 s), so this bounds the waits nothing else does,
#: an outage above all. A task class sets its own as ``resume_deadline``.
RESUME_DEADLINE = 3600.0
#: Message header holding when (epoch seconds) the task first ran, kept across resumes.
FIRST_RUN_HEADER = "sfox_first_run"
#: Attribute of a task's request holding its first run's time, once looked up.
_FIRST_RUN = "sfox_first_run_at"


def resume_refusal(
    name: str, *, first_run: float, now: float, countdown: float, deadline: float, reason: str
) -> RetriesExhausted | None:
    """The failure of a task whose resume in ``countdown`` s would pass ``deadline``; else None.

    The message says how long the task has waited, the bound it met, and what it
    was waiting for, so that the failure carries its reason.
    """
    if now + max(0.0, countdown) - first_run <= deadline:
        return None
    return RetriesExhausted(
        f"{name} gave up after {now - first_run:.0f} s: resuming in {countdown:.0f} s "
        f"would pass its {deadline:g} s resume deadline (resume_deadline); "
        f"it was waiting for: {reason}"
    )


def delays_at_broker(app: Celery) -> bool:
    """Whether ``app`` sends countdowns to RabbitMQ's native delayed delivery.

    Celery's own test (5.5+, in ``send_task``): an AMQP broker and a quorum queue
    among the app's queues. Its delayed delivery counts whole seconds.
    """
    if app.conf.task_always_eager or detect_quorum_queues is None:
        return False
    driver = app.producer_pool.connections.connection.transport.driver_type
    found, _ = detect_quorum_queues(app, driver)
    return bool(found)


def broker_countdown(countdown: float) -> int:
    """``countdown`` as native delayed delivery can hold it: whole seconds, at least 1.

    Rounded up, never down: a wait the caller was told to take (a ``Retry-After``,
    the limiter's next slot) is never cut short.
    """
    return max(1, math.ceil(countdown))


class SfoxTask(Task):  # type: ignore[misc]
    """A package task: sent to ``SFOX_QUEUE``, acked late, resumed from the broker."""

    acks_late = True
    #: Celery's counter is off: ``resume_deadline`` bounds every return to the broker.
    max_retries = None
    #: Seconds from the first run within which the task may resume from the broker.
    resume_deadline: float = RESUME_DEADLINE
    #: The wall clock the resume deadline is read on (a test may set its own).
    clock = staticmethod(time.time)

    #: Whose work this is: batch (a fan-out's chunks, the nightly run) unless a task says.
    lane: Lane = BATCH

    @property
    def queue(self) -> Any:
        """Where this task's lane goes, as this task's app resolves and declares it."""
        return queue_for(self.app, self.lane)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        marked = (options.get("headers") or {}).get(LANE_HEADER)
        if marked in LANES and not options.get("queue"):
            options["queue"] = queue_for(self.app, marked)
        countdown = options.get("countdown")
        if countdown and countdown > 0 and delays_at_broker(self.app):
            options["countdown"] = broker_countdown(countdown)
        return super().apply_async(args, kwargs, **options)

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Progress to resume from if this run must go back to the broker."""
        setattr(self.request, _CHECKPOINT, state)

    def last_checkpoint(self) -> dict[str, Any] | None:
        """The progress :meth:`checkpoint` recorded last in this run, if any."""
        state: dict[str, Any] | None = getattr(self.request, _CHECKPOINT, None)
        return state

    def first_run_at(self) -> float:
        """When this task first ran (epoch seconds): its header, else this run's start."""
        known: float | None = getattr(self.request, _FIRST_RUN, None)
        if known is None:
            carried = self.request.get(FIRST_RUN_HEADER)
            known = float(carried) if carried is not None else self.clock()
            setattr(self.request, _FIRST_RUN, known)
        return known

    def resume_headers(self) -> dict[str, Any]:
        """The headers a resume of this task is sent with: its own, and its first run's time."""
        return {**(self.request.headers or {}), FIRST_RUN_HEADER: self.first_run_at()}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request_stack.top is None:  # called directly, outside a worker
            return super().__call__(*args, **kwargs)
        self.first_run_at()
        try:
            return self.run(*args, **kwargs)
        except Deferred as deferred:
            logger.info(
                "%s[%s] resumes from the broker in %.1f s (%s)",
                self.name,
                self.request.id,
                deferred.countdown,
                deferred.reason,
            )
            raise self._resume_later(
                kwargs, deferred.state, deferred.countdown, deferred.reason
            ) from None
        except OUTAGE_ERRORS as exc:
            away = "Redis" if isinstance(exc, STORE_ERRORS) else "the broker"
            logger.warning(
                "%s[%s]: %s unreachable past its retries (%s); resuming from the broker in %.0f s",
                self.name,
                self.request.id,
                away,
                type(exc).__name__,
                REDIS_OUTAGE_COUNTDOWN,
            )
            state = self.last_checkpoint() or kwargs.get("_resume")
            raise self._resume_later(
                kwargs, state, REDIS_OUTAGE_COUNTDOWN, f"{away} ({type(exc).__name__})"
            ) from None

    def _resume_later(
        self, kwargs: dict[str, Any], state: dict[str, Any] | None, countdown: float, reason: str
    ) -> Exception:
        """The retry that resumes this run from the broker, or its failure past the deadline."""
        refused = resume_refusal(
            self.name,
            first_run=self.first_run_at(),
            now=self.clock(),
            countdown=countdown,
            deadline=self.resume_deadline,
            reason=reason,
        )
        if refused is not None:
            logger.error("%s[%s]: %s", self.name, self.request.id, refused.message)
            return refused
        new_kwargs = {k: v for k, v in kwargs.items() if k != "_resume"}
        if state is not None:
            new_kwargs["_resume"] = state
        try:
            return self.retry(  # type: ignore[no-any-return]
                kwargs=new_kwargs,
                countdown=max(0.0, countdown),
                kwargsrepr="{" + ", ".join(f"{k}: …" for k in new_kwargs) + "}",
                headers=self.resume_headers(),
                throw=False,
            )
        except Reject as reject:
            # The retry could not be published: keep the message at the broker instead.
            logger.warning("%s[%s]: left at the broker for redelivery", self.name, self.request.id)
            return cast(Exception, Reject(reject.reason, requeue=True))
