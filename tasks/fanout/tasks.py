"""Just-in-time fan-out: mint chunk by chunk, in step with the downstream tasks.

:func:`with_user_tokens` returns a Celery group of *segment* tasks; no message
holds more than one segment of user IDs. Each segment stages its chunks in a
Redis list of the run, then the run proceeds by itself:

- a chunk is *released* (handed to a ``sfox.jit_mint_chunk`` task) only while
  fewer than ``ahead`` chunks' worth of users are minted-but-unfinished, so
  tokens are minted in step with their use and none waits in a queue for long;
- a chunk task mints its users (through the shared limiter), sends each
  granted user's ``downstream`` signature with ``user_token=<entry>`` at once,
  to where the downstream's own app routes it (:func:`downstream_route`),
  records the refused users, and releases more chunks;
- each downstream task, when it ends, marks its user done and releases more.
  Every downstream message carries a ``sfox.jit_done`` link and errback bound
  for ``SFOX_QUEUE``, so any worker, one that never imports ``tasks`` too,
  reports the end. A worker that imports ``tasks`` reads the run and user from
  the message's ``sfox_jit`` header and marks a success (or ``Ignore``) itself
  from ``task_postrun``, dropping the link first: one Redis call, no second
  task. Failures go by the errback, which Celery also sends when the worker's
  main process records them (hard time limit, lost worker).

Every counter moves in one Lua script, and moves once however often Celery
redelivers a task or a call is made again after a dropped Redis connection:
segments stage once, chunks finish once, users are done once. A chunk is
minted by one chunk task only, and a chunk task that went back to the broker
after minting resumes with its tokens. Whether a user's downstream task was
sent is the run's books' to say (:mod:`tasks.fanout.dispatched`), not the
transport's: a chunk task that runs again, redelivered or taking over a stale
chunk, skips the users recorded as sent, on any broker. The run's keys expire
after :data:`RUN_TTL` seconds.

Deadlines: a chunk task mints within ``SFOX_RETRY_DEADLINE`` (its carried
budget); a segment or a done mark, which only write the books, go back to the
broker while Redis is away for at most :data:`BOOKS_DEADLINE` s, then fail
naming the outage (their ``resume_deadline``).

Public here are :func:`with_user_tokens` and :func:`run_progress` (exported by
``tasks``) and the tasks, by their ``sfox.*`` names. The package's other parts
drive a run through :mod:`tasks.fanout.api`; every other name of this folder is
the fan-out's own.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, cast

from celery import Task, group, signals
from celery.canvas import Signature
from kombu.entity import Exchange, Queue

from .._exceptions import InvalidArgument
from ..budget.ratelimit import BATCH, Lane
from ..minting import MintResult, validate_user_ids
from ..worker.base import SfoxTask
from ..worker.host import calling_app, package_task, settings_for
from ..worker.lanes import LANE_HEADER, LANES, lane_of
from ..worker.mint import TASK_TIME_LIMIT
from ..worker.runtime import get_runtime
from .dispatched import Dispatched
from .store import Chunk, JitRun, RunProgress

__all__ = ["run_progress", "with_user_tokens"]

logger = logging.getLogger("tasks.jit")

#: Chunks minted ahead of the downstream tasks' progress, by default.
DEFAULT_AHEAD = 4
#: Chunks per segment message.
CHUNKS_PER_SEGMENT = 50
#: Most user IDs one with_user_tokens call accepts.
MAX_RUN_USERS = 1_000_000
#: Message header naming the run and user of a downstream task: ``[run_id, user_id]``.
DONE_HEADER = "sfox_jit"
#: The task that marks a downstream task's user done.
DONE_TASK = "sfox.jit_done"
#: Seconds from its first run a segment or a done mark may wait at the broker for Redis
#: (the run's books) before it fails: its run then stands unfinished, which
#: ``run_progress`` shows.
BOOKS_DEADLINE = 3600.0


def run_for(run_id: str, app: Any = None) -> JitRun:
    """The run's bookkeeping in the Redis of ``app`` (by default the app at hand)."""
    return JitRun(get_runtime(app if app is not None else calling_app()).redis, run_id)


