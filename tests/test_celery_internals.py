"""Every private name of Celery, kombu, billiard, redis-py and prometheus_client the package uses.

Each row names one internal, the package module that uses it, and what it must
look like (an attribute, a method with these parameters, or a name the class's
source assigns). A release that renames or reshapes one fails here, naming it,
before a worker misbehaves. ``make test-floors`` runs this module at every
dependency's floor too; a row marked with a version range applies only there.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import version

import pytest
from packaging.version import Version


@dataclass(frozen=True)
class Internal:
    """``where`` (module:Class.attr) must exist as ``kind``, for ``used_by``."""

    where: str
    used_by: str
    #: "attr" (exists), "method" (callable with ``params`` first), "assigned" (the
    #: class's source sets ``self.<name>``), "function".
    kind: str = "attr"
    params: tuple[str, ...] = ()
    #: The distribution and lowest version the row applies from.
    since: tuple[str, str] | None = None

    def __str__(self) -> str:
        return f"{self.where} ({self.used_by})"


INTERNALS = [
    # -- Celery ---------------------------------------------------------------------------
    Internal("celery._state:_tls.current_app", "worker/host.py: the host's current app"),
    Internal("celery._state:default_app", "worker/host.py: the host's default app"),
    Internal(
        "celery._state:_get_current_app",
        "worker/host.py: what the fallback app looks like (main 'default', fixups=[])",
        kind="function",
    ),
    Internal(
        "celery.app.task:Task._get_exec_options",
        "fanout/tasks.py: where a downstream task's own app routes it",
        kind="method",
        params=("self",),
    ),
    Internal("celery.app.task:Task._backend", "worker/mint.py: the task's own backend"),
    Internal(
        "celery.app.amqp:Queues.new_missing",
        "worker/lanes.py: SFOX_QUEUE as an app would create it, copied for the batch queue",
        kind="method",
        params=("self", "name"),
    ),
    Internal("kombu.entity:Queue.attrs", "worker/lanes.py: the declaration the batch queue copies"),
    Internal(
        "celery.app.base:Celery._get_backend",
        "worker/app.py: the package app's TTL backend",
        kind="method",
        params=("self",),
    ),
    Internal(
        "celery.backends.redis:RedisBackend._set",
        "worker/backend.py: a result written with its TTL",
        kind="method",
        params=("self", "key", "value"),
    ),
    Internal(
        "celery.backends.base:BaseKeyValueStoreBackend._store_result",
        "worker/backend.py: the task whose result is stored",
        kind="method",
        params=("self", "task_id", "result", "state", "traceback", "request"),
    ),
    Internal(
        "celery.worker.request:Request._apply_result",
        "worker/transport.py: whether a request was written to a pool process",
        kind="assigned",
    ),
    Internal(
        "celery.utils.quorum_queues:detect_quorum_queues",
        "worker/base.py: whether countdowns go to native delayed delivery",
        kind="function",
        since=("celery", "5.5"),
    ),
    # -- billiard -------------------------------------------------------------------------
    Internal(
        "billiard.pool:ApplyResult._write_to",
        "worker/transport.py: the pool process a job is being written to (celery's asynpool "
        "sets it)",
    ),
    Internal(
        "billiard.pool:ApplyResult._accepted",
        "worker/transport.py: a written job marked started, so that the pool's flush at a "
        "reconnect keeps it",
        kind="assigned",
    ),
    # -- kombu's Redis transport ------------------------------------------------------------
    Internal(
        "kombu.transport.redis:Channel._brpop_start",
        "worker/transport.py: the wait for a message",
        kind="method",
        params=("self", "timeout"),
    ),
    Internal(
        "kombu.transport.redis:Channel._brpop_read",
        "worker/transport.py: the take that answers the wait",
        kind="method",
        params=("self",),
    ),
    Internal(
        "kombu.transport.redis:Channel._get",
        "worker/transport.py: a take outside the event loop",
        kind="method",
        params=("self", "queue"),
    ),
    Internal(
        "kombu.transport.redis:Channel._create_client",
        "worker/transport.py: one client object per pool",
        kind="method",
        params=("self", "asynchronous"),
    ),
    Internal(
        "kombu.transport.redis:Channel._get_client",
        "worker/transport.py: the Sentinel channel's client waits for a replica",
        kind="method",
        params=("self",),
    ),
    Internal(
        "kombu.transport.redis:SentinelChannel._get_pool",
        "worker/transport.py: the Sentinel channel is the package's channel on kombu's",
        kind="method",
        params=("self", "asynchronous"),
    ),
    Internal(
        "kombu.transport.redis:Channel._do_restore_message",
        "worker/transport.py: a put-back message gets its own header",
        kind="method",
        params=("self", "payload", "exchange", "routing_key"),
    ),
    Internal("kombu.transport.redis:Channel._in_poll", "worker/transport.py", kind="assigned"),
    Internal("kombu.transport.redis:Channel._queue_cycle", "worker/transport.py", kind="assigned"),
    Internal(
        "kombu.transport.redis:QoS.restore_unacked",
        "worker/transport.py: what a closing channel puts back",
        kind="method",
        params=("self", "client"),
    ),
    Internal(
        "kombu.transport.redis:QoS.restore_visible",
        "worker/transport.py: the visibility sweep",
        kind="method",
        params=("self",),
    ),
    Internal("kombu.transport.virtual.base:QoS._delivered", "worker/transport.py", kind="assigned"),
    Internal(
        "kombu.transport.redis:QoS.reject",
        "worker/transport.py: a reject on a channel closed while its task ran is owed",
        kind="method",
        params=("self", "delivery_tag", "requeue"),
    ),
    Internal(
        "kombu.connection:Connection.Pool",
        "worker/transport.py: app.pool hands out connections on the package's transport",
        kind="method",
        params=("self", "limit"),
    ),
    Internal(
        "kombu.connection:ConnectionPool.new",
        "worker/transport.py: the pool's connections, made as kombu makes them",
        kind="method",
        params=("self",),
    ),
    Internal(
        "kombu.connection:PooledConnection.__init__",
        "worker/transport.py: a pooled connection on the package's transport",
        kind="method",
        params=("self", "pool"),
        since=("kombu", "5.5.0"),
    ),
    Internal(
        "kombu.connection:Connection._info",
        "worker/transport.py: a pooled connection copies its pool's connection",
        kind="method",
        params=("self", "resolve"),
    ),
    Internal(
        "kombu.transport.virtual.base:QoS.append",
        "worker/transport.py",
        kind="method",
        params=("self", "message", "delivery_tag"),
    ),
    Internal(
        "kombu.transport.virtual.base:QoS.ack",
        "worker/transport.py",
        kind="method",
        params=("self", "delivery_tag"),
    ),
    Internal(
        "kombu.transport.virtual.base:Channel.connection",
        "worker/transport.py: the connection that delivers a take",
        kind="assigned",
    ),
    # -- redis-py: the package's Sentinel client ------------------------------------------
    Internal(
        "redis.client:Redis._send_command_parse_response",
        "_redis.py: a write's WAIT, on the connection that wrote, inside its retry",
        kind="method",
        params=("self", "conn", "command_name"),
    ),
    Internal(
        "redis.client:Pipeline._execute_transaction",
        "_redis.py: a pipeline's WAIT",
        kind="method",
        params=("self", "connection", "commands", "raise_on_error"),
    ),
    Internal(
        "redis.client:Pipeline._execute_pipeline",
        "_redis.py: a pipeline's WAIT",
        kind="method",
        params=("self", "connection", "commands", "raise_on_error"),
    ),
    Internal(
        "redis.sentinel:SentinelManagedConnection.connect_check_health",
        "_redis.py: a reconnect in place asks the sentinels for the master (before it, "
        "connect() did, and still does)",
        kind="method",
        params=("self",),
        since=("redis", "6.0"),
    ),
    # -- prometheus_client ----------------------------------------------------------------
    Internal("prometheus_client.values:ValueClass", "_metrics.py: multiprocess mode per process"),
    Internal(
        "prometheus_client.values:get_value_class",
        "_metrics.py: multiprocess mode per process",
        kind="function",
    ),
]


def _applies(internal: Internal) -> bool:
    if internal.since is None:
        return True
    dist, lowest = internal.since
    return Version(version(dist)) >= Version(lowest)


def _owner_and_name(internal: Internal) -> tuple[object, str]:
    module_name, path = internal.where.split(":")
    owner: object = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


@pytest.mark.parametrize("internal", INTERNALS, ids=str)
def test_the_internal_is_still_there(internal: Internal) -> None:
    """The private name the package relies on exists, in the shape it relies on."""
    if not _applies(internal):
        pytest.skip(f"{internal.where} is not in this release: the package does without it")
    try:
        owner, name = _owner_and_name(internal)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{internal} is gone: {exc}")
    if internal.kind == "assigned":
        source = inspect.getsource(owner)  # type: ignore[arg-type]
        assert f"self.{name} =" in source or f"self.{name}:" in source, (
            f"{internal}: {owner!r} no longer sets self.{name}"
        )
        return
    assert hasattr(owner, name), f"{internal} is gone"
    value = getattr(owner, name)
    if internal.kind in ("method", "function"):
        assert callable(value), f"{internal} is no longer callable"
        params = tuple(inspect.signature(value).parameters)
        assert params[: len(internal.params)] == internal.params, (
            f"{internal}: its parameters are now {params}, the package expects "
            f"{internal.params} first"
        )
