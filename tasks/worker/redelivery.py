"""A mint delivered again runs once: it answers from its first run's result.

A broker delivers a message again when it never received the acknowledgement:
RabbitMQ requeues every unacknowledged message of a channel that closes, with
the task still running in its pool process or just ended, its ack lost with the
connection (Celery 5 lets running tasks go on after a lost connection). Run
again, a mint would spend sFOX's budget on the very tokens its first run minted.

Celery's own answer, ``worker_deduplicate_successful_tasks`` (``celery.app.trace``),
is an option of the app that runs the task, which a partner's app does not set;
it looks only at messages marked redelivered (a publish sent again after a lost
confirm is not), and only at runs that have ended. So :class:`MintOnce`, the
base of the mint task, does the same itself, for every delivery:

1. **a finished run's result.** A SUCCESS stored under the task id is the answer:
   nothing is minted, one INFO line says so. A message delivered again keeps its
   task id, and so does a retry, whose id holds ``RETRY`` until the task ends.
   Celery's key-value backends (Redis) keep a SUCCESS once stored, whatever is
   stored later for the id (the ``STARTED`` of the run delivered again included).
2. **a run under way.** Each run holds a claim on its task id in the limiter's
   Redis (``sfox:mint-run:<id>``, at most :func:`run_bound` seconds). A delivery
   that finds the claim held waits, polling, for that run's result and answers
   from it. A run that ends in success leaves its claim to expire, so a delivery
   that comes between the run's end and Celery storing its result still waits for
   it; a run that goes back to the broker gives its claim up before its retry is
   sent, and one that fails, as it fails. A claim whose holder died expires within
   :func:`run_bound`: the delivery waiting on it then mints.

Not covered: a copy of a message whose run went back to the broker
(:class:`~tasks.minting.Deferred`), delivered again while the retry is pending,
mints beside that retry; a result gone after ``SFOX_TOKEN_RESULT_TTL``, not
stored (``ignore_result``), or on a backend that lets a later state overwrite a
SUCCESS (a database backend with ``task_track_started``) cannot answer: the
delivery then waits out the finished run's claim and mints.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal, cast

from celery import states
from celery.backends.base import DisabledBackend
from celery.exceptions import BackendGetMetaError
from redis.exceptions import LockError
from redis.lock import Lock

from .._exceptions import ConfigurationError
from .._redis import STORE_ERRORS
from .._settings import Settings
from ..minting import MintResult
from .base import SfoxTask
from .outcome import MintOutcome
from .runtime import get_runtime

__all__ = ["CLAIM_POLL", "MintOnce", "run_bound", "stored_success"]

logger = logging.getLogger("tasks.mint")

#: Seconds between two looks at a run under way, waiting for its result.
CLAIM_POLL = 0.2
#: Seconds added to a run's longest plausible length, for a claim's life.
CLAIM_MARGIN = 5.0
#: The claim of one task id on a run.
_CLAIM_KEY = "sfox:mint-run:{}"
#: Attribute of a task's request holding its run's claim.
_CLAIM = "sfox_claim"
#: Failures to read the stored result: the task then runs as if none were stored.
_READ_ERRORS: tuple[type[Exception], ...] = (*STORE_ERRORS, BackendGetMetaError)
#: Failures to give a claim up: it expires within run_bound all the same.
_RELEASE_ERRORS: tuple[type[Exception], ...] = (LockError, *STORE_ERRORS)


def run_bound(settings: Settings) -> float:
    """Seconds one run of a mint lasts at most: its turn, a request in flight, a wait in place."""
    request = settings.connect_timeout + settings.read_timeout
    return settings.task_turn + request + settings.retry.inprocess_wait_max + CLAIM_MARGIN


def stored_success(task: Any, *, warn: bool = True) -> Mapping[str, Any] | None:
    """The mint result ``task``'s id already stored as SUCCESS, if any; None otherwise.

    A backend that cannot be read right now answers None (with a warning, if
    ``warn``): the task runs, as it would have without this check.
    """
    request = task.request
    backend = task.backend
    if isinstance(backend, DisabledBackend) or not getattr(backend, "persistent", False):
        return None
    try:
        meta = backend.get_task_meta(request.id, cache=False)
    except _READ_ERRORS as exc:
        if not warn:
            return None
        logger.warning(
            "%s[%s]: could not read a stored result (%s); running it",
            task.name,
            request.id,
            type(exc).__name__,
        )
        return None
    result = meta.get("result") if meta.get("status") == states.SUCCESS else None
    if not isinstance(result, Mapping) or "tokens" not in result or "failed" not in result:
        return None
    return result


class MintOnce(SfoxTask):
    """A package task whose deliveries of one task id run once (see the module's docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if self.request_stack.top is None or request.is_eager or not request.id:
            return super().__call__(*args, **kwargs)
        stored, claim = self._stored_or_claim()
        if stored is not None:
            logger.info(
                "%s[%s] delivered again after it ran: answered from its stored result, "
                "nothing minted",
                self.name,
                request.id,
            )
            return MintOutcome(cast(MintResult, stored))
        setattr(request, _CLAIM, claim)
        try:
            return super().__call__(*args, **kwargs)
        except BaseException:
            self._give_up_claim()  # failed: a redelivery may run now
            raise

    def _resume_later(
        self, kwargs: dict[str, Any], state: dict[str, Any] | None, countdown: float, reason: str
    ) -> Exception:
        # Given up before the retry is sent (or the task fails), so that no run finds it held.
        self._give_up_claim()
        return super()._resume_later(kwargs, state, countdown, reason)

    def _give_up_claim(self) -> None:
        claim: Lock | None = getattr(self.request, _CLAIM, None)
        setattr(self.request, _CLAIM, None)
        if claim is not None:
            with contextlib.suppress(*_RELEASE_ERRORS):  # already expired, or Redis away
                claim.release()

    def _stored_or_claim(self) -> tuple[Mapping[str, Any] | None, Lock | None]:
        """The stored result of this task id, else a claim on running it (None: run unclaimed)."""
        bound = run_bound(get_runtime(self.app).settings)
        deadline = time.monotonic() + bound
        waiting = False
        while True:
            stored = stored_success(self, warn=not waiting)
            if stored is not None:
                return stored, None
            claim = self._claim(bound)
            if claim is not False:
                return None, claim
            if time.monotonic() >= deadline:
                logger.warning(
                    "%s[%s]: another run of it still holds it after %.0f s; running it",
                    self.name,
                    self.request.id,
                    bound,
                )
                return None, None
            if not waiting:
                waiting = True
                logger.info(
                    "%s[%s] delivered again while a run of it is under way: waiting for its result",
                    self.name,
                    self.request.id,
                )
            time.sleep(CLAIM_POLL)

    def _claim(self, bound: float) -> Lock | Literal[False] | None:
        """A claim on this task id (a Lock), False when another run holds it, None: no claims."""
        try:
            client = get_runtime(self.app).redis
        except ConfigurationError:
            return None  # an in-process broker and budget: no second worker to meet
        claim = client.lock(_CLAIM_KEY.format(self.request.id), timeout=bound, thread_local=False)
        try:
            return claim if claim.acquire(blocking=False) else False
        except STORE_ERRORS as exc:
            logger.warning(
                "%s[%s]: Redis unreachable for its claim (%s); running it unclaimed",
                self.name,
                self.request.id,
                type(exc).__name__,
            )
            return None
