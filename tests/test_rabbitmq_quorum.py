"""RabbitMQ quorum queues, and a mint delivered again after its connection dropped.

Each test gets a vhost of its own, deleted afterwards. A partner's app that runs
``SFOX_QUEUE`` as a quorum queue on a topic exchange (:mod:`tests.partner_quorum`)
runs every package task, countdowns included (native delayed delivery: whole
seconds); the package's own worker declares a quorum queue with
``SFOX_QUEUE_TYPE=quorum``; and a worker whose connections RabbitMQ closes every
2-3 s mints almost nobody twice: a mint delivered again after it finished
answers from its stored result.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.entity import Exchange, Queue

from tasks import unseal
from tasks.testing.faults import Fault
from tests.conftest import REDIS_URL
from tests.downstream_runs import runs_by_user
from tests.services import eventually
from tests.test_nightly import write_orders
from tests.test_rabbitmq import QUEUE as RABBIT_QUEUE
from tests.test_rabbitmq import (
    amqp_url,
    private_vhost,
    rabbit_worker,
    rabbitmq_answers,
    rabbitmqctl,
)
from tests.workers import ROOT, Caller, WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not rabbitmq_answers(), reason="no RabbitMQ")]

#: The package's queue in these tests (SFOX_QUEUE), a quorum queue where the test says so.
QUEUE = "sfox-quorum"


@pytest.fixture
def vhost() -> Iterator[str]:
    with private_vhost() as name:
        yield name


def caller_for(vhost: str, queue: str, queue_type: str = "classic") -> Caller:
    """A caller sending to ``queue``, declared as the package's own app declares it."""
    caller = Caller(amqp_url(vhost), queue)
    if queue_type == "quorum":
        caller.app.conf.task_queues = [
            Queue(
                queue,
                Exchange(queue, type="topic"),
                routing_key=queue,
                queue_arguments={"x-queue-type": "quorum"},
            )
        ]
    return caller


def queue_types(vhost: str) -> dict[str, str]:
    """Every queue of ``vhost`` and its type (classic, quorum)."""
    out = rabbitmqctl("list_queues", "-q", "-p", vhost, "name", "type")
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    return {name: kind for name, kind in rows if name != "name"}


def minted_twice(fake_sfox, prefix: str) -> dict[str, int]:
    """Users (starting with ``prefix``) the stand-in granted more than one token."""
    minted = Counter(
        user for user, _ in fake_sfox.issued_tokens.values() if user.startswith(prefix)
    )
    return {user: n for user, n in minted.items() if n > 1}


