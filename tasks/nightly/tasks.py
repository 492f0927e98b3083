"""The nightly run: one recurring order per user, exactly once, on an at-least-once queue.

``sfox.run_nightly_orders`` (fired by beat, the CLI, or anyone) coordinates a
run for one date, in short *turns*: no run of the task holds its message for
longer than ``SFOX_TASK_TURN`` (plus a second), however many users the night
has, so RabbitMQ's ``consumer_timeout`` never ends a worker and Redis'
visibility timeout never hands the coordinator to a second worker.

1. **claim** the date: the first task id to claim it owns the run; any other
   trigger for that date does nothing and says so, before any sFOX request.
   The owner's own later turns (same task id) go on with the run;
2. **stage** the orders in Redis (idempotent: each order once, keyed by its
   deterministic ``client_order_id``); malformed rows are kept as errors;
3. **fan out** through :mod:`tasks.fanout.tasks`: tokens are minted chunk by chunk in
   step with the order tasks, and each user's ``sfox.place_user_order`` gets
   that user's sealed token. From then on the run proceeds by itself;
4. **watch** it, a turn at a time: each turn reports ``PROGRESS`` (done /
   total) for Flower, hands lost chunks back, and comes back after
   :data:`TURN_COUNTDOWN` s as a retry of the same task; the turn that finds
   every user done returns the summary.

A lease (renewed while a turn lives) keeps two copies of the coordinator from
working at once. Each order's outcome is written once (a placement always
wins over the "already placed" of a concurrent duplicate), and sFOX itself
refuses a reused ``client_order_id`` within 24 hours, so a crash anywhere
places no order twice. The summary accounts for every staged order: one the
run could not place, or that has no outcome at all, is counted as failed with
its reason, never left out.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from celery import Task

from .._exceptions import InvalidArgument, SfoxError
from .._redis import STORE_ERRORS
from ..budget.ratelimit import LimiterWait
from ..budget.retry import Defer
from ..fanout.store import Chunk, RunProgress
from ..fanout.tasks import (
    CHUNKS_PER_SEGMENT,
    DEFAULT_AHEAD,
    downstream_of,
    downstream_route,
    send_chunks,
    send_downstream,
    stale_after,
)
from ..minting import Deferred
from ..sfox.orders import OrderOutcome, TokenHolder
from ..worker.base import SfoxTask
from ..worker.host import package_task
from ..worker.mint import TASK_TIME_LIMIT
from ..worker.outcome import ShortRepr, summarise_nightly
from ..worker.runtime import get_runtime
from .orders import load_orders
from .store import NightlyRun

__all__ = ["place_user_order", "run_nightly_orders"]

logger = logging.getLogger("tasks.nightly")

#: Seconds between progress reports and lease renewals within a turn.
POLL_INTERVAL = 1.0
#: Seconds between one turn of the coordinator and the next.
TURN_COUNTDOWN = 1.0
#: Most order tasks sent again in one turn.
MAX_RESEND = 1000


def _today() -> date:
    return datetime.now(timezone.utc).date()


def _kwargsrepr(given: Mapping[str, Any]) -> str:
    """What Flower shows: the date and the file's name, not a long path."""
    parts = [f"run_date: {given.get('run_date') or 'today'}"]
    if given.get("orders_file"):
        parts.append(f"orders: {Path(str(given['orders_file'])).name[:40]}")
    return "{" + ", ".join(parts) + "}"


class NightlyTask(SfoxTask):
    """Base of the coordinator: its turns are retries of one task id."""

    time_limit = TASK_TIME_LIMIT

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        options.setdefault("kwargsrepr", _kwargsrepr(kwargs or {}))
        return super().apply_async(args, kwargs, **options)


