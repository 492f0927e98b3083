"""The baselines without Celery: a plain batched loop and the naive per-user loop.

Run as its own process (``python -m bench._plain``) so that its memory and
CPU are its own, it prints one JSON object with what it measured. Both loops
use one :class:`requests.Session` and one client-side :class:`SlidingWindow`,
a correct limiter written here independently of the package's: no window of
``period`` seconds, wherever it starts, holds more than ``limit`` requests.
``threads`` > 1 shares that session and limiter between threads of the one
process, to give the loop the same parallelism as the package's workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
class Outcome:
    """What one loop measured."""

    mode: str
    users: int
    threads: int
    wall_s: float = 0.0
    tokens: int = 0
    requests: int = 0
    rate_limited: int = 0
    #: CPU seconds of this process while it ran the loop.
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "users": self.users,
            "threads": self.threads,
            "wall_s": self.wall_s,
            "tokens": self.tokens,
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "cpu_s": self.cpu_s,
            "errors": self.errors[:10],
        }


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

    outcome = Outcome("batch", len(user_ids), threads)
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

    outcome = Outcome("single", len(user_ids), threads)
    _run(outcome, user_ids, send, _session(api_key, threads), SlidingWindow(*rate))
    return outcome


def user_ids(prefix: str, count: int) -> list[str]:
    """The benchmark's synthetic user IDs: ``{prefix}-0000000`` ..."""
    return [f"{prefix}-{index:07d}" for index in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._plain", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=("batch", "single"), required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--prefix", default="plain")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rate", default="240/10s", help="N/Ss, client side")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    api_key = os.environ["BENCH_SFOX_KEY"]
    ids = user_ids(args.prefix, args.users)
    rate = parse_rate(args.rate)
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
