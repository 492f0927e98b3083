"""The baselines without Celery: a plain batched loop, the naive per-user loop, a nightly loop.

Run as its own process (``python -m bench._plain``) so that its memory and
CPU are its own, it prints one JSON object with what it measured. The loops
use one :class:`requests.Session` and one client-side :class:`SlidingWindow`,
a correct limiter written here independently of the package's: no window of
``period`` seconds, wherever it starts, holds more than ``limit`` requests.
``threads`` > 1 shares that session and limiter between threads of the one
process, to give the loop the same parallelism as the package's workers.

The nightly loop (:func:`run_nightly`) is what a partner would write instead
of the package's nightly run: it reads the same orders file, mints a batch of
users' tokens, places their orders from ``threads`` threads, and mints the
next batch once the orders of the last one are under way, so that no token
waits long. Minting and orders share the one limiter, as they share sFOX's
budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

#: Seconds to wait after a 429, as sFOX documents (a correct limiter should never see one).
PENALTY = 60.0
#: Attempts per request before the loop gives up on it.
ATTEMPTS = 3
#: Timeouts per request: connect, read.
TIMEOUTS = (3.05, 30.0)

TOKENS_PATH = "/v1/enterprise/user-tokens"


class SlidingWindow:
    """At most ``limit`` acquisitions in any ``period`` seconds: a log of send times."""

    def __init__(
        self,
        limit: int,
        period: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if limit < 1 or period <= 0:
            raise ValueError("a sliding window needs limit >= 1 and period > 0")
        self.limit = limit
        self.period = period
        self._clock = clock
        self._sleep = sleep
        self._log: deque[float] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take a slot, sleeping until one is free; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                while self._log and self._log[0] <= now - self.period:
                    self._log.popleft()
                if len(self._log) < self.limit:
                    self._log.append(now)
                    return waited
                wait = self._log[0] + self.period - now + 1e-4
            self._sleep(wait)
            waited += wait


@dataclass
class Measured:
    """What every loop measures, and how it is written out."""

    users: int
    threads: int
    wall_s: float = 0.0
    rate_limited: int = 0
    #: CPU seconds of this process while it ran the loop.
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["errors"] = self.errors[:10]
        return data


@dataclass
class Outcome(Measured):
    """What one minting loop measured."""

    mode: str = ""
    tokens: int = 0
    requests: int = 0


def parse_rate(text: str) -> tuple[int, float]:
    """``"240/10s"`` -> ``(240, 10.0)``."""
    limit, _, period = text.partition("/")
    return int(limit), float(period.rstrip("s") or 1)


def _session(api_key: str, threads: int) -> requests.Session:
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(threads, 1))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {api_key}"
    return session


def _run(
    outcome: Outcome,
    jobs: list[Any],
    send: Callable[[requests.Session, Any], tuple[int, int]],
    session: requests.Session,
    limiter: SlidingWindow,
) -> None:
    """Run ``send`` for each job on ``outcome.threads`` threads; fill in ``outcome``."""
    pending: Iterator[Any] = iter(jobs)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                job = next(pending, None)
            if job is None:
                return
            for _ in range(ATTEMPTS):
                limiter.acquire()
                try:
                    status, minted = send(session, job)
                except requests.RequestException as exc:
                    status, minted = 0, 0
                    with lock:
                        outcome.errors.append(type(exc).__name__)
                with lock:
                    outcome.requests += 1
                    if status == 429:
                        outcome.rate_limited += 1
                    outcome.tokens += minted
                if status == 429:
                    time.sleep(PENALTY)
                    continue
                if status == 201:
                    break
                with lock:
                    outcome.errors.append(f"HTTP {status}")

    started, cpu = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=work) for _ in range(outcome.threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    outcome.wall_s = time.perf_counter() - started
    outcome.cpu_s = time.process_time() - cpu


def run_batched(
    base_url: str,
    api_key: str,
    user_ids: list[str],
    *,
    batch_size: int,
    rate: tuple[int, float],
    threads: int = 1,
) -> Outcome:
    """The plain loop: ``POST /v1/enterprise/user-tokens`` with ``batch_size`` IDs each."""
    url = base_url.rstrip("/") + TOKENS_PATH
    batches = [user_ids[i : i + batch_size] for i in range(0, len(user_ids), batch_size)]

    def send(session: requests.Session, batch: list[str]) -> tuple[int, int]:
        response = session.post(url, json={"data": batch}, timeout=TIMEOUTS)
        if response.status_code != 201:
            return response.status_code, 0
        wanted = set(batch)
        data = response.json()["data"]
        return 201, sum(1 for entry in data if entry["partner_user_id"] in wanted)

    outcome = Outcome(len(user_ids), threads, mode="batch")
    _run(outcome, batches, send, _session(api_key, threads), SlidingWindow(*rate))
    return outcome


def run_naive(
    base_url: str,
    api_key: str,
    user_ids: list[str],
    *,
    rate: tuple[int, float],
    threads: int = 1,
) -> Outcome:
    """The naive loop: ``POST /v1/enterprise/user-tokens/{id}``, one request per user."""
    base = base_url.rstrip("/") + TOKENS_PATH + "/"

    def send(session: requests.Session, user_id: str) -> tuple[int, int]:
        response = session.post(base + quote(user_id, safe=""), timeout=TIMEOUTS)
        if response.status_code != 201:
            return response.status_code, 0
        return 201, int(response.json()["data"]["partner_user_id"] == user_id)

    outcome = Outcome(len(user_ids), threads, mode="single")
    _run(outcome, user_ids, send, _session(api_key, threads), SlidingWindow(*rate))
    return outcome


@dataclass
class NightlyOutcome(Measured):
    """What the nightly loop measured."""

    #: Wall-clock time the loop started, so its last order can be timed from outside.
    started_at: float = 0.0
    mints: int = 0
    remints: int = 0
    orders: int = 0
    placed: int = 0


def read_orders(path: str) -> dict[str, list[dict[str, Any]]]:
    """The orders file as ``user -> [order body, ...]`` in file order, with side and id."""
    by_user: dict[str, list[dict[str, Any]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            user = row["user_id"]
            body: dict[str, Any] = {
                "side": row["side"],
                "currency_pair": row["currency_pair"],
                "algorithm_id": int(row["algorithm_id"]),
            }
            for name in ("quantity", "amount", "price"):
                if row.get(name):
                    body[name] = float(row[name])
            orders = by_user.setdefault(user, [])
            body["client_order_id"] = f"plain-{user}-{row.get('order_ref') or len(orders)}"
            orders.append(body)
    return by_user


def write_orders(path: Path, users: Sequence[str]) -> None:
    """A nightly orders file: one market buy of 25 (quote currency) per user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "side", "currency_pair", "algorithm_id", "quantity",
                         "amount", "price", "order_ref"])  # fmt: skip
        for user in users:
            writer.writerow([user, "buy", "btcusd", 100, "", 25, "", "nightly"])


