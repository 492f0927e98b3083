"""Just-in-time fan-out: mint chunk by chunk, in step with the downstream tasks.

:func:`with_user_tokens` returns a Celery group of *segment* tasks; no message
holds more than one segment of user IDs. Each segment stages its chunks in a
Redis list of the run, then the run proceeds by itself:

- a chunk is *released* (handed to a ``sfox.jit_mint_chunk`` task) only while
  fewer than ``ahead`` chunks' worth of users are minted-but-unfinished, so
  tokens are minted in step with their use and none waits in a queue for long;
- a chunk task mints its users (through the shared limiter), sends each
  granted user's ``downstream`` signature with ``user_token=<entry>`` at once,
  records the refused users, and releases more chunks;
- each downstream task, when it ends, marks its user done and releases more:
  on success (or ``Ignore``) from a ``task_postrun`` handler in the worker that ran it (the
  message carries the run and user in a ``sfox_jit`` header), on failure from
  a small ``sfox.jit_done`` errback, which Celery also sends when the worker's
  main process records the failure (hard time limit, lost worker). With
  ``done_callbacks=True`` success sends ``sfox.jit_done`` too, for downstream
  tasks that run on workers which never import ``tasks``.

Every counter moves in one Lua script, and moves once however often Celery
redelivers a task: segments stage once, chunks finish once, users are done
once. The run's keys expire after :data:`RUN_TTL` seconds.
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

from tasks._app import app
from tasks._exceptions import InvalidUserIds
from tasks._mint import Deferred, validate_user_ids
from tasks._runtime import get_runtime

__all__ = ["Chunk", "JitRun", "RunProgress", "send_chunks", "stale_after", "with_user_tokens"]

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

# Shared by the scripts below. KEYS: 1 state hash, 2 queue list, 3 done set,
# 4 released hash (chunk index -> chunk), 5 released-at zset, 6 finished set,
# 7 released-by hash (chunk index -> id of the task that must send it).
# ARGV[1] is the keys' TTL, ARGV[2] the calling task's id ('' outside a task).
# release(): hand out chunks while fewer than `budget` users are released but
# unfinished, noting when and by whom each went out. mine(): chunks this very
# task released before and that never finished: a redelivered task died
# between taking them and sending them, so it sends them again. stale(): chunks
# released longer ago than `stale_after` and never finished, whoever took them.
_COMMON = """
local SENDER = ARGV[2]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function mine()
  local out = {}
  if SENDER == '' then return out end
  local all = redis.call('HGETALL', KEYS[7])
  for i = 1, #all, 2 do
    if all[i + 1] == SENDER and redis.call('SISMEMBER', KEYS[6], all[i]) == 0 then
      local chunk = redis.call('HGET', KEYS[4], all[i])
      if chunk then table.insert(out, chunk) end
    end
  end
  return out
end
local function release(out)
  local budget = tonumber(redis.call('HGET', KEYS[1], 'budget') or '0')
  while true do
    local inflight = tonumber(redis.call('HGET', KEYS[1], 'inflight') or '0')
    local dispatched = tonumber(redis.call('HGET', KEYS[1], 'dispatched') or '0')
    local pending = inflight + dispatched - redis.call('SCARD', KEYS[3])
    if pending >= budget then break end
    local chunk = redis.call('LPOP', KEYS[2])
    if not chunk then break end
    local index, n = string.match(chunk, '^(%d+)|(%d+)|')
    redis.call('HINCRBY', KEYS[1], 'inflight', tonumber(n))
    redis.call('HSET', KEYS[4], index, chunk)
    redis.call('ZADD', KEYS[5], now(), index)
    redis.call('HSET', KEYS[7], index, SENDER)
    table.insert(out, chunk)
  end
  return out
end
local function forget(index)
  redis.call('HDEL', KEYS[4], index)
  redis.call('ZREM', KEYS[5], index)
  redis.call('HDEL', KEYS[7], index)
