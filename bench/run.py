"""The benchmark: ``python -m bench.run [--concurrency 4] [--sizes 1000,10000,100000]``.

Starts real parts (Redis, the sFOX stand-in as its own process with a set
latency and sFOX's 250 / 10 s per-IP rule, real Celery workers) and measures,
for each N side by side:

1. the package: ``with_user_tokens`` into a no-op downstream (skipped with a
   message while ``tasks.with_user_tokens`` does not exist), and the mint task
   alone (several tasks sent together above ``SFOX_MAX_USER_IDS``);
2. a plain loop without Celery (``bench._plain``), with the workers' total
   concurrency in threads and with one thread;
3. the naive loop, one single-user request per user (projected above
   ``--naive-max``);
4. the bound, N / batch size / allowed rate.

Then the pipeline's own ceiling with every rate limit off (tokens/s against
worker concurrency and stand-in latency), and the CPU cost per 100-user batch
against a stand-in with no latency. Then the nightly run, the job partners
run, at sFOX's rule: ``sfox.run_nightly_orders`` against a plain nightly loop
and the bound; and budgets per egress address: mint tasks from 1, 2 and 4
loopback source addresses, each with a limiter scope of its own
(``bench._nightly``). Last, the lanes: on-demand mint latency idle and during
nights, and the night's time beside on-demand mints (``bench._lanes``). Writes
``RESULTS.md``, ``chart.png``, ``lanes.png`` and ``out/results.json`` under
``--out``. ``--smoke`` does all of it at tiny N, with no rate-limit waits, in a
minute or two.
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import psutil

from bench import _cpu, _lanes, _nightly, _report
from bench._config import Config, parse_args
from bench._infra import (
    ROOT,
    UNLIMITED_RATE,
    BenchError,
    BenchRedis,
    FakeProcess,
    Sampler,
    Workers,
    mb,
    measured,
)
from bench._plain import parse_rate
from bench._row import Row

#: Seconds without a single user arriving downstream before a with_user_tokens run is given up.
STALL_S = 120.0

APPROACH_WUT = "package: with_user_tokens"
APPROACH_MINT = "package: mint tasks"
APPROACH_CELERY = "Celery alone: a no-op task per user, no minting"
APPROACH_PLAIN_N = "plain loop, {threads} threads"
APPROACH_PLAIN_1 = "plain loop, 1 thread"


def plain_approach(threads: int) -> str:
    """The plain loop's name with its thread count."""
    return APPROACH_PLAIN_1 if threads == 1 else APPROACH_PLAIN_N.format(threads=threads)


APPROACH_NAIVE = "naive, 1 request per user"
APPROACH_BOUND = "bound"


