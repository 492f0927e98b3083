"""The benchmark's options: the command line, read into one :class:`Config`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bench._infra import DEFAULT_REDIS_URL, ROOT, UNLIMITED_RATE

#: Config fields given as comma-separated whole numbers.
_INT_LISTS = ("sizes", "grid_concurrency", "nightly_sizes", "egress_counts", "lanes_sizes")


@dataclass
class Config:
    sizes: list[int]
    workers: int
    concurrency: int
    latency: float
    rate: str
    sfox_limit: int | None
    sfox_window: float
    sfox_penalty: float
    batch_size: int
    max_user_ids: int
    naive_max: int
    grid_concurrency: list[int]
    grid_latency: list[float]
    grid_users: int
    grid_chunk: int
    grid_wut_users: int
    profile_users: int
    profile_wut_users: int
    nightly_sizes: list[int]
    egress_counts: list[int]
    egress_requests: int
    egress_batch: int
    egress_chunk: int
    egress_concurrency: int
    lanes_sizes: list[int]
    lanes_every: float
    lanes_idle: int
    lanes_burst: int
    sections: list[str]
    redis_url: str
    out: Path
    smoke: bool

    @property
    def threads(self) -> int:
        return self.workers * self.concurrency


def _ints(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Throughput, overhead and memory of sfox-tokens against real parts.",
    )
    add = parser.add_argument
    add("--sizes", default="1000,10000,100000", help="user counts N (comma-separated)")
    add("--workers", type=int, default=1, help="Celery worker processes")
    add("--concurrency", type=int, default=4, help="pool processes per worker")
    add("--latency", type=float, default=0.05, help="stand-in latency per request, seconds")
    add("--rate", default="240/10s", help="SFOX_RATE_LIMIT, and the plain loops' limiter")
    add("--sfox-limit", type=int, default=250, help="stand-in's per-IP limit (0: off)")
    add("--sfox-window", type=float, default=10.0)
    add("--sfox-penalty", type=float, default=60.0)
    add("--batch-size", type=int, default=100, help="SFOX_TOKEN_BATCH_SIZE")
    add("--max-user-ids", type=int, default=10_000, help="SFOX_MAX_USER_IDS")
    add("--naive-max", type=int, default=10_000, help="largest N measured naively")
    add("--grid-concurrency", default="1,2,4,8")
    add("--grid-latency", default="0,0.05")
    add("--grid-users", type=int, default=20_000)
    add("--grid-chunk", type=int, default=1_000, help="users per mint task in the grid")
    add(
        "--grid-wut-users",
        type=int,
        default=2_000,
        help="users per with_user_tokens run in the grid (one task per user: slower)",
    )
    add("--profile-users", type=int, default=50_000)
    add("--profile-wut-users", type=int, default=5_000)
    add("--nightly-sizes", default="1000,10000", help="users (one order each) per nightly run")
    add("--egress-counts", default="1,2,4", help="egress addresses, one worker and scope each")
    add(
        "--egress-requests",
        type=int,
        default=720,
        help="requests per egress address (3 windows of 240: the first window's burst is a third)",
    )
    add("--egress-batch", type=int, default=10, help="SFOX_TOKEN_BATCH_SIZE in the egress runs")
    add("--egress-chunk", type=int, default=100, help="users per mint task in the egress runs")
    add("--egress-concurrency", type=int, default=2, help="pool processes per egress worker")
    add(
        "--lanes-sizes",
        default="2400,10000",
        help="users per night beside on-demand mints (the smallest also alone and with a burst)",
    )
    add("--lanes-every", type=float, default=3.0, help="seconds between on-demand mints")
    add("--lanes-idle", type=int, default=10, help="on-demand mints timed with no night")
    add(
        "--lanes-burst",
        type=int,
        default=50,
        help="on-demand mints sent at once mid-night (0: none)",
    )
    add(
        "--sections",
        default="rate,grid,profile,nightly,egress,lanes",
        help="any of rate, grid, profile, nightly, egress, lanes",
    )
    add(
        "--redis-url",
        default=os.environ.get("SFOX_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="the benchmark's own Redis database, emptied at start "
        "(default $SFOX_BENCH_REDIS_URL, else db 13)",
    )
    add("--out", type=Path, default=None, help="where RESULTS.md and chart.png go (bench/)")
    add("--smoke", action="store_true", help="tiny N, no rate-limit waits, < 60 s")
    args = parser.parse_args(argv)
    # Each Config field comes from the option of the same name; these few are parsed.
    parsed: dict[str, Any] = {
        **{name: _ints(getattr(args, name)) for name in _INT_LISTS},
        "grid_latency": _floats(args.grid_latency),
        "sfox_limit": args.sfox_limit or None,
        "sections": [s.strip() for s in args.sections.split(",") if s.strip()],
        "out": args.out or (ROOT / "bench" / ("out/smoke" if args.smoke else "")),
    }
    given: dict[str, Any] = {
        f.name: parsed.get(f.name, getattr(args, f.name, None)) for f in fields(Config)
    }
    config = Config(**given)
    if config.smoke:
        config.sizes = [200, 500]
        config.concurrency = min(config.concurrency, 2)
        config.latency = 0.002
        config.rate = UNLIMITED_RATE
        config.sfox_limit = None
        config.naive_max = 200
        config.grid_concurrency = [2]
        config.grid_latency = [0.0]
        config.grid_users = 1_000
        config.grid_chunk = 250
        config.grid_wut_users = 200
        config.profile_users = 1_000
        config.profile_wut_users = 200
        config.nightly_sizes = [200]
        config.egress_counts = [1, 2]
        config.egress_requests = 20
        # Tasks of one request each: with no limit a task ends in milliseconds, and with
        # only a few tasks one worker could take them all before its twin wakes.
        config.egress_chunk = config.egress_batch
        # A night of 200 lasts seconds without limits: mints every 0.25 s land inside it.
        config.lanes_sizes = [200]
        config.lanes_every = 0.25
        config.lanes_idle = 3
        config.lanes_burst = 5
    return config
