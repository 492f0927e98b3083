"""The Redis bookkeeping of a ``with_user_tokens`` run: its keys, its scripts, its progress.

Every counter moves in one Lua script (this folder's ``.lua`` files), and moves
once however often a call is made again after a redelivery or a dropped Redis
connection. Nothing here knows Celery: the tasks in :mod:`tasks.fanout.tasks`
drive it, and :mod:`tasks.fanout.api` for the package's other parts.

Eviction. The books carry no TTL while their run is active, so that a Redis on
``volatile-lru`` (which evicts only keys that have one) leaves them alone; once
the script that ends the run says so (or the coordinator of a ``coordinated``
run closes it), the run's final progress is kept in the registry and the books
get :data:`RUN_TTL`. What bounds a run nobody drives any more is the registry of
runs (``sfox:jit:runs``): each staging sweeps it, and a run unchanged for
:data:`ABANDONED_AFTER` gets its TTL there (and loses it if it moves again). What is
lost anyway (``allkeys-lru`` evicts any key) is found by :meth:`JitRun.progress`:
the state hash counts what the other keys hold, and the registry remembers the
runs whose books must exist; a run found short is :attr:`RunProgress.lost`, never
finished.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from .._redis import lua
from .._redis import script as script_for

__all__ = ["ABANDONED_AFTER", "RUN_TTL", "Chunk", "JitRun", "RunProgress", "sweep_registry"]

logger = logging.getLogger("tasks.jit")

#: Seconds a run's bookkeeping stays in Redis after the run ended (or was abandoned).
RUN_TTL = 3 * 86400
#: Seconds without any change after which an unfinished run counts as abandoned: its
#: books get :data:`RUN_TTL` at the next sweep of the registry.
ABANDONED_AFTER = 86400
#: Most runs of the registry one sweep looks at.
_SWEEP_LIMIT = 20

_PREFIX = "sfox:jit"
#: The registry of runs: active runs (a sorted set, scored by when a sweep next looks at
#: each), and ended ones (scored by when their books expire). Neither carries a TTL.
ACTIVE_RUNS = f"{_PREFIX}:runs"
ENDED_RUNS = f"{_PREFIX}:ended"
#: Each ended run's final progress (a hash, no TTL, kept as long as it is in ENDED_RUNS):
#: a run whose books expired or were evicted after its end still reads as finished.
FINAL_PROGRESS = f"{_PREFIX}:final"
#: Most ended runs one sweep forgets.
_FORGET_LIMIT = 1000
#: What a script adds to its answer when the run has ended, or an abandoned run moved.
_ENDED = b"ended"
_REVIVED = b"revived"

# The scripts live in this folder's .lua files: common.lua names every script's KEYS and
# ARGV[1..2], and how a chunk is handed out; each script's own file its other ARGV. Every
# one is run through JitRun's method of the same name, which passes them in that order.
_LUA = __package__ or "tasks.fanout"
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
    #: What of the run's books is gone (evicted): empty unless the run is lost.
    lost: tuple[str, ...] = ()

    @property
    def refused(self) -> int:
        """Users sFOX refused (the same as :attr:`failed`)."""
        return self.failed

    @property
    def finished(self) -> bool:
        """Every user either finished downstream or was refused (never when lost)."""
        return (
            not self.lost
            and self.total > 0
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
        #: Users whose downstream task was published (``tasks.fanout.dispatched``): no
        #: script touches it, but it lives and dies with the run's books.
        self.sent_users = f"{base}:sent-users"
        self._base = base

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
            self.failed_users,
        ]

    # Each returns the chunks the caller must send now, then confirm with ``sent``.
    # ``sender`` is the calling task's id: when Celery redelivers that task after a
    # crash, or a call is made again after a dropped connection, the chunks it took
    # but never confirmed come back to it.

    def stage(
        self, segment: int, chunks: Sequence[Chunk], spec: dict[str, Any], *, sender: str = ""
    ) -> list[Chunk]:
        """Add a segment's chunks once; then the run is in the registry, which is swept.

        Registered once its state exists: a read in between never finds a run the
        registry knows without its books.
        """
        staged, ended = self._answer(
            "stage", sender, segment, json.dumps(spec), *(c.encode() for c in chunks)
        )
        if not ended:
            self._register()
        sweep_registry(self.client)
        return staged

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
        """Newly releasable chunks, and ones whose sender died unsent.

        The run's coordinator calls it while it watches the run: the run stays in
        (or comes back to) the registry's active runs.
        """
        with self.client.pipeline() as pipe:
            self._register(pipe)
            self._call("sweep", sender, client=pipe)
            answer = pipe.execute()[-1]
        return [Chunk.decode(c) for c in answer]

    def _call(self, name: str, sender: str, *args: Any, **on: Any) -> Any:
        """Run the script ``name``; ``on`` may name a pipeline (``client=pipe``) to queue it on."""
        return script_for(self.client, _SCRIPTS[name])(
            keys=self.keys(), args=[sender or "", *args], **on
        )

    def _chunks(self, name: str, sender: str, *args: Any) -> list[Chunk]:
        return self._answer(name, sender, *args)[0]

    def _answer(self, name: str, sender: str, *args: Any) -> tuple[list[Chunk], bool]:
        """The chunks a script hands out, and whether the run has ended (then noted)."""
        answer = list(self._call(name, sender, *args))
        mark = answer.pop() if answer and answer[-1] in (_ENDED, _REVIVED) else None
        if mark == _ENDED:
            self._ended()
        elif mark == _REVIVED:
            self._register()
        return [Chunk.decode(c) for c in answer], mark == _ENDED

    def _register(self, pipe: Any = None) -> None:
        """The run is active: in the registry (checked once :data:`ABANDONED_AFTER` passed).

        Queued on ``pipe`` if given, else sent at once.
        """
        if pipe is None:
            with self.client.pipeline() as own:
                self._register(own)
                own.execute()
            return
        pipe.zadd(ACTIVE_RUNS, {self.run_id: time.time() + ABANDONED_AFTER}, nx=True)
        pipe.zrem(ENDED_RUNS, self.run_id)
        pipe.hdel(FINAL_PROGRESS, self.run_id)

    def close(self) -> None:
        """The coordinator of a ``coordinated`` run is done with it (any other run ends
        when its last script says so): see :meth:`_ended`."""
        self._ended()

    def _ended(self) -> None:
        """The run ended: its final progress is kept, it is ended in the registry, and
        then only its books get :data:`RUN_TTL`, so that none of them goes before."""
        final = self.progress()  # the final progress already, if it ended before
        with self.client.pipeline() as pipe:
            if not final.lost:
                fields = asdict(final)
                del fields["lost"]
                pipe.hsetnx(FINAL_PROGRESS, self.run_id, json.dumps(fields))
            pipe.zrem(ACTIVE_RUNS, self.run_id)
            pipe.zadd(ENDED_RUNS, {self.run_id: time.time() + RUN_TTL})
            for key in self.mortal_keys():
                pipe.expire(key, RUN_TTL)
            pipe.execute()

    def mortal_keys(self) -> list[str]:
        """Every key of the run's books: the scripts' and the published users'."""
        return [*self.keys(), self.sent_users]

    def minted_key(self, index: int) -> str:
        """Where chunk ``index``'s mint result is kept (see :meth:`keep_minted`)."""
        return f"{self._base}:minted:{index}"

    def keep_minted(self, chunk: Chunk, result: Mapping[str, Any], seconds: int) -> None:
        """Keep ``chunk``'s mint result, its tokens sealed, for ``seconds``.

        A chunk task that runs again within them (redelivered, or put back when its
        return to the broker could not be sent) sends the same tokens, and so the
        same messages, which the package's Redis transport hands over once, instead
        of minting anew. Its own TTL: a key that goes early (evicted) costs only that.
        """
        self.client.set(self.minted_key(chunk.index), json.dumps(result), ex=max(1, seconds))

    def kept_minted(self, chunk: Chunk) -> dict[str, Any] | None:
        """``chunk``'s kept mint result, if still kept and of these users; else None."""
        raw = self.client.get(self.minted_key(chunk.index))
        if raw is None:
            return None
        result: dict[str, Any] = json.loads(raw)
        users = {str(t["partner_user_id"]) for t in result.get("tokens", [])}
        users |= {str(f["user_id"]) for f in result.get("failed", [])}
        return result if users <= set(chunk.user_ids) else None

    def record_failed(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Keep the refused users' entries (HSET: the same entries again change nothing).

        Written before the chunk is finished, so while the run is active: no TTL.
        """
        mapping = {e["user_id"]: json.dumps(e) for e in entries}
        if mapping:
            self.client.hset(self.failed_users, mapping=mapping)

    def failed(self) -> dict[str, dict[str, Any]]:
        """Users sFOX refused, with their ``failed`` entries."""
        return {
            k.decode(): json.loads(v) for k, v in self.client.hgetall(self.failed_users).items()
        }

    def done_users(self) -> set[str]:
        """Users whose downstream task ended."""
        return {u.decode() for u in self.client.smembers(self.done_set)}

    def spec(self) -> dict[str, str]:
        raw = self.client.hgetall(self.state)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def spec_field(self, name: str) -> str | None:
        """One field of the run's spec (see :meth:`spec`), or None."""
        raw = self.client.hget(self.state, name)
        return None if raw is None else raw.decode()

    def progress(self) -> RunProgress:
        """Where the run stands; :attr:`RunProgress.lost` names what of its books is gone.

        A run found lost is logged at ERROR, with what is lost (no user ID, no token).
        """
        with self.client.pipeline() as pipe:
            pipe.hmget(
                self.state, "total", "dispatched", "failed", "inflight", "done_count", "segments",
                "queued", "counted",
            )  # fmt: skip
            pipe.scard(self.done_set)
            pipe.llen(self.queue)
            pipe.scard(self.staged)
            pipe.exists(self.state)
            pipe.zscore(ACTIVE_RUNS, self.run_id)
            pipe.zscore(ENDED_RUNS, self.run_id)
            pipe.hget(FINAL_PROGRESS, self.run_id)
            state, done, queued, staged, any_state, active, ended, final = pipe.execute()
        if final is not None:
            # The run ended: what it ended with, whatever of its books expired or was
            # evicted since (they carry their TTL from then on).
            return RunProgress(**json.loads(final))
        total, dispatched, failed, inflight, done_count, segments, queued_count = (
            int(v or 0) for v in state[:7]
        )
        # The run existed: the registry knows it, a segment was staged, or a user's end
        # was written into a state that no longer has the run's size.
        known = active is not None or staged > 0 or any_state > 0
        lost = missing_books(
            has_state=state[0] is not None,
            known=known or (ended is not None and float(ended) > time.time()),
            counted=state[7].decode() if state[7] is not None else None,
            counts=(done_count, segments, queued_count),
            found=(int(done), int(staged), int(queued)),
        )
        if lost:
            logger.error(
                "run %s is lost: Redis evicted part of its books: %s; its progress is unknown: "
                "set the Redis's maxmemory-policy to noeviction",
                self.run_id[:24],
                "; ".join(lost),
            )
        return RunProgress(
            total=total,
            dispatched=dispatched,
            done=int(done),
            failed=failed,
            queued_chunks=int(queued),
            inflight=inflight,
            lost=lost,
        )


def missing_books(
    *,
    has_state: bool,
    known: bool,
    counted: str | None,
    counts: tuple[int, int, int],
    found: tuple[int, int, int],
) -> tuple[str, ...]:
    """What of a run's books is gone, from what the state counts and the keys hold.

    ``counts`` and ``found`` are (users done, segments staged, chunks queued): the
    state's counts and the sizes of the keys they count. A run the registry (or its
    staged set) knows with no state has lost its state, and so has one whose state
    was written again after its segments were staged (``counted`` is ``rebuilt``);
    a key smaller than its count has lost itself, a larger one means the counts went
    with the state. A state without ``counted`` predates the counts: not checked.
    """
    state = "the run's state (its size, counts and downstream)"
    if not has_state:
        return (state,) if known else ()
    if counted == "rebuilt":
        return (state,)
    if counted is None:
        return ()
    names = ("the users done", "the segments staged", "the queued chunks")
    lost = []
    for name, count, size in zip(names, counts, found, strict=True):
        if size < count:
            lost.append(f"{name}: {count} counted, {size} found")
        elif size > count:
            lost.append(f"the run's counts ({name}: {count} counted, {size} found)")
    return tuple(lost)


def sweep_registry(client: redis.Redis[bytes], now: float | None = None) -> None:
    """Look at the registry's runs that are due: bound the abandoned, forget the ended.

    An active run unchanged for :data:`ABANDONED_AFTER` is abandoned: its books get
    :data:`RUN_TTL` (a coordinator that comes back makes them persistent again). One
    whose books are gone is reported lost. Ended runs leave the registry once their
    books expired. At most :data:`_SWEEP_LIMIT` runs a call: each staging sweeps.
    """
    now = time.time() if now is None else now
    gone = client.zrangebyscore(ENDED_RUNS, "-inf", now, start=0, num=_FORGET_LIMIT)
    if gone:
        with client.pipeline() as pipe:
            pipe.zrem(ENDED_RUNS, *gone)
            pipe.hdel(FINAL_PROGRESS, *gone)
            pipe.execute()
    for raw in client.zrangebyscore(ACTIVE_RUNS, "-inf", now, start=0, num=_SWEEP_LIMIT):
        _look_at(JitRun(client, raw.decode()), now)


def _look_at(run: JitRun, now: float) -> None:
    with run.client.pipeline() as pipe:
        pipe.hget(run.state, "changed")
        pipe.ttl(run.state)
        changed, ttl = pipe.execute()
    if ttl == -1 and changed is not None and float(changed) + ABANDONED_AFTER > now:
        run.client.zadd(ACTIVE_RUNS, {run.run_id: float(changed) + ABANDONED_AFTER}, xx=True)
        return
    if ttl == -2:
        logger.error("run %s is lost: Redis evicted its books before it ended", run.run_id[:24])
    elif ttl == -1:
        logger.warning(
            "run %s abandoned: unchanged for %.0f s; its books expire in %d s",
            run.run_id[:24],
            now - float(changed or 0),
            RUN_TTL,
        )
        with run.client.pipeline() as pipe:
            books = run.mortal_keys()
            for key in books:
                pipe.expire(key, RUN_TTL)
            pipe.execute()
    with run.client.pipeline() as pipe:
        pipe.zrem(ACTIVE_RUNS, run.run_id)
        pipe.zadd(ENDED_RUNS, {run.run_id: now + (ttl if ttl > 0 else RUN_TTL)})
        pipe.execute()
