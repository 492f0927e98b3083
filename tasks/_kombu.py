"""Kombu's Redis transport, publishing through one client object per connection pool.

Kombu's Redis channel builds a new ``redis.Redis`` object for each command it
sends outside its event loop: every task it publishes, every event, every
acknowledgement. With redis-py 8 that object costs about as much CPU as the
command's own round trip (its response-callback tables are rebuilt each
time), and it holds no state of its own beyond the connection pool it is
given. This channel keeps one per pool and hands it out instead; connections
still come from the same pool, command by command, so nothing else changes.

``tasks.app`` makes its broker connections with :class:`Connection`, which
picks this transport wherever kombu would pick its Redis one (``redis://``,
``rediss://``); URLs, and what Flower reads from them, stay as they are.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP as CeleryAMQP
from kombu.connection import Connection as KombuConnection
from kombu.transport import redis as kombu_redis

__all__ = ["AMQP", "Channel", "Connection", "Transport"]


class Channel(kombu_redis.Channel):
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