@package_task(bind=True, base=NightlyTask, name="sfox.run_nightly_orders")
def run_nightly_orders(
    self: NightlyTask,
    run_date: str | None = None,
    orders_file: str | None = None,
    _resume: dict[str, Any] | None = None,
) -> Mapping[str, Any]:
    """Place tonight's orders, each once; return the run's summary (a turn at a time)."""
    # The date is fixed by the first turn: a later turn after midnight is the same run.
    day = date.fromisoformat((_resume or {}).get("run_date") or run_date or _today().isoformat())
    self.checkpoint({"run_date": day.isoformat()})
    runtime = get_runtime(self.app)
    run = NightlyRun(runtime.redis, day)
    task_id = self.request.id or uuid.uuid4().hex

    owner = run.claim(task_id)
    if owner is not None:
        logger.warning(
            "nightly run for %s is already under way or done (task %s): nothing to do",
            day,
            owner,
        )
        return _short(
            self,
            {
                "run_date": day.isoformat(),
                "status": "skipped",
                "reason": f"the run for {day} is already under way or done",
                "owner": owner,
            },
        )

    finished = run.flag("summary")
    if finished:
        return _short(self, json.loads(finished))

    lease = uuid.uuid4().hex
    lease_seconds = runtime.settings.nightly.lease
    if not run.lease_for(lease, lease_seconds):
        # Another copy of this very task is alive (a redelivery): let it work.
        logger.info("nightly run for %s: another copy is working; checking again later", day)
        raise _next_turn(self, day, orders_file, lease_seconds)

    turn_ends = time.monotonic() + runtime.settings.task_turn
    try:
        started = float(run.flag("started") or time.time())
        run.set_flag("started", str(started))
        if run.flag("staged") is None:
            orders, errors = run.stage(
                load_orders(
                    path=orders_file or runtime.settings.nightly.orders_file,
                    source=None if orders_file else runtime.settings.nightly.orders_source,
                )
            )
            run.set_flag("staged", "1")
            logger.info(
                "nightly run for %s: %d order(s) for %d user(s) staged, %d row(s) skipped",
                day,
                orders,
                run.user_count(),
                errors,
            )
        if run.flag("dispatched") is None:
            _dispatch(self.app, run, runtime.settings.batch_size, task_id)
            run.set_flag("dispatched", "1")
        total = run.user_count()
        while True:
            if not run.lease_for(lease, lease_seconds):
                raise _next_turn(self, day, orders_file, lease_seconds)
            progress = run.jit.progress()
            done = min(total, progress.done + progress.failed)
            self.update_state(
                state="PROGRESS", meta={"run_date": day.isoformat(), "done": done, "total": total}
            )
            self.send_event("task-progress", done=done, total=total)
            if total == 0 or progress.finished:
                break
            resent = run.jit.sweep(sender=task_id)
            if resent:
                logger.warning(
                    "nightly run for %s: sending %d chunk(s) again whose chunk task was lost",
                    day,
                    len(resent),
                )
                send_chunks(run.jit, resent, sender=task_id)
            _resend_if_stalled(self.app, run, progress, runtime.settings.nightly.resend_after)
            if time.monotonic() + POLL_INTERVAL >= turn_ends:
                raise _next_turn(self, day, orders_file, TURN_COUNTDOWN)
            time.sleep(POLL_INTERVAL)
        summary = run.summary("done", started)
        run.set_flag("summary", json.dumps(summary))
        logger.info(
            "nightly run for %s done: %d placed, %d already placed, %d failed, %d users",
            day,
            summary["placed"],
            summary["already_placed"],
            summary["failed_orders"],
            summary["users"],
        )
        return _short(self, summary)
    finally:
        try:
            run.drop_lease(lease)
        except STORE_ERRORS:  # it expires by itself within the lease's seconds
            logger.warning("nightly run for %s: could not drop the lease", day)


def _resend_if_stalled(app: Any, run: NightlyRun, progress: RunProgress, after: float) -> None:
    """Send again the order tasks of users not done, once the run has stood still ``after`` s.

    Only once every chunk is minted (a chunk still minting is the fan-out's to
    finish); the clock restarts at each user done, and at each resend.
    """
    if progress.queued_chunks or progress.inflight > 0:
        return
    now = time.time()
    done = progress.done + progress.failed
    mark = run.flag("stall")
    seen_done, since = (int(mark.split(":")[0]), float(mark.split(":")[1])) if mark else (-1, now)
    if done != seen_done:
        run.set_flag("stall", f"{done}:{now}")
        return
    if now - since < after:
        return
    missing = run.users_not_done()[:MAX_RESEND]
    run.set_flag("stall", f"{done}:{now}")
    if not missing:
        return
    logger.warning(
        "nightly run for %s: no user done for %.0f s; sending %d order task(s) again "
        "(their messages were lost, or they wait long): %s",
        run.day,
        now - since,
        len(missing),
        ", ".join(missing[:20]),
    )
    downstream, route = downstream_of(run.jit, app)
    for user_id in missing:
        # No token: the order task mints one for the user (it cannot open an empty seal).
        send_downstream(
            run.jit.run_id,
            downstream,
            {"partner_user_id": user_id, "token": "", "expires": ""},
            route,
        )


