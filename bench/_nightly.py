"""The nightly run side by side, and budgets per egress address (sections of ``bench.run``).

**nightly**: at sFOX's rule, for each N users with one order each, measured in
one benchmark run:

- the package: ``sfox.run_nightly_orders(run_date=..., orders_file=...)`` on
  real workers, driven by its task name, its keyword arguments and its
  summary alone (how the coordinator works inside is its own business);
- the plain nightly loop (:func:`bench._plain.run_nightly`): what a partner
  would write instead, one process, one session, a correct limiter;
- the bound: the sliding window lets the first ``limit`` requests go at once,
  the rest at ``limit / period`` a second, so ``(requests - limit) / rate``
  for the ``ceil(N / batch) + N`` requests a run needs; and beside it the
  least time a sliding window really allows, in whole windows,
  ``(ceil(requests / limit) - 1) * period`` (the bound itself is not
  reachable: a full first window followed by a steady stream would hold twice
  the limit in the window that starts with the burst).

Everything that decides a target is counted by the stand-in, the same way
for both: requests (mints, re-mints, orders), 429s, users issued more than
one token, and each order's token age at arrival.

**egress**: mint tasks from 1, 2 and 4 loopback source addresses (127.0.0.2,
...), one worker per address with ``SFOX_SOURCE_ADDRESS`` and a
``SFOX_RATE_LIMIT_SCOPE`` of its own, each address given the same number of
requests: with a budget per address, the wall time stays put while the
requests scale with the addresses, with no 429 at any. One more run sends
from 4 addresses under one shared scope, the default: it gets one address's
throughput.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench._infra import BenchError, Workers, measured
from bench._plain import (
    TOKENS_PATH,
    nightly_bound_s,
    nightly_requests,
    window_minimum_s,
    write_orders,
)
from bench._row import Row

if TYPE_CHECKING:
    from bench.run import Bench

__all__ = [
    "APPROACH_EGRESS",
    "APPROACH_NIGHTLY_PACKAGE",
    "APPROACH_NIGHTLY_PLAIN",
    "EGRESS_ADDRESSES",
    "FIRST_RUN_DATE",
    "NIGHTLY_TASK",
    "count_at_the_stand_in",
    "section_egress",
    "section_nightly",
    "wait_for",
]

#: The package's nightly task, sent by name like any partner app would.
NIGHTLY_TASK = "sfox.run_nightly_orders"
APPROACH_NIGHTLY_PACKAGE = "package: sfox.run_nightly_orders"
APPROACH_NIGHTLY_PLAIN = "plain nightly loop, {threads} threads"
APPROACH_EGRESS = "package: mint tasks, {addresses} egress address{es}, {scopes} scope{s}"
#: Loopback aliases standing in for egress IPs; the stand-in listens on 127.0.0.1.
EGRESS_ADDRESSES = tuple(f"127.0.0.{index}" for index in range(2, 10))
#: The first run date; each nightly run takes the next day, so no run finds another's claim.
FIRST_RUN_DATE = date(2030, 1, 1)
#: Seconds between progress lines while a long nightly run goes on.
PROGRESS_EVERY_S = 30.0
ORDERS_PATH = "/v1/orders"
#: Seconds between two looks at whether the nightly task has ended.
READY_EVERY_S = 0.05
#: Seconds between two calls of a waiting ``tick``.
TICK_S = 0.005


def count_at_the_stand_in(row: Row, stats: dict[str, Any], started_at: float) -> None:
    """Requests by kind, 429s, tokens issued twice and token ages, as the stand-in saw them."""
    by_path = stats["requests_by_path"]
    tokens_all = int(stats["requests"][TOKENS_PATH])
    row.mints = int(by_path.get(TOKENS_PATH, 0))
    row.remints = tokens_all - row.mints
    row.orders = int(stats["requests"][ORDERS_PATH])
    row.requests = int(stats["requests"]["total"])
    row.rate_limited = int(stats["rate_limited"])
    row.max_in_window = int(stats["max_requests_in_window"])
    use = stats["token_use"]
    row.minted_twice = int(use["users_minted_more_than_once"])
    row.token_age_max_s = use["max_s"]
    row.token_age_p99_s = use["p99_s"]
    last_order = stats["times"]["last_order_at"]
    row.last_order_s = float(last_order) - started_at if last_order else 0.0
    row.addresses = _addresses(stats)


def _addresses(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {
        ip: {
            "requests": int(entry["requests"]),
            "rate_limited": int(entry["rate_limited"]),
            "max_requests_in_window": int(entry["max_requests_in_window"]),
        }
        for ip, entry in stats["by_address"].items()
    }


def _pause(seconds: float, tick: Callable[[], None] | None) -> None:
    """Sleep ``seconds``, calling ``tick`` every :data:`TICK_S` meanwhile if given."""
    if tick is None:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while True:
        tick()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(TICK_S, left))


def wait_for(
    bench: Bench, result: Any, timeout: float, tick: Callable[[], None] | None = None
) -> dict[str, Any]:
    """The task's result, saying how far it got now and then while it runs.

    ``tick`` is called every :data:`TICK_S` while waiting (the lanes section sends
    and times on-demand mints from it, in this one thread).
    """
    deadline = time.monotonic() + timeout
    said = time.monotonic()
    while not result.ready():
        now = time.monotonic()
        if now > deadline:
            raise BenchError(f"{NIGHTLY_TASK} did not finish in {timeout:.0f} s")
        if now - said >= PROGRESS_EVERY_S:
            info = result.info
            if isinstance(info, dict) and "done" in info:
                bench.log(f"    {result.state}: {info['done']} / {info.get('total', '?')}")
            else:  # RETRY: the coordinator's turn ended, it resumes from the broker
                bench.log(f"    {result.state}")
            said = now
        _pause(READY_EVERY_S, tick)
    try:
        summary: dict[str, Any] = dict(result.get(timeout=10))
    except Exception as exc:
        raise BenchError(f"{NIGHTLY_TASK} failed: {type(exc).__name__}: {exc}") from None
    return summary


def run_nightly_package(bench: Bench, users: int, orders: Path, run_date: date) -> Row:
    """``sfox.run_nightly_orders`` on fresh workers, timed from sending it to its summary."""
    from tasks import app

    c = bench.config
    row = Row("nightly", APPROACH_NIGHTLY_PACKAGE, users, concurrency=c.workers * c.concurrency)
    row.latency = c.latency
    row.bound_s = nightly_bound_s(nightly_requests(users, c.batch_size), c.rate)
    bench.reset()
    workers = Workers(
        bench.worker_env(c.rate),
        bench.log_dir,
        count=c.workers,
        concurrency=c.concurrency,
        redis_client=bench.redis.client,
    )
    with measured(row, workers, bench.fake):
        started_at = time.time()
        result = app.send_task(
            NIGHTLY_TASK, kwargs={"run_date": run_date.isoformat(), "orders_file": str(orders)}
        )
        summary = wait_for(bench, result, 3 * row.bound_s + 180)
    count_at_the_stand_in(row, bench.fake.stats(), started_at)
    row.placed = int(summary.get("placed", 0))
    row.tokens = row.placed + int(summary.get("already_placed", 0))
    if summary.get("status") != "done":
        row.notes.append(f"the run ended {summary.get('status')!r}: {summary.get('reason', '')}")
    if summary.get("failed_orders"):
        row.notes.append(f"{summary['failed_orders']} order(s) failed: {list(summary['failed'])}")
    if int(summary.get("remints", 0)) != row.remints:
        row.notes.append(
            f"the summary counts {summary.get('remints')} re-mint(s), the stand-in {row.remints}"
        )
    return bench.record(row)


def run_nightly_plain(bench: Bench, users: int, orders: Path) -> Row:
    """The plain nightly loop in its own process, with as many threads as the package."""
    c = bench.config
    threads = c.workers * c.concurrency
    row = Row("nightly", APPROACH_NIGHTLY_PLAIN.format(threads=threads), users, concurrency=threads)
    row.latency = c.latency
    row.bound_s = nightly_bound_s(nightly_requests(users, c.batch_size), c.rate)
    bench.reset()
    args = [
        sys.executable, "-m", "bench._plain", "--url", bench.fake.url, "--mode", "nightly",
        "--orders", str(orders), "--batch-size", str(c.batch_size), "--rate", c.rate,
        "--threads", str(threads),
    ]  # fmt: skip
    outcome = bench.loop_process(row, args, timeout=3 * row.bound_s + 180)
    count_at_the_stand_in(row, bench.fake.stats(), float(outcome["started_at"]))
    row.placed = row.tokens = int(outcome["placed"])
    return bench.record(row)


def section_nightly(bench: Bench) -> None:
    c = bench.begin_section("the nightly run, one order per user")
    for index, users in enumerate(c.nightly_sizes):
        tag = uuid.uuid4().hex[:8]
        orders = bench.out_dir / f"nightly-orders-{users}.csv"
        write_orders(orders, [f"night-{tag}-{i:07d}" for i in range(users)])
        run_nightly_package(bench, users, orders, FIRST_RUN_DATE + timedelta(days=index))
        run_nightly_plain(bench, users, orders)
        bound = Row("nightly", "bound", users)
        bound.requests = nightly_requests(users, c.batch_size)
        bound.mints = math.ceil(users / c.batch_size)
        bound.orders = bound.tokens = users
        bound.wall_s = bound.bound_s = nightly_bound_s(bound.requests, c.rate)
        bench.rows.append(bound)
        least = Row("nightly", "sliding-window minimum", users)
        least.requests, least.mints, least.orders = bound.requests, bound.mints, bound.orders
        least.tokens = users
        least.wall_s = least.bound_s = window_minimum_s(bound.requests, c.rate)
        bench.rows.append(least)
        orders.unlink(missing_ok=True)


def run_egress(bench: Bench, addresses: int, *, shared: bool) -> Row:
    """Mint tasks from ``addresses`` source addresses: a scope each, or one for all."""
    c = bench.config
    if addresses > len(EGRESS_ADDRESSES):
        raise BenchError(f"at most {len(EGRESS_ADDRESSES)} egress addresses on loopback")
    sources = EGRESS_ADDRESSES[:addresses]
    scopes = ["egress-shared"] * addresses if shared else [f"egress-{ip}" for ip in sources]
    budgets = len(set(scopes))
    row = Row(
        "egress",
        APPROACH_EGRESS.format(
            addresses=addresses,
            es="" if addresses == 1 else "es",
            scopes=budgets,
            s="" if budgets == 1 else "s",
        ),
        c.egress_requests * budgets * c.egress_batch,
        concurrency=addresses * c.egress_concurrency,
    )
    row.latency = c.latency
    row.bound_s = nightly_bound_s(c.egress_requests * budgets, c.rate, budgets)
    bench.reset()
    env = {**bench.worker_env(c.rate), "SFOX_TOKEN_BATCH_SIZE": str(c.egress_batch)}
    workers = Workers(
        env,
        bench.log_dir,
        count=addresses,
        concurrency=c.egress_concurrency,
        redis_client=bench.redis.client,
        worker_envs=[
            {"SFOX_SOURCE_ADDRESS": ip, "SFOX_RATE_LIMIT_SCOPE": scope}
            for ip, scope in zip(sources, scopes, strict=True)
        ],
    )
    tag = uuid.uuid4().hex[:8]
    ids = [f"egress-{tag}-{index:07d}" for index in range(row.users)]
    with measured(row, workers):
        row.tokens = bench._mint_tasks(ids, c.egress_chunk, 3 * row.bound_s + 180)
    stats = bench.fake.stats()
    row.requests = row.mints = int(stats["requests"][TOKENS_PATH])
    row.rate_limited = int(stats["rate_limited"])
    row.addresses = _addresses(stats)
    row.max_in_window = max(
        (entry["max_requests_in_window"] for entry in row.addresses.values()), default=0
    )
    strays = sorted(set(row.addresses) - set(sources))
    if strays:
        row.notes.append(f"requests arrived from addresses not configured: {strays}")
    if row.tokens != row.users:
        row.notes.append(f"{row.users - row.tokens} user(s) got no token")
    return bench.record(row)


def section_egress(bench: Bench) -> None:
    c = bench.config
    c = bench.begin_section(
        f"budgets per egress address ({c.egress_requests} requests of {c.egress_batch} users "
        "each; sFOX's rule per address, the package's rate per scope)"
    )
    for addresses in c.egress_counts:
        run_egress(bench, addresses, shared=False)
    if max(c.egress_counts, default=1) > 1:
        run_egress(bench, max(c.egress_counts), shared=True)
