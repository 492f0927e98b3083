"""Redis Sentinel as broker, result backend and limiter, configured from the environment.

One topology of the module's own (a master, a replica, three sentinels, quorum 2)
serves every test here. A real worker is told only ``CELERY_BROKER_URL=sentinel://...``
and ``CELERY_BROKER_TRANSPORT_OPTIONS={"master_name": ...}``: the result backend and
the limiter follow the broker's master. Mints sent before a ``SENTINEL FAILOVER``
and running through it all finish, and their results keep the mint's short TTL.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks._redis import STORE_ERRORS, ReplicatedRedis, redis_client, with_master_name
from tests.conftest import REDIS_URL
from tests.sentinel_topology import MASTER_NAME, SentinelCaller, SentinelTopology
from tests.services import run_text
from tests.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.slow

QUEUE = "sentinel-drill"
SCRIPT = Path(sys.executable).with_name("sfox-tokens")
#: The mint result's TTL the worker is given: below Celery's day, as in production.
RESULT_TTL = 900


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    topo = SentinelTopology(tmp_path_factory.mktemp("sentinel"))
    try:
        yield topo.start()
    finally:
        topo.stop()


def sentinel_env(topo: SentinelTopology, **more: str) -> dict[str, str]:
    return {
        **os.environ,
        "CELERY_BROKER_URL": topo.url,
        "CELERY_RESULT_BACKEND": topo.url,
        "CELERY_BROKER_TRANSPORT_OPTIONS": topo.transport_options,
        **more,
    }


def results(store, ids: dict[str, list[str]], timeout: float) -> dict[str, dict[str, Any]]:
    """Every task's stored result, read from the current master; fail after ``timeout``."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(found) < len(ids):
        for task_id in ids:
            if task_id in found:
                continue
            raw = store.get(f"celery-task-meta-{task_id}")
            meta = json.loads(raw) if raw else None
            if meta and meta["status"] == "SUCCESS":
                found[task_id] = meta
            else:
                assert not meta or meta["status"] not in ("FAILURE", "REVOKED"), meta
        time.sleep(0.2)
    missing = [task_id for task_id in ids if task_id not in found]
    assert not missing, f"{len(missing)} of {len(ids)} mints have no result after {timeout:g} s"
    return found