def nightly_requests(users: int, batch_size: int) -> int:
    """The requests one nightly run needs: a mint per batch and an order per user."""
    return math.ceil(users / batch_size) + users


def nightly_bound_s(requests: int, rate: str, budgets: int = 1) -> float:
    """The issue's bound: the first window's ``limit`` at once, the rest at ``limit / period``.

    For ``requests`` through ``budgets`` budgets of ``rate`` each. No client can
    quite reach it: a steady stream right after a full first window would put
    twice the limit into the window that starts with the burst.
    """
    limit, period = parse_rate(rate)
    return max(0, requests - budgets * limit) / (budgets * limit / period)


def window_minimum_s(requests: int, rate: str, budgets: int = 1) -> float:
    """The least time a sliding window allows: ``limit`` per ``period``, in whole windows.

    Any span of ``k`` periods holds at most ``k * limit`` requests, so the
    last of ``requests`` can leave no sooner than ``(ceil(requests / limit) - 1)``
    periods after the first (latency not counted).
    """
    limit, period = parse_rate(rate)
    return max(0, math.ceil(requests / (budgets * limit)) - 1) * period


class _NightlyLoop:
    """The partner's nightly loop: one minting thread, ``threads`` placing threads."""

    def __init__(
        self, base_url: str, api_key: str, outcome: NightlyOutcome, rate: tuple[int, float]
    ) -> None:
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        self.outcome = outcome
        self.session = _session(api_key, outcome.threads)
        self.limiter = SlidingWindow(*rate)
        self.lock = threading.Lock()

    def post(self, path: str, bearer: str, body: Any) -> requests.Response:
        """One request through the limiter; a 429 (never expected) waits the penalty."""
        headers = {"Authorization": f"Bearer {bearer}"}  # over the session's enterprise key
        while True:
            self.limiter.acquire()
            response = self.session.post(
                self.base + path, json=body, headers=headers, timeout=TIMEOUTS
            )
            if response.status_code != 429:
                return response
            with self.lock:
                self.outcome.rate_limited += 1
            time.sleep(PENALTY)

    def mint(self, users: list[str], batch_size: int, ready: queue.Queue[Any]) -> None:
        """Mint batch after batch, handing each user and token to the placers."""
        for start in range(0, len(users), batch_size):
            batch = users[start : start + batch_size]
            try:
                response = self.post(TOKENS_PATH, self.api_key, {"data": batch})
                tokens = (
                    {e["partner_user_id"]: e["token"] for e in response.json()["data"]}
                    if response.status_code == 201
                    else {}
                )
                problem = f"no token (HTTP {response.status_code})"
            except requests.RequestException as exc:
                tokens, problem = {}, f"no token ({type(exc).__name__})"
            with self.lock:
                self.outcome.mints += 1
            for user in batch:
                if user in tokens:
                    ready.put((user, tokens[user]))
                else:
                    with self.lock:
                        self.outcome.errors.append(problem)

    def place(self, orders: list[dict[str, Any]], user: str, token: str) -> None:
        """The user's orders with the user's token; one fresh token after a 401."""
        reminted = False
        for order in orders:
            body = {k: v for k, v in order.items() if k != "side"}
            try:
                while True:
                    response = self.post(f"/v1/orders/{order['side']}", token, body)
                    with self.lock:
                        self.outcome.orders += 1
                    if response.status_code != 401 or reminted:
                        break
                    reminted = True
                    again = self.post(f"{TOKENS_PATH}/{quote(user, safe='')}", self.api_key, None)
                    with self.lock:
                        self.outcome.remints += 1
                    if again.status_code != 201:
                        break
                    token = again.json()["data"]["token"]
                result = "placed" if response.status_code == 201 else f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                result = type(exc).__name__
            with self.lock:
                if result == "placed":
                    self.outcome.placed += 1
                else:
                    self.outcome.errors.append(f"order: {result}")


