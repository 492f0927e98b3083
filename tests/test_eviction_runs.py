"""Run books under eviction: volatile-lru leaves active runs alone; allkeys-lru's loss is lost.

Each test runs a ``redis-server`` of its own (a port of 26600-26699) holding the
limiter and the run books (``SFOX_LIMITER_URL``), as a partner's cache Redis
might; the broker and results stay in the suite's database. A nightly run and
a ``with_user_tokens`` run go on real workers while a partner's cache fills
that Redis past its ``maxmemory``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import date
from itertools import count

import pytest
import redis

from tasks import run_nightly_orders, with_user_tokens
from tasks.fanout.store import ABANDONED_AFTER, ACTIVE_RUNS, RUN_TTL, Chunk, JitRun, sweep_registry
from tasks.nightly.store import NightlyRun
from tests.services import wait_until
from tests.test_eviction import ConfiguredRedis
from tests.testtasks import record_token, runs_by_user
from tests.workers import WorkerProcess

pytestmark = pytest.mark.slow

QUEUE = "eviction-runs"
#: A partner's cache entry: big enough that a few fill the Redis.
CACHE_VALUE = b"c" * 64 * 1024
ENV = {
    "SFOX_QUEUE": QUEUE,
    "SFOX_RATE_LIMIT": "5000/1s",
    "SFOX_VISIBILITY_TIMEOUT": "6",
    "SFOX_NIGHTLY_LEASE": "2",
    "SFOX_TASK_TURN": "3",
    "SFOX_TOKEN_BATCH_SIZE": "10",
}


def own_port() -> int:
    """A free port of 26600-26699, the range these tests keep for their servers."""
    for port in range(26600, 26700):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 26600-26699")


def start_books_redis(request, tmp_path, policy: str, samples: int) -> ConfiguredRedis:
    """The books' Redis; ``samples`` 1 makes its LRU pick any key the policy allows."""
    server = ConfiguredRedis(
        tmp_path / "redis", "--maxmemory-policy", policy, "--maxmemory-samples", str(samples)
    )
    server.port = own_port()
    request.addfinalizer(server.stop)
    return server.start()


def start_worker(request, tmp_path, name: str, books: ConfiguredRedis, url: str) -> WorkerProcess:
    env = {**ENV, "SFOX_LIMITER_URL": books.url, "SFOX_API_URL": url}
    worker = WorkerProcess(name, tmp_path, env=env, concurrency=3, queues=QUEUE, loglevel="INFO")
    request.addfinalizer(worker.stop)
    return worker.start()


def write_orders(tmp_path, users) -> str:
    path = tmp_path / "orders.csv"
    rows = ["user_id,side,currency_pair,algorithm_id,quantity,amount,price"]
    rows += [f"{u},buy,btcusd,100,,25," for u in users]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def cap_memory(client: redis.Redis) -> None:
    """maxmemory 1 MB above what Redis holds now: each cache entry written evicts."""
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 1024 * 1024)


class Cache:
    """A partner's cache: entries with a TTL written in a thread, one each ``every`` s."""

    def __init__(self, client: redis.Redis, every: float = 0.002) -> None:
        self.client = client
        self.every = every
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)

    def _fill(self) -> None:
        for n in count():
            if self._stop.wait(self.every):
                return
            self.client.set(f"partner:cache:{n}", CACHE_VALUE, ex=600)
            self.written += 1

    def __enter__(self) -> Cache:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def evicted(client: redis.Redis) -> int:
    return int(client.info("stats")["evicted_keys"])


def book_keys(client: redis.Redis, day: str, run_id: str) -> list[bytes]:
    return [
        *client.keys(f"sfox:nightly:{{{day}}}:*"),
        *client.keys(f"sfox:jit:{{nightly-{day}}}:*"),
        *client.keys(f"sfox:jit:{{{run_id}}}:*"),
    ]


