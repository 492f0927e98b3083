"""The package's own Redis: one client recipe and one policy for a dropped connection.

Redis holds the shared limiter, the fan-out's and the nightly run's books. A
dropped connection there (a failover, a proxy restart, a ``timeout`` setting,
a blip) is transient, like a 503 from sFOX, and is handled in two steps, the
same for every call the package makes:

1. **In place.** Every client made by :func:`redis_client` retries a command
   that met a connection error or a timeout, :data:`REDIS_RETRIES` times with
   backoff (:data:`REDIS_BACKOFF_BASE` doubling up to :data:`REDIS_BACKOFF_CAP`,
   with jitter): about 5 to 11 s in all, enough to ride through a failover or
   a short restart. A retried command may have run once already, so every
   script and write of the package is idempotent: running it twice has the
   effect of running it once (each script says why).
2. **At the broker.** An outage longer than that reaches the task as one of
   :data:`STORE_ERRORS`. The task's base class (:class:`tasks.worker.mint.SfoxTask`)
   sends it back to the broker with its progress, to resume after
   :data:`REDIS_OUTAGE_COUNTDOWN` seconds. It never fails the task. The
   limiter turns the same errors into a wait (:class:`~tasks.budget.ratelimit.LimiterWait`),
   so a mint keeps its tokens.

A Redis that is full (``maxmemory`` reached under ``noeviction``) answers a
write with ``OOM``: that is an outage of the store as well, handled the same way,
with an ERROR line that names memory (:data:`STORE_ERRORS` includes
``OutOfMemoryError``). Work goes on once memory frees.

Redis Sentinel is reached with ``sentinel://h1:p1;sentinel://h2:p2`` and a
master name (:func:`redis_client`); the client asks the sentinels for the
master and follows a failover. Replication is asynchronous, and a failover
throws away what the old master took that no replica had: so on a
Sentinel-managed master every write of the package's clients waits for a
replica to acknowledge it (``WAIT``, :func:`replicated`), and a write none
acknowledged, made to a master the sentinels no longer name or during a
failover, is an outage like a dropped connection: written again, on the master
the sentinels name. Plain Redis sends no ``WAIT``. :func:`inspect_redis` reads
what the package needs to know about a Redis before relying on it: its
eviction policy, and whether it is a Cluster node.

Celery's own Redis use (publishing, acknowledgements, results) is covered by
Celery's and kombu's settings in ``celeryconfig.py``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.sentinel
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import OutOfMemoryError  # type: ignore[attr-defined]  # not in the stubs
from redis.retry import Retry

__all__ = [
    "CLUSTER_REFUSAL",
    "DEFAULT_SENTINEL_PORT",
    "REDIS_BACKOFF_BASE",
    "REDIS_BACKOFF_CAP",
    "REDIS_OUTAGE_COUNTDOWN",
    "REDIS_RETRIES",
    "REDIS_SCHEMES",
    "REPLICA_ACK_MS",
    "STORE_ERRORS",
    "FollowingConnection",
    "FollowingSSLConnection",
    "OutOfMemoryError",
    "RedisFacts",
    "ReplicatedRedis",
    "UnreplicatedWrite",
    "inspect_redis",
    "is_sentinel",
    "lua",
    "masked_url",
    "probe_client",
    "redis_client",
    "replicated",
    "report_full",
    "script",
    "sentinel_master_name",
    "with_master_name",
    "with_sentinel_auth",
]

logger = logging.getLogger("tasks.redis")

#: Retries of one command after a dropped connection or a timeout, before it fails.
REDIS_RETRIES = 8
#: First backoff ceiling in seconds; doubles per retry up to :data:`REDIS_BACKOFF_CAP`.
REDIS_BACKOFF_BASE = 0.1
#: Largest wait between two retries of one command, seconds.
REDIS_BACKOFF_CAP = 2.0
#: Seconds a task waits at the broker when Redis stays away past the retries in place.
REDIS_OUTAGE_COUNTDOWN = 5.0
#: Seconds one command may wait for its answer, and to connect.
REDIS_SOCKET_TIMEOUT = 5.0
REDIS_CONNECT_TIMEOUT = 2.0

#: Milliseconds a write on a Sentinel-managed master waits for a replica's acknowledgement.
REPLICA_ACK_MS = 100


class UnreplicatedWrite(redis.ConnectionError):
    """A write no replica acknowledged, that a failover could throw away: write it again.

    A ``ConnectionError``: the in-place retry (and, past it, the broker) handles it
    as the outage it is, on a new connection to the master the sentinels name.
    """


#: What Redis raises for an outage (``BusyLoadingError``, a restart loading its data,
#: is a ``ConnectionError``; a failover's ``ReadOnlyError`` from the old master becomes
#: one in redis-py's Sentinel client): transient, never a reason to fail a task. A
#: full Redis (``OutOfMemoryError``: a write refused at ``maxmemory`` under
#: ``noeviction``) is one too: it takes writes again once memory frees.
STORE_ERRORS: tuple[type[redis.RedisError], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OutOfMemoryError,
)

#: URL schemes of a Redis the package can use: one server, or a master behind Sentinel.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")
_SENTINEL = "sentinel://"
#: Port of a sentinel named without one.
DEFAULT_SENTINEL_PORT = 26379
#: Query parameters of a ``sentinel://`` URL that are the package's, not redis-py's.
_MASTER_NAME = "master_name"
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")
#: Seconds between two ERROR lines about one wait for the same full Redis, per process.
FULL_REPORT_INTERVAL = 10.0
#: The one line a worker (and ``sfox-tokens check``) gives for a Redis Cluster under the
#: limiter; ``{where}`` is the Redis, its password masked.
CLUSTER_REFUSAL = (
    "the limiter's Redis {where} is a Redis Cluster node (cluster_enabled:1): the shared "
    "rate limiter and the run books need one standalone Redis or a Sentinel-managed master "
    "(their keys span hash slots); point SFOX_LIMITER_URL at one"
)


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names a master through Redis Sentinel (``sentinel://h1:p1;...``)."""
    return url.startswith(_SENTINEL)


