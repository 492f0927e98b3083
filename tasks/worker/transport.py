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
only the former, and marks started a job already written to a pool process,
which Celery's pool would otherwise drop at the reconnect although it runs
(:func:`_running_tags`). A running task's message stays among the unacknowledged
until the task ends and acknowledges it, or, if its worker dies instead, until
the visibility timeout hands it to another worker, as for any crash. And when
Redis is down at that moment (a restart), the messages it could not put back
are put back by the worker's next restore sweep once Redis answers, not left
for the visibility timeout. An acknowledgement that Redis was not there to take
still ends the message here (its record is removed at the next sweep): left
among the delivered, it would be put back when the channel closes, and its
task, which has ended, would run again.

A full Redis (``maxmemory`` reached under ``noeviction``) refuses writes with
``OOM`` and is handled as Redis away, never as a reason for the worker to stop:
an ack it refuses is removed at a later sweep as above; a message it refuses
to take back (a reject with requeue) stays recorded as unacknowledged and is
put back by a later sweep; a sweep or a wait it refuses is skipped. Each says
so in an ERROR line that names memory, and work goes on once memory frees.

Kombu takes a message off its queue with ``BRPOP`` and records it as
unacknowledged with a second command. A connection that drops between the two,
or while ``BRPOP``'s answer is on its way, loses the message: Redis has popped
it, and no one holds it. This channel takes a message with one Lua script
(:data:`TAKE`) that pops it and records it in the same step, and notes in a
small per-consumer inbox which message it handed over. When the answer is lost
on the way, the next take hands the same message over again. When nothing is
waiting, the channel waits with ``BLMOVE q q RIGHT RIGHT``, which blocks like
``BRPOP`` but leaves the message where it is.

