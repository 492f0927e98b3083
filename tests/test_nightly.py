"""The nightly run end to end: real workers, real Redis, the stand-in's orders endpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from tasks import place_user_order, run_nightly_orders
from tasks.nightly.store import NightlyRun
from tasks.sealing import Sealer, derive_seal_key
from tasks.testing import Fault
from tests.conftest import ENTERPRISE_KEY
from tests.services import eventually
from tests.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.slow

QUEUE = "nightly-tests"
NIGHTLY_ENV = {
    "SFOX_QUEUE": QUEUE,
    # The stand-in has no rate limit here; the limiter is still in every call.
    "SFOX_RATE_LIMIT": "5000/1s",
    "SFOX_VISIBILITY_TIMEOUT": "6",
    "SFOX_NIGHTLY_LEASE": "2",
    # Below the visibility timeout: no run of a task outlives it, so none is redelivered.
    "SFOX_TASK_TURN": "3",
}


def write_orders(tmp_path, users, *, extra_rows=""):
    path = tmp_path / "orders.csv"
    rows = ["user_id,side,currency_pair,algorithm_id,quantity,amount,price"]
    rows += [f"{u},buy,btcusd,100,,25," for u in users]
    path.write_text("\n".join(rows) + "\n" + extra_rows)
    return str(path)


def start_workers(tmp_path, fake_sfox, count=1, concurrency=4, name="nightly"):
    env = {**NIGHTLY_ENV, "SFOX_API_URL": fake_sfox.url}
    return [
        WorkerProcess(
            f"{name}{i}", tmp_path, env=env, concurrency=concurrency, queues=QUEUE, loglevel="INFO"
        ).start()
        for i in range(count)
    ]


def run(day, orders, **options):
    return run_nightly_orders.apply_async(
        kwargs={"run_date": day, "orders_file": orders}, queue=QUEUE, **options
    )


def orders_by_user(fake_sfox):
    return Counter(order.user_id for order in fake_sfox.orders)


@pytest.fixture
def nightly_workers(fake_sfox, redis_client, tmp_path):
    workers = start_workers(tmp_path, fake_sfox)
    yield workers
    for w in workers:
        w.stop()


def test_thousand_users_each_get_exactly_one_order(nightly_workers, fake_sfox, tmp_path):
    """1,000 users, 3 refused, 2 orders rejected: every other user gets one order; it adds up."""
    users = [f"acct-{i:04d}" for i in range(1000)]
    for refused in ("acct-0007", "acct-0500", "acct-0999"):
        fake_sfox.refuse(refused, status=404, message="user not found")
    fake_sfox.inject(
        Fault.status(422, body="insufficient funds", path="/v1/orders"),
        Fault.status(422, body="insufficient funds", path="/v1/orders"),
    )
    orders = write_orders(tmp_path, users, extra_rows="bad-row,buy,btcusd,999,,1,\n")
    summary = run("2026-11-27", orders).get(timeout=240)

    placed = orders_by_user(fake_sfox)
    assert all(n == 1 for n in placed.values())
    assert len(placed) == 995
    assert summary["users"] == 1000 and summary["orders"] == 1000
    assert summary["placed"] == 995 and summary["already_placed"] == 0
    assert summary["failed_orders"] == 5
    assert summary["placed"] + summary["already_placed"] + summary["failed_orders"] == 1000
    refused = summary["failed"]["token refused (404): user not found"]
    assert refused == {"count": 3, "user_ids": ["acct-0007", "acct-0500", "acct-0999"]}
    rejected = summary["failed"]["order rejected (422): insufficient funds"]
    assert rejected["count"] == 2 and not set(rejected["user_ids"]) & set(placed)
    assert summary["skipped_rows"] == [
        {"line": 1002, "user_id": "bad-row", "error": summary["skipped_rows"][0]["error"]}
    ]
    assert summary["tokens_minted"] == 997 and summary["remints"] == 0
    # Nothing twice without a crash: no user minted twice, no chunk sent again.
    minted = Counter(user for user, _ in fake_sfox.issued_tokens.values())
    assert len(minted) == 997 and set(minted.values()) == {1}
    assert all("again" not in w.log() for w in nightly_workers)


def test_second_trigger_for_the_same_date_does_nothing(nightly_workers, fake_sfox, tmp_path):
    """Firing the nightly task twice for one date gives one run; the second sends nothing."""
    orders = write_orders(tmp_path, [f"twice-{i}" for i in range(50)])
    first = run("2026-11-20", orders)
    second = run("2026-11-20", orders)
    results = [first.get(timeout=120), second.get(timeout=120)]
    skipped = [r for r in results if r["status"] == "skipped"]
    done = [r for r in results if r["status"] == "done"]
    assert len(skipped) == 1 and len(done) == 1
    assert "already under way or done" in skipped[0]["reason"]
    assert len(fake_sfox.orders) == 50
    before = fake_sfox.count()
    third = run("2026-11-20", orders).get(timeout=60)
    assert third["status"] == "skipped" and fake_sfox.count() == before


def test_killed_pool_processes_leave_every_order_exactly_once(fake_sfox, redis_client, tmp_path):
    """SIGKILL the pool processes mid-run: afterwards each order exists once, none missing."""
    fake_sfox.configure(latency=0.01)
    users = [f"kill-{i}" for i in range(300)]
    workers = start_workers(tmp_path, fake_sfox, concurrency=3)
    try:
        result = run("2026-11-21", write_orders(tmp_path, users))
        assert eventually(lambda: len(fake_sfox.orders) >= 60, timeout=120)
        for child in children(workers[0].proc.pid):
            os.kill(child, signal.SIGKILL)
        summary = result.get(timeout=240)
    finally:
        for w in workers:
            w.stop()
    placed = orders_by_user(fake_sfox)
    assert set(placed) == set(users) and all(n == 1 for n in placed.values())
    assert summary["placed"] + summary["already_placed"] == 300


def test_killed_worker_replaced_by_another_finishes_the_run(fake_sfox, redis_client, tmp_path):
    """SIGKILL the whole worker mid-run, start another: each order exists once, none missing."""
    fake_sfox.configure(latency=0.01)
    users = [f"crash-{i}" for i in range(300)]
    first = start_workers(tmp_path, fake_sfox, concurrency=3, name="doomed")[0]
    result = run("2026-11-22", write_orders(tmp_path, users))
    try:
        assert eventually(lambda: len(fake_sfox.orders) >= 60, timeout=120)
        for child in children(first.proc.pid):
            os.kill(child, signal.SIGKILL)
        first.proc.kill()
        first.proc.wait(10)
        placed_at_crash = len(fake_sfox.orders)
        assert placed_at_crash < 300
    finally:
        first.stop()
    second = start_workers(tmp_path, fake_sfox, concurrency=3, name="heir")[0]
    try:
        summary = result.get(timeout=240)
    finally:
        second.stop()
    placed = orders_by_user(fake_sfox)
    assert set(placed) == set(users) and all(n == 1 for n in placed.values())
    assert summary["status"] == "done"
    assert summary["placed"] + summary["already_placed"] == 300


def test_run_survives_killed_redis_connections(nightly_workers, fake_sfox, redis_client, tmp_path):
    """CLIENT KILL every worker connection to Redis mid-run: the run still completes."""
    fake_sfox.configure(latency=0.005)
    users = [f"ck-{i}" for i in range(300)]
    result = run("2026-11-23", write_orders(tmp_path, users))
    assert eventually(lambda: len(fake_sfox.orders) >= 50, timeout=120)
    me = redis_client.client_id()
    # Only this suite's database: other suites and the benchmark share the Redis server.
    db = str(redis_client.connection_pool.connection_kwargs.get("db", 0))
    for client in redis_client.client_list():
        if int(client["id"]) != me and client.get("db") == db:
            redis_client.client_kill_filter(_id=client["id"])
    summary = result.get(timeout=240)
    placed = orders_by_user(fake_sfox)
    assert set(placed) == set(users) and all(n == 1 for n in placed.values())
    assert summary["placed"] + summary["already_placed"] == 300


def test_expired_sealed_token_is_reminted_and_the_order_placed(
    nightly_workers, fake_sfox, redis_client, tmp_path
):
    """A downstream task whose sealed token is past the TTL mints a new one, once, and succeeds."""
    day = date(2026, 11, 24)
    stage_one_order(redis_client, day, "late-user")
    old = Sealer([derive_seal_key(ENTERPRISE_KEY)], 900, clock=lambda: time.time() - 3600)
    entry = {
        "partner_user_id": "late-user",
        "token": old.seal("stale"),
        "expires": "2099-01-01T00:00:00Z",
    }
    result = place_user_order.apply_async(
        kwargs={"run_date": day.isoformat(), "user_token": entry}, queue=QUEUE
    ).get(timeout=60)
    assert result["placed"] == 1
    assert [o.user_id for o in fake_sfox.orders] == ["late-user"]
    assert fake_sfox.count("/v1/enterprise/user-tokens/late-user") == 1
    assert NightlyRun(redis_client, day).remints() == 1


def test_token_rejected_with_401_is_reminted_once(nightly_workers, fake_sfox, redis_client):
    """sFOX's 401 for a user token leads to one re-mint and a placed order; never a loop."""
    day = date(2026, 11, 25)
    stage_one_order(redis_client, day, "revoked-user")
    from tasks import mint_user_tokens

    entry = mint_user_tokens.apply_async((["revoked-user"],), queue=QUEUE).get(timeout=60)[
        "tokens"
    ][0]
    fake_sfox.expire_all_tokens("revoked-user")
    result = place_user_order.apply_async(
        kwargs={"run_date": day.isoformat(), "user_token": entry}, queue=QUEUE
    ).get(timeout=60)
    assert result["placed"] == 1
    assert fake_sfox.count("/v1/enterprise/user-tokens/revoked-user") == 1
    # Every token it gets is refused: one re-mint, then the order is reported failed.
    stage_one_order(redis_client, day, "always-refused", ref="x")
    fake_sfox.inject(Fault.status(401, path="/v1/orders"), Fault.status(401, path="/v1/orders"))
    entry = mint_user_tokens.apply_async((["always-refused"],), queue=QUEUE).get(timeout=60)[
        "tokens"
    ][0]
    result = place_user_order.apply_async(
        kwargs={"run_date": day.isoformat(), "user_token": entry}, queue=QUEUE
    ).get(timeout=60)
    assert result["failed"] == 1
    assert fake_sfox.count("/v1/enterprise/user-tokens/always-refused") == 1