def _next_turn(task: NightlyTask, day: date, orders_file: str | None, countdown: float) -> Any:
    """The coordinator's next turn: the same task, back from the broker in ``countdown`` s."""
    kwargs: dict[str, Any] = {"run_date": day.isoformat()}
    if orders_file:
        kwargs["orders_file"] = orders_file
    return task.retry(
        kwargs=kwargs, countdown=countdown, kwargsrepr=_kwargsrepr(kwargs), throw=False
    )


def _short(task: Task, summary: dict[str, Any]) -> Mapping[str, Any]:
    """In a worker, the summary with a one-line repr for Celery's event and Flower."""
    if task.request.called_directly or task.request.is_eager:
        return summary
    return ShortRepr(summary, summarise_nightly(summary))


def _dispatch(app: Any, run: NightlyRun, chunk_size: int, sender: str) -> None:
    """Stage the run's users with the fan-out, a segment at a time."""
    total = run.user_count()
    downstream = app.signature("sfox.place_user_order", kwargs={"run_date": run.day.isoformat()})
    spec = {
        "total": total,
        "budget": DEFAULT_AHEAD * chunk_size,
        "stale_after": stale_after(app),
        "downstream": json.dumps(dict(downstream)),
        "route": json.dumps(downstream_route(downstream)),
    }
    per_segment = chunk_size * CHUNKS_PER_SEGMENT
    for segment, start in enumerate(range(0, total, per_segment)):
        users = [u.decode() for u in run.client.lrange(run.users, start, start + per_segment - 1)]
        chunks = [
            Chunk(start // chunk_size + i, users[i * chunk_size : (i + 1) * chunk_size])
            for i in range((len(users) + chunk_size - 1) // chunk_size)
        ]
        send_chunks(run.jit, run.jit.stage(segment, chunks, spec, sender=sender), sender=sender)


class PlaceTask(SfoxTask):
    """Base of the order task."""

    time_limit = TASK_TIME_LIMIT


@package_task(bind=True, base=PlaceTask, name="sfox.place_user_order")
def place_user_order(
    self: PlaceTask,
    run_date: str,
    user_token: dict[str, Any],
    _resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Place the user's nightly order(s) with the user's token, each exactly once.

    ``_resume`` carries the user's (sealed) token and the outcomes not yet
    recorded when the task went back to the broker (a long wait, the end of its
    turn, a Redis outage): an order placed before is recorded, never sent again.
    """
    if not isinstance(user_token, dict) or not user_token.get("partner_user_id"):
        raise InvalidArgument("place_user_order needs user_token=<an entry from 'tokens'>")
    day = date.fromisoformat(run_date)
    runtime = get_runtime(self.app)
    run = NightlyRun(runtime.redis, day)
    user_id = str(user_token["partner_user_id"])
    resume = _resume or {}
    holder = TokenHolder(user_id, resume.get("token") or user_token)
    holder.reminted = bool(resume.get("reminted"))
    unrecorded: dict[str, list[str]] = dict(resume.get("unrecorded") or {})

    def checkpoint() -> None:
        self.checkpoint(
            {
                "token": {"token": holder.sealed, "expires": holder.expires},
                "reminted": holder.reminted,
                "unrecorded": dict(unrecorded),
            }
        )

    checkpoint()
    placer = runtime.placer(on_remint=run.count_remint)
    counts: dict[str, int] = defaultdict(int)
    for coid, (status, reason) in list(unrecorded.items()):
        run.record(coid, user_id, OrderOutcome(status, reason))
        del unrecorded[coid]
        checkpoint()
        counts[status] += 1
    for coid, order in run.orders_of(user_id):
        if run.outcome(coid) is not None:
            counts["done before"] += 1
            continue
        try:
            outcome = placer.place(holder, order.side, order.body(day))
        except (Defer, LimiterWait) as wait:
            # Placing never mints a list, so these two are the only long waits it meets.
            checkpoint()
            countdown = wait.countdown if isinstance(wait, Defer) else wait.seconds
            raise Deferred(countdown, wait.reason, self.last_checkpoint() or {}, False) from None
        except SfoxError as exc:
            outcome = OrderOutcome("failed", exc.message)
        unrecorded[coid] = [outcome.status, outcome.reason]
        checkpoint()
        run.record(coid, user_id, outcome)
        del unrecorded[coid]
        checkpoint()
        counts[outcome.status] += 1
        if outcome.status == "failed":
            logger.warning("user %s: order %s failed: %s", user_id, coid, outcome.reason)
    return {"user_id": user_id, **counts}
