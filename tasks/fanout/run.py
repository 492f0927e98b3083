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
after minting resumes with its tokens, sending no downstream task twice. The
run's keys expire after :data:`RUN_TTL` seconds.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task, group, signals
from celery.canvas import Signature
from kombu.entity import Exchange, Queue

from tasks._exceptions import InvalidUserIds
from tasks._redis import lua
from tasks._redis import script as script_for
from tasks.minting import MintResult, validate_user_ids
from tasks.worker.app import app
from tasks.worker.base import SfoxTask
from tasks.worker.mint import TASK_TIME_LIMIT
from tasks.worker.runtime import get_runtime
from tasks.worker.transport import ONCE_HEADER

__all__ = [
    "Chunk",
    "JitRun",
    "RunProgress",
    "downstream_route",
    "route_options",
    "run_progress",
    "send_chunks",
    "send_downstream",
    "stale_after",
    "with_user_tokens",
]

logger = logging.getLogger("tasks.jit")

#: Seconds a run's bookkeeping stays in Redis after its last change.
RUN_TTL = 3 * 86400
#: Chunks minted ahead of the downstream tasks' progress, by default.
DEFAULT_AHEAD = 4
#: Chunks per segment message.
CHUNKS_PER_SEGMENT = 50
#: Most user IDs one with_user_tokens call accepts.
MAX_RUN_USERS = 1_000_000
#: Message header naming the run and user of a downstream task: ``[run_id, user_id]``.
DONE_HEADER = "sfox_jit"

_PREFIX = "sfox:jit"

# The scripts live in this folder's .lua files: common.lua names every script's KEYS and
# ARGV[1..2], and how a chunk is handed out; each script's own file its other ARGV. Every
# one is run through JitRun's method of the same name, which passes them in that order.
_LUA = "tasks.fanout"
_SCRIPTS = {
    "stage": lua(_LUA, "common", "stage"),
    "sent": lua(_LUA, "sent"),
    "claim": lua(_LUA, "claim"),
    "finish": lua(_LUA, "common", "finish"),
    "done": lua(_LUA, "common", "done"),
    "sweep": lua(_LUA, "common", "sweep"),
}


@dataclass(frozen=True)
class RunProgress:
    """Where a ``with_user_tokens`` run stands (:func:`run_progress`)."""

    #: Users in the run.
    total: int
    #: Users whose downstream task was sent.
    dispatched: int
    #: Users whose downstream task ended (succeeded, failed for good, or was handed over).
    done: int
    #: Users sFOX refused a token: they never reach the downstream task.
    failed: int
    #: Chunks not yet released for minting.
    queued_chunks: int
    #: Users of chunks being minted now.
    inflight: int

    @property
    def refused(self) -> int:
        """Users sFOX refused (the same as :attr:`failed`)."""
        return self.failed

    @property
    def finished(self) -> bool:
        """Every user either finished downstream or was refused."""
        return (
            self.total > 0
            and self.done + self.failed >= self.total
            and self.queued_chunks == 0
            and self.inflight <= 0
        )


@dataclass(frozen=True)
class Chunk:
    index: int
    user_ids: list[str]

    def encode(self) -> str:
        return f"{self.index}|{len(self.user_ids)}|{json.dumps(self.user_ids)}"

    @classmethod
    def decode(cls, text: str | bytes) -> Chunk:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        index, _count, body = text.split("|", 2)
        return cls(int(index), list(json.loads(body)))