def test_volatile_lru_evicts_the_cache_and_leaves_active_runs_whole(
    request, tmp_path, fake_sfox, redis_client
):
    """A cache with TTLs fills the books' Redis mid-run: both runs finish whole, none lost."""
    # Any key with a TTL may go, as over hours of a busy cache.
    books = start_books_redis(request, tmp_path, "volatile-lru", samples=1)
    client = books.client()
    fake_sfox.configure(latency=0.03)
    worker = start_worker(request, tmp_path, "volatile", books, fake_sfox.url)
    day, run_id = "2026-10-11", "evict-volatile"
    users = [f"vl-{i}" for i in range(150)]
    nightly = run_nightly_orders.apply_async(
        kwargs={"run_date": day, "orders_file": write_orders(tmp_path, users)}, queue=QUEUE
    )
    jit = [f"vj-{i}" for i in range(150)]
    downstream = record_token.s("volatile", delay=0.1).set(queue=QUEUE)
    with_user_tokens(jit, downstream, run_id=run_id, chunk_size=10).apply_async(queue=QUEUE)
    fan = JitRun(client, run_id)
    wait_until(lambda: fan.progress().done >= 10, 60, "the fan-out under way")
    cap_memory(client)
    with Cache(client) as cache:
        wait_until(lambda: evicted(client) >= 50, 60, "the cache evicting")
        # Mid-run, with Redis evicting: no key of either run's books has a TTL.
        assert fan.progress().done < len(jit)
        ttls = {key: client.ttl(key) for key in book_keys(client, day, run_id)}
        assert ttls and all(ttl == -1 for key, ttl in ttls.items() if b":lease" not in key), ttls
        summary = nightly.get(timeout=120)
        wait_until(lambda: fan.progress().finished, 60, "the fan-out finished")
    assert cache.written > 100 and evicted(client) >= 50
    assert summary["status"] == "done" and summary["lost"] == []
    assert summary["users"] == 150 and summary["placed"] == 150
    progress = fan.progress()
    assert progress.lost == () and progress.done == 150
    assert set(runs_by_user(redis_client, "volatile").values()) == {1}
    assert len(runs_by_user(redis_client, "volatile")) == 150
    # Ended: the books carry the run's TTL now (and may go: the summaries are out).
    ended = {key: client.ttl(key) for key in book_keys(client, day, run_id)}
    assert all(ttl > 0 for ttl in ended.values()), ended
    assert " is lost" not in worker.log() and "abandoned" not in worker.log()


def test_allkeys_lru_loss_is_reported_lost_never_done(
    request, tmp_path, fake_sfox, redis_client, caplog
):
    """allkeys-lru evicts both runs' books mid-run: the night ends lost, so does a second
    trigger; the fan-out's progress is lost and never finished; ERROR lines say what."""
    # A near-exact LRU: the keys idle longest go first.
    books = start_books_redis(request, tmp_path, "allkeys-lru", samples=10)
    client = books.client()
    fake_sfox.configure(latency=0.02)
    first = start_worker(request, tmp_path, "allkeys-a", books, fake_sfox.url)
    day, run_id = "2026-10-12", "evict-allkeys"
    orders = write_orders(tmp_path, [f"al-{i}" for i in range(150)])
    nightly = run_nightly_orders.apply_async(
        kwargs={"run_date": day, "orders_file": orders}, queue=QUEUE
    )
    jit = [f"aj-{i}" for i in range(150)]
    downstream = record_token.s("allkeys", delay=0.1).set(queue=QUEUE)
    with_user_tokens(jit, downstream, run_id=run_id, chunk_size=10).apply_async(queue=QUEUE)
    night, fan = NightlyRun(client, date.fromisoformat(day)), JitRun(client, run_id)
    wait_until(
        lambda: client.hlen(night.outcomes) >= 20 and fan.progress().done >= 20,
        60,
        "both runs under way",
    )
    # The workers stop mid-run (their messages go back to the broker); the books idle
    # while the registry of runs is read (each staging sweeps it), and the cache evicts
    # every key of both runs' books.
    first.stop()
    assert not fan.progress().finished
    state = f"sfox:jit:{{{run_id}}}:state"

    def registry_read() -> None:
        assert client.zscore(ACTIVE_RUNS, run_id) is not None

    def books_idle() -> bool:
        registry_read()
        return int(client.object("idletime", state)) >= 2

    def books_gone() -> bool:
        registry_read()
        return not book_keys(client, day, run_id)

    wait_until(books_idle, 10, "the books idle")
    cap_memory(client)

    # Slow enough that the cache's older entries are idle longer (Redis's LRU clock
    # counts seconds) than the registry, read all the while.
    with Cache(client, every=0.1):
        wait_until(books_gone, 60, "the books evicted")
    client.config_set("maxmemory", 0)
    second = start_worker(request, tmp_path, "allkeys-b", books, fake_sfox.url)
    summary = nightly.get(timeout=90)
    assert summary["status"] == "lost", summary
    assert "every record of the run" in " ".join(summary["lost"]), summary
    again = run_nightly_orders.apply_async(
        kwargs={"run_date": day, "orders_file": orders}, queue=QUEUE
    ).get(timeout=60)
    assert again["status"] == "lost" and again["lost"] == summary["lost"], again
    errors = [ln for ln in second.log().splitlines() if f"nightly run for {day} is lost" in ln]
    assert len(errors) >= 2 and all("ERROR" in ln for ln in errors), errors
    with caplog.at_level(logging.ERROR, logger="tasks.jit"):
        wait_until(lambda: fan.progress().lost, 60, "the fan-out found lost")
    progress = fan.progress()
    assert not progress.finished and "the run's state" in progress.lost[0]
    assert any(f"run {run_id} is lost" in r.getMessage() for r in caplog.records)


# The books' own logic on the suite's Redis: no worker, a clock given to the sweeps.

SPEC = {"total": 4, "budget": 10, "stale_after": 3600, "downstream": "{}"}


def ttls(client: redis.Redis, keys: list[str]) -> list[int]:
    """The TTL of each of ``keys`` that exists."""
    return [client.ttl(key) for key in keys if client.exists(key)]


