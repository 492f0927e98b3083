"""Which users of a ``with_user_tokens`` run have had their downstream task published.

The one record that keeps a chunk task that runs again from sending a user's
downstream task twice: redelivered after its worker died, back from the broker
after an outage, or a new chunk task that took over a chunk gone stale. A chunk
task records each user right after publishing the user's task, and skips the
users recorded already. A user whose publish landed and whose record did not
(the worker died, or Redis stayed away past the retries in place, in between)
is sent again. A chunk task that runs again with its tokens (in its progress,
or kept in the run's books: :meth:`~tasks.fanout.store.JitRun.keep_minted`) sends
the same message again (a user's task has one id in a run,
:func:`~tasks.fanout.tasks.downstream_task_id`), which the package's Redis
transport hands over once; one that comes back after its tokens are no longer
kept (a crash, redelivered after the visibility timeout) mints anew, and the
task runs twice: a downstream task must be idempotent for that, as for any
redelivery.

The record is the run's, in the run's hash slot (``sfox:jit:{<run_id>}:sent-users``),
and lives as long as the run's other books: no TTL while the run is active (a Redis on
``volatile-lru`` evicts only keys with one), the run's TTL from its end. Sending a
user's task again on purpose (the nightly run's resend of lost users) does not look
here. Nothing here knows Celery.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from .store import RUN_TTL, JitRun

__all__ = ["Dispatched"]


class Dispatched:
    """The users of one run whose downstream task was published."""

    def __init__(self, client: redis.Redis[bytes], run_id: str) -> None:
        self.client = client
        books = JitRun(client, run_id)
        self.key = books.sent_users
        self._state = books.state

    def among(self, user_ids: Iterable[str]) -> set[str]:
        """Those of ``user_ids`` whose downstream task was published already."""
        users = list(user_ids)
        if not users:
            return set()
        with self.client.pipeline(transaction=False) as pipe:
            for user_id in users:
                pipe.sismember(self.key, user_id)
            found = pipe.execute()
        return {user for user, sent in zip(users, found, strict=True) if sent}

    def record(self, user_id: str) -> None:
        """``user_id``'s downstream task is out: no chunk task sends it again.

        Persistent while the run is; a record made after its end (a chunk task that
        ran again late) takes the run's TTL, so that nothing is left behind.
        """
        with self.client.pipeline() as pipe:
            pipe.sadd(self.key, user_id)
            pipe.ttl(self._state)
            _, state_ttl = pipe.execute()
        if state_ttl != -1:
            self.client.expire(self.key, RUN_TTL)