def test_check_asks_a_sentinel_and_pings_the_master(topology, fake_sfox):
    """`sfox-tokens check` on sentinel:// names the master and passes broker, backend, limiter."""
    env = sentinel_env(topology, SFOX_API_URL=fake_sfox.url)
    out = run_text([SCRIPT, "check", "--timeout", "3"], cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {line[6:16].strip(): line for line in out.stdout.splitlines() if line[:4].strip()}
    for name in ("broker", "backend", "rate limit"):
        assert lines[name].startswith("ok"), lines[name]
        assert f"(master '{MASTER_NAME}')" in lines[name]
        assert "maxmemory-policy noeviction" in lines[name]
    assert "Port could not be cast" not in out.stdout + out.stderr
    # The limiter alone on Sentinel, named by its own settings.
    env.update(
        CELERY_BROKER_URL=REDIS_URL,
        CELERY_RESULT_BACKEND=REDIS_URL,
        CELERY_BROKER_TRANSPORT_OPTIONS="",
        SFOX_LIMITER_URL=topology.url,
        SFOX_LIMITER_MASTER_NAME=MASTER_NAME,
    )
    out = run_text([SCRIPT, "check", "--timeout", "3"], cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"(master '{MASTER_NAME}') answers (maxmemory-policy noeviction)" in out.stdout


def test_mints_run_through_a_failover_and_keep_their_ttl(topology, fake_sfox, tmp_path):
    """Mints in flight during SENTINEL FAILOVER all finish; every result expires within the TTL."""
    fake_sfox.configure(latency=0.2)
    env = sentinel_env(
        topology,
        SFOX_API_URL=fake_sfox.url,
        SFOX_QUEUE=QUEUE,
        SFOX_TOKEN_RESULT_TTL=str(RESULT_TTL),
        SFOX_TOKEN_BATCH_SIZE="10",
        SFOX_MINT_CONCURRENCY="1",
        # A long window: the sliding log outlives the drill, to be found on the master.
        SFOX_RATE_LIMIT="100000/300s",
    )
    worker = WorkerProcess(
        "sentinel", tmp_path, env=env, concurrency=4, queues=QUEUE, loglevel="INFO"
    )
    caller = SentinelCaller(topology, QUEUE)
    store = redis_client(with_master_name(topology.url, MASTER_NAME))
    try:
        worker.start()
        assert "maxmemory-policy noeviction" in worker.log()
        sent = {}
        for round_ in range(2):
            # About 8 s of minting for 4 processes: results are stored all through the
            # failover, while the old master still takes writes it will throw away.
            batch = {
                caller.send("sfox.mint_user_tokens", args=[ids]).id: ids
                for ids in ([f"s{round_}-{n}-{i}" for i in range(50)] for n in range(32))
            }
            sent.update(batch)
            time.sleep(1.0)  # mints are running
            started = time.monotonic()
            topology.failover()
            print(f"failover {round_ + 1} took {time.monotonic() - started:.1f} s")
        found = results(store, sent, timeout=120)
        for task_id, ids in sent.items():
            tokens = found[task_id]["result"]["tokens"]
            assert [t["partner_user_id"] for t in tokens] == ids
            ttl = store.ttl(f"celery-task-meta-{task_id}")
            assert 0 < ttl <= RESULT_TTL, (task_id, ttl)
        assert store.keys("sfox:ratelimit*"), "the limiter did not count on the master"
        # The package's channel took them (take.lua remembers what it handed over).
        assert store.keys("sfox:seen:*"), "the broker ran kombu's own Sentinel channel"
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()
    finally:
        caller.close()
        worker.stop()
        store.close()
        fake_sfox.configure(latency=0.0)


@pytest.fixture
def books(topology):
    """The package's own client of the topology's master, as the run books use it."""
    client = redis_client(with_master_name(topology.url, MASTER_NAME))
    try:
        yield client
    finally:
        client.close()


def test_only_a_sentinel_client_waits_for_a_replica(books):
    """Plain Redis gets redis-py's own client (no WAIT); a Sentinel master the waiting one."""
    plain = redis_client(REDIS_URL)
    assert type(plain) is redis.Redis
    assert type(plain.pipeline()) is redis.client.Pipeline
    assert isinstance(books, ReplicatedRedis)
    plain.close()


def test_a_write_a_cut_off_master_took_is_written_again_on_the_new(topology, books):
    """A run-book write landing on a master the sentinels replaced is made again on the new one.

    The master is stopped (SIGSTOP: cut off) until its replica is promoted, then
    let go: for some seconds, until the sentinels turn it into a replica, it takes
    writes as a master and throws them away at its first sync. A connection it
    held through all this writes there; no replica acknowledges, and the write is
    made again on the master the sentinels name.
    """
    held = books.client()  # one connection, held: nothing asks the sentinels before the write
    held.set("sfox:drill:warm", "1")
    old, new = topology.master_port(), topology.replica_port()
    topology.signal(old, signal.SIGSTOP)
    try:
        topology.wait_master(new)
    finally:
        topology.signal(old, signal.SIGCONT)
    try:
        assert held.connection.port == old
        for _attempt in range(10):  # as a task does: an outage past the retries, then again
            try:
                held.hset("sfox:drill:books", "chunk", "done")
                break
            except STORE_ERRORS:
                continue
        assert held.connection.port == new
        assert redis.Redis(port=new).hget("sfox:drill:books", "chunk") == b"done"
    finally:
        held.close()
        topology.wait_in_sync()


def test_a_write_waits_for_a_replica_that_is_up(topology, books):
    """A replica that is up but has not acknowledged (stopped 1 s) is waited for."""
    replica = topology.replica_port()
    resuming = threading.Event()

    def resume() -> None:
        time.sleep(1.0)
        resuming.set()
        topology.signal(replica, signal.SIGCONT)

    topology.signal(replica, signal.SIGSTOP)
    thread = threading.Thread(target=resume)
    thread.start()
    try:
        books.set("sfox:drill:acked", "1")
        assert resuming.is_set(), "the write stood before its replica could take it"
    finally:
        thread.join()
        topology.signal(replica, signal.SIGCONT)
    assert redis.Redis(port=replica).get("sfox:drill:acked") == b"1"


def test_a_master_whose_replica_is_down_still_takes_writes(topology, books):
    """With its only replica down (as the sentinels see it), a write stands on the master."""
    master, replica = topology.master_port(), topology.replica_port()
    topology.signal(replica, signal.SIGSTOP)
    try:
        topology.wait_replica_down()
        assert books.set("sfox:drill:alone", "1")
        assert redis.Redis(port=master).get("sfox:drill:alone") == b"1"
    finally:
        topology.signal(replica, signal.SIGCONT)
        topology.wait_in_sync()