def downstream_of(run: JitRun, celery_app: Any) -> tuple[Signature, dict[str, Any]]:
    """The run's downstream signature, bound to ``celery_app``, and where to send it."""
    spec = run.spec()
    signature = celery_app.signature(json.loads(spec["downstream"]))
    return signature, route_options(json.loads(spec.get("route") or "{}"))


def run_progress(run_id: str) -> RunProgress:
    """Where the ``with_user_tokens`` run ``run_id`` stands; ``.finished`` once it ended.

    ``run_id`` is the one given to :func:`with_user_tokens`, or the ``run_id``
    attribute of the canvas it returned.
    """
    return run_for(run_id).progress()


def segments(user_ids: Iterable[str], chunk_size: int) -> Iterator[list[Chunk]]:
    """``user_ids`` in chunks of ``chunk_size``, :data:`CHUNKS_PER_SEGMENT` chunks a segment.

    Read lazily: no more than one segment of user IDs is held at a time.
    """
    ids = iter(user_ids)
    index = 0
    while True:
        segment: list[Chunk] = []
        while len(segment) < CHUNKS_PER_SEGMENT:
            users = list(islice(ids, chunk_size))
            if not users:
                break
            segment.append(Chunk(index, users))
            index += 1
        if not segment:
            return
        yield segment


def run_spec(
    app: Any,
    downstream: Signature,
    *,
    total: int,
    chunk_size: int,
    ahead: int,
    lane: Lane = BATCH,
) -> dict[str, Any]:
    """What a run's books keep of it: its size, its budget, its downstream, its route, its lane."""
    return {
        "lane": lane,
        "total": total,
        "budget": ahead * chunk_size,
        "stale_after": stale_after(app),
        "downstream": json.dumps(dict(downstream)),
        "route": json.dumps(downstream_route(downstream)),
    }


def stale_after(app: Any) -> float:
    """Seconds after which a released, unfinished chunk is taken as lost.

    Longer than any honest chunk task can take: a redelivery after the
    visibility timeout, plus minting's whole retry deadline, plus a margin.
    """
    options = app.conf.get("broker_transport_options") or {}
    visibility = float(options.get("visibility_timeout", 3600))
    return visibility + settings_for(app).retry.deadline + 60


#: The message options that say where a task goes.
_ROUTING = ("queue", "exchange", "routing_key", "priority")


def downstream_route(downstream: Signature) -> dict[str, Any]:
    """Where ``downstream``'s own app would send it: queue, exchange, routing key, priority.

    Worked out here, in the caller's process, with the signature's app (its
    ``task_routes``, its default queue, the task's own ``queue``), so that the
    package's workers, whose app knows none of that, send it there too. The
    queue keeps its declaration (exchange type, arguments) as JSON.
    """
    owner = downstream.app
    name = downstream.task
    options: dict[str, Any] = {}
    task = owner.tasks.get(name)
    if task is not None:
        exec_options = task._get_exec_options()
        options.update({k: exec_options[k] for k in _ROUTING if exec_options.get(k) is not None})
    options.update({k: downstream.options[k] for k in _ROUTING if downstream.options.get(k)})
    routed = owner.amqp.router.route(options, name, downstream.args, downstream.kwargs)
    route: dict[str, Any] = {}
    queue = routed.get("queue")
    if isinstance(queue, Queue):
        route["queue"] = queue.as_dict(recurse=True)  # type: ignore[no-untyped-call]
    elif isinstance(queue, str):
        route["queue"] = {"name": queue}
    exchange = routed.get("exchange")
    if isinstance(exchange, Exchange):
        exchange = exchange.name
    if exchange is not None:
        route["exchange"] = exchange
    for key in ("routing_key", "priority"):
        if routed.get(key) is not None:
            route[key] = routed[key]
    return route


