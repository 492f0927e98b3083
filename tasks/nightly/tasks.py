"""The nightly run: one recurring order per user, exactly once, on an at-least-once queue.

``sfox.run_nightly_orders`` (fired by beat, the CLI, or anyone) coordinates a
run for one date, in short *turns*: no run of the task holds its message for
longer than ``SFOX_TASK_TURN`` (plus a second), however many users the night
has, so RabbitMQ's ``consumer_timeout`` never ends a worker and Redis'
visibility timeout never hands the coordinator to a second worker.

1. **take** the date (:meth:`~tasks.nightly.store.NightlyRun.take`): the first
   task to claim it owns the run, and its coordinator holds a lease, renewed
   within each turn and kept for its own next turn between turns. A later
   trigger does nothing, and says so, while that lease is live or once the run
   finished, before any sFOX request. When the run is unfinished and the lease
   is gone (the coordinator failed, or its message was lost, and no one renewed
   the lease for a whole lease period), the trigger takes the run over and goes
   on where the books stand. A run that fails before its orders are staged (no
   orders file, a bad one) gives the date up at once: a trigger after the fix
   runs it;
2. **stage** the orders in Redis (idempotent: each order once, keyed by its
   deterministic ``client_order_id``); malformed rows are kept as errors;
3. **fan out** through :class:`tasks.fanout.api.FanOut`: tokens are minted
   chunk by chunk in step with the order tasks, and each user's
   ``sfox.place_user_order`` gets that user's sealed token. From then on the
   run proceeds by itself;
4. **watch** it, a turn at a time: each turn reports ``PROGRESS`` (done /
   total) for Flower, hands lost chunks back, and comes back after
   :data:`TURN_COUNTDOWN` s as a retry of the same task; the turn that finds
   every user done writes and returns the summary.

What a trigger returns, by ``status``:

- ``done``: the run's summary (this task finished the run, or resumed and finished it);
- ``skipped``: the date's run had finished already: nothing was done;
- ``under_way``: another task's coordinator works on the date (its lease is
  live): nothing was done; ``owner`` names that task;
- ``handed_over``: this task owned the run, stood still past its lease, and a
  later trigger (``owner``) took the run over: this task stops;
- ``not_configured``: no orders are configured (neither
  ``SFOX_NIGHTLY_ORDERS_FILE`` nor ``SFOX_NIGHTLY_ORDERS_SOURCE``), none were
  given (``orders_file``) and none are staged for the date: nothing was claimed
  or started, and one warning says which settings to set;
- ``unfinished``: one coordinator watched the run for :data:`RUN_DEADLINE` s
  and it is still not finished: it stops, and the next trigger for the date
  resumes it;
- ``lost``: Redis evicted part of the run's records (or of its fan-out's books):
  the summary's ``lost`` lists what, its counts are what was left, and every later
  trigger for the date says ``lost`` too, never ``done`` (its records would not
  tell which orders were placed).

Every verdict but ``done`` carries a ``reason``. A failure (a bad orders file, a
bad source) fails the task.

Each order's outcome is written once (a placement always wins over the
"already placed" of a concurrent duplicate), a resumed run places no order
that has an outcome, and sFOX itself refuses a reused ``client_order_id``
within 24 hours, so a crash or a take-over anywhere places no order twice. The
summary accounts for every staged order: one the run could not place, or that
has no outcome at all, is counted as failed with its reason, never left out.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from celery import Task

from .._exceptions import InvalidArgument, SfoxError
from .._redis import STORE_ERRORS
from .._settings import Settings
from ..budget.ratelimit import LimiterWait
from ..budget.retry import Defer
from ..fanout.api import FanOut, RunProgress
from ..minting import Deferred
from ..sfox.orders import OrderOutcome, TokenHolder
from ..worker.base import SfoxTask
from ..worker.host import calling_app, package_task
from ..worker.mint import TASK_TIME_LIMIT
from ..worker.outcome import ShortRepr, summarise_nightly
from ..worker.runtime import get_runtime
from .orders import load_orders
from .store import Claim, NightlyRun, RunBooks

if TYPE_CHECKING:
    from ..worker.host import TaskDecorator

__all__ = ["RunState", "place_user_order", "run_nightly_orders", "run_state"]

logger = logging.getLogger("tasks.nightly")

#: Seconds between looks at the run's progress within a turn: how late its end is seen.
POLL_INTERVAL = 0.25
#: Seconds between progress reports, lease renewals and sweeps within a turn.
REPORT_INTERVAL = 1.0
#: Seconds between one turn of the coordinator and the next.
TURN_COUNTDOWN = 1.0
#: Most order tasks sent again in one turn.
MAX_RESEND = 1000
#: Seconds one coordinator task watches a run before it stops and leaves the rest to the
#: next trigger for the date: under a day, so that no night's coordinator outlives the next's.
RUN_DEADLINE = 20 * 3600.0

#: Where the nightly orders are configured, for the message that says none are.
_WHERE_ORDERS = (
    "set SFOX_NIGHTLY_ORDERS_FILE (a CSV or .jsonl file) or SFOX_NIGHTLY_ORDERS_SOURCE "
    "(module:function), in the app's configuration (sfox_nightly_orders_file; "
    "CELERY_SFOX_NIGHTLY_ORDERS_FILE in Django settings) or the environment, "
    "or give orders_file"
)


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
    #: The run's own bound (``RUN_DEADLINE``) ends it as ``unfinished``; this one, an hour
    #: later, ends a coordinator that cannot even reach its books (Redis away) to say so.
    resume_deadline = RUN_DEADLINE + 3600.0

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        options.setdefault("kwargsrepr", _kwargsrepr(kwargs or {}))
        return super().apply_async(args, kwargs, **options)


@dataclass
class _Carried:
    """What a coordinator carries from one turn to the next (its ``_resume``)."""

    #: Fixed by the first turn: a later turn after midnight is the same run.
    run_date: str
    #: ``time.time()`` past which this task stops watching the run (:data:`RUN_DEADLINE`).
    deadline: float
    #: Whether this task owns the run (it took the date in an earlier turn).
    owned: bool = False
    #: Whether this task saw the run's orders staged: records found missing then are lost.
    staged: bool = False


# Typed for users who have Celery's stubs: ``.get()`` is the summary (tasks.worker.host).
@cast(
    "TaskDecorator[..., Mapping[str, Any]]",
    package_task(bind=True, base=NightlyTask, name="sfox.run_nightly_orders"),
)
def run_nightly_orders(
    self: NightlyTask,
    run_date: str | None = None,
    orders_file: str | None = None,
    _resume: dict[str, Any] | None = None,
) -> Mapping[str, Any]:
    """Place the date's orders, each once; return the summary, or what the trigger found.

    A turn at a time (the module's docstring lists every ``status``). ``_resume``
    is the coordinator's own state from its last turn.
    """
    resume = _resume or {}
    carried = _Carried(
        run_date=date.fromisoformat(
            resume.get("run_date") or run_date or _today().isoformat()
        ).isoformat(),
        deadline=float(resume.get("deadline") or time.time() + RUN_DEADLINE),
        owned=bool(resume.get("owned")),
        staged=bool(resume.get("staged")),
    )
    self.checkpoint(asdict(carried))
    day = date.fromisoformat(carried.run_date)
    runtime = get_runtime(self.app)
    settings = runtime.settings
    run = NightlyRun(runtime.redis, day)
    # Orders are needed only to stage them: a run staged already is resumed without any.
    if not (orders_file or settings.nightly.configured or carried.owned or run.flag("staged")):
        return _short(self, _not_configured(day))
    task_id = self.request.id or uuid.uuid4().hex
    token = uuid.uuid4().hex
    claim = run.take(task_id, token, settings.nightly.lease)
    found = _nothing_to_do(run, claim, carried.owned)
    if found is not None:
        return _short(self, found)
    carried.owned = True
    self.checkpoint(asdict(carried))
    run.activate()
    if claim.verdict == "busy":
        # Another copy of this very task holds the lease (a redelivery): let it work.
        logger.info("nightly run for %s: another copy is working; checking again later", day)
        if time.time() >= carried.deadline:
            return _short(self, _unfinished(day))
        raise _next_turn(self, carried, orders_file, settings.nightly.lease)
    if claim.verdict == "took":
        logger.warning(
            "nightly run for %s: the coordinator of task %s is gone; task %s resumes the run "
            "where it stands",
            day,
            claim.owner,
            task_id,
        )
    return _coordinate(self, run, token, carried, orders_file, settings)


def _not_configured(day: date) -> dict[str, Any]:
    logger.warning(
        "nightly run for %s not started: no nightly orders are configured; %s",
        day,
        _WHERE_ORDERS,
    )
    return _verdict(day, "not_configured", f"no nightly orders are configured: {_WHERE_ORDERS}")


def _nothing_to_do(run: NightlyRun, claim: Claim, owned: bool) -> dict[str, Any] | None:
    """What a trigger that may not run the date returns (and logs); None if it may."""
    day = run.day
    if claim.verdict == "finished":
        lost = json.loads(run.flag("summary") or "{}").get("lost")
        if lost:
            return _lost(day, lost)
        logger.warning(
            "nightly run for %s is done already (task %s): nothing to do", day, claim.owner
        )
        return _verdict(day, "skipped", f"the run for {day} is done", claim.owner)
    if claim.verdict != "under_way":
        return None
    if owned:
        logger.warning(
            "nightly run for %s was taken over by task %s: this coordinator stops",
            day,
            claim.owner,
        )
        reason = f"the run for {day} was taken over by task {claim.owner}"
        return _verdict(day, "handed_over", reason, claim.owner)
    logger.warning("nightly run for %s is under way (task %s): nothing to do", day, claim.owner)
    return _verdict(
        day, "under_way", f"the run for {day} is under way (task {claim.owner})", claim.owner
    )


def _coordinate(
    task: NightlyTask,
    run: NightlyRun,
    token: str,
    carried: _Carried,
    orders_file: str | None,
    settings: Settings,
) -> Mapping[str, Any]:
    """One turn of the run's coordinator, holding the lease ``token``."""
    task_id = task.request.id or ""
    lease_seconds = settings.nightly.lease
    turn_ends = time.monotonic() + settings.task_turn
    kept = False  # the lease is kept for this task's next turn
    try:
        if time.time() >= carried.deadline:
            return _short(task, _unfinished(run.day))
        if run.flag("staged") is None:
            if run.lost(staged=carried.staged):
                # Staging again would place the date's orders again, blind: the run ends
                # lost, and its summary tells every later trigger so.
                return _short(task, _finish(run, FanOut(task.app, run.fanout_id)))
            _stage(run, task_id, token, orders_file, settings)
        carried.staged = True
        fan = FanOut(task.app, run.fanout_id)
        if run.flag("dispatched") is None:
            downstream = task.app.signature(
                "sfox.place_user_order", kwargs={"run_date": run.day.isoformat()}
            )
            fan.start(
                downstream, run.iter_users(), total=run.user_count(), chunk_size=settings.batch_size
            )
            run.set_flag("dispatched", "1")
        ended = _watch(task, run, fan, token, turn_ends, settings)
        if ended == "lease_lost":
            # This turn stood still past its lease: whoever holds it now goes on.
            raise _next_turn(task, carried, orders_file, lease_seconds)
        if ended == "turn_over":
            run.hand_over(token, task_id, lease_seconds)
            kept = True
            raise _next_turn(task, carried, orders_file, TURN_COUNTDOWN)
        return _short(task, _finish(run, fan))
    finally:
        if not kept:
            try:
                run.drop_lease(token)
            except STORE_ERRORS:  # it expires by itself within the lease's seconds
                logger.warning("nightly run for %s: could not drop the lease", run.day)


def _watch(
    task: NightlyTask,
    run: NightlyRun,
    fan: FanOut,
    token: str,
    turn_ends: float,
    settings: Settings,
) -> str:
    """Watch the run until it finishes or the turn ends: ``finished``, ``turn_over`` or
    ``lease_lost``. Looks every :data:`POLL_INTERVAL`, so that the run's end is seen
    within a quarter of a second; reports progress, renews the lease and hands lost
    chunks and order tasks back every :data:`REPORT_INTERVAL`."""
    total = run.user_count()
    reported = -REPORT_INTERVAL
    while True:
        due = time.monotonic() - reported >= REPORT_INTERVAL
        if due and not run.lease_for(token, settings.nightly.lease):
            return "lease_lost"
        progress = fan.progress()
        done = min(total, progress.done + progress.failed)
        finished = total == 0 or progress.finished or bool(progress.lost)
        if due or finished:
            task.update_state(
                state="PROGRESS",
                meta={"run_date": run.day.isoformat(), "done": done, "total": total},
            )
            task.send_event("task-progress", done=done, total=total)
        if finished:
            return "finished"
        if due:
            reported = time.monotonic()
            sent = fan.sweep()
            if sent:
                logger.warning(
                    "nightly run for %s: sending %d chunk(s) again (lost, or taken and never sent)",
                    run.day,
                    sent,
                )
            _resend_if_stalled(fan, run, progress, settings.nightly.resend_after)
        if time.monotonic() + POLL_INTERVAL >= turn_ends:
            return "turn_over"
        time.sleep(POLL_INTERVAL)


def _finish(run: NightlyRun, fan: FanOut) -> dict[str, Any]:
    """Write the finished run's summary (from then on every trigger is skipped); return it.

    A run whose records (or fan-out books) Redis lost ends ``lost``, never ``done``.
    """
    started = run.flag("started")
    progress = fan.progress()
    lost = [*run.lost(staged=True), *(f"fan-out: {what}" for what in progress.lost)]
    summary = run.summary(
        "lost" if lost else "done",
        float(started) if started else None,
        refused=fan.refused(),
        tokens_dispatched=progress.dispatched,
    )
    if lost:
        summary.update(_lost(run.day, lost))
    run.close(summary)
    fan.close()
    logger.info(
        "nightly run for %s %s: %d placed, %d already placed, %d failed, %d users",
        run.day,
        summary["status"],
        summary["placed"],
        summary["already_placed"],
        summary["failed_orders"],
        summary["users"],
    )
    return summary


def _stage(
    run: NightlyRun, task_id: str, token: str, orders_file: str | None, settings: Settings
) -> None:
    """Stage the date's orders; if they cannot be read, give the date up before raising."""
    if orders_file:
        run.set_flag("orders_file", orders_file)
    if run.flag("started") is None:
        run.set_flag("started", str(time.time()))
    try:
        orders, errors = run.stage(
            load_orders(
                path=orders_file or settings.nightly.orders_file,
                source=None if orders_file else settings.nightly.orders_source,
            )
        )
    except Exception:
        try:
            run.release(task_id, token)
        except STORE_ERRORS:  # the lease expires by itself; a later trigger takes the date
            logger.warning("nightly run for %s: could not give the date up", run.day)
        raise
    run.mark_staged(orders)
    logger.info(
        "nightly run for %s: %d order(s) for %d user(s) staged, %d row(s) skipped",
        run.day,
        orders,
        run.user_count(),
        errors,
    )


def _resend_if_stalled(fan: FanOut, run: NightlyRun, progress: RunProgress, after: float) -> None:
    """Send again the order tasks of users not done, once the run has stood still ``after`` s.

    Only once every chunk is minted (a chunk still minting is the fan-out's to
    finish); the clock restarts at each user done, and at each resend. Each goes
    out as a new task, and runs: one whose first task was only slow runs twice,
    and its orders are still placed once (outcomes recorded once, sFOX refusing
    a reused ``client_order_id``).
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
    missing = run.users_not_in(fan.ended(), MAX_RESEND)
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
    fan.resend(missing)


def _next_turn(
    task: NightlyTask, carried: _Carried, orders_file: str | None, countdown: float
) -> Any:
    """The coordinator's next turn: the same task, back from the broker in ``countdown`` s."""
    kwargs: dict[str, Any] = {"run_date": carried.run_date, "_resume": asdict(carried)}
    if orders_file:
        kwargs["orders_file"] = orders_file
    return task.retry(
        kwargs=kwargs,
        countdown=countdown,
        kwargsrepr=_kwargsrepr(kwargs),
        headers=task.resume_headers(),
        throw=False,
    )


def _verdict(day: date, status: str, reason: str, owner: str | None = None) -> dict[str, Any]:
    """What a trigger that ran no part of the run returns."""
    found: dict[str, Any] = {"run_date": day.isoformat(), "status": status, "reason": reason}
    if owner:
        found["owner"] = owner
    return found


def _unfinished(day: date) -> dict[str, Any]:
    logger.warning(
        "nightly run for %s: not finished after %.0f s of this coordinator; it stops, and the "
        "next trigger for the date resumes the run",
        day,
        RUN_DEADLINE,
    )
    reason = (
        f"the run for {day} is not finished after {RUN_DEADLINE:.0f} s: trigger it again "
        f"to go on (sfox-tokens nightly --date {day} --resume)"
    )
    return _verdict(day, "unfinished", reason)


def _lost(day: date, lost: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A run Redis lost records of: logged at ERROR, and what every trigger says of it."""
    logger.error(
        "nightly run for %s is lost: Redis evicted %s; set its maxmemory-policy to noeviction",
        day,
        "; ".join(lost),
    )
    reason = (
        f"Redis evicted records of the run for {day} ({'; '.join(lost)}): which orders were "
        "placed is not known from them; see sFOX's orders for the date"
    )
    return {**_verdict(day, "lost", reason), "lost": list(lost)}


def _short(task: Task, summary: dict[str, Any]) -> Mapping[str, Any]:
    """In a worker, the summary with a one-line repr for Celery's event and Flower."""
    if task.request.called_directly or task.request.is_eager:
        return summary
    return ShortRepr(summary, summarise_nightly(summary))


@dataclass(frozen=True)
class RunState:
    """Where a date's run stands: its records, and its fan-out's progress once started."""

    books: RunBooks
    progress: RunProgress | None
    #: What of the run's records Redis lost (evicted); empty when they are whole.
    lost: tuple[str, ...] = ()


def run_state(day: date, app: Any = None) -> RunState:
    """Where the run for ``day`` stands, read from the books in ``app``'s Redis."""
    app = app if app is not None else calling_app()
    run = NightlyRun(get_runtime(app).redis, day)
    books = run.books()
    progress = FanOut(app, run.fanout_id).progress() if books.dispatched else None
    return RunState(books, progress, run.lost())


class PlaceTask(SfoxTask):
    """Base of the order task."""

    time_limit = TASK_TIME_LIMIT


# Typed for users who have Celery's stubs: ``.get()`` is the user's outcomes.
@cast(
    "TaskDecorator[..., dict[str, Any]]",
    package_task(bind=True, base=PlaceTask, name="sfox.place_user_order"),
)
def place_user_order(
    self: PlaceTask,
    run_date: str,
    user_token: dict[str, Any],
    _resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Place the user's nightly order(s) with the user's token, each exactly once.

    ``_resume`` carries the user's (sealed) token, the outcomes not yet recorded
    and the retry budget of the order in progress when the task went back to the
    broker (a long wait, the end of its turn, a Redis outage): an order placed
    before is recorded, never sent again, and a resumed order keeps its deadline.
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
    placer = runtime.placer(on_remint=run.count_remint)
    # The budget of the order in progress (SFOX_RETRY_DEADLINE from its first attempt).
    budget = placer.budget(resume["budget"]) if resume.get("budget") else None

    def checkpoint() -> None:
        self.checkpoint(
            {
                "token": {"token": holder.sealed, "expires": holder.expires},
                "reminted": holder.reminted,
                "unrecorded": dict(unrecorded),
                "budget": budget.to_json() if budget is not None else None,
            }
        )

    checkpoint()
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
        budget = budget or placer.budget()
        try:
            outcome = placer.place(holder, order.side, order.body(day), budget)
        except (Defer, LimiterWait) as wait:
            # Placing never mints a list, so these two are the only long waits it meets.
            checkpoint()
            countdown = wait.countdown if isinstance(wait, Defer) else wait.seconds
            raise Deferred(countdown, wait.reason, self.last_checkpoint() or {}, False) from None
        except SfoxError as exc:
            outcome = OrderOutcome("failed", exc.message)
        budget = None  # the next order's attempts and deadline are its own
        unrecorded[coid] = [outcome.status, outcome.reason]
        checkpoint()
        run.record(coid, user_id, outcome)
        del unrecorded[coid]
        checkpoint()
        counts[outcome.status] += 1
        if outcome.status == "failed":
            logger.warning("user %s: order %s failed: %s", user_id, coid, outcome.reason)
    return {"user_id": user_id, **counts}