def run_nightly(
    base_url: str,
    api_key: str,
    orders_file: str,
    *,
    batch_size: int,
    rate: tuple[int, float],
    threads: int = 1,
) -> NightlyOutcome:
    """Mint in batches and place every user's orders with that user's fresh token."""
    started_at, started, cpu = time.time(), time.perf_counter(), time.process_time()
    by_user = read_orders(orders_file)
    outcome = NightlyOutcome(len(by_user), threads, started_at=started_at)
    loop = _NightlyLoop(base_url, api_key, outcome, rate)
    # One batch of users waits here at most: the next is minted as this one is taken.
    ready: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=batch_size)

    def placer() -> None:
        while (job := ready.get()) is not None:
            loop.place(by_user[job[0]], *job)

    placers = [threading.Thread(target=placer) for _ in range(threads)]
    for thread in placers:
        thread.start()
    try:
        loop.mint(list(by_user), batch_size, ready)
    finally:
        for _ in placers:
            ready.put(None)
        for thread in placers:
            thread.join()
    outcome.wall_s = time.perf_counter() - started
    outcome.cpu_s = time.process_time() - cpu
    return outcome


def user_ids(prefix: str, count: int) -> list[str]:
    """The benchmark's synthetic user IDs: ``{prefix}-0000000`` ..."""
    return [f"{prefix}-{index:07d}" for index in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._plain", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=("batch", "single", "nightly"), required=True)
    parser.add_argument("--orders", help="the orders file (--mode nightly)")
    parser.add_argument("--users", type=int, default=0, help="users (--mode batch, single)")
    parser.add_argument("--prefix", default="plain")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rate", default="240/10s", help="N/Ss, client side")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    api_key = os.environ["BENCH_SFOX_KEY"]
    rate = parse_rate(args.rate)
    if args.mode == "nightly":
        nightly = run_nightly(
            args.url, api_key, args.orders, batch_size=args.batch_size, rate=rate,
            threads=args.threads,
        )  # fmt: skip
        json.dump(nightly.as_json(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    ids = user_ids(args.prefix, args.users)
    if args.mode == "batch":
        outcome = run_batched(
            args.url, api_key, ids, batch_size=args.batch_size, rate=rate, threads=args.threads
        )
    else:
        outcome = run_naive(args.url, api_key, ids, rate=rate, threads=args.threads)
    json.dump(outcome.as_json(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
