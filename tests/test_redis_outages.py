"""No work lost when Redis drops its connections or restarts: mints, a fan-out, a nightly run.

Each test runs real workers on a Redis of its own (persistence on, another port)
that is the broker, the result backend, the limiter's store and the run books,
and breaks it while mints, a ``with_user_tokens`` fan-out of more users than
``ahead`` chunks and a nightly run go on together. Afterwards every mint has
every token, every downstream task ran once, every order was placed once, and
the nightly summary adds up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tasks import with_user_tokens
from tasks._redis import redis_client
from tasks.fanout.store import JitRun
from tests.downstream_runs import task_ids_by_user
from tests.redis_server import ConnectionKiller, PrivateRedis
from tests.services import eventually
from tests.testtasks import record_token, runs_by_user
from tests.workers import Caller, WorkerProcess

pytestmark = pytest.mark.slow

QUEUE = "outages"


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@contextlib.contextmanager
def drill_workers(
    tmp_path, name: str, url: str, api_url: str, **env: str
) -> Iterator[list[WorkerProcess]]:
    """Two workers of three processes on the drills' queue, ``url`` their broker and store.

    Redelivery is slow (600 s): what comes back within a drill came back because of
    what the drill did. Both workers stop, whatever the drill did.
    """
    env = {
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "SFOX_API_URL": api_url,
        "SFOX_QUEUE": QUEUE,
        "SFOX_RATE_LIMIT": "5000/1s",
        "SFOX_VISIBILITY_TIMEOUT": "600",
        "SFOX_NIGHTLY_RESEND_AFTER": "8",
        **env,
    }
    workers: list[WorkerProcess] = []
    try:
        for i in range(2):
            worker = WorkerProcess(
                f"{name}{i}", tmp_path, env=env, concurrency=3, queues=QUEUE, loglevel="INFO"
            )
            workers.append(worker)
            worker.start()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture
def outage_workers(private_redis, fake_sfox, tmp_path):
    with drill_workers(tmp_path, "outage", private_redis.url, fake_sfox.url) as workers:
        yield workers


def result_of(store, task_id: str, timeout: float, state=lambda: None) -> Any:
    """The task's result, read from the backend by polling (a caller's pub/sub is dropped too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = store.get(f"celery-task-meta-{task_id}")
        if raw:
            meta = json.loads(raw)
            if meta["status"] == "SUCCESS":
                return meta["result"]
            assert meta["status"] not in ("FAILURE", "REVOKED"), meta
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} did not succeed in {timeout:g} s: {state()}")


def start_the_work(caller: Caller, tmp_path, tag: str) -> dict[str, Any]:
    """Mints, a fan-out and a nightly run, all sent at once."""
    mints = {
        caller.send("sfox.mint_user_tokens", args=[[f"{tag}-m{n}-{i}" for i in range(150)]]).id: n
        for n in range(12)
    }
    fan_ids = [f"{tag}-f{i}" for i in range(400)]
    run_id = f"{tag}-fanout-{time.time_ns()}"
    canvas = with_user_tokens(
        fan_ids, record_token.s(tag).set(queue=QUEUE), run_id=run_id, chunk_size=25, ahead=2
    )
    for segment in canvas.tasks:
        caller.send(segment.task, args=segment.args)
    orders = tmp_path / f"{tag}-orders.csv"
    night_users = [f"{tag}-n{i}" for i in range(300)]
    orders.write_text(
        "user_id,side,currency_pair,algorithm_id,quantity,amount,price\n"
        + "".join(f"{u},buy,btcusd,100,,25,\n" for u in night_users)
    )
    nightly = caller.send(
        "sfox.run_nightly_orders", kwargs={"run_date": "2026-10-01", "orders_file": str(orders)}
    ).id
    return {
        "mints": mints,
        "fan_ids": fan_ids,
        "run_id": run_id,
        "nightly": nightly,
        "night_users": night_users,
    }


def check_nothing_lost(work: dict[str, Any], store, fake_sfox, tag: str) -> None:
    for task_id, n in work["mints"].items():
        result = result_of(store, task_id, timeout=120)
        assert [t["partner_user_id"] for t in result["tokens"]] == [
            f"{tag}-m{n}-{i}" for i in range(150)
        ]
        assert result["failed"] == []
    summary = result_of(
        store,
        work["nightly"],
        timeout=180,
        state=lambda: (
            JitRun(store, "nightly-2026-10-01").progress(),
            store.hlen("sfox:nightly:{2026-10-01}:outcomes"),
        ),
    )
    assert summary["status"] == "done"
    assert (summary["users"], summary["orders"]) == (300, 300)
    assert summary["placed"] + summary["already_placed"] == 300, summary["failed"]
    assert summary["failed_orders"] == 0
    placed = Counter(o.user_id for o in fake_sfox.orders if o.user_id.startswith(f"{tag}-n"))
    assert set(placed) == set(work["night_users"]) and set(placed.values()) == {1}
    # The fan-out into a partner's task, run by the package's workers: kombu's Redis
    # transport alone can lose a message whose delivery a dropped connection cut, and
    # deliver twice one whose publish it retried; the package's transport does neither.
    run = JitRun(store, work["run_id"])
    assert eventually(lambda: run.progress().finished, timeout=120), run.progress()
    runs = runs_by_user(store, tag)
    twice = {u: n for u, n in runs.items() if n != 1}
    lost = set(work["fan_ids"]) - set(runs)
    print(f"fan-out: {len(lost)} lost, {len(twice)} run twice")
    assert set(runs) <= set(work["fan_ids"])
    ids = task_ids_by_user(store, tag)
    assert not lost and not twice, (sorted(lost), {u: ids[u] for u in twice})
    assert run.progress().done == len(work["fan_ids"])