class JitRun:
    """The Redis bookkeeping of one run."""

    def __init__(self, client: redis.Redis[bytes], run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        base = f"{_PREFIX}:{{{run_id}}}"  # one hash slot per run, for Redis Cluster
        self.state = f"{base}:state"
        self.queue = f"{base}:queue"
        self.done_set = f"{base}:done"
        self.staged = f"{base}:staged"
        self.finished_set = f"{base}:finished"
        self.failed_users = f"{base}:failed"
        self.released = f"{base}:released"
        self.released_at = f"{base}:released-at"
        self.released_by = f"{base}:released-by"
        self.owners = f"{base}:owners"

    def keys(self) -> list[str]:
        """Every script's KEYS, in the order the scripts name them."""
        return [
            self.state,
            self.queue,
            self.done_set,
            self.released,
            self.released_at,
            self.finished_set,
            self.released_by,
            self.staged,
            self.owners,
        ]

    @classmethod
    def for_app(cls, run_id: str, conf: Any = None) -> JitRun:
        return cls(get_runtime(conf if conf is not None else app.conf).redis, run_id)

    # Each returns the chunks the caller must send now, then confirm with ``sent``.
    # ``sender`` is the calling task's id: when Celery redelivers that task after a
    # crash, or a call is made again after a dropped connection, the chunks it took
    # but never confirmed come back to it.

    def stage(
        self, segment: int, chunks: Sequence[Chunk], spec: dict[str, Any], *, sender: str = ""
    ) -> list[Chunk]:
        """Add a segment's chunks once."""
        return self._chunks(
            "stage", sender, segment, json.dumps(spec), *(c.encode() for c in chunks)
        )

    def sent(self, chunks: Sequence[Chunk], *, sender: str = "") -> None:
        """The caller has published these chunks' tasks: they are no longer its to resend."""
        if chunks:
            self._call("sent", sender, *(c.index for c in chunks))

    def claim(self, chunk: Chunk, *, sender: str = "") -> bool:
        """Whether ``sender`` may mint ``chunk``: unfinished, and no other task's."""
        return bool(self._call("claim", sender, chunk.index))

    def finish_chunk(
        self, chunk: Chunk, dispatched: int, failed: int, *, sender: str = ""
    ) -> list[Chunk]:
        """Count a minted chunk once."""
        return self._chunks("finish", sender, chunk.index, len(chunk.user_ids), dispatched, failed)

    def user_done(self, user_id: str, *, sender: str = "") -> list[Chunk]:
        """Mark one user's downstream work ended."""
        return self._chunks("done", sender, user_id)

    def sweep(self, *, sender: str = "") -> list[Chunk]:
        """Newly releasable chunks, and ones whose sender died unsent."""
        return self._chunks("sweep", sender)

    def _call(self, name: str, sender: str, *args: Any) -> Any:
        return script_for(self.client, _SCRIPTS[name])(
            keys=self.keys(), args=[RUN_TTL, sender or "", *args]
        )

    def _chunks(self, name: str, sender: str, *args: Any) -> list[Chunk]:
        return [Chunk.decode(c) for c in self._call(name, sender, *args)]

    def record_failed(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Keep the refused users' entries (HSET: the same entries again change nothing)."""
        mapping = {e["user_id"]: json.dumps(e) for e in entries}
        if mapping:
            with self.client.pipeline() as pipe:
                pipe.hset(self.failed_users, mapping=mapping)
                pipe.expire(self.failed_users, RUN_TTL)
                pipe.execute()

    def failed(self) -> dict[str, dict[str, Any]]:
        """Users sFOX refused, with their ``failed`` entries."""
        return {
            k.decode(): json.loads(v) for k, v in self.client.hgetall(self.failed_users).items()
        }

    def spec(self) -> dict[str, str]:
        raw = self.client.hgetall(self.state)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def downstream(self, celery_app: Any) -> tuple[Signature, dict[str, Any]]:
        """The run's downstream signature, bound to ``celery_app``, and where to send it."""
        spec = self.spec()
        signature = celery_app.signature(json.loads(spec["downstream"]))
        return signature, route_options(json.loads(spec.get("route") or "{}"))

    def progress(self) -> RunProgress:
        with self.client.pipeline() as pipe:
            pipe.hmget(self.state, "total", "dispatched", "failed", "inflight")
            pipe.scard(self.done_set)
            pipe.llen(self.queue)
            (total, dispatched, failed, inflight), done, queued = pipe.execute()
        return RunProgress(
            total=int(total or 0),
            dispatched=int(dispatched or 0),
            done=int(done),
            failed=int(failed or 0),
            queued_chunks=int(queued),
            inflight=int(inflight or 0),
        )


def run_progress(run_id: str) -> RunProgress:
    """Where the ``with_user_tokens`` run ``run_id`` stands; ``.finished`` once it ended.

    ``run_id`` is the one given to :func:`with_user_tokens`, or the ``run_id``
    attribute of the canvas it returned.
    """
    return JitRun.for_app(run_id).progress()


def _segments(user_ids: Sequence[str], chunk_size: int) -> list[list[Chunk]]:
    chunks = [
        Chunk(i // chunk_size, list(user_ids[i : i + chunk_size]))
        for i in range(0, len(user_ids), chunk_size)
    ]
    return [chunks[i : i + CHUNKS_PER_SEGMENT] for i in range(0, len(chunks), CHUNKS_PER_SEGMENT)]


def stale_after(conf: Any) -> float:
    """Seconds after which a released, unfinished chunk is taken as lost.

    Longer than any honest chunk task can take: a redelivery after the
    visibility timeout, plus minting's whole retry deadline, plus a margin.
    """
    visibility = float((conf.get("broker_transport_options") or {}).get("visibility_timeout", 3600))
    return visibility + get_runtime(conf).settings.retry.deadline + 60


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
) -> Signature:
    """A canvas that mints tokens for ``user_ids`` and calls ``downstream`` once per user.

    Each granted user's ``downstream`` is sent with ``user_token=<that user's
    entry from "tokens">`` (sealed) as soon as its chunk is minted, to where the
    downstream's own app routes it; refused users never reach it and are logged
    and kept with the run. At most ``ahead`` chunks are minted ahead of the
    downstream tasks' progress. Bad ``user_ids`` raise :class:`ValueError`
    here, before anything is sent.

    A downstream task marks its user done when it ends, on any worker: one
    that imports ``tasks`` does it in place (one Redis call), any other sends a
    small ``sfox.jit_done`` task to ``SFOX_QUEUE`` (its link and errback). The
    returned canvas has the run's id as ``.run_id``; :func:`run_progress` reads
    where the run stands.
    """
    ids = validate_user_ids(user_ids, maximum=MAX_RUN_USERS)
    if not isinstance(downstream, Signature):
        raise InvalidUserIds(
            f"downstream must be a Celery signature (task.s(...)), not {type(downstream).__name__}"
        )
    if ahead < 1:
        raise ValueError("ahead must be at least 1 chunk")
    size = chunk_size or get_runtime(app.conf).settings.batch_size
    run = run_id or uuid.uuid4().hex
    spec = {
        "total": len(ids),
        "budget": ahead * size,
        "stale_after": stale_after(app.conf),
        "downstream": json.dumps(dict(downstream)),
        "route": json.dumps(downstream_route(downstream)),
    }
    canvas = group(
        jit_segment.si(run, index, [c.encode() for c in segment], spec).set(
            argsrepr=f"[run {run[:12]}, segment {index}, {_users(segment)} users]"
        )
        for index, segment in enumerate(_segments(ids, size))
    )
    canvas.run_id = run
    return canvas


def _users(chunks: Sequence[Chunk]) -> int:
    return sum(len(c.user_ids) for c in chunks)


def send_chunks(run: JitRun, chunks: Sequence[Chunk], *, sender: str = "") -> None:
    """Publish a chunk task for each of ``chunks``, confirming each once it is out."""
    for chunk in chunks:
        jit_mint_chunk.apply_async(
            (run.run_id, chunk.encode()),
            argsrepr=f"[run {run.run_id[:12]}, chunk {chunk.index}, {len(chunk.user_ids)} users]",
        )
        run.sent([chunk], sender=sender)


@app.task(bind=True, base=SfoxTask, name="sfox.jit_segment")
def jit_segment(
    self: SfoxTask, run_id: str, segment: int, chunks: list[str], spec: dict[str, Any]
) -> dict[str, Any]:
    """Stage one segment of a with_user_tokens run and release the first chunks."""
    run = JitRun.for_app(run_id, self.app.conf)
    me = self.request.id or ""
    send_chunks(
        run, run.stage(segment, [Chunk.decode(c) for c in chunks], spec, sender=me), sender=me
    )
    return {"run": run_id, "segment": segment, "chunks": len(chunks)}


class _ChunkTask(SfoxTask):
    time_limit = TASK_TIME_LIMIT


@app.task(bind=True, base=_ChunkTask, name="sfox.jit_mint_chunk")
def jit_mint_chunk(
    self: SfoxTask, run_id: str, encoded: str, _resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Mint one chunk of a run, send each granted user's downstream, release more.

    ``_resume`` is the mint's progress while minting, then ``{"minted": result,
    "sent": n}`` once minted: a return to the broker after that (an outage)
    mints nothing again and sends no downstream task twice.
    """
    chunk = Chunk.decode(encoded)
    run = JitRun.for_app(run_id, self.app.conf)
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
        result = get_runtime(self.app.conf).minter().mint(chunk.user_ids, _resume)
    self.checkpoint({"minted": result, "sent": int(resume.get("sent", 0))})
    downstream, route = run.downstream(self.app)
    tokens = result["tokens"]
    for position in range(int(resume.get("sent", 0)), len(tokens)):
        send_downstream(run_id, downstream, tokens[position], route)
        self.checkpoint({"minted": result, "sent": position + 1})
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
        "sent": len(tokens),
        "failed": [f["user_id"] for f in result["failed"]],
    }


def _done_signature(run_id: str, user_id: str) -> Signature:
    """``sfox.jit_done`` for one user, bound for the package's queue from any app."""
    return jit_done.si(run_id, user_id).set(queue=SfoxTask.queue)


def send_downstream(
    run_id: str, downstream: Signature, entry: Mapping[str, Any], route: Mapping[str, Any]
) -> None:
    user_id = str(entry["partner_user_id"])
    sig = downstream.clone(kwargs={"user_token": entry})
    done = _done_signature(run_id, user_id)
    sig.link(done)
    sig.link_error(done)
    # ONCE_HEADER: a copy of this user's task sent by a chunk task that ran again (its
    # worker died, or Redis dropped the line before it noted its progress) is dropped by
    # the package's transport, if another task of this user was handed over first.
    sig.set(headers={DONE_HEADER: [run_id, user_id], ONCE_HEADER: f"{run_id}:{user_id}"}, **route)
    sig.apply_async(kwargsrepr=f"{{user_token: <sealed token for {user_id}>}}")


@app.task(bind=True, base=SfoxTask, name="sfox.jit_done", ignore_result=True)
def jit_done(self: SfoxTask, run_id: str, user_id: str, *_: Any) -> None:
    """A downstream task ended: mark its user done and release more chunks."""
    run = JitRun.for_app(run_id, self.app.conf)
    me = self.request.id or ""
    send_chunks(run, run.user_done(user_id, sender=me), sender=me)


#: ``task_postrun`` states after which a downstream task will not run again.
_ENDED = frozenset({"SUCCESS", "IGNORED"})


def _is_done_link(callback: Any) -> bool:
    return isinstance(callback, Mapping) and callback.get("task") == jit_done.name


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
        run = JitRun.for_app(run_id, sender.app.conf)
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