end
local function stale(out, limit)
  local after = tonumber(redis.call('HGET', KEYS[1], 'stale_after') or '0')
  if after <= 0 then return out end
  local t = now()
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', t - after, 'LIMIT', 0, limit)
  for _, index in ipairs(old) do
    local chunk = redis.call('HGET', KEYS[4], index)
    if chunk and redis.call('SISMEMBER', KEYS[6], index) == 0 then
      redis.call('ZADD', KEYS[5], t, index)
      redis.call('HSET', KEYS[7], index, SENDER)
      table.insert(out, chunk)
    else
      forget(index)
    end
  end
  return out
end
local function touch(ttl)
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

# ARGV: ttl, sender, segment index, spec json, chunks...; KEYS[8] staged set.
_STAGE = (
    _COMMON
    + """
local out = mine()
local spec = cjson.decode(ARGV[4])
for k, v in pairs(spec) do redis.call('HSETNX', KEYS[1], k, v) end
if redis.call('SADD', KEYS[8], ARGV[3]) == 1 then
  for i = 5, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
end
touch(tonumber(ARGV[1]))
return release(out)
"""
)

# ARGV: ttl, sender, chunk index, users, dispatched, failed.
_FINISH = (
    _COMMON
    + """
local out = mine()
if redis.call('SADD', KEYS[6], ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'inflight', -tonumber(ARGV[4]))
  redis.call('HINCRBY', KEYS[1], 'dispatched', tonumber(ARGV[5]))
  redis.call('HINCRBY', KEYS[1], 'failed', tonumber(ARGV[6]))
end
forget(ARGV[3])
touch(tonumber(ARGV[1]))
return release(out)
"""
)

# ARGV: ttl, sender, user id.
_DONE = (
    _COMMON
    + """
local out = mine()
redis.call('SADD', KEYS[3], ARGV[3])
touch(tonumber(ARGV[1]))
return stale(release(out), 1)
"""
)

# ARGV: ttl, sender.
_SWEEP = (
    _COMMON
    + """
return stale(release(mine()), 100)
"""
)


@dataclass(frozen=True)
class RunProgress:
    """Where a run stands."""

    total: int
    dispatched: int
    done: int
    failed: int
    queued_chunks: int
    inflight: int

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

    def _keys(self, *extra: str) -> list[str]:
        return [
            self.state,
            self.queue,
            self.done_set,
            self.released,
            self.released_at,
            self.finished_set,
            self.released_by,
            *extra,
        ]

    @classmethod
    def for_app(cls, run_id: str) -> JitRun:
        return cls(get_runtime(app.conf).redis, run_id)

    def _script(self, source: str) -> Any:
        return self.client.register_script(source)

    # Each returns the chunks the caller must send now. ``sender`` is the calling
    # task's id: when Celery redelivers that task after a crash, the chunks it took
    # but may never have sent come back to it.

    def stage(
        self, segment: int, chunks: Sequence[Chunk], spec: dict[str, Any], *, sender: str = ""
    ) -> list[Chunk]:
        """Add a segment's chunks once."""
        return self._run(
            _STAGE,
            [segment, json.dumps(spec), *(c.encode() for c in chunks)],
            sender,
            self.staged,
        )

    def finish_chunk(
        self, chunk: Chunk, dispatched: int, failed: int, *, sender: str = ""
    ) -> list[Chunk]:
        """Count a minted chunk once."""
        return self._run(_FINISH, [chunk.index, len(chunk.user_ids), dispatched, failed], sender)

    def user_done(self, user_id: str, *, sender: str = "") -> list[Chunk]:
        """Mark one user's downstream work ended."""
        return self._run(_DONE, [user_id], sender)

    def sweep(self, *, sender: str = "") -> list[Chunk]:
        """Newly releasable chunks, and ones whose sender died unsent."""
        return self._run(_SWEEP, [], sender)

    def _run(self, script: str, args: list[Any], sender: str, *extra_keys: str) -> list[Chunk]:
        released = self._script(script)(
            keys=self._keys(*extra_keys), args=[RUN_TTL, sender or "", *args]
        )
        return [Chunk.decode(c) for c in released]

    def record_failed(self, entries: Iterable[Mapping[str, Any]]) -> None:
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


