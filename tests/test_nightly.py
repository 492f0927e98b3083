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


def start_workers(tmp_path, fake_sfox, count=1, concurrency=4, name="nightly", env=None):
    env = {**NIGHTLY_ENV, "SFOX_API_URL": fake_sfox.url, **(env or {})}
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


def trigger(day, **kwargs):
    """The nightly task for ``day`` as beat or a partner sends it: no orders file named."""
    return run_nightly_orders.apply_async(kwargs={"run_date": day, **kwargs}, queue=QUEUE)


def orders_by_user(fake_sfox):
    return Counter(order.user_id for order in fake_sfox.orders)


def assert_each_order_once(fake_sfox, users):
    """Every user of ``users`` has one order at the stand-in; no client_order_id came twice."""
    by_coid = Counter(order.client_order_id for order in fake_sfox.orders)
    assert set(by_coid.values()) == {1}
    assert sorted(orders_by_user(fake_sfox).elements()) == sorted(users)
    assert fake_sfox.duplicate_order_attempts == 0


def nightly_keys(redis_client, day):
    """Every key of ``day``'s run: its records and its fan-out's books."""
    return [
        *redis_client.keys(f"sfox:nightly:{{{day}}}:*"),
        *redis_client.keys(f"sfox:jit:{{nightly-{day}}}:*"),
    ]


def stall(redis_client, day, orders, owner="gone-coordinator"):
    """A run whose coordinator claimed the date, staged the orders, and was never seen again."""
    from tasks.nightly.orders import load_orders

    night = NightlyRun(redis_client, date.fromisoformat(day))
    assert night.take(owner, "its-lease", 0.001).verdict == "owner"  # a 1 ms lease
    night.stage(load_orders(path=orders))
    night.set_flag("started", str(time.time()))
    night.set_flag("staged", "1")
    assert eventually(lambda: night.books().phase == "stalled", timeout=5)
    return night


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
    """Two triggers at once give one run; a trigger for the finished date is skipped, sends none."""
    orders = write_orders(tmp_path, [f"twice-{i}" for i in range(50)])
    first = run("2026-11-20", orders)
    second = run("2026-11-20", orders)
    results = [first.get(timeout=120), second.get(timeout=120)]
    by_status = {r["status"]: r for r in results}
    # The second finds the first at work (under_way), or already done (skipped).
    assert set(by_status) in ({"done", "under_way"}, {"done", "skipped"}), results
    other = by_status.get("under_way") or by_status["skipped"]
    ran = {r["status"]: task.id for r, task in zip(results, (first, second), strict=True)}
    assert other["owner"] == ran["done"]
    assert len(fake_sfox.orders) == 50
    before = fake_sfox.count()
    third = run("2026-11-20", orders).get(timeout=60)
    assert third["status"] == "skipped" and "is done" in third["reason"]
    assert fake_sfox.count() == before


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
    assert "2026-10-02: skipped: the run for 2026-10-02 is done" in second.stdout
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


# -- who runs a date: take-over, resume, no orders ------------------------------------------


def test_claims_of_a_date_follow_the_lease(redis_client):
    """take: the first owns; another waits while the lease lives, takes over once it is gone."""
    night = NightlyRun(redis_client, date(2026, 12, 10))
    assert night.take("first", "lease-1", 30) == ("owner", "")
    assert night.take("first", "lease-1", 30) == ("owner", "first")  # run twice: the same
    assert night.take("first", "lease-2", 30) == ("busy", "first")  # a second copy of it
    assert night.take("second", "lease-3", 30) == ("under_way", "first")
    # Between turns the lease is kept for the owner's next turn, and for no one else.
    night.hand_over("lease-1", "first", 30)
    night.hand_over("lease-1", "first", 30)  # run twice: still kept for the next turn
    assert night.take("second", "lease-3", 30) == ("under_way", "first")
    assert night.take("first", "lease-4", 30) == ("owner", "first")
    # The owner is gone (its lease lapsed): the next trigger takes the run over.
    night.drop_lease("lease-4")
    assert night.take("second", "lease-5", 30) == ("took", "first")
    assert night.take("first", "lease-6", 30) == ("under_way", "second")
    night.set_flag("summary", "{}")
    assert night.take("third", "lease-7", 30) == ("finished", "second")