def route_options(route: Mapping[str, Any]) -> dict[str, Any]:
    """Message options for :meth:`Signature.apply_async` from :func:`downstream_route`."""
    options = {k: v for k, v in route.items() if k != "queue"}
    declared = dict(route.get("queue") or {})
    if not declared:
        return options
    exchange = declared.pop("exchange", None)
    declared.pop("bindings", None)
    if isinstance(exchange, Mapping):
        options["queue"] = Queue(exchange=Exchange(**exchange), **declared)  # type: ignore[no-untyped-call]
    else:
        options["queue"] = declared["name"]
    return options


def with_user_tokens(
    user_ids: Sequence[str],
    downstream: Signature,
    *,
    ahead: int = DEFAULT_AHEAD,
    chunk_size: int | None = None,
    run_id: str | None = None,
    lane: Lane = BATCH,
) -> Signature:
    """A canvas that mints tokens for ``user_ids`` and calls ``downstream`` once per user.

    Each granted user's ``downstream`` is sent with ``user_token=<that user's
    entry from "tokens">`` (sealed) as soon as its chunk is minted, to where the
    downstream's own app routes it; refused users never reach it and are logged
    and kept with the run. At most ``ahead`` chunks are minted ahead of the
    downstream tasks' progress. Bad ``user_ids`` raise :class:`ValueError`
    here, before anything is sent.

    ``lane`` is whose work it is: ``"batch"`` (the default) goes to the batch queue
    and waits in the batch lane at the limiter; ``"on_demand"`` marks a small,
    interactive run (a user waits for it) to go ahead of batch work, as a
    ``sfox.mint_user_tokens`` call does.

    A downstream task marks its user done when it ends, on any worker: one
    that imports ``tasks`` does it in place (one Redis call), any other sends a
    small ``sfox.jit_done`` task to ``SFOX_QUEUE`` (its link and errback). The
    returned canvas has the run's id as ``.run_id``; :func:`run_progress` reads
    where the run stands.
    """
    ids = validate_user_ids(user_ids, maximum=MAX_RUN_USERS)
    if not isinstance(downstream, Signature):
        raise InvalidArgument(
            f"downstream must be a Celery signature (task.s(...)), not {type(downstream).__name__}"
        )
    if ahead < 1:
        raise InvalidArgument(f"ahead={ahead!r} must be at least 1 chunk")
    if lane not in LANES:
        raise InvalidArgument(f"lane={lane!r} must be one of {', '.join(LANES)}")
    app = calling_app()
    size = chunk_size or settings_for(app).batch_size
    run = run_id or uuid.uuid4().hex
    spec = run_spec(app, downstream, total=len(ids), chunk_size=size, ahead=ahead, lane=lane)
    canvas = group(
        jit_segment.si(run, index, [c.encode() for c in segment], spec).set(
            argsrepr=f"[run {run[:12]}, segment {index}, {_users(segment)} users]",
            headers={LANE_HEADER: lane},
        )
        for index, segment in enumerate(segments(ids, size))
    )
    canvas.run_id = run
    return canvas


def _users(chunks: Sequence[Chunk]) -> int:
    return sum(len(c.user_ids) for c in chunks)


def send_chunks(run: JitRun, chunks: Sequence[Chunk], *, sender: str = "") -> None:
    """Publish a chunk task for each of ``chunks``, in the run's lane, confirming each once out."""
    if not chunks:
        return
    lane = lane_of(run.spec_field("lane"), BATCH)
    for chunk in chunks:
        jit_mint_chunk.apply_async(
            (run.run_id, chunk.encode()),
            argsrepr=f"[run {run.run_id[:12]}, chunk {chunk.index}, {len(chunk.user_ids)} users]",
            headers={LANE_HEADER: lane},
        )
        run.sent([chunk], sender=sender)


@package_task(bind=True, base=SfoxTask, name="sfox.jit_segment", resume_deadline=BOOKS_DEADLINE)
def jit_segment(
    self: SfoxTask, run_id: str, segment: int, chunks: list[str], spec: dict[str, Any]
) -> dict[str, Any]:
    """Stage one segment of a with_user_tokens run and release the first chunks."""
    run = run_for(run_id, self.app)
    me = self.request.id or ""
    send_chunks(
        run, run.stage(segment, [Chunk.decode(c) for c in chunks], spec, sender=me), sender=me
    )
    return {"run": run_id, "segment": segment, "chunks": len(chunks)}