def test_nothing_is_lost_while_redis_drops_every_connection(
    private_redis, outage_workers, fake_sfox, tmp_path
):
    """CLIENT KILL of every connection each second: every task ends, nothing twice, none lost."""
    fake_sfox.configure(latency=0.01)
    store = redis_client(private_redis.url)
    caller = Caller(private_redis.url, QUEUE)
    try:
        with ConnectionKiller(private_redis.client(), interval=1.0) as killer:
            work = start_the_work(caller, tmp_path, "drop")
            check_nothing_lost(work, store, fake_sfox, "drop")
    finally:
        caller.close()
    assert killer.kills > 0
    for worker in outage_workers:
        assert "raised unexpected" not in worker.log()


def test_nothing_is_lost_across_a_redis_restart(private_redis, outage_workers, fake_sfox, tmp_path):
    """Redis restarts twice mid-run (its data kept): every task ends, nothing twice, none lost."""
    fake_sfox.configure(latency=0.01)
    store = redis_client(private_redis.url)
    caller = Caller(private_redis.url, QUEUE)
    try:
        work = start_the_work(caller, tmp_path, "restart")
        for _ in range(2):
            time.sleep(2.0)
            private_redis.restart(down_for=1.0)
        check_nothing_lost(work, store, fake_sfox, "restart")
    finally:
        caller.close()
    for worker in outage_workers:
        assert "raised unexpected" not in worker.log()


def _pool_processes(worker: WorkerProcess) -> list[int]:
    """The pids of the worker's pool processes."""
    assert worker.proc is not None
    found = subprocess.run(
        ["pgrep", "-P", str(worker.proc.pid)], capture_output=True, text=True, check=False
    )
    return [int(pid) for pid in found.stdout.split()]


def test_a_task_written_to_its_process_as_the_connection_drops_runs_once(
    private_redis, fake_sfox, tmp_path
):
    """The pool process has the task when the consumer's connection drops: it runs once.

    On a reconnect Celery's pool drops every job its process has not yet said it
    started, and ignores that job's answers, although one written to a process runs:
    its message was never acknowledged, and came back after the visibility timeout to
    run again. The pool processes here are stopped (``SIGSTOP``) while the job is
    written to one, and go on after the reconnect. Two of them: with one, the task
    would use the worker's whole prefetch, and an idle consumer reconnects in place.
    """
    env = {
        "CELERY_BROKER_URL": private_redis.url,
        "CELERY_RESULT_BACKEND": private_redis.url,
        "SFOX_API_URL": fake_sfox.url,
        "SFOX_QUEUE": "written",
        "SFOX_VISIBILITY_TIMEOUT": "10",
    }
    worker = WorkerProcess("written", tmp_path, env=env, concurrency=2, queues="written")
    client = private_redis.client()
    caller = Caller(private_redis.url, "written")
    stopped: list[int] = []
    try:
        worker.start()
        caller.send("tests.count_run", args=["warm"])
        assert eventually(lambda: client.hlen("tests:runs:warm") == 1, timeout=30), worker.log()
        processes = _pool_processes(worker)
        assert len(processes) == 2, (processes, worker.log())
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        task = caller.send("tests.count_run", args=["written"])
        assert eventually(lambda: f"[{task.id}] received" in worker.log(), timeout=10)
        time.sleep(0.5)  # the job is written to a stopped process's pipe
        lost = worker.log().count("Connection to broker lost")
        client.execute_command("CLIENT KILL TYPE normal SKIPME yes")
        assert eventually(
            lambda: worker.log().count("Connection to broker lost") > lost, timeout=10
        ), worker.log()
        time.sleep(1.0)  # the consumer reconnects
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped = []
        assert eventually(lambda: client.hget("tests:runs:written", task.id) == b"1", timeout=10)
        # Acknowledged, its record goes at the next sweep; a message left unacknowledged
        # comes back once the visibility timeout (10 s) has passed, and runs again.
        assert eventually(lambda: client.hlen("unacked") == 0, timeout=30), worker.log()
        time.sleep(3.0)
        assert client.hgetall("tests:runs:written") == {task.id.encode(): b"1"}
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        caller.close()
        worker.stop()
