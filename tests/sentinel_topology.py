"""Redis Sentinel of a test's own: a master, a replica and three sentinels (quorum 2).

Every process listens on a free loopback port of the test's and lives in the
test's directory; :meth:`SentinelTopology.stop` ends them all, whatever state
they are in, and is meant for a finalizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from tasks.testing.process import stop_process
from tests.services import free_port

MASTER_NAME = "sfoxmaster"
#: Milliseconds without an answer after which a sentinel deems the master down.
DOWN_AFTER_MS = 2000
#: Milliseconds a failover may take before another is tried.
FAILOVER_TIMEOUT_MS = 10000


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what} (last error: {last})")


class SentinelTopology:
    """``redis-server`` master and replica, three ``redis-server --sentinel``, quorum 2."""

    def __init__(self, directory: Path, *, maxmemory_policy: str = "noeviction") -> None:
        self.directory = directory
        self.policy = maxmemory_policy
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port(), free_port(), free_port()]
        self.procs: list[subprocess.Popen[bytes]] = []
        #: Each data port's redis-server and its arguments, to stop, kill and start again.
        self.servers: dict[int, tuple[subprocess.Popen[bytes], list[str]]] = {}
        self.failovers = 0

    @property
    def url(self) -> str:
        """What an operator puts in CELERY_BROKER_URL (the master's name goes elsewhere)."""
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)

    @property
    def transport_options(self) -> str:
        """CELERY_BROKER_TRANSPORT_OPTIONS (and the result backend's) for this topology."""
        return json.dumps({"master_name": MASTER_NAME})

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = self.directory / f"{name}.log"
        proc = subprocess.Popen(
            ["redis-server", *args, "--logfile", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 30.0) -> SentinelTopology:
        self.directory.mkdir(parents=True, exist_ok=True)
        master_port, replica_port = self.data_ports
        for index, port in enumerate(self.data_ports):
            folder = self.directory / f"data{index}"
            folder.mkdir(exist_ok=True)
            args = [
                "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                "--save", "", "--appendonly", "no",
                "--maxmemory-policy", self.policy,
            ]  # fmt: skip
            if port == replica_port:
                args += ["--replicaof", "127.0.0.1", str(master_port)]
            self.servers[port] = (self._spawn(args, f"redis{index}"), args)
        for port in self.data_ports:
            _wait(lambda p=port: _client(p).ping(), timeout, f"redis-server on {port}")
        _wait(lambda: self._replica_in_sync(master_port), timeout, "the replica to sync")
        for index, port in enumerate(self.sentinel_ports):
            conf = self.directory / f"sentinel{index}.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.directory}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self._spawn([str(conf), "--sentinel"], f"sentinel{index}")
        _wait(self._sentinels_agree, timeout, "the sentinels to know each other and the replica")
        return self

    def sentinel(self, index: int = 0) -> redis.Redis:
        return _client(self.sentinel_ports[index])

    def master_port(self) -> int:
        """The port the first answering sentinel names as the master's."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                _host, master = _client(port).sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(master)
        raise RuntimeError("no sentinel answers")

    def master(self) -> redis.Redis:
        return _client(self.master_port())

    def replica_port(self) -> int:
        master = self.master_port()
        return next(p for p in self.data_ports if p != master)

    def wait_replica_down(self, timeout: float = 30.0) -> None:
        """Back once every sentinel deems the replica down (s_down)."""

        def down() -> bool:
            return all(
                all("s_down" in str(r.get("flags", ""))
                    for r in _client(p).sentinel_slaves(MASTER_NAME))
                for p in self.sentinel_ports
            )  # fmt: skip

        _wait(down, timeout, "the sentinels to deem the replica down")

    def wait_in_sync(self, timeout: float = 30.0) -> None:
        """Back once the replica follows the master and every sentinel knows it."""
        _wait(lambda: self._replica_in_sync(self.master_port()), timeout, "the replica to sync")
        _wait(self._sentinels_agree, timeout, "the sentinels to know the replica")

    def _replica_in_sync(self, master: int) -> bool:
        """Whether the replica follows ``master`` and has acknowledged everything it holds."""
        replica = next(p for p in self.data_ports if p != master)
        info = _client(replica).info("replication")
        if info.get("role") != "slave" or info.get("master_link_status") != "up":
            return False
        # A write, then WAIT on the same connection: the replica holds all the master has.
        with _client(master).pipeline(transaction=False) as pipe:
            pipe.incr("sentinel-topology:probe").wait(1, 1000)
            return bool(pipe.execute()[1] >= 1)

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            client = _client(port)
            master = client.sentinel_master(MASTER_NAME)
            if int(master["num-other-sentinels"]) < 2 or int(master["num-slaves"]) < 1:
                return False
            replicas = client.sentinel_slaves(MASTER_NAME)
            if not any(r.get("master-link-status") == "ok" for r in replicas):
                return False
        return True

    def failover(self, timeout: float = 40.0) -> int:
        """``SENTINEL FAILOVER``; back once the new master leads a synced replica. Its port."""
        old = self.master_port()
        _wait(self._sentinels_agree, timeout, "the sentinels to be ready for a failover")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sentinel(self.failovers % 3).sentinel_failover(MASTER_NAME)
                break
            except redis.ResponseError as exc:  # INPROG, NOGOODSLAVE: not yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SENTINEL FAILOVER refused: {exc}") from None
                time.sleep(0.2)
        self.failovers += 1
        new = next(p for p in self.data_ports if p != old)

        def switched() -> bool:
            if any(_client(p).sentinel_get_master_addr_by_name(MASTER_NAME)[1] != new
                   for p in self.sentinel_ports):  # fmt: skip
                return False
            return _client(new).info("replication").get("role") == "master"

        _wait(switched, timeout, "every sentinel to name the new master")
        _wait(lambda: self._replica_in_sync(new), timeout, "the old master to follow the new one")
        return new

    def wait_master(self, port: int, timeout: float = 40.0) -> None:
        """Back once every sentinel names ``port`` as the master's and it says it is one."""

        def named() -> bool:
            if any(_client(p).sentinel_get_master_addr_by_name(MASTER_NAME)[1] != port
                   for p in self.sentinel_ports):  # fmt: skip
                return False
            return _client(port).info("replication").get("role") == "master"

        _wait(named, timeout, f"every sentinel to name {port} the master")

    def signal(self, port: int, sig: signal.Signals) -> None:
        """Send ``sig`` to the redis-server on ``port`` (SIGSTOP: a master cut off)."""
        os.kill(self.servers[port][0].pid, sig)

    def kill_master(self, timeout: float = 60.0) -> int:
        """SIGKILL the master; back once the replica leads and the killed one follows it, empty.

        The killed server starts again only after the failover: started sooner,
        empty, it would still be the master and its replica would copy its emptiness.
        """
        old = self.master_port()
        proc, args = self.servers[old]
        proc.kill()
        proc.wait(10)
        new = self.replica_port()
        self.wait_master(new, timeout)
        self.servers[old] = (self._spawn(args, f"redis-{old}-again"), args)
        self.wait_in_sync(timeout)
        return new

    def stop(self) -> None:
        """End every process, sentinels first (so that none fails over while the rest stop)."""
        for proc in reversed(self.procs):
            stop_process(proc, 10)
        self.procs.clear()


class SentinelCaller:
    """Sends tasks by name through the sentinels, as a partner's app configured for them would.

    With the package's transport (``amqp=...``), as the Redis guide advises a
    partner: its publishes wait for a replica too.
    """

    def __init__(self, topo: SentinelTopology, queue: str) -> None:
        self.queue = queue
        self.app = Celery(
            "sentinel-caller", set_as_current=False, amqp="tasks.worker.transport:AMQP"
        )
        self.app.conf.update(
            broker_transport_options={"master_name": MASTER_NAME},
            task_serializer="json",
            accept_content=["json"],
            task_publish_retry_policy={"max_retries": 20, "interval_step": 0.5, "interval_max": 2},
        )
        self.connection = self.app.connection_for_write(topo.url)

    def send(self, name: str, **options: Any) -> Any:
        """The task's AsyncResult."""
        return self.app.send_task(name, connection=self.connection, queue=self.queue, **options)

    def close(self) -> None:
        self.connection.release()