def masked_url(url: str) -> str:
    """``url`` fit for a log line: every password (in each part of a ``;`` list) masked.

    The query is left out: it may carry a sentinel's password.
    """
    return ";".join(_masked_part(part) for part in url.split(";"))


def _masked_part(part: str) -> str:
    try:
        parts = urlsplit(part.strip())
    except ValueError:
        return "(an unreadable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:**@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def sentinel_master_name(url: str) -> str | None:
    """The master name a ``sentinel://`` URL carries (``?master_name=``), if any."""
    for part in url.split(";"):
        for key, value in parse_qsl(urlsplit(part).query):
            if key == _MASTER_NAME and value:
                return value
    return None


def with_master_name(url: str, master_name: str | None, *, replace: bool = False) -> str:
    """``url``, carrying ``master_name`` when it is a ``sentinel://`` URL that names none.

    With ``replace``, ``master_name`` takes the place of the one ``url`` names. The
    package's own clients (:func:`redis_client`) take the master's name from the
    URL; kombu and Celery take it from their transport options instead.
    """
    if not master_name or not is_sentinel(url):
        return url
    if sentinel_master_name(url) and not replace:
        return url
    parts = []
    for index, part in enumerate(url.split(";")):
        split = urlsplit(part)
        query = [(k, v) for k, v in parse_qsl(split.query) if k != _MASTER_NAME]
        if index == 0:
            query.append((_MASTER_NAME, master_name))
        parts.append(urlunsplit(split._replace(query=urlencode(query))))
    return ";".join(parts)


def with_sentinel_auth(url: str, sentinel_kwargs: Mapping[str, Any]) -> str:
    """``url`` carrying the sentinels' ``username`` and ``password`` from ``sentinel_kwargs``.

    Those are kombu's and Celery's transport option of that name; a URL that
    already carries them keeps its own.
    """
    if not is_sentinel(url):
        return url
    parts = url.split(";")
    first = urlsplit(parts[0])
    query = parse_qsl(first.query)
    have = {k for part in parts for k, _ in parse_qsl(urlsplit(part).query)}
    added = [
        (f"sentinel_{key}", str(sentinel_kwargs[key]))
        for key in ("username", "password")
        if sentinel_kwargs.get(key) and f"sentinel_{key}" not in have
    ]
    if not added:
        return url
    query += added
    parts[0] = urlunsplit(first._replace(query=urlencode(query)))
    return ";".join(parts)