def staged_run(client: redis.Redis, run_id: str) -> JitRun:
    run = JitRun(client, run_id)
    for chunk in run.stage(0, [Chunk(0, ["a", "b"]), Chunk(1, ["c", "d"])], SPEC):
        run.finish_chunk(chunk, dispatched=2, failed=0)
    return run


def test_fan_out_books_short_of_their_counts_are_lost_and_an_ended_run_stays_finished(
    redis_client, caplog
):
    """A set evicted, or the state: lost, with what; an ended run reads finished without books."""
    run = staged_run(redis_client, "books-lost")
    run.user_done("a")
    assert run.progress().lost == ()
    redis_client.delete(run.done_set)
    with caplog.at_level(logging.ERROR, logger="tasks.jit"):
        assert run.progress().lost == ("the users done: 1 counted, 0 found",)
    redis_client.delete(run.state)
    progress = run.progress()
    assert progress.lost == ("the run's state (its size, counts and downstream)",)
    assert not progress.finished
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR]
    assert "run books-lost is lost" in caplog.records[0].getMessage()

    ended = staged_run(redis_client, "books-ended")
    for user in "abcd":
        ended.user_done(user)
    assert all(0 < ttl <= RUN_TTL for ttl in ttls(redis_client, ended.keys()))
    redis_client.delete(*ended.keys())  # evicted after the end
    assert ended.progress().finished and ended.progress().done == 4


def test_an_abandoned_fan_out_gets_its_ttl_and_loses_it_when_it_moves(redis_client, caplog):
    """No change for a day: the next staging's sweep gives its books the TTL; a user's end
    makes them persistent and active again."""
    run = staged_run(redis_client, "books-abandoned")
    assert set(ttls(redis_client, run.keys())) == {-1}
    sweep_registry(redis_client, now=time.time() + ABANDONED_AFTER - 60)
    assert redis_client.ttl(run.state) == -1  # not yet a day
    with caplog.at_level(logging.WARNING, logger="tasks.jit"):
        sweep_registry(redis_client, now=time.time() + ABANDONED_AFTER + 60)
    assert "run books-abandoned abandoned" in caplog.text
    assert 0 < redis_client.ttl(run.state) <= RUN_TTL
    assert redis_client.zscore(ACTIVE_RUNS, run.run_id) is None
    run.user_done("a")
    assert redis_client.ttl(run.state) == -1
    assert redis_client.zscore(ACTIVE_RUNS, run.run_id) is not None


def test_nightly_records_lost_abandoned_and_closed(redis_client, caplog, capsys):
    """lost() names what is short; a date with no coordinator for a day gets the TTL; close
    gives every record the TTL and keeps the date known as ended."""
    from tasks.cli.common import EXIT_FAILED
    from tasks.cli.nightly import show_state
    from tasks.nightly.orders import Order
    from tasks.nightly.store import ABANDONED_AFTER as NIGHT_ABANDONED
    from tasks.nightly.store import sweep_registry as sweep_nights
    from tasks.nightly.tasks import run_state

    night = NightlyRun(redis_client, date(2026, 10, 13))
    assert night.take("owner-task", "tok", 30).verdict == "owner"
    night.activate()
    orders = [Order(f"u{i}", "buy", "btcusd", 100, None, None, None, "#1", 2) for i in range(3)]
    assert 0 < redis_client.ttl(night.owner) <= RUN_TTL  # a TTL until the orders are staged
    assert night.stage(orders) == (3, 0)
    night.mark_staged(3)
    assert night.lost() == () and redis_client.ttl(night.owner) == -1
    redis_client.delete(night.users)
    assert night.lost() == ("users: 3 written, 0 found",)
    assert run_state(night.day).lost == ("users: 3 written, 0 found",)
    assert show_state(night.day) == EXIT_FAILED  # `sfox-tokens nightly --state` says so
    assert "records lost (evicted): users: 3 written, 0 found" in capsys.readouterr().out
    redis_client.delete(night.meta)
    assert night.lost() == ("every record of the run: its staged orders, outcomes and flags",)
    night.mark_staged(3)  # the records back, for the sweep below
    night.drop_lease("tok")
    with caplog.at_level(logging.WARNING, logger="tasks.nightly"):
        sweep_nights(redis_client, now=time.time() + NIGHT_ABANDONED + 60)
    assert "nightly run for 2026-10-13 abandoned" in caplog.text
    assert 0 < redis_client.ttl(night.meta) <= RUN_TTL
    assert night.take("owner-task", "tok-2", 30).verdict == "owner"
    night.activate()  # resumed: persistent again
    assert redis_client.ttl(night.meta) == -1 and redis_client.ttl(night.orders) == -1
    night.close({"status": "done", "lost": []})
    records = [key for key in night.records() if redis_client.exists(key)]
    assert records and all(0 < redis_client.ttl(key) <= RUN_TTL for key in records)
    redis_client.delete(*night.records())  # evicted after the end: the registry still knows
    assert night.lost(staged=False) != ()
