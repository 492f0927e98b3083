"""The Redis bookkeeping of a ``with_user_tokens`` run: its keys, its scripts, its progress.

Every counter moves in one Lua script (this folder's ``.lua`` files), and moves
once however often a call is made again after a redelivery or a dropped Redis
connection. Nothing here knows Celery: the tasks in :mod:`tasks.fanout.tasks`
drive it, and :mod:`tasks.fanout.api` for the package's other parts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .._redis import lua
from .._redis import script as script_for

__all__ = ["RUN_TTL", "Chunk", "JitRun", "RunProgress"]

#: Seconds a run's bookkeeping stays in Redis after its last change.
RUN_TTL = 3 * 86400

_PREFIX = "sfox:jit"

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