def _where(url: str, master_name: str | None) -> str:
    """How log lines name the Redis at ``url``: its URL, passwords masked, and its master."""
    where = masked_url(url)
    return f"{where} (master {master_name!r})" if is_sentinel(url) and master_name else where


_full_reported: dict[tuple[str, str], float] = {}
_full_lock = threading.Lock()


def report_full(where: str, doing: str) -> None:
    """Say that the Redis ``where`` is full: once per :data:`FULL_REPORT_INTERVAL` s per wait.

    ``where`` names the Redis (no credential); ``doing`` says what waits for memory.
    """
    now = time.monotonic()
    with _full_lock:
        last = _full_reported.get((where, doing), -FULL_REPORT_INTERVAL)
        if now - last < FULL_REPORT_INTERVAL:
            return
        _full_reported[(where, doing)] = now
        if len(_full_reported) > 1000:  # one entry per waiting task: forget the old ones
            for key, at in list(_full_reported.items()):
                if now - at >= FULL_REPORT_INTERVAL:
                    del _full_reported[key]
    logger.error(
        "Redis %s is out of memory (used memory above maxmemory, nothing it may evict): it "
        "refuses writes; %s waits and retries until memory frees: delete keys or raise "
        "maxmemory",
        where,
        doing,
    )


class _StoreRetry(Retry):
    """The package's in-place retry, saying so when the reason is a full Redis."""

    def __init__(self, where: str) -> None:
        super().__init__(
            EqualJitterBackoff(cap=REDIS_BACKOFF_CAP, base=REDIS_BACKOFF_BASE), REDIS_RETRIES
        )
        self.where = where

    def call_with_retry(
        self, do: Callable[[], Any], fail: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any:
        def failed(error: Exception, *count: Any) -> Any:
            if isinstance(error, OutOfMemoryError):
                report_full(self.where, "a write of the limiter or the run books")
            return fail(error, *count)

        return super().call_with_retry(do, failed, *args, **kw)


def redis_client(url: str) -> redis.Redis[bytes]:
    """A client for ``url`` whose every command rides through a short outage.

    ``url`` is ``redis://``, ``rediss://``, ``unix://``, or ``sentinel://h1:p1;...``
    whose ``master_name`` query parameter names the master (:func:`with_master_name`).
    """
    where = _where(url, sentinel_master_name(url))
    return _client(
        url,
        redis_class=ReplicatedRedis,
        retry=_StoreRetry(where),
        retry_on_error=list(STORE_ERRORS),
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        health_check_interval=30,
    )


#: Seconds between two questions to the sentinels about where the master is, per pool.
MASTER_CHECK_INTERVAL = 1.0


class FollowingConnection(redis.sentinel.SentinelManagedConnection):
    """A master's connection that asks the sentinels where the master is at every connect.

    redis-py's asks only when the pool hands the connection out: a command's
    retry in place reconnects to the address it had, a master that has died or
    been demoted, until its retries run out.
    """

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_sock", None) is None and self.connection_pool.is_master:
            # No sentinel answering now is for the connect itself to say.
            with contextlib.suppress(redis.ConnectionError):
                self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(*args, **kwargs)  # type: ignore[misc]


class FollowingSSLConnection(FollowingConnection, redis.sentinel.SentinelManagedSSLConnection):
    """:class:`FollowingConnection` over TLS."""


class _FollowingPool(redis.sentinel.SentinelConnectionPool):
    """A Sentinel pool that asks where the master is every :data:`MASTER_CHECK_INTERVAL` s.

    redis-py's own pool asks only when it opens a connection, or when the old
    master, demoted, refuses a write; until then (about ten seconds after a
    failover) its writes land on the old master, which throws them away. Asked
    each second, the pool closes its idle connections as soon as the sentinels
    name another master.
    """

    _checked_at = -MASTER_CHECK_INTERVAL

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        tls = kwargs.pop("ssl", False)
        kwargs["connection_class"] = FollowingSSLConnection if tls else FollowingConnection
        super().__init__(service_name, sentinel_manager, **kwargs)

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= MASTER_CHECK_INTERVAL:
            self._checked_at = now
            # No sentinel answering now is for the connection's own connect to say.
            with contextlib.suppress(redis.ConnectionError):
                self.get_master_address()  # closes idle connections when the master moved
        return super().get_connection(*args, **kwargs)


def probe_client(url: str, timeout: float) -> redis.Redis[bytes]:
    """A client for one look at ``url`` (a check): no retries, every step within ``timeout``."""
    return _client(
        url, retry=Retry(NoBackoff(), 0), socket_timeout=timeout, socket_connect_timeout=timeout
    )


def _client(url: str, *, redis_class: Any = redis.Redis, **options: Any) -> redis.Redis[bytes]:
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    hosts, master_name, master, sentinel_kwargs = _sentinel_spec(url)
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name in options:
            sentinel_kwargs.setdefault(name, options[name])
    sentinel = redis.sentinel.Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **master)
    client: redis.Redis[bytes] = sentinel.master_for(
        master_name, redis_class=redis_class, connection_pool_class=_FollowingPool, **options
    )
    return client


