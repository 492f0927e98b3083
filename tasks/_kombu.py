"""Kombu's Redis transport: one client object per pool, and no rerun after a dropped link.

Kombu's Redis channel builds a new ``redis.Redis`` object for each command it
sends outside its event loop: every task it publishes, every event, every
acknowledgement. With redis-py 8 that object costs about as much CPU as the
command's own round trip (its response-callback tables are rebuilt each
time), and it holds no state of its own beyond the connection pool it is
given. This channel keeps one per pool and hands it out instead; connections
still come from the same pool, command by command, so nothing else changes.

When Redis drops the worker's connection, kombu closes the channel and puts
every message it had delivered and not yet acknowledged back on its queue:
the ones waiting in the worker (reserved, or counting down), which Celery
forgets on a reconnect and must get again, but also the ones running at that
moment, which then run a second time beside the first. :class:`QoS` puts back
only the former. A running task's message stays among the unacknowledged
until the task ends and acknowledges it, or, if its worker dies instead, until
the visibility timeout hands it to another worker, as for any crash. And when
Redis is down at that moment (a restart), the messages it could not put back
are put back by the worker's next restore sweep once Redis answers, not left
for the visibility timeout.

``tasks.app`` makes its broker connections with :class:`Connection`, which
picks this transport wherever kombu would pick its Redis one (``redis://``,
``rediss://``); URLs, and what Flower reads from them, stay as they are.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP as CeleryAMQP
from kombu.connection import Connection as KombuConnection
from kombu.transport import redis as kombu_redis

from tasks._redis import STORE_ERRORS

__all__ = ["AMQP", "Channel", "Connection", "QoS", "Transport"]


def _written_to_a_process(request: Any) -> bool:
    """Whether the pool has begun writing ``request`` to a pool process (it will run there).

    Requests still in the pool's outgoing buffer are dropped when the connection
    is lost, and must be put back.
    """
    ref = getattr(request, "_apply_result", None)
    job = ref() if callable(ref) else None
    return job is not None and getattr(job, "_write_to", None) is not None


def _running_tags() -> set[Any]:
    """Delivery tags of the messages whose tasks this worker runs, or is handing to a process.

    A request written to a pool process runs although the pool has not yet said
    it started: put back, it would run twice. Kept, it is acknowledged when it
    ends, or comes back after the visibility timeout if its worker dies.
    """
    from celery.worker import state

    requests = [*state.active_requests]
    requests += [r for r in state.reserved_requests if _written_to_a_process(r)]
    tags = set()
    for request in requests:
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag is not None:
            tags.add(tag)
    return tags


#: Tags of messages a closing channel could not put back (Redis was down): put back later.
_unrestored: set[Any] = set()


class QoS(kombu_redis.QoS):
    """Kombu's Redis ack emulation, leaving running tasks' messages to their own ack."""

    def restore_unacked(self, client: Any = None) -> None:
        running = _running_tags()
        waiting = [tag for tag in self._delivered if tag not in running]
        self._delivered.clear()
        _unrestored.update(waiting)
        self._restore(client)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        if _unrestored:
            self._restore(None)
        return super().restore_visible(*args, **kwargs)  # type: ignore[no-untyped-call]

    def _restore(self, client: Any) -> None:
        """Put back what is owed; a tag already acked or put back is a no-op."""
        try:
            with self.channel.conn_or_acquire(client) as conn:
                for tag in list(_unrestored):
                    self.restore_by_tag(tag, client=conn)  # type: ignore[no-untyped-call]
                    _unrestored.discard(tag)
        except STORE_ERRORS:
            pass  # Redis is away: the next restore sweep tries again


class Channel(kombu_redis.Channel):
    QoS = QoS
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


class Connection(KombuConnection):
    """A kombu connection that uses :class:`Transport` in place of kombu's Redis one."""

    def get_transport_cls(self) -> Any:
        cls = super().get_transport_cls()  # type: ignore[no-untyped-call]
        return Transport if cls is kombu_redis.Transport else cls


class AMQP(CeleryAMQP):  # type: ignore[misc]
    """Celery's messaging glue, connecting through :class:`Connection`."""

    Connection = Connection