A publish whose answer a dropped connection cut is sent again, by redis-py
(the same bytes) or by kombu (a new delivery tag), and the first may have
landed: the task would run twice. The take script remembers each message it
hands over, by a hash of its content less its delivery tag, for
:data:`SEEN_TTL` seconds, and drops another delivery of the same content. A
message this channel puts back (after a crash, a lost connection, a reject)
gets a header of its own (:data:`RESTORE_HEADER`), so each return is handed
over again; a task's retry is a new message (its retry count goes up). The
transport knows nothing of what a task does: whether a user's work may run
again is the business of the books that own it (a ``with_user_tokens`` run's,
the nightly run's), never of which messages the transport hands over.

Through Redis Sentinel (``sentinel://``), :class:`SentinelChannel` is this
channel on kombu's Sentinel one, with one more rule: replication is
asynchronous, and a failover throws away what the old master took that no
replica had. So every write waits for a replica (``WAIT``, as the package's own
clients do: :func:`tasks._redis.replicated`), the take included: a message taken
from a master a failover is replacing is not handed over (it is still on the
new master's queue, or in the inbox if the take stands), and a publish, an
acknowledgement or a restore no replica took is written again on the master the
sentinels name, or left to the sweep as for Redis away.

``tasks.app`` makes its broker connections with :class:`Connection`, which
picks this transport wherever kombu would pick its Redis one (``redis://``,
``rediss://``) and :class:`SentinelTransport` for ``sentinel://``, and so do the
connections of its pool (:class:`ConnectionPool`, Celery's ``app.pool``, which
every publish goes through); URLs, and what Flower reads from them, stay as they
are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from queue import Empty
from time import monotonic, time
from typing import Any

import kombu.connection as kombu_connection
from celery.app.amqp import AMQP as CeleryAMQP
from kombu.connection import Connection as KombuConnection
from kombu.connection import ConnectionPool as KombuConnectionPool
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import loads
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from .._redis import (
    STORE_ERRORS,
    FollowingConnection,
    FollowingSSLConnection,
    OutOfMemoryError,
    ReplicatedRedis,
    UnreplicatedWrite,
    lua,
    replicated,
    report_full,
    script,
)

#: Kombu 5.5+: the class of a pool's connections, kombu's own whatever the pool's
#: connection is. Kombu 5.4 has none: a pool clones its connection, class and all.
_KOMBU_POOLED: Any = getattr(kombu_connection, "PooledConnection", None)
#: Whether a pool of :class:`Connection` must be told to make the package's connections.
POOLS_MAKE_THEIR_OWN = _KOMBU_POOLED is not None

__all__ = [
    "AMQP",
    "LAST_QUEUES",
    "RESTORE_HEADER",
    "SEEN_TTL",
    "TAKE",
    "Channel",
    "Connection",
    "ConnectionPool",
    "PooledConnection",
    "QoS",
    "SentinelChannel",
    "SentinelTransport",
    "Transport",
]

logger = logging.getLogger(__name__)

#: Seconds a handed-over message is remembered (by a hash of its content, less its
#: delivery tag), to drop a second delivery of it that a retried publish made. Such a
#: copy lands right behind the first.
SEEN_TTL = 900
#: Seconds a consumer's inbox (the message it was last handed) outlives its last take.
INBOX_TTL = 3600
#: A header each message put back gets a new value of, telling it from the first delivery.
RESTORE_HEADER = "sfox_restore"

#: Queues taken from only when the consumer's other queues are empty: the batch queue
#: (:mod:`tasks.worker.lanes`), so that on-demand work never waits behind batch work.
LAST_QUEUES: set[str] = set()
#: Seconds an idle consumer with one of :data:`LAST_QUEUES` waits on its first queue
#: before it looks at all of them again: how late batch work may start on an idle worker.
LAST_QUEUE_WAIT = 0.2

#: Pop the first message of the consumer's queues and record it as unacked, in one step
#: (``take.lua``, which names its keys and arguments).
TAKE = lua(__package__ or "tasks.worker", "take")
_TAKE_SHA = hashlib.sha1(TAKE.encode()).hexdigest()  # noqa: S324 - Redis names scripts so

#: This process's consumers, told apart from other processes' by their inboxes.
_PROCESS = uuid.uuid4().hex
#: Per inbox: the tag of the last message this process received through it.
_last_received: dict[str, str] = {}


def _written_job(request: Any) -> Any:
    """The pool's job for ``request`` if the pool has begun writing it to a process, else None.

    A job still in the pool's outgoing buffer is dropped when the connection is
    lost: its message must be put back. One being written, or written, runs.
    """
    ref = getattr(request, "_apply_result", None)
    job = ref() if callable(ref) else None
    if job is None or getattr(job, "_write_to", None) is None:
        return None
    return job


def _running_tags() -> set[Any]:
    """Delivery tags of the messages whose tasks this worker runs, or is handing to a process.

    A request written to a pool process runs although the process has not yet
    said it started: put back, it would run twice. Kept, it is acknowledged when
    it ends, or comes back after the visibility timeout if its worker dies.

    Called as the consumer's channel closes, before Celery's pool drops, for the
    reconnect, every job whose process has not yet said it started: it would then
    ignore that job's answers, and the message of a written one, which runs, would
    never be acknowledged and would come back after the visibility timeout to run
    again. So a written job is marked started here, as billiard marks it when its
    process says so (``ApplyResult._accepted``): the pool keeps it, and its task
    acknowledges its message when it ends.
    """
    from celery.worker import state

    requests = [*state.active_requests]
    for request in state.reserved_requests:
        job = _written_job(request)
        if job is not None:
            job._accepted = True
            requests.append(request)
    tags = set()
    for request in requests:
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag is not None:
            tags.add(tag)
    return tags


#: Tags of messages a closing channel could not put back (Redis was down): put back later.
_unrestored: set[Any] = set()
#: Tags of messages acknowledged while Redis was away: their records are removed later.
_unremoved: set[Any] = set()
#: Seconds a consumer waits between two takes while the broker's Redis is full.
FULL_WAIT = 1.0


def _report_full(channel: Any, doing: str) -> None:
    """An ERROR line (at most one per interval) saying the broker's Redis is out of memory."""
    client = getattr(channel.connection, "client", None)
    where = "of the broker"
    if client is not None:  # named without credentials
        scheme = client.transport_cls if isinstance(client.transport_cls, str) else "redis"
        where = f"{scheme}://{client.hostname}:{client.port}/{client.virtual_host or 0}"
    report_full(f"{where} (the broker)", doing)


class QoS(kombu_redis.QoS):
    """Kombu's Redis ack emulation, leaving running tasks' messages to their own ack."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        taken = getattr(self.channel, "_taken", None)
        if taken is not None and delivery_tag in taken:
            taken.discard(delivery_tag)  # the take script has recorded it already
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
        else:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]

    def ack(self, delivery_tag: Any) -> None:
        """Acknowledge; if Redis is away, the message is still done, and its record goes later.

        Left among the delivered, a message whose ack failed would be put back
        when the channel closes, and its task, which has ended, would run again.
        """
        if getattr(self.channel.connection, "client", None) is None:
            _unremoved.add(delivery_tag)  # its channel closed while the task ran
        else:
            try:
                self._remove_from_indices(delivery_tag).execute()  # type: ignore[no-untyped-call]
            except STORE_ERRORS as exc:
                _unremoved.add(delivery_tag)
                if isinstance(exc, OutOfMemoryError):
                    _report_full(self.channel, "acknowledging a finished task")
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        """Reject; if Redis is away or refuses it, the message stays owed and a sweep finishes it.

        Requeued, it stays recorded as unacknowledged until a sweep puts it back;
        dropped, its record goes at a sweep, as for an ack. So too when the channel
        closed with its connection while the task ran (a running task's message is
        not put back then): a task that goes back to the broker after a reconnect
        rejects it here, and the next channel's sweep puts it back.
        """
        owed = _unrestored if requeue else _unremoved
        if getattr(self.channel.connection, "client", None) is None:
            owed.add(delivery_tag)  # its channel closed while the task ran
            virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
            return
        try:
            super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]
        except STORE_ERRORS as exc:  # a put-back that ran twice does nothing the second time
            owed.add(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
            if isinstance(exc, OutOfMemoryError):
                _report_full(self.channel, "putting a message back on its queue")

    def restore_unacked(self, client: Any = None) -> None:
        running = _running_tags()
        waiting = [tag for tag in self._delivered if tag not in running]
        self._delivered.clear()
        _unrestored.update(waiting)
        self._restore(client)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        if _unrestored or _unremoved:
            self._restore(None)
        try:
            return super().restore_visible(*args, **kwargs)  # type: ignore[no-untyped-call]
        except OutOfMemoryError:  # its lock is a write: the next sweep tries again
            _report_full(self.channel, "the sweep for unacknowledged messages")
            return None

    def _restore(self, client: Any) -> None:
        """Put back what is owed; a tag already acked or put back is a no-op."""
        if not (_unrestored or _unremoved):
            return
        if client is None and getattr(self.channel.connection, "client", None) is None:
            return  # closed with its connection: the next channel's sweep does it
        try:
            with self.channel.conn_or_acquire(client) as conn:
                for tag in list(_unremoved):
                    self._remove_from_indices(tag, conn.pipeline()).execute()  # type: ignore[no-untyped-call]
                    _unremoved.discard(tag)
                for tag in list(_unrestored):
                    self.restore_by_tag(tag, client=conn)  # type: ignore[no-untyped-call]
                    _unrestored.discard(tag)
        except STORE_ERRORS as exc:  # Redis is away or full: the next restore sweep tries again
            if isinstance(exc, OutOfMemoryError):
                _report_full(self.channel, "putting messages back on their queues")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _sync_client: Any = None
    #: What the consuming connection's pending command is: "TAKE", "WAIT" or None (BRPOP).
    _pending: str | None = None
    #: Whether the next poll waits for a message (the last take found none).
    _waiting = False
    _wait_turn = 0
    #: How to wait: BLMOVE (Redis >= 6.2), or BLPOP on a key no one fills.
    _wait_command = "BLMOVE"
    #: Whether Redis has the take script cached (EVALSHA), as far as this channel knows.
    _take_cached = True
    #: When (monotonic) Redis last refused this channel a write for want of memory.
    _full_at = -FULL_WAIT
    _inbox_key = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        #: Tags the take script recorded as unacked, not yet appended to the QoS.
        self._taken: set[str] = set()

    def _key(self, queue: str, pri: int) -> str:
        return str(self._q_for_pri(queue, pri))  # type: ignore[no-untyped-call]

    def _takes_atomically(self) -> bool:
        """Whether this channel takes with :data:`TAKE`; else it is kombu's own."""
        return bool(self.ack_emulation) and not self.global_keyprefix

    def _take_keys(self, queues: list[str]) -> tuple[list[str], list[Any]]:
        keys = [self._key(queue, pri) for pri in self.priority_steps for queue in queues]
        digest = hashlib.sha1("\0".join(sorted(keys)).encode()).hexdigest()[:16]  # noqa: S324
        inbox = f"sfox:inbox:{_PROCESS}:{os.getpid()}:{digest}"
        self._inbox_key = inbox
        args = [
            time(),
            _last_received.get(inbox, ""),
            "sfox:seen:",
            SEEN_TTL,
            INBOX_TTL,
        ]
        return [self.unacked_key, self.unacked_index_key, inbox, *keys], args

    def _taken_payload(self, reply: Any, inbox: str) -> tuple[Any, str] | None:
        """The payload and queue of a take's answer; None when it handed nothing over."""
        if reply is None:
            _last_received[inbox] = ""
            return None
        key, item, tag, dropped, again = reply
        if dropped:
            logger.info(
                "dropped %d second delivery(ies) of a message whose publish was retried",
                dropped,
            )
        if key is None:
            _last_received[inbox] = ""
            return None
        tag = _text(tag) if tag is not None else ""
        _last_received[inbox] = tag
        payload = loads(_text(item))  # type: ignore[no-untyped-call]
        if again:
            payload = payload[0]  # its unacked record: [message, exchange, routing key]
        if tag:
            self._taken.add(tag)
        return payload, _text(key).rsplit(self.sep, 1)[0]

    def _do_restore_message(
        self, payload: Any, exchange: Any, routing_key: Any, pipe: Any, leftmost: bool = False
    ) -> None:
        headers = payload.get("headers") if isinstance(payload, dict) else None
        if isinstance(headers, dict):
            headers[RESTORE_HEADER] = uuid.uuid4().hex  # not a copy: hand it over again
        super()._do_restore_message(  # type: ignore[no-untyped-call]
            payload, exchange, routing_key, pipe, leftmost
        )

    def _brpop_start(self, timeout: Any = None) -> None:
        if not self._takes_atomically():
            super()._brpop_start(timeout)  # type: ignore[no-untyped-call]
            return None
        if timeout is None:
            timeout = getattr(self, "brpop_timeout", 1)  # kombu < 5.5 has none: 1 s
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        first = [q for q in queues if q not in LAST_QUEUES]
        queues = first + [q for q in queues if q in LAST_QUEUES]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        if self._waiting:
            self._pending = "WAIT"
            self._wait_turn += 1
            # BLMOVE waits on one key: on the first queues, and not for long while a
            # last queue (batch work) may fill meanwhile.
            waited = first or queues
            key = self._key(waited[self._wait_turn % len(waited)], 0)
            if len(waited) < len(queues):
                timeout = min(timeout or LAST_QUEUE_WAIT, LAST_QUEUE_WAIT)
            # A full Redis refuses BLMOVE (a write) at once: wait on the idle key meanwhile,
            # so that the consumer does not spin.
            full = monotonic() - self._full_at < FULL_WAIT
            if self._wait_command == "BLMOVE" and not full:
                connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", timeout or 0)
            else:
                connection.send_command("BLPOP", f"{self._inbox_key}:idle", timeout or 1)
            return None
        self._pending = "TAKE"
        keys, args = self._take_keys(queues)
        if self._take_cached:
            connection.send_command("EVALSHA", _TAKE_SHA, len(keys), *keys, *args)
        else:
            connection.send_command("EVAL", TAKE, len(keys), *keys, *args)
        return None

    def _brpop_read(self, **options: Any) -> Any:
        pending, self._pending = self._pending, None
        if pending is None:
            return super()._brpop_read(**options)  # type: ignore[no-untyped-call]
        inbox = self._inbox_key
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "EVALSHA" if pending == "TAKE" else "BLMOVE", **options
                )
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except NoScriptError:
                self._take_cached = False  # Redis lost it (a restart); EVAL caches it again
                raise Empty() from None
            except OutOfMemoryError:
                self._full_at = monotonic()
                self._waiting = True  # the next poll waits, without writing
                _report_full(self, "taking the next message")
                raise Empty() from None
            except ResponseError:
                if pending != "WAIT" or self._wait_command != "BLMOVE":
                    raise
                self._wait_command = "BLPOP"  # Redis before 6.2
                raise Empty() from None
            if pending == "WAIT":
                self._waiting = False
                raise Empty()
            self._take_cached = True
            if reply is not None and reply[0] is not None and not self._take_stands():
                raise Empty()  # taken on a master a failover replaces: not handed over
            taken = self._taken_payload(reply, inbox)
            if taken is None:
                self._waiting = reply is None
                raise Empty()
            payload, queue = taken
            self._queue_cycle.rotate(queue)
            self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _take_stands(self) -> bool:
        """Whether the message just taken may be handed over: always, but on Sentinel."""
        return True

    def maybe_refresh_binding_expiry(self) -> None:
        # kombu >= 5.7 refreshes its binding tables each second with a script a full
        # Redis refuses; said once per interval here rather than a traceback a second.
        refresh = getattr(super(), "maybe_refresh_binding_expiry", None)
        if refresh is None:
            return
        try:
            refresh()
        except OutOfMemoryError:
            _report_full(self, "refreshing the queue bindings")

    def _get(self, queue: str, timeout: Any = None) -> Any:
        if not self._takes_atomically():
            return super()._get(queue)  # type: ignore[no-untyped-call]
        keys, args = self._take_keys([queue])
        with self.conn_or_acquire() as client:
            reply = script(client, TAKE)(keys=keys, args=args)
        taken = self._taken_payload(reply, keys[2])
        if taken is None:
            raise Empty()
        return taken[0]

    def _create_client(self, asynchronous: bool = False) -> Any:
        if self.connection is None:
            # Closed under the producer that holds it (its connection went on): a
            # connection error, so that kombu's retry reconnects and sends again.
            raise RedisConnectionError("the channel was closed")
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """:class:`Channel` on kombu's Sentinel channel; every write waits for a replica.

    Kombu's Sentinel channel adds only how the pools are made (through the
    sentinels) to its Redis channel, so the two combine by inheritance. Publishes,
    acknowledgements and restores go through :class:`~tasks._redis.ReplicatedRedis`;
    a take, sent by hand on the consuming connection, waits in :meth:`_take_stands`.
    """

    #: Connections that ask the sentinels for the master at every connect, a reconnect
    #: in place included (redis-py's return to the address they had).
    connection_class: Any = FollowingConnection
    connection_class_ssl: Any = FollowingSSLConnection

    def _get_client(self) -> Any:
        if self.global_keyprefix:  # kombu's prefixing client, and kombu's own take
            return super()._get_client()  # type: ignore[no-untyped-call]
        return ReplicatedRedis

    def _take_stands(self) -> bool:
        """Whether the take a replica may not have survives a failover; else drop the link.

        Not handed over, the message stays where the master the sentinels name
        has it: on its queue if the take was thrown away, else in this consumer's
        inbox, which hands it over at the next take.
        """
        connection = self.client.connection
        try:
            replicated(self.client.connection_pool, connection)
        except (UnreplicatedWrite, *self.connection_errors):
            connection.disconnect()  # the next take connects to the master the sentinels name
            return False
        return True


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


#: Kombu's Redis transports, and the package's in their place.
_TRANSPORTS: dict[Any, Any] = {
    kombu_redis.Transport: Transport,
    kombu_redis.SentinelTransport: SentinelTransport,
}


class Connection(KombuConnection):
    """A kombu connection that uses :class:`Transport` (:class:`SentinelTransport`) in
    place of kombu's Redis (Sentinel) one; so do the connections of its pools."""

    def get_transport_cls(self) -> Any:
        cls = super().get_transport_cls()  # type: ignore[no-untyped-call]
        return _TRANSPORTS.get(cls, cls)

    def Pool(self, limit: int | None = None, **kwargs: Any) -> Any:
        if not POOLS_MAKE_THEIR_OWN:  # kombu 5.4: its clones are of this class already
            return super().Pool(limit, **kwargs)  # type: ignore[no-untyped-call]
        return ConnectionPool(self, limit=limit, **kwargs)  # type: ignore[no-untyped-call]


class PooledConnection(Connection, _KOMBU_POOLED or KombuConnection):  # type: ignore[misc]
    """A connection of a :class:`ConnectionPool`: kombu's pooled connection, on this transport."""


class ConnectionPool(KombuConnectionPool):
    """Kombu's pool of connections (Celery's ``app.pool``, which every publish of a worker
    and of ``apply_async`` goes through), handing out :class:`PooledConnection`.

    Kombu's own pool makes a ``kombu.connection.PooledConnection``, which picks kombu's
    transport: on Sentinel its publishes waited for no replica, and one made to a master
    a failover had just replaced stood there, and was thrown away when the sentinels
    turned that master into a replica some seconds later.
    """

    def new(self) -> PooledConnection:
        return PooledConnection(self, **dict(self.connection._info(resolve=False)))  # type: ignore[no-untyped-call]


class AMQP(CeleryAMQP):  # type: ignore[misc]
    """Celery's messaging glue, connecting through :class:`Connection`."""

    Connection = Connection