#: Commands that write nothing, so wait for no replica. Any other command waits: a
#: write the package adds later is covered without being listed.
_READS = frozenset({
    "AUTH", "CLIENT", "COMMAND", "CONFIG", "DBSIZE", "ECHO", "EVALSHA_RO", "EVAL_RO",
    "EXISTS", "GET", "HELLO", "HEXISTS", "HGET", "HGETALL", "HKEYS", "HLEN", "HMGET",
    "HSCAN", "HVALS", "INFO", "KEYS", "LINDEX", "LLEN", "LRANGE", "MEMORY", "MGET",
    "OBJECT", "PING", "PTTL", "ROLE", "SCAN", "SCARD", "SELECT", "SENTINEL", "SISMEMBER",
    "SMEMBERS", "SMISMEMBER", "SRANDMEMBER", "SSCAN", "STRLEN", "TIME", "TTL", "TYPE",
    "WAIT", "ZCARD", "ZCOUNT", "ZRANGE", "ZRANGEBYSCORE", "ZRANK", "ZREVRANGE",
    "ZREVRANGEBYSCORE", "ZSCAN", "ZSCORE",
})  # fmt: skip


def _writes(command: Any) -> bool:
    name = command.decode() if isinstance(command, bytes) else str(command)
    return name.split(" ", 1)[0].upper() not in _READS


def replicated(pool: Any, connection: Any) -> None:
    """Return once a replica has every write made on ``connection``, or the write may stand.

    ``WAIT 1`` :data:`REPLICA_ACK_MS` on the connection that wrote. When no
    replica acknowledges in time, the sentinels decide (:func:`stands`): the write
    stands on the master they name when no failover is under way and no replica
    of it is up; else it raises :class:`UnreplicatedWrite`, and the caller's retry
    writes it again (every write of the package may run twice) on a new
    connection, which asks the sentinels for the master: past the retries, the
    task goes back to the broker as for any Redis outage.
    """
    try:
        connection.send_command("WAIT", 1, REPLICA_ACK_MS)
        acked = int(connection.read_response())
    except redis.ResponseError:  # a demoted master, now a replica, refuses WAIT
        acked = 0
    if acked >= 1:
        return
    if stands(pool, (connection.host, connection.port)):
        logger.info(
            "no replica of the Sentinel master %s took a write within %d ms: it stands there",
            getattr(pool, "service_name", "?"),
            REPLICA_ACK_MS,
        )
        return
    logger.info(
        "a write on %s:%s was taken by no replica within the wait, and the sentinels of %s "
        "name another master, are failing over or know a replica catching up: it is "
        "written again",
        connection.host,
        connection.port,
        getattr(pool, "service_name", "?"),
    )
    raise UnreplicatedWrite(
        f"no replica took a write within {REPLICA_ACK_MS} ms, and the sentinels name another "
        "master, are failing over or know a replica catching up: written again"
    )