def test_a_partners_quorum_queue_runs_every_package_task(vhost, fake_sfox, redis_client, tmp_path):
    """A mint, a mint sent with a 0.4 s countdown, a fan-out and a night with countdowns.

    The partner's app declares SFOX_QUEUE as a quorum queue on a topic exchange;
    the package sends through that declaration from the partner's process and its
    worker. A 429 with Retry-After, the limiter's short waits and the coordinator's
    turns go back to RabbitMQ as whole-second countdowns: everything finishes, and
    nothing is minted, run downstream or placed twice.
    """
    fake_sfox.configure(latency=0.01)
    fake_sfox.inject(Fault.status(429, retry_after=2))
    env = {
        # The partner's app reads its broker and backend from its own module's names.
        "CELERY_BROKER_URL": "",
        "CELERY_RESULT_BACKEND": "",
        "PARTNER_AMQP_URL": amqp_url(vhost),
        "PARTNER_REDIS_URL": REDIS_URL,
        "SFOX_API_URL": fake_sfox.url,
        "SFOX_QUEUE": QUEUE,
        # Short turns and a tight budget: the night's coordinator and its order tasks
        # go back to the broker with sub-second and whole-second countdowns.
        "SFOX_TASK_TURN": "0.5",
        "SFOX_RATE_LIMIT": "20/1s",
    }
    worker = WorkerProcess(
        "partner-quorum",
        tmp_path,
        env=env,
        app="tests.partner_quorum",
        include=None,
        queues=f"partner,{QUEUE}",
        concurrency=3,
        loglevel="INFO",
    ).start()
    mint = [f"pq-mint-{i}" for i in range(10)]
    later = ["pq-later-1", "pq-later-2"]
    fan = [f"pq-fan-{i}" for i in range(60)]
    night = [f"pq-night-{i}" for i in range(50)]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tests.partner_quorum_calls"],
            input=json.dumps(
                {
                    "mint": mint,
                    "later": later,
                    "fan": fan,
                    "run_date": "2026-08-10",
                    "orders_file": write_orders(tmp_path, night),
                }
            ),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env},
            timeout=400,
        )
        types = queue_types(vhost)
    finally:
        worker.stop()
    log = worker.log()
    assert out.returncode == 0, out.stderr[-4000:] + log[-4000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["package_task_app"] == "partner-quorum"
    assert found["mint"] == mint and found["later"] == later
    assert found["finished"]
    summary = found["summary"]
    assert summary["status"] == "done" and summary["placed"] == 50, summary
    assert types[QUEUE] == "quorum" and types["celery_delayed_0"] == "quorum"
    # The countdowns were real, and went to RabbitMQ (a direct exchange would be named): the
    # 429's Retry-After sent a task back to the broker every run; a sub-second countdown is
    # the caller's `later` mint above (a worker's own sub-second deferral depends on timing).
    assert "resumes from the broker in " in log and "retry: Retry in" in log
    assert "countdown must be a positive number" not in log
    assert "Direct exchanges are not supported" not in log
    assert "PRECONDITION_FAILED" not in log and "inequivalent arg" not in log
    assert minted_twice(fake_sfox, "pq-") == {}
    assert set(runs_by_user(redis_client, "quorum").values()) == {1}
    placed = Counter(o.user_id for o in fake_sfox.orders)
    assert set(placed) == set(night) and set(placed.values()) == {1}


def test_the_package_worker_declares_its_queue_as_SFOX_QUEUE_TYPE_says(vhost, fake_sfox, tmp_path):
    """``SFOX_QUEUE_TYPE=quorum``: a quorum queue on a topic exchange; a mint and a countdown run.

    The 429's Retry-After (2 s) sends the mint back to the broker, through RabbitMQ's
    delayed delivery, as does a caller's countdown; both mints come back whole.
    """
    fake_sfox.configure(latency=0.01)
    fake_sfox.inject(Fault.status(429, retry_after=2))
    caller = caller_for(vhost, RABBIT_QUEUE, "quorum")  # connects at its first send
    worker = rabbit_worker(
        tmp_path, fake_sfox, vhost, "own-quorum", SFOX_QUEUE_TYPE="quorum", SFOX_TASK_TURN="0.5"
    )
    users = [f"oq-{i}" for i in range(30)]
    try:
        first = caller.send("sfox.mint_user_tokens", args=[users[:10]])
        later = caller.send("sfox.mint_user_tokens", args=[users[10:]], countdown=1)
        tokens = first.get(timeout=60)["tokens"] + later.get(timeout=60)["tokens"]
        types = queue_types(vhost)
        exchanges = rabbitmqctl("list_exchanges", "-q", "-p", vhost, "name", "type")
    finally:
        caller.close()
        worker.stop()
    log = worker.log()
    assert [t["partner_user_id"] for t in tokens] == users
    assert types[RABBIT_QUEUE] == "quorum" and types["celery_delayed_0"] == "quorum"
    assert f"{RABBIT_QUEUE}\ttopic" in exchanges
    assert "resumes from the broker in" in log and "retry: Retry in" in log
    assert "Direct exchanges are not supported" not in log
    assert "countdown must be a positive number" not in log
    assert minted_twice(fake_sfox, "oq-") == {}


def test_an_unknown_SFOX_QUEUE_TYPE_is_refused_naming_it(tmp_path):
    """Anything but classic or quorum stops the package's app from loading, naming the setting."""
    out = subprocess.run(
        [sys.executable, "-c", "import tasks; tasks.app.conf.task_default_queue"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "SFOX_QUEUE_TYPE": "stream"},
        timeout=60,
    )
    assert out.returncode != 0 and "SFOX_QUEUE_TYPE='stream'" in out.stderr


def test_a_mint_delivered_again_after_it_finished_answers_from_its_stored_result(
    vhost, fake_sfox, tmp_path
):
    """The same mint message published again once its task finished: nothing minted again."""
    fake_sfox.configure(latency=0.01)
    caller = caller_for(vhost, RABBIT_QUEUE)
    worker = rabbit_worker(tmp_path, fake_sfox, vhost, "again")
    users = [f"again-{i}" for i in range(5)]
    try:
        sent = caller.send("sfox.mint_user_tokens", args=[users])
        first = sent.get(timeout=60)
        # As RabbitMQ would deliver it again, had the first run's ack been lost: same id.
        caller.send("sfox.mint_user_tokens", args=[users], task_id=sent.id)
        answered = eventually(lambda: "answered from its stored result" in worker.log(), 30)
        again = sent.backend.get_task_meta(sent.id, cache=False)
    finally:
        caller.close()
        worker.stop()
    assert answered, worker.log()[-3000:]
    assert again["status"] == "SUCCESS" and again["result"] == first
    assert minted_twice(fake_sfox, "again-") == {}
    assert worker.log().count("mint done for") == 1


class ConnectionCloser:
    """Closes every connection of a vhost every 2-3 s (``rabbitmqctl close_all_connections``)."""

    def __init__(self, vhost: str, interval: tuple[float, float] = (2.0, 3.0)) -> None:
        self.vhost = vhost
        self.interval = interval
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(random.uniform(*self.interval)):
            try:
                rabbitmqctl("close_all_connections", "--vhost", self.vhost, "sfox drop drill")
                self.rounds += 1
            except subprocess.SubprocessError:
                continue

    def __enter__(self) -> ConnectionCloser:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(70)


def send_retrying(caller: Caller, name: str, **options: Any) -> Any:
    """Send ``name``; a connection the drill just closed is opened again (bounded)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return caller.send(name, **options)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


#: The drill: mints, users per mint, seconds between two sends.
DRILL_MINTS = 20
DRILL_USERS = 200
DRILL_SEND_EVERY = 1.5


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_connections_closed_every_few_seconds_mint_almost_nobody_twice(
    vhost, fake_sfox, tmp_path, queue_type
):
    """RabbitMQ closes the worker's connections every 2-3 s while 20 mints of 200 users run.

    Each mint takes about a second, so most closes cut one short or lose its ack,
    and RabbitMQ delivers it again. Every mint comes back whole and right, and at
    most a few percent of the 4,000 users are minted twice.
    """
    fake_sfox.configure(latency=0.15)
    caller = caller_for(vhost, RABBIT_QUEUE, queue_type)
    worker = rabbit_worker(
        tmp_path,
        fake_sfox,
        vhost,
        f"drill-{queue_type}",
        SFOX_QUEUE_TYPE=queue_type,
        SFOX_TOKEN_BATCH_SIZE="25",
        SFOX_MINT_CONCURRENCY="1",
        SFOX_RATE_LIMIT="5000/1s",
    )
    batches = [[f"drill-{m}-{i}" for i in range(DRILL_USERS)] for m in range(DRILL_MINTS)]
    started = time.monotonic()
    try:
        with ConnectionCloser(vhost) as closer:
            sent = []
            for users in batches:
                sent.append(send_retrying(caller, "sfox.mint_user_tokens", args=[users]))
                time.sleep(DRILL_SEND_EVERY)
            results = [r.get(timeout=180) for r in sent]
        took = time.monotonic() - started
        alive = worker.proc.poll() is None
    finally:
        caller.close()
        worker.stop()
    log = worker.log()
    assert alive, log[-4000:]
    for users, result in zip(batches, results, strict=True):
        assert [t["partner_user_id"] for t in result["tokens"]] == users
        assert result["failed"] == []
    issued = fake_sfox.issued_tokens
    for result in results:  # each sealed token is one sFOX granted that user
        assert all(issued[unseal(t["token"])][0] == t["partner_user_id"] for t in result["tokens"])
    twice = minted_twice(fake_sfox, "drill-")
    deliveries = len(re.findall(r"sfox\.mint_user_tokens\[[^]]+\] received", log))
    answered = log.count("answered from its stored result")
    print(
        f"\n{queue_type}: {closer.rounds} closes in {took:.0f} s; {deliveries} deliveries of "
        f"{DRILL_MINTS} mints, {log.count('mint done for')} minted, {answered} answered from "
        f"the stored result ({log.count('waiting for its result')} after waiting); "
        f"{len(twice)} of {DRILL_MINTS * DRILL_USERS} users minted twice or more"
    )
    assert closer.rounds >= 8
    assert deliveries > DRILL_MINTS and answered > 0  # the drill did deliver mints again
    assert len(twice) <= 0.05 * DRILL_MINTS * DRILL_USERS, twice