class Bench:
    """One benchmark invocation: the parts it started and the rows it measured."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.api_key = "bench-ek-" + secrets.token_hex(16)
        self.out_dir = config.out / "out" if not config.smoke else config.out
        self.log_dir = self.out_dir / "logs"
        self.redis = BenchRedis(config.redis_url)
        self.fake = FakeProcess(self.api_key, self.log_dir)
        self.rows: list[Row] = []
        self.profile: dict[str, Any] = {}
        #: Load average (1, 5, 15 min) when each section started: the machine may be shared.
        self.load: dict[str, list[float]] = {}
        #: The lanes section's runs and on-demand samples (``bench._lanes``), if it ran.
        self.lanes: dict[str, Any] = {}

    # -- set-up ----------------------------------------------------------------------

    def worker_env(self, rate: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SFOX_", "CELERY_")) and k != "ENTERPRISE_API_KEY"
        }
        env.update(
            CELERY_BROKER_URL=self.config.redis_url,
            CELERY_RESULT_BACKEND=self.config.redis_url,
            SFOX_API_URL=self.fake.url,
            SFOX_ENTERPRISE_API_KEY=self.api_key,
            SFOX_RATE_LIMIT=rate,
            SFOX_TOKEN_BATCH_SIZE=str(self.config.batch_size),
            SFOX_MAX_USER_IDS=str(self.config.max_user_ids),
        )
        return env

    def start(self) -> None:
        self.redis.check()
        self.redis.lock()
        self.redis.wipe()
        c = self.config
        self.fake.start(
            latency=c.latency,
            rate_limit=c.sfox_limit,
            rate_window=c.sfox_window,
            rate_penalty=c.sfox_penalty,
        )
        # This process sends tasks and reads results: it must see the workers' settings.
        env = self.worker_env(c.rate)
        os.environ.clear()
        os.environ.update(env)

    def stop(self) -> None:
        self.fake.stop()
        self.redis.unlock()

    def reset(self) -> None:
        """Empty limiter window, no pause, no leftover messages, a stand-in with no history.

        Between runs no worker is running, so the whole database can go: a run that timed
        out must not leave messages for the next run's workers.
        """
        self.redis.wipe()
        self.fake.reset()

    def log(self, message: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        print(f"[{stamp}] {message}", flush=True)

    def record(self, row: Row) -> Row:
        self.rows.append(row)
        if row.skipped:
            self.log(f"  {row.approach:30} N={row.users:>7,}: skipped: {row.skipped}")
        elif row.projected:
            self.log(f"  {row.approach:30} N={row.users:>7,}: {row.wall_s:8.1f} s (projected)")
        else:
            self.log(
                f"  {row.approach:30} N={row.users:>7,}: {row.wall_s:8.2f} s "
                f"{row.tokens_per_s:9.0f} tokens/s  {row.requests} requests, "
                f"{row.rate_limited} x 429, RSS {row.rss_largest_mb:.1f} MB"
            )
        return row

    # -- the package -----------------------------------------------------------------

    def _timeout(self, users: int, rate: str) -> float:
        limit, period = parse_rate(rate)
        bound = math.ceil(users / self.config.batch_size) * period / limit
        return 3 * bound + 120

    def run_package(
        self,
        section: str,
        approach: str,
        users: int,
        *,
        rate: str,
        concurrency: int,
        chunk: int,
    ) -> Row:
        row = Row(section, approach, users, concurrency=concurrency * self.config.workers)
        row.latency = float(self.fake.configure()["latency"])
        self.reset()
        tag = uuid.uuid4().hex[:8]
        ids = [f"pkg-{tag}-{index:07d}" for index in range(users)]
        workers = Workers(
            self.worker_env(rate),
            self.log_dir,
            count=self.config.workers,
            concurrency=concurrency,
            redis_client=self.redis.client,
        )
        with measured(row, workers, self.fake):
            if approach == APPROACH_MINT:
                row.tokens = self._mint_tasks(ids, chunk, self._timeout(users, rate))
            elif approach == APPROACH_CELERY:
                row.tokens = self._celery_alone(users, tag, self._timeout(users, rate))
            else:
                row.tokens = self._with_user_tokens(ids, tag, self._timeout(users, rate))
        lost = sum(log.count("Connection to broker lost") for log in workers.logs())
        if lost:
            row.notes.append(
                f"the workers lost their broker connection {lost} time(s) during the run"
            )
        self._fake_counts(row)
        if row.tokens != users:
            row.notes.append(f"{users - row.tokens} user(s) got no token")
        return self.record(row)

    def _mint_tasks(self, ids: list[str], chunk: int, timeout: float) -> int:
        from tasks import mint_user_tokens

        size = min(chunk, self.config.max_user_ids)
        results = [
            mint_user_tokens.apply_async((ids[i : i + size],)) for i in range(0, len(ids), size)
        ]
        deadline = time.monotonic() + timeout
        tokens = 0
        for result in results:
            outcome = result.get(timeout=max(1.0, deadline - time.monotonic()))
            tokens += len(outcome["tokens"])
            result.forget()
        return tokens

    def _with_user_tokens(self, ids: list[str], tag: str, timeout: float) -> int:
        from bench.tasks import noop
        from tasks import with_user_tokens

        counter = f"bench:noop:{tag}"
        with_user_tokens(ids, noop.s(counter=counter)).apply_async()
        return self._arrivals(counter, len(ids), timeout)

    def _celery_alone(self, users: int, tag: str, timeout: float) -> int:
        from bench.tasks import fanout

        counter = f"bench:noop:{tag}"
        size = self.config.batch_size
        for first in range(0, users, size):
            fanout.delay(first, min(size, users - first), counter)
        return self._arrivals(counter, users, timeout)

    def _arrivals(self, counter: str, users: int, timeout: float) -> int:
        # One Celery task per user runs far below the rate limit's pace: wait while users
        # keep arriving, and give up only when none has for STALL_S.
        arrived, last, changed = 0, -1, time.monotonic()
        while arrived < users and time.monotonic() - changed < max(STALL_S, timeout / 10):
            arrived = int(self.redis.client.get(counter) or 0)
            if arrived != last:
                last, changed = arrived, time.monotonic()
            time.sleep(0.02)
        return arrived

    def _fake_counts(self, row: Row) -> None:
        stats = self.fake.stats()
        row.requests = int(stats["requests"]["/v1/enterprise/user-tokens"])
        row.rate_limited = int(stats["rate_limited"])
        row.max_in_window = int(stats["max_token_requests_in_window"])

    # -- the loops without Celery ----------------------------------------------------

    def run_plain(
        self, section: str, approach: str, mode: str, users: int, *, threads: int, rate: str
    ) -> Row:
        row = Row(section, approach, users, concurrency=threads)
        row.latency = float(self.fake.configure()["latency"])
        self.reset()
        args = [
            sys.executable, "-m", "bench._plain", "--url", self.fake.url, "--mode", mode,
            "--users", str(users), "--prefix", f"{mode}-{uuid.uuid4().hex[:8]}",
            "--batch-size", str(self.config.batch_size), "--rate", rate,
            "--threads", str(threads),
        ]  # fmt: skip
        outcome = self.loop_process(row, args, timeout=self._timeout(users, rate) * 100)
        row.tokens = int(outcome["tokens"])
        self._fake_counts(row)
        return self.record(row)

    def loop_process(self, row: Row, args: list[str], *, timeout: float) -> dict[str, Any]:
        """Run one ``bench._plain`` loop, fill in its wall, CPU and peak RSS; its outcome."""
        env = {**os.environ, "BENCH_SFOX_KEY": self.api_key}
        fake0 = self.fake.cpu_seconds()
        what = f"{row.approach} for N={row.users}"
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        process = psutil.Process(proc.pid)
        with Sampler(lambda: [process]) as sampler:
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{what} did not finish") from None
            finally:
                if proc.poll() is None:  # a timeout, or the benchmark itself was stopped
                    proc.kill()
                    proc.wait(5)
        if proc.returncode != 0:
            raise BenchError(f"{what} failed (exit {proc.returncode})")
        outcome: dict[str, Any] = json.loads(stdout)
        row.wall_s = float(outcome["wall_s"])
        row.worker_cpu_s = float(outcome["cpu_s"])
        row.fake_cpu_s = self.fake.cpu_seconds() - fake0
        row.rss_total_mb = row.rss_largest_mb = mb(sampler.peak.largest)
        row.notes.extend(outcome["errors"])
        return outcome

    # -- the sections ----------------------------------------------------------------

    def begin_section(self, what: str) -> Config:
        """Log what a section measures under which limits; set the stand-in to them."""
        c = self.config
        self.log(
            f"{what}: stand-in latency {c.latency * 1000:g} ms, sFOX rule "
            f"{c.sfox_limit or 'off'}/{c.sfox_window:g}s, package {c.rate}, "
            f"{c.workers} worker(s) x {c.concurrency}"
        )
        self.fake.configure(latency=c.latency, rate_limit=c.sfox_limit)
        return c

    def section_rate(self) -> None:
        c = self.begin_section("at the rate limit")
        plain = plain_approach(c.threads)
        for users in c.sizes:
            self.run_package(
                "rate", APPROACH_WUT, users, rate=c.rate, concurrency=c.concurrency,
                chunk=c.max_user_ids,
            )  # fmt: skip
            self.run_package(
                "rate", APPROACH_CELERY, users, rate=c.rate, concurrency=c.concurrency,
                chunk=c.max_user_ids,
            )  # fmt: skip
            self.run_package(
                "rate", APPROACH_MINT, users, rate=c.rate, concurrency=c.concurrency,
                chunk=c.max_user_ids,
            )  # fmt: skip
            self.run_plain("rate", plain, "batch", users, threads=c.threads, rate=c.rate)
            self.run_plain("rate", APPROACH_PLAIN_1, "batch", users, threads=1, rate=c.rate)
            if users <= c.naive_max:
                self.run_plain(
                    "rate", APPROACH_NAIVE, "single", users, threads=c.threads, rate=c.rate
                )
        self._add_naive_projections()
        self._add_bounds()

    def _add_naive_projections(self) -> None:
        measured = [r for r in self.rows if r.approach == APPROACH_NAIVE and r.section == "rate"]
        if not measured:
            return
        basis = max(measured, key=lambda r: r.users)
        for users in self.config.sizes:
            if users > self.config.naive_max:
                row = Row("rate", APPROACH_NAIVE, users, concurrency=basis.concurrency)
                row.projected = True
                row.tokens = users
                row.requests = users
                row.wall_s = users / basis.tokens_per_s
                row.notes.append(f"projected from the measured N={basis.users:,}")
                self.record(row)

    def _add_bounds(self) -> None:
        limit, period = parse_rate(self.config.rate)
        for users in self.config.sizes:
            row = Row("rate", APPROACH_BOUND, users)
            row.requests = math.ceil(users / self.config.batch_size)
            row.wall_s = row.requests * period / limit
            row.tokens = users
            self.rows.append(row)

    def section_grid(self) -> None:
        c = self.config
        self.log("the pipeline's own ceiling: stand-in and package rate limits off")
        self.fake.configure(rate_limit=None)
        for latency in c.grid_latency:
            self.fake.configure(latency=latency)
            for concurrency in c.grid_concurrency:
                self.run_package(
                    "grid", APPROACH_WUT, c.grid_wut_users, rate=UNLIMITED_RATE,
                    concurrency=concurrency, chunk=c.grid_chunk,
                )  # fmt: skip
                self.run_package(
                    "grid", APPROACH_CELERY, c.grid_wut_users, rate=UNLIMITED_RATE,
                    concurrency=concurrency, chunk=c.grid_chunk,
                )  # fmt: skip
                self.run_package(
                    "grid", APPROACH_MINT, c.grid_users, rate=UNLIMITED_RATE,
                    concurrency=concurrency, chunk=c.grid_chunk,
                )  # fmt: skip
                self.run_plain(
                    "grid", plain_approach(concurrency * c.workers), "batch",
                    c.grid_users, threads=concurrency * c.workers, rate=UNLIMITED_RATE,
                )  # fmt: skip
        self.fake.configure(latency=c.latency, rate_limit=c.sfox_limit)

    # -- all of it -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.time()
        self.start()
        try:
            sections: dict[str, Callable[[], None]] = {
                "rate": self.section_rate,
                "grid": self.section_grid,
                "profile": lambda: _cpu.section_profile(self),
                "nightly": lambda: _nightly.section_nightly(self),
                "egress": lambda: _nightly.section_egress(self),
                "lanes": lambda: _lanes.section_lanes(self),
            }
            for name, section in sections.items():
                if name in self.config.sections:
                    self.load[name] = [round(x, 2) for x in os.getloadavg()]
                    section()
        finally:
            self.stop()
        return self.results(time.time() - started)

    def results(self, elapsed: float) -> dict[str, Any]:
        c = self.config
        return {
            "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "elapsed_s": elapsed,
            "machine": {
                "cpus": os.cpu_count(),
                "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                "python": platform.python_version(),
                "platform": platform.platform(terse=True),
            },
            "config": {
                "sizes": c.sizes,
                "workers": c.workers,
                "concurrency": c.concurrency,
                "latency": c.latency,
                "rate": c.rate,
                "sfox_rule": (
                    f"{c.sfox_limit}/{c.sfox_window:g}s, {c.sfox_penalty:g} s penalty"
                    if c.sfox_limit
                    else "off"
                ),
                "batch_size": c.batch_size,
                "mint_concurrency": _mint_concurrency(),
                "max_user_ids": c.max_user_ids,
                "naive_max": c.naive_max,
                "grid_users": c.grid_users,
                "grid_chunk": c.grid_chunk,
                "grid_wut_users": c.grid_wut_users,
                "profile_users": c.profile_users,
                "profile_wut_users": c.profile_wut_users,
                "nightly_sizes": c.nightly_sizes,
                "token_result_ttl": _token_result_ttl(),
                "egress_counts": c.egress_counts,
                "egress_requests": c.egress_requests,
                "egress_batch": c.egress_batch,
                "egress_chunk": c.egress_chunk,
                "egress_concurrency": c.egress_concurrency,
                "lanes_sizes": c.lanes_sizes,
                "lanes_every": c.lanes_every,
                "lanes_idle": c.lanes_idle,
                "lanes_burst": c.lanes_burst,
                "smoke": c.smoke,
                "command": "python -m bench.run " + " ".join(sys.argv[1:]),
            },
            "load": self.load,
            "rows": [row.as_json() for row in self.rows],
            "profile": self.profile,
            "lanes": self.lanes,
        }


def _token_result_ttl() -> int:
    """SFOX_TOKEN_RESULT_TTL in the workers: the age no token may reach at use."""
    from tasks._settings import DEFAULT_RESULT_TTL

    return int(os.environ.get("SFOX_TOKEN_RESULT_TTL") or DEFAULT_RESULT_TTL)


def _mint_concurrency() -> int:
    """Requests one mint task sends at once in the workers (they inherit this environment)."""
    from tasks._settings import DEFAULT_MINT_CONCURRENCY

    return int(os.environ.get("SFOX_MINT_CONCURRENCY") or DEFAULT_MINT_CONCURRENCY)


def _stop(signum: int, frame: Any) -> None:
    # A background job ignores SIGINT: SIGTERM must unwind too, so that the workers and the
    # stand-in are stopped and the database lock is given back.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    config = parse_args(argv)
    bench = Bench(config)
    try:
        results = bench.run()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    bench.out_dir.mkdir(parents=True, exist_ok=True)
    (bench.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    config.out.mkdir(parents=True, exist_ok=True)
    _report.write(results, config.out)
    bench.log(f"wrote {config.out / 'RESULTS.md'} and {config.out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