def stands(pool: Any, address: tuple[Any, Any] | None = None, *, run_id: str | None = None) -> bool:
    """Whether a write no replica acknowledged, made at ``address`` (or on the server
    whose ``run_id`` is given), may stand there.

    Only on the master the sentinels name, while none of them is failing over,
    and when they know no live replica of it: a replica that is up but has not
    caught up (a resync after a failover or a restart) is waited for, since a
    failover now would promote it without the write. A master with no replica up
    and replicating (all down, or an old master the sentinels have not yet turned
    into one) takes writes alone: nothing better can be had, and the replica that
    comes copies them in its first sync. With no sentinel answering, nothing better can be
    known: it stands.
    """
    states = []
    for sentinel in getattr(pool.sentinel_manager, "sentinels", ()):
        with contextlib.suppress(redis.RedisError):
            states.append((sentinel, sentinel.sentinel_master(pool.service_name)))
    if not states:
        return True
    asked, current = max(states, key=lambda found: int(found[1].get("config-epoch") or 0))
    failing_over = any("failover_in_progress" in str(s.get("flags", "")) for _, s in states)
    if address is not None:
        named = (str(current.get("ip")), int(current.get("port") or 0))
        elsewhere = named != (str(address[0]), int(address[1] or 0))
    else:
        elsewhere = not run_id or str(current.get("runid") or "") != run_id
    if failing_over or elsewhere:
        return False
    try:
        replicas = asked.sentinel_slaves(pool.service_name)
    except redis.RedisError:
        return True
    return not any(_live(replica) for replica in replicas)


def _live(replica: Mapping[str, Any]) -> bool:
    """Whether the sentinels see a replica up and replicating (if perhaps not caught up).

    An old master not yet turned into a replica (the sentinels do it some seconds
    after a failover) still reports ``master``: it holds nothing to wait for.
    """
    flags = str(replica.get("flags", ""))
    down = "s_down" in flags or "o_down" in flags or "disconnected" in flags
    return not down and str(replica.get("role-reported", "slave")) == "slave"


class ReplicatedRedis(redis.Redis):  # type: ignore[type-arg]
    """A client of a Sentinel-managed master whose every write waits for a replica.

    The ``WAIT`` is sent inside the command's own retry, on the connection that
    wrote: a write that must be made again is made again, with its ``WAIT``.
    """

    def _send_command_parse_response(
        self, conn: Any, command_name: Any, *args: Any, **options: Any
    ) -> Any:
        reply = super()._send_command_parse_response(conn, command_name, *args, **options)  # type: ignore[misc]
        if _writes(command_name):
            replicated(self.connection_pool, conn)
        return reply

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        return ReplicatedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


class ReplicatedPipeline(redis.client.Pipeline):  # type: ignore[type-arg]
    """A pipeline of :class:`ReplicatedRedis`: one ``WAIT`` after the whole batch, if it wrote."""

    def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: Any) -> Any:
        reply = super()._execute_transaction(connection, commands, raise_on_error)  # type: ignore[misc]
        self._replicated(connection, commands)
        return reply

    def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: Any) -> Any:
        reply = super()._execute_pipeline(connection, commands, raise_on_error)  # type: ignore[misc]
        self._replicated(connection, commands)
        return reply

    def _replicated(self, connection: Any, commands: Any) -> None:
        if any(_writes(args[0]) for args, _options in commands):
            replicated(self.connection_pool, connection)