def test_a_run_that_fails_before_staging_gives_the_date_up(redis_client):
    """release: unstaged, the date is free again at once; staged, it stays owned."""
    night = NightlyRun(redis_client, date(2026, 12, 11))
    assert night.take("first", "lease-1", 30).verdict == "owner"
    night.set_flag("started", "1")
    assert night.release("first", "lease-1") is True
    assert night.release("first", "lease-1") is False  # run twice: nothing left to drop
    assert night.books().phase == "not_started"
    assert redis_client.keys("sfox:nightly:{2026-12-11}:*") == []
    assert night.take("second", "lease-2", 30) == ("owner", "")
    night.set_flag("staged", "1")
    assert night.release("second", "lease-2") is False
    assert night.books().phase == "stalled" and night.books().owner == "second"


def test_no_orders_configured_starts_nothing(nightly_workers, fake_sfox, redis_client):
    """No orders file or source: not_configured, one warning naming the settings, no key."""
    result = trigger("2026-12-01").get(timeout=60)
    assert result["status"] == "not_configured"
    assert "SFOX_NIGHTLY_ORDERS_FILE" in result["reason"]
    assert "SFOX_NIGHTLY_ORDERS_SOURCE" in result["reason"]
    log = nightly_workers[0].log()
    warnings = [line for line in log.splitlines() if "no nightly orders are configured" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], warnings
    assert nightly_keys(redis_client, "2026-12-01") == []
    assert fake_sfox.count() == 0


def test_a_date_whose_first_trigger_had_no_orders_file_runs_once_it_has_one(
    fake_sfox, redis_client, tmp_path
):
    """The configured file is missing: the trigger fails, holds nothing; with the file, it runs."""
    orders = tmp_path / "tonight" / "orders.csv"
    worker = start_workers(
        tmp_path, fake_sfox, name="unready", env={"SFOX_NIGHTLY_ORDERS_FILE": str(orders)}
    )[0]
    try:
        with pytest.raises(Exception, match="not a readable file"):
            trigger("2026-12-02").get(timeout=60)
        assert nightly_keys(redis_client, "2026-12-02") == []
        users = [f"late-file-{i}" for i in range(25)]
        orders.parent.mkdir()
        write_orders(orders.parent, users)
        summary = trigger("2026-12-02").get(timeout=120)
    finally:
        worker.stop()
    assert summary["status"] == "done" and summary["placed"] == 25, summary
    assert_each_order_once(fake_sfox, users)


def test_a_run_whose_coordinator_is_gone_is_resumed_exactly_once(
    nightly_workers, fake_sfox, redis_client, tmp_path
):
    """Claimed and staged, 10 orders placed, coordinator gone: a new trigger places the other 30."""
    from tasks import mint_user_tokens

    day = "2026-12-03"
    users = [f"stalled-{i}" for i in range(40)]
    orders = write_orders(tmp_path, users)
    stall(redis_client, day, orders)
    early = mint_user_tokens.apply_async((users[:10],), queue=QUEUE).get(timeout=60)["tokens"]
    for entry in early:
        placed = place_user_order.apply_async(
            kwargs={"run_date": day, "user_token": entry}, queue=QUEUE
        ).get(timeout=60)
        assert placed["placed"] == 1
    assert len(fake_sfox.orders) == 10

    resumed = run(day, orders)
    summary = resumed.get(timeout=120)
    assert summary["status"] == "done", summary
    assert summary["placed"] == 40 and summary["already_placed"] == 0, summary
    assert summary["failed_orders"] == 0
    assert_each_order_once(fake_sfox, users)
    books = NightlyRun(redis_client, date.fromisoformat(day)).books()
    assert books.owner == resumed.id and books.phase == "finished"
    assert "the coordinator of task gone-coordinator is gone" in nightly_workers[0].log()
    assert run(day, orders).get(timeout=60)["status"] == "skipped"