class _ChunkTask(SfoxTask):
    time_limit = TASK_TIME_LIMIT


@package_task(bind=True, base=_ChunkTask, name="sfox.jit_mint_chunk")
def jit_mint_chunk(
    self: SfoxTask, run_id: str, encoded: str, _resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Mint one chunk of a run, send each granted user's downstream, release more.

    ``_resume`` is the mint's progress while minting, then ``{"minted": result}``
    once minted: a return to the broker after that (an outage) mints nothing
    again. The result is kept in the run's books too, for half of
    ``SFOX_TOKEN_RESULT_TTL``: a run of this task without it (redelivered, or put
    back when its return to the broker could not be sent) sends the same tokens,
    and so the same messages. Users whose downstream task the run's books record as
    sent are skipped, whichever task sent it.
    """
    chunk = Chunk.decode(encoded)
    run = run_for(run_id, self.app)
    me = self.request.id or ""
    resume = _resume or {}
    result: MintResult | None = resume.get("minted")
    if result is None:
        if not run.claim(chunk, sender=me):
            logger.info(
                "run %s: chunk %d is finished or another task's: not minted again",
                run_id[:12],
                chunk.index,
            )
            return {"run": run_id, "chunk": chunk.index, "sent": 0, "failed": [], "skipped": True}
        result = cast("MintResult | None", run.kept_minted(chunk))
        if result is None:
            result = get_runtime(self.app).minter().mint(chunk.user_ids, _resume)
            self.checkpoint({"minted": result})
            run.keep_minted(chunk, result, settings_for(self.app).result_ttl // 2)
        else:
            logger.info(
                "run %s: chunk %d was minted by an earlier run of its task: its tokens are "
                "sent as they were",
                run_id[:12],
                chunk.index,
            )
    self.checkpoint({"minted": result})
    tokens = result["tokens"]
    sent = send_unsent(self.app, run, chunk, tokens)
    if result["failed"]:
        run.record_failed(result["failed"])
        logger.warning(
            "run %s: %d user(s) refused, not sent downstream: %s",
            run_id[:12],
            len(result["failed"]),
            ", ".join(f"{f['user_id']} ({f['status']})" for f in result["failed"][:20]),
        )
    released = run.finish_chunk(chunk, len(tokens), len(result["failed"]), sender=me)
    send_chunks(run, released, sender=me)
    return {
        "run": run_id,
        "chunk": chunk.index,
        "sent": sent,
        "failed": [f["user_id"] for f in result["failed"]],
    }


def send_unsent(app: Any, run: JitRun, chunk: Chunk, tokens: Sequence[Mapping[str, Any]]) -> int:
    """Send the downstream task of each of ``tokens``' users the books do not record as sent.

    Returns how many this call sent.
    """
    sent = Dispatched(run.client, run.run_id)
    before = sent.among(str(entry["partner_user_id"]) for entry in tokens)
    if before:
        logger.info(
            "run %s: chunk %d: %d user(s) sent before, by this task or another: not sent again",
            run.run_id[:12],
            chunk.index,
            len(before),
        )
    downstream, route = downstream_of(run, app)
    for entry in tokens:
        user_id = str(entry["partner_user_id"])
        if user_id not in before:
            task_id = downstream_task_id(run.run_id, user_id)
            send_downstream(run.run_id, downstream, entry, route, task_id=task_id)
            sent.record(user_id)
    return len(tokens) - len(before)


def _done_signature(run_id: str, user_id: str) -> Signature:
    """``sfox.jit_done`` for one user, bound for the package's queue from any app."""
    done = jit_done.si(run_id, user_id)
    return done.set(queue=settings_for(done.app).queue)


def downstream_task_id(run_id: str, user_id: str) -> str:
    """The task id of ``user_id``'s downstream task in run ``run_id``: the same at every send.

    A chunk task that sends a user's task again (its first publish was refused but had
    landed, as around a failover) sends the same message, which the package's Redis
    transport hands over once.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sfox-jit:{run_id}:{user_id}"))


def send_downstream(
    run_id: str,
    downstream: Signature,
    entry: Mapping[str, Any],
    route: Mapping[str, Any],
    *,
    task_id: str | None = None,
) -> None:
    """Send ``entry``'s user its downstream task, under ``task_id`` (else a new one)."""
    user_id = str(entry["partner_user_id"])
    sig = downstream.clone(kwargs={"user_token": entry})
    done = _done_signature(run_id, user_id)
    sig.link(done)
    sig.link_error(done)
    sig.set(headers={DONE_HEADER: [run_id, user_id]}, **route)
    if task_id is not None:
        sig.set(task_id=task_id)
    sig.apply_async(kwargsrepr=f"{{user_token: <sealed token for {user_id}>}}")


@package_task(
    bind=True,
    base=SfoxTask,
    name="sfox.jit_done",
    ignore_result=True,
    resume_deadline=BOOKS_DEADLINE,
)
def jit_done(self: SfoxTask, run_id: str, user_id: str, *_: Any) -> None:
    """A downstream task ended: mark its user done and release more chunks."""
    run = run_for(run_id, self.app)
    me = self.request.id or ""
    send_chunks(run, run.user_done(user_id, sender=me), sender=me)


#: ``task_postrun`` states after which a downstream task will not run again.
_ENDED = frozenset({"SUCCESS", "IGNORED"})


def _is_done_link(callback: Any) -> bool:
    return isinstance(callback, Mapping) and callback.get("task") == DONE_TASK


@signals.task_prerun.connect
def _mark_done_here(sender: Task | None = None, **_: Any) -> None:
    """A downstream task of a run starts on a worker that imports ``tasks``.

    Its success is marked by :func:`_downstream_ended` on this worker, so its
    ``sfox.jit_done`` link is dropped: no second task per user. Its errback
    stays, for failures the main process records (hard time limit, lost worker).
    """
    if sender is None or not sender.request.get(DONE_HEADER):
        return
    callbacks = sender.request.callbacks
    if callbacks:
        sender.request.callbacks = [c for c in callbacks if not _is_done_link(c)] or None


@signals.before_task_publish.connect
def _keep_done_link(body: Any = None, headers: Mapping[str, Any] | None = None, **_: Any) -> None:
    """Every message of a run's downstream task carries its ``sfox.jit_done`` link.

    A retry of a downstream task whose link :func:`_mark_done_here` dropped may
    run on a worker that does not import ``tasks``: the link goes back on it.
    """
    mark = (headers or {}).get(DONE_HEADER)
    if not mark or not isinstance(body, (tuple, list)) or len(body) != 3:
        return
    embed = body[2]
    if not isinstance(embed, dict):
        return
    callbacks = list(embed.get("callbacks") or [])
    if not any(_is_done_link(c) for c in callbacks):
        embed["callbacks"] = [*callbacks, dict(_done_signature(str(mark[0]), str(mark[1])))]


@signals.task_postrun.connect
def _downstream_ended(sender: Task | None = None, state: str | None = None, **_: Any) -> None:
    """A downstream task of a run ended here: mark its user done, release more.

    It ended if it succeeded, or stopped by raising ``Ignore`` (which is also
    how ``self.replace`` hands the user over to a replacement). Failures are
    left to the ``sfox.jit_done`` errback, which Celery sends whichever
    process records the failure; a retry is not an end. If Redis cannot be
    reached here, the mark goes to the broker as a ``sfox.jit_done`` task.
    """
    if state not in _ENDED or sender is None:
        return
    mark = sender.request.get(DONE_HEADER)
    if not mark:
        return
    run_id, user_id = str(mark[0]), str(mark[1])
    me = sender.request.id or ""
    try:
        run = run_for(run_id, sender.app)
        send_chunks(run, run.user_done(user_id, sender=me), sender=me)
    except Exception:  # a signal handler must not fail the task that already ended
        logger.warning(
            "run %s: could not mark a downstream task done here; sending sfox.jit_done",
            run_id[:12],
            exc_info=True,
        )
        try:
            _done_signature(run_id, user_id).apply_async()
        except Exception:
            logger.exception("run %s: could not mark a downstream task done", run_id[:12])