def _segments(user_ids: Sequence[str], chunk_size: int) -> list[list[Chunk]]:
    chunks = [
        Chunk(i // chunk_size, list(user_ids[i : i + chunk_size]))
        for i in range(0, len(user_ids), chunk_size)
    ]
    return [chunks[i : i + CHUNKS_PER_SEGMENT] for i in range(0, len(chunks), CHUNKS_PER_SEGMENT)]


def stale_after(conf: Any) -> float:
    """Seconds after which a released, unfinished chunk is taken as never sent.

    Longer than any honest chunk task can take: a redelivery after the
    visibility timeout, plus minting's whole retry deadline, plus a margin.
    """
    visibility = float((conf.get("broker_transport_options") or {}).get("visibility_timeout", 3600))
    return visibility + get_runtime(conf).settings.retry.deadline + 60


def with_user_tokens(
    user_ids: Sequence[str],
    downstream: Signature,
    *,
    ahead: int = DEFAULT_AHEAD,
    chunk_size: int | None = None,
    run_id: str | None = None,
    done_callbacks: bool = False,
) -> Signature:
    """A canvas that mints tokens for ``user_ids`` and calls ``downstream`` once per user.

    Each granted user's ``downstream`` is sent with ``user_token=<that user's
    entry from "tokens">`` (sealed) as soon as its chunk is minted; refused
    users never reach it and are logged and kept with the run. At most
    ``ahead`` chunks are minted ahead of the downstream tasks' progress.
    Bad ``user_ids`` raise :class:`ValueError` here, before anything is sent.

    A worker that imports ``tasks`` (``celery -A tasks worker``, or an app that
    imports it) marks a downstream task's user done when the task succeeds or
    raises ``Ignore`` (as ``self.replace`` does: the user is handed over), at
    the cost of one Redis call; a failure sends a ``sfox.jit_done`` errback.
    Pass ``done_callbacks=True`` when ``downstream`` runs on workers that do
    not import ``tasks``: every success then sends a ``sfox.jit_done`` task
    instead, a second Celery task per user (a task ending by ``Ignore`` there
    is never marked, as Celery sends it neither link nor errback).
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
        "done_callbacks": int(done_callbacks),
    }
    return group(
        jit_segment.si(run, index, [c.encode() for c in segment], spec).set(
            argsrepr=f"[run {run[:12]}, segment {index}, {_users(segment)} users]"
        )
        for index, segment in enumerate(_segments(ids, size))
    )


def _users(chunks: Sequence[Chunk]) -> int:
    return sum(len(c.user_ids) for c in chunks)


def send_chunks(run_id: str, chunks: Sequence[Chunk]) -> None:
    for chunk in chunks:
        jit_mint_chunk.apply_async(
            (run_id, chunk.encode()),
            argsrepr=f"[run {run_id[:12]}, chunk {chunk.index}, {len(chunk.user_ids)} users]",
        )


@app.task(name="sfox.jit_segment", acks_late=True)
def jit_segment(
    run_id: str, segment: int, chunks: list[str], spec: dict[str, Any]
) -> dict[str, Any]:
    """Stage one segment of a with_user_tokens run and release the first chunks."""
    run = JitRun.for_app(run_id)
    released = run.stage(
        segment, [Chunk.decode(c) for c in chunks], spec, sender=jit_segment.request.id or ""
    )
    send_chunks(run_id, released)
    return {"run": run_id, "segment": segment, "chunks": len(chunks)}


class _ChunkTask(Task):  # type: ignore[misc]
    max_retries = None  # the carried budget bounds retries (see tasks._tasks)
    #: Killed past this: far beyond minting's own deadline (SFOX_RETRY_DEADLINE).
    time_limit = 3600


@app.task(bind=True, base=_ChunkTask, name="sfox.jit_mint_chunk", acks_late=True)
def jit_mint_chunk(
    self: Task, run_id: str, encoded: str, _resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Mint one chunk of a run, send each granted user's downstream, release more."""
    chunk = Chunk.decode(encoded)
    run = JitRun.for_app(run_id)
    runtime = get_runtime(self.app.conf)
    try:
        result = runtime.minter().mint(chunk.user_ids, _resume)
    except Deferred as deferred:
        raise self.retry(
            kwargs={"_resume": deferred.state}, countdown=deferred.countdown, kwargsrepr="{resume}"
        ) from None
    spec = run.spec()
    downstream = self.app.signature(json.loads(spec["downstream"]))
    callbacks = spec.get("done_callbacks") == "1"
    for entry in result["tokens"]:
        user_id = entry["partner_user_id"]
        sig = downstream.clone(kwargs={"user_token": entry})
        done = jit_done.si(run_id, user_id)
        sig.link_error(done)
        mark = [run_id, user_id]
        if callbacks:
            sig.link(done)
            mark.append(_LINKED)
        sig.set(headers={DONE_HEADER: mark})
        sig.apply_async(kwargsrepr=f"{{user_token: <sealed token for {user_id}>}}")
    if result["failed"]:
        run.record_failed(result["failed"])
        logger.warning(
            "run %s: %d user(s) refused, not sent downstream: %s",
            run_id[:12],
            len(result["failed"]),
            ", ".join(f"{f['user_id']} ({f['status']})" for f in result["failed"][:20]),
        )
    released = run.finish_chunk(
        chunk, len(result["tokens"]), len(result["failed"]), sender=self.request.id or ""
    )
    send_chunks(run_id, released)
    return {
        "run": run_id,
        "chunk": chunk.index,
        "sent": len(result["tokens"]),
        "failed": [f["user_id"] for f in result["failed"]],
    }


@app.task(bind=True, name="sfox.jit_done", acks_late=True, ignore_result=True)
def jit_done(self: Task, run_id: str, user_id: str, *_: Any) -> None:
    """A downstream task ended: mark its user done and release more chunks."""
    released = JitRun.for_app(run_id).user_done(user_id, sender=self.request.id or "")
    send_chunks(run_id, released)


#: Third item of a ``sfox_jit`` header: successes are marked by a ``sfox.jit_done`` link.
_LINKED = "linked"
#: ``task_postrun`` states after which a downstream task will not run again.
_ENDED = frozenset({"SUCCESS", "IGNORED"})


@signals.task_postrun.connect
def _downstream_succeeded(sender: Task | None = None, state: str | None = None, **_: Any) -> None:
    """A downstream task of a run ended here: mark its user done, release more.

    It ended if it succeeded, or stopped by raising ``Ignore`` (which is also
    how ``self.replace`` hands the user over to a replacement). Failures are
    left to the ``sfox.jit_done`` errback, which Celery sends whichever
    process records the failure; a retry is not an end.
    """
    if state not in _ENDED or sender is None:
        return
    mark = sender.request.get(DONE_HEADER)
    if not mark or (_LINKED in mark[2:] and state == "SUCCESS"):
        return  # done_callbacks=True: the sfox.jit_done link marks a success
    try:
        run_id, user_id = str(mark[0]), str(mark[1])
        released = JitRun.for_app(run_id).user_done(user_id, sender=sender.request.id or "")
        send_chunks(run_id, released)
    except Exception:  # a signal handler must not fail the task that already succeeded
        logger.exception("run %s: could not mark a downstream task done", str(mark[0])[:12])