def test_a_coordinator_lost_mid_run_is_taken_over(
    nightly_workers, fake_sfox, redis_client, tmp_path
):
    """The coordinator's next turn is lost (revoked) mid-run: a later trigger takes over, once."""
    fake_sfox.configure(latency=0.1)  # long enough a night that the take-over is mid-run
    day = "2026-12-04"
    users = [f"orphan-{i}" for i in range(300)]
    orders = write_orders(tmp_path, users)
    first = run(day, orders)
    assert eventually(lambda: len(fake_sfox.orders) >= 20, timeout=120)
    run_nightly_orders.app.control.revoke(first.id)
    night = NightlyRun(redis_client, date.fromisoformat(day))
    # Its turn ends, the lease kept for its next turn lapses: the run has no coordinator.
    assert eventually(lambda: night.books().phase in ("stalled", "finished"), timeout=30)
    assert night.books().phase == "stalled"
    assert len(fake_sfox.orders) < 300  # the night is not over
    second = run(day, orders)
    summary = second.get(timeout=180)
    assert summary["status"] == "done", summary
    assert summary["placed"] + summary["already_placed"] == 300
    assert_each_order_once(fake_sfox, users)
    assert night.books().owner == second.id


def test_cli_shows_a_stalled_date_and_resumes_it(
    nightly_workers, fake_sfox, redis_client, tmp_path
):
    """`nightly --state` shows a stalled run's facts; `--resume` finishes it; then: finished."""
    from tasks.cli.main import main

    day = "2026-12-05"
    users = [f"cli-stalled-{i}" for i in range(20)]
    stall(redis_client, day, write_orders(tmp_path, users))

    shown = sfox_tokens("nightly", "--date", day, "--state")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"nightly run for {day}: stalled")
    for fact in (
        "owner: task gone-coordinator",
        "lease: none",
        "orders staged: 20 for 20 users",
        "fan-out: not started",
        "placed: 0",
    ):
        assert fact in lines, shown.stdout
    assert ENTERPRISE_KEY not in shown.stdout

    resumed = sfox_tokens("nightly", "--date", day, "--resume", "--queue", QUEUE)
    assert resumed.returncode == 0, resumed.stderr
    assert f"nightly run for {day}: done" in resumed.stdout
    assert re.search(r"placed\s+20", resumed.stdout)
    assert_each_order_once(fake_sfox, users)

    finished = sfox_tokens("nightly", "--date", day, "--state")
    assert finished.stdout.startswith(f"nightly run for {day}: finished")
    assert "users done: 20 of 20" in finished.stdout and "placed: 20" in finished.stdout
    again = sfox_tokens("nightly", "--date", day, "--resume", "--queue", QUEUE)
    assert again.returncode == 0 and "nothing to resume" in again.stdout
    assert len(fake_sfox.orders) == 20
    # In process too: a date that never began has nothing to resume (2, one line).
    assert main(["nightly", "--date", "2026-12-06", "--resume"]) == 2
    assert nightly_keys(redis_client, "2026-12-06") == []


def test_cli_says_when_no_orders_are_configured(nightly_workers, fake_sfox, redis_client):
    """`sfox-tokens nightly` with no orders anywhere: exit 2, the settings named, nothing held."""
    out = sfox_tokens("nightly", "--date", "2026-12-07", "--queue", QUEUE)
    assert out.returncode == 2
    assert "not_configured" in out.stdout and "SFOX_NIGHTLY_ORDERS_FILE" in out.stdout
    assert nightly_keys(redis_client, "2026-12-07") == []


def _results_of(redis_client, task_result_has) -> list[dict]:
    """The stored results (Redis backend) for which ``task_result_has`` holds."""
    found = []
    for key in redis_client.scan_iter("celery-task-meta-*"):
        meta = json.loads(redis_client.get(key) or b"{}")
        result = meta.get("result")
        if isinstance(result, dict) and task_result_has(result):
            found.append(result)
    return found


def test_an_order_task_sent_again_runs_and_places_nothing_twice(
    nightly_workers, fake_sfox, redis_client, tmp_path
):
    """The resend of a user's order task (a new id) runs, finds the order placed, places none."""
    from tasks import app
    from tasks.fanout.api import FanOut

    users = [f"resend-{i}" for i in range(5)]
    day = "2026-11-21"
    assert run(day, write_orders(tmp_path, users)).get(timeout=60)["placed"] == 5
    night = NightlyRun(redis_client, date.fromisoformat(day))
    FanOut(app, night.fanout_id).resend(["resend-2"])  # what a stalled night sends
    assert eventually(
        lambda: _results_of(
            redis_client, lambda r: r.get("user_id") == "resend-2" and "done before" in r
        ),
        timeout=30,
    )
    assert_each_order_once(fake_sfox, users)