def test_reused_client_order_id_is_recorded_as_already_placed(
    nightly_workers, fake_sfox, redis_client
):
    """An order whose client_order_id sFOX has seen is 'already placed', not a failure."""
    day = date(2026, 11, 26)
    stage_one_order(redis_client, day, "dup-user")
    from tasks import mint_user_tokens

    entry = mint_user_tokens.apply_async((["dup-user"],), queue=QUEUE).get(timeout=60)["tokens"][0]
    kwargs = {"run_date": day.isoformat(), "user_token": entry}
    assert place_user_order.apply_async(kwargs=kwargs, queue=QUEUE).get(timeout=60)["placed"] == 1
    run_ = NightlyRun(redis_client, day)
    redis_client.delete(run_.outcomes)  # as if the outcome was lost in a crash
    again = place_user_order.apply_async(kwargs=kwargs, queue=QUEUE).get(timeout=60)
    assert again["already_placed"] == 1 and len(fake_sfox.orders) == 1


def stage_one_order(redis_client, day, user_id, ref="#1"):
    from tasks.nightly.orders import Order

    NightlyRun(redis_client, day).stage(
        [Order(user_id, "buy", "btcusd", 100, None, Decimal("25"), None, ref, 2)]
    )


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def sfox_tokens(*args, timeout=120):
    script = Path(sys.executable).with_name("sfox-tokens")
    return subprocess.run(
        [str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_cli_triggers_a_run_shows_the_summary_and_refuses_a_second(
    nightly_workers, fake_sfox, tmp_path
):
    """`sfox-tokens nightly` runs now and prints the summary; again for that date: skipped, 0."""
    orders = write_orders(tmp_path, [f"cli-{i}" for i in range(20)])
    first = sfox_tokens("nightly", "--date", "2026-10-02", "--orders", orders, "--queue", QUEUE)
    assert first.returncode == 0, first.stderr
    assert "nightly run for 2026-10-02: done" in first.stdout
    assert re.search(r"placed\s+20", first.stdout)
    second = sfox_tokens("nightly", "--date", "2026-10-02", "--orders", orders, "--queue", QUEUE)
    assert second.returncode == 0
    assert "skipped" in second.stdout and "already under way or done" in second.stdout
    assert len(fake_sfox.orders) == 20


def test_cli_exit_code_says_some_orders_failed(nightly_workers, fake_sfox, tmp_path):
    """A run with a refused user and a skipped row exits 1 and names both."""
    fake_sfox.refuse("cli-bad", status=404, message="user not found")
    orders = write_orders(tmp_path, ["cli-ok", "cli-bad"], extra_rows="cli-x,hold,btcusd,100,1,,\n")
    out = sfox_tokens("nightly", "--date", "2026-10-03", "--orders", orders, "--queue", QUEUE)
    assert out.returncode == 1
    assert "token refused (404): user not found: cli-bad" in out.stdout
    assert "skipped line 4" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--date", "27/11/2026"], "YYYY-MM-DD"),
        (["--orders", "/nonexistent.csv"], "not a readable file"),
        (["--timeout", "0"], "--timeout"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(args, message):
    """Bad nightly arguments exit 2 with a one-line error and send nothing."""
    out = sfox_tokens("nightly", *args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_no_secret_in_the_debug_log_of_a_whole_nightly_run(
    worker, events, fake_sfox, redis_client, tmp_path
):
    """A full nightly run through the DEBUG worker: no key or token in its log, events or Redis."""
    from tests.test_worker import dump_redis

    users = [f"scan-{i}" for i in range(30)]
    fake_sfox.refuse("scan-3", status=422, message="user deactivated")
    fake_sfox.inject(Fault.status(503, path="/v1/orders"))
    summary = run_nightly_orders.apply_async(
        kwargs={"run_date": "2026-10-04", "orders_file": write_orders(tmp_path, users)}
    ).get(timeout=120)
    assert summary["placed"] == 29
    # An expired token, re-minted: its plaintext must not leak either.
    day = date(2026, 10, 4)
    stage_one_order(redis_client, day, "scan-remint", ref="extra")
    stale = Sealer([derive_seal_key(ENTERPRISE_KEY)], 900, clock=lambda: time.time() - 3600)
    place_user_order.apply_async(
        kwargs={
            "run_date": day.isoformat(),
            "user_token": {
                "partner_user_id": "scan-remint",
                "token": stale.seal("stale-plain"),
                "expires": "2099-01-01T00:00:00Z",
            },
        }
    ).get(timeout=60)
    time.sleep(1.0)
    secrets_ = [ENTERPRISE_KEY, "stale-plain", *fake_sfox.issued_tokens]
    assert len(secrets_) >= 31
    log = worker.log()
    assert "scan-1" in log and "nightly run for 2026-10-04" in log
    event_text = json.dumps(events.events, default=str)
    redis_text = dump_redis(redis_client)
    for secret in secrets_:
        assert secret not in log
        assert secret not in event_text
        assert secret not in redis_text
