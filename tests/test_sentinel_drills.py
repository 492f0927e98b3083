"""Failover drills: mints, a fan-out and a night on Sentinel, its master failed over and killed.

Each drill starts a Sentinel topology of its own (a master, a replica, three
sentinels) that is the broker, the result backend, the limiter's store and the
run books, and two real workers told only its URL and master name. It sends
the same work as the Redis outage drills (12 mints, a 400-user
``with_user_tokens`` fan-out into a partner's task, a 300-order night), then
fails the master over or kills it while that work runs. Afterwards every mint
has every token, each granted once at the stand-in; every downstream task ran
once; every order was placed once; and every run finished on its own.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tasks._redis import redis_client, with_master_name
from tests.sentinel_topology import MASTER_NAME, SentinelCaller, SentinelTopology
from tests.test_redis_outages import QUEUE, check_nothing_lost, drill_workers, start_the_work

pytestmark = pytest.mark.slow


@pytest.fixture
def topology(tmp_path):
    topo = SentinelTopology(tmp_path / "sentinel")
    try:
        yield topo.start()
    finally:
        topo.stop()


@pytest.fixture
def drill(topology, fake_sfox, tmp_path):
    """Two workers on the topology, a caller, and the master's store, as a partner runs them."""
    options = {"CELERY_BROKER_TRANSPORT_OPTIONS": topology.transport_options}
    with drill_workers(tmp_path, "sentinel", topology.url, fake_sfox.url, **options) as workers:
        caller = SentinelCaller(topology, QUEUE)
        store = redis_client(with_master_name(topology.url, MASTER_NAME))
        fake_sfox.configure(latency=0.05)
        try:
            yield caller, store, workers
        finally:
            fake_sfox.configure(latency=0.0)
            caller.close()
            store.close()


def check_minted_once(work, fake_sfox, tag: str) -> None:
    """Each mint's users were granted a token once at the stand-in: no mint ran twice."""
    granted = Counter(
        user for user, _expiry in fake_sfox.issued_tokens.values() if user.startswith(f"{tag}-m")
    )
    assert len(granted) == 12 * 150
    twice = {user: n for user, n in granted.items() if n != 1}
    assert not twice, twice


def kill_and_check(topology, drill, fake_sfox, work, tag: str) -> None:
    """Kill the master (``SIGKILL``), then check that all of ``work`` ended, once each."""
    _caller, store, workers = drill
    started = time.monotonic()
    topology.kill_master()
    print(f"kill and recovery took {time.monotonic() - started:.1f} s")
    check_nothing_lost(work, store, fake_sfox, tag)
    check_minted_once(work, fake_sfox, tag)
    check_workers(workers)


def check_workers(workers) -> None:
    for worker in workers:
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()
        assert "raised unexpected" not in worker.log()


def test_nothing_is_lost_through_two_failovers_and_a_master_kill(
    topology, drill, fake_sfox, tmp_path
):
    """SENTINEL FAILOVER twice, then SIGKILL of the master, mid-run: all ends, once each."""
    work = start_the_work(drill[0], tmp_path, "sfail")
    for _ in range(2):
        time.sleep(1.0)
        started = time.monotonic()
        topology.failover()
        print(f"failover took {time.monotonic() - started:.1f} s")
    kill_and_check(topology, drill, fake_sfox, work, "sfail")


def test_nothing_is_lost_when_the_master_is_killed_mid_mint(topology, drill, fake_sfox, tmp_path):
    """SIGKILL of the master one second in, no failover asked: all ends, once each."""
    work = start_the_work(drill[0], tmp_path, "skill")
    time.sleep(1.0)
    kill_and_check(topology, drill, fake_sfox, work, "skill")