def _sentinel_spec(
    url: str,
) -> tuple[list[tuple[str, int]], str, dict[str, Any], dict[str, Any]]:
    """The sentinels, the master's name, and the connection options of the master and sentinels.

    As for kombu and Celery, the first part that carries a password gives the
    master's credentials and the first part's path its database. The query (of
    any part) may add ``master_name``, ``sentinel_password`` (and ``_username``),
    and the TLS parameters of a ``rediss://`` URL (``ssl_cert_reqs``,
    ``ssl_ca_certs``, ...; ``ssl=true`` alone turns TLS on): TLS applies to the
    sentinels and the master alike.
    """
    from redis.connection import parse_url

    hosts: list[tuple[str, int]] = []
    master: dict[str, Any] = {}
    query: dict[str, Any] = {}
    for index, part in enumerate(p.strip() for p in url.split(";") if p.strip()):
        if not is_sentinel(part):
            raise ValueError("every part of a Sentinel URL must start with sentinel://")
        parsed = parse_url("redis://" + part[len(_SENTINEL) :])
        hosts.append((parsed.pop("host", "localhost"), parsed.pop("port", DEFAULT_SENTINEL_PORT)))
        credentials: dict[str, Any] = {
            k: parsed.pop(k) for k in ("username", "password") if k in parsed
        }
        if credentials and "password" not in master:
            master.update(credentials)
        db = parsed.pop("db", None)
        if index == 0 and db is not None:
            master["db"] = db
        query.update(parsed)
    master_name = query.pop(_MASTER_NAME, None)
    if not master_name:
        raise ValueError(
            "a sentinel:// URL needs the master's name (master_name in the transport "
            "options, or SFOX_LIMITER_MASTER_NAME for the limiter)"
        )
    sentinel_kwargs = {
        key.removeprefix("sentinel_"): query.pop(key) for key in _SENTINEL_AUTH if key in query
    }
    ssl = str(query.pop("ssl", "")).lower() in ("1", "true", "yes", "on")
    tls = {key: query.pop(key) for key in list(query) if key.startswith("ssl_")}
    if ssl or tls:
        master.update(ssl=True, **tls)
        sentinel_kwargs.update(ssl=True, **tls)
    master.update(query)
    return hosts, str(master_name), master, sentinel_kwargs


@dataclass(frozen=True)
class RedisFacts:
    """What the package checks about a Redis before relying on it."""

    #: The Redis, as log lines name it (no credential).
    where: str
    #: ``maxmemory-policy``, or None when Redis would not say (CONFIG and INFO refused).
    policy: str | None
    #: Whether it runs with ``cluster_enabled:1``; None when INFO was refused.
    cluster: bool | None

    @property
    def evicts(self) -> bool:
        """Whether Redis may drop keys when memory fills (or would not say it will not)."""
        return self.policy != "noeviction"


def inspect_redis(
    url: str, *, master_name: str | None = None, timeout: float = REDIS_CONNECT_TIMEOUT
) -> RedisFacts:
    """Ping the Redis at ``url`` (its master, for Sentinel) and read its policy and mode.

    One try, each step bounded by ``timeout``; raises ``redis.RedisError`` (or
    ``ValueError`` for a URL it cannot read) when Redis does not answer. A managed
    Redis that disables CONFIG usually still answers INFO; when both are refused
    the policy is None (unknown).
    """
    url = with_master_name(url, master_name)
    client = probe_client(url, timeout)
    try:
        client.ping()
        policy = _policy(client)
        try:
            cluster: bool | None = bool(int(client.info("cluster").get("cluster_enabled", 0)))
        except redis.ResponseError:
            cluster = None
        return RedisFacts(_where(url, sentinel_master_name(url)), policy, cluster)
    finally:
        client.close()
        manager = getattr(client.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            sentinel.close()


def _policy(client: redis.Redis[bytes]) -> str | None:
    try:
        found: Mapping[Any, Any] = client.config_get("maxmemory-policy")
        value = found.get("maxmemory-policy", found.get(b"maxmemory-policy"))
        if value:
            return value.decode() if isinstance(value, bytes) else str(value)
    except redis.ResponseError:
        pass  # CONFIG disabled or renamed (managed Redis): INFO usually says it
    try:
        value = client.info("memory").get("maxmemory_policy")
    except redis.ResponseError:
        return None
    return str(value) if value else None


#: Each client's registered scripts, by source: registered once per client.
_scripts: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def script(client: redis.Redis[bytes], source: str) -> Any:
    """``source`` registered with ``client`` (once); calling it runs EVALSHA.

    redis-py loads the script again by itself when Redis has lost it (a restart).
    """
    registered = _scripts.get(client)
    if registered is None:
        registered = _scripts[client] = {}
    found = registered.get(source)
    if found is None:
        found = registered[source] = client.register_script(source)
    return found


@functools.cache
def lua(package: str, *names: str) -> str:
    """The Lua text of ``names`` (``NAME.lua`` files shipped beside ``package``), joined.

    A script that starts with shared functions names their file first.
    """
    folder = files(package)
    return "\n".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)
