"""On-demand mints beside the nightly run: the lanes, side by side (a section of ``bench.run``).

A partner's app keeps minting on demand while the nightly run spends all of
sFOX's budget. At sFOX's rule, in one benchmark run, on fresh workers each time:

- **on-demand latency**: single-user ``sfox.mint_user_tokens`` sent by name to
  ``SFOX_QUEUE`` as a partner's app sends it, one every ``--lanes-every``
  seconds, timed from the send until its result is ready: with no night
  (``--lanes-idle`` of them), and during a night of each ``--lanes-sizes``;
  against its bound, one request's latency plus one slot of the window
  (``latency + period / limit``);
- **the night's duration**, ``sfox.run_nightly_orders`` as :mod:`bench._nightly`
  runs it, at the smallest size: alone, beside the stream, and with a burst of
  ``--lanes-burst`` mints at once half-way through; against the nightly bound,
  with the on-demand requests' own share of the budget (their count times
  period / limit);
- where the night alone spends its fixed time: from the send to the first
  request at the stand-in, and from the last order at the stand-in to the
  summary (stored by the worker, and seen by the sender).

The on-demand mints are sent and timed from the thread that waits for the night
(:func:`bench._nightly.wait_for`'s ``tick``): one ``MGET`` of the pending result
keys every few milliseconds, so a result is seen within that of being stored.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench._infra import BenchError, Workers, measured
from bench._nightly import FIRST_RUN_DATE, NIGHTLY_TASK, count_at_the_stand_in, wait_for
from bench._plain import nightly_bound_s, nightly_requests, parse_rate, write_orders
from bench._row import Row

if TYPE_CHECKING:
    from bench.run import Bench

__all__ = [
    "MINT_TASK",
    "OnDemand",
    "Sample",
    "on_demand_bound_s",
    "percentiles",
    "section_lanes",
    "slot_s",
]

#: The on-demand task, sent by name like any partner app would.
MINT_TASK = "sfox.mint_user_tokens"
#: Seconds the on-demand mints still pending when a night ends may take to finish.
DRAIN_S = 120.0
#: Seconds between two looks at the pending on-demand results when no night is waited for.
IDLE_POLL_S = 0.005
#: Run dates of the lanes section's nights: far from the nightly section's.
LANES_FIRST_DATE = FIRST_RUN_DATE + timedelta(days=1000)


def slot_s(rate: str) -> float:
    """One slot of the window: ``period / limit`` seconds."""
    limit, period = parse_rate(rate)
    return period / limit


def on_demand_bound_s(latency: float, rate: str) -> float:
    """The least an on-demand mint can take at a full window: one request's latency + one slot."""
    return latency + slot_s(rate)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p95 and max (nearest rank), ``None`` each for no values."""
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": rank(0.5), "p95": rank(0.95), "max": ordered[-1]}


@dataclass
class Sample:
    """One on-demand mint: when it was sent, how long until its result, whether it minted."""

    #: Seconds since the run started (the night's send) when this mint was sent.
    sent_s: float
    task_id: str
    burst: bool = False
    #: Send to result ready; ``None`` while pending (or never ready).
    latency_s: float | None = None
    ok: bool = False
    error: str = ""

    def as_json(self) -> list[Any]:
        return [round(self.sent_s, 4), self.latency_s, self.ok, self.burst]


@dataclass
class OnDemand:
    """Single-user mints sent by name to ``SFOX_QUEUE`` on a schedule, timed until ready.

    One every ``every_s`` from ``first_s`` on, at most ``count`` of them (``None``:
    until :meth:`stop`); and ``burst`` more at once at ``burst_at_s``. Driven by
    :meth:`tick` from the thread that waits: nothing here runs in a thread of its own.
    """

    app: Any
    queue: str
    every_s: float
    first_s: float = 0.0
    count: int | None = None
    burst: int = 0
    burst_at_s: float = 0.0
    prefix: str = field(default_factory=lambda: f"live-{uuid.uuid4().hex[:8]}")
    samples: list[Sample] = field(default_factory=list)
    _t0: float = 0.0
    _next_s: float = 0.0
    _burst_sent: bool = False
    _sending: bool = False
    _pending: dict[bytes, tuple[Sample, float]] = field(default_factory=dict)

    def start(self, t0: float) -> None:
        """Start the schedule, ``t0`` being the run's start on :func:`time.perf_counter`."""
        self._t0, self._next_s, self._sending = t0, self.first_s, True

    def stop(self) -> None:
        """Send no more (the night ended); the pending ones are still timed."""
        self._sending = False

    @property
    def singles(self) -> int:
        return sum(1 for s in self.samples if not s.burst)

    @property
    def done_sending(self) -> bool:
        return not self._sending or (
            self.count is not None and self.singles >= self.count and not self.burst
        )

    def _send(self, burst: bool) -> None:
        user = f"{self.prefix}-{len(self.samples):05d}"
        sent = time.perf_counter()
        result = self.app.send_task(MINT_TASK, args=[[user]], queue=self.queue)
        sample = Sample(sent - self._t0, result.id, burst=burst)
        self.samples.append(sample)
        self._pending[self.app.backend.get_key_for_task(result.id)] = (sample, sent)

    def tick(self) -> None:
        """Send what is due, then look once at every pending result."""
        now = time.perf_counter() - self._t0
        if self._sending:
            if self.burst and not self._burst_sent and now >= self.burst_at_s:
                self._burst_sent = True
                for _ in range(self.burst):
                    self._send(burst=True)
            if (self.count is None or self.singles < self.count) and now >= self._next_s:
                self._send(burst=False)
                self._next_s += self.every_s
        self.poll()

    def poll(self) -> None:
        if not self._pending:
            return
        from celery import states

        backend = self.app.backend
        keys = list(self._pending)
        values = backend.client.mget(keys)
        seen = time.perf_counter()
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue
            meta = backend.decode_result(value)
            if meta["status"] not in states.READY_STATES:
                continue
            sample, sent = self._pending.pop(key)
            sample.latency_s = seen - sent
            outcome = meta["result"]
            tokens = outcome.get("tokens") if isinstance(outcome, dict) else None
            sample.ok = meta["status"] == states.SUCCESS and isinstance(tokens, list)
            sample.ok = sample.ok and len(tokens or ()) == 1
            if not sample.ok:
                sample.error = f"{meta['status']}: {str(meta['result'])[:200]}"

    def drain(self, timeout: float) -> None:
        """Wait for the pending results, ``timeout`` seconds at most."""
        deadline = time.perf_counter() + timeout
        while self._pending and time.perf_counter() < deadline:
            self.poll()
            time.sleep(IDLE_POLL_S)
        for sample, _ in self._pending.values():
            sample.error = f"no result within {timeout:g} s of the run's end"

    def summary(self, *, burst: bool) -> dict[str, Any]:
        """Count, failures and percentiles of the singles (or of the burst)."""
        chosen = [s for s in self.samples if s.burst == burst]
        latencies = [s.latency_s for s in chosen if s.ok and s.latency_s is not None]
        return {
            "count": len(chosen),
            "failed": sum(1 for s in chosen if not s.ok),
            **percentiles(latencies),
        }

    def notes(self) -> list[str]:
        errors = sorted({s.error for s in self.samples if s.error})
        return [f"on-demand mint failed: {error}" for error in errors]


def _stream(app: Any, c: Any, **schedule: Any) -> OnDemand:
    from tasks._settings import DEFAULT_QUEUE

    # The partner's own sending: by name, to SFOX_QUEUE (the benchmark sets no SFOX_QUEUE).
    return OnDemand(app, DEFAULT_QUEUE, c.lanes_every, **schedule)


def _workers(bench: Bench) -> Workers:
    c = bench.config
    return Workers(
        bench.worker_env(c.rate),
        bench.log_dir,
        count=c.workers,
        concurrency=c.concurrency,
        redis_client=bench.redis.client,
    )


def run_idle(bench: Bench) -> dict[str, Any]:
    """``--lanes-idle`` on-demand mints, ``--lanes-every`` apart, with nothing else running."""
    from tasks import app

    c = bench.config
    row = Row("lanes", "on demand, no night", 0, concurrency=c.workers * c.concurrency)
    row.latency = c.latency
    demand = _stream(app, c, count=c.lanes_idle)
    bench.reset()
    with measured(row, _workers(bench), bench.fake):
        demand.start(time.perf_counter())
        while not demand.done_sending:
            demand.tick()
            time.sleep(IDLE_POLL_S)
        demand.drain(DRAIN_S)
    stats = bench.fake.stats()
    row.requests = int(stats["requests"]["total"])
    row.rate_limited = int(stats["rate_limited"])
    row.notes.extend(demand.notes())
    return _entry("idle", row, demand)


def run_night(
    bench: Bench, users: int, orders: Path, index: int, demand: OnDemand | None, name: str
) -> dict[str, Any]:
    """``sfox.run_nightly_orders`` on fresh workers, with ``demand`` sent beside it."""
    from tasks import app

    c = bench.config
    row = Row("lanes", f"night, {name}", users, concurrency=c.workers * c.concurrency)
    row.latency = c.latency
    row.bound_s = nightly_bound_s(nightly_requests(users, c.batch_size), c.rate)
    run_date = LANES_FIRST_DATE + timedelta(days=index)
    bench.reset()
    with measured(row, _workers(bench), bench.fake):
        started_at = time.time()
        t0 = time.perf_counter()
        result = app.send_task(
            NIGHTLY_TASK, kwargs={"run_date": run_date.isoformat(), "orders_file": str(orders)}
        )
        if demand is not None:
            demand.start(t0)
        summary = wait_for(
            bench, result, 3 * row.bound_s + 180, demand.tick if demand is not None else None
        )
        night_s = time.perf_counter() - t0
        seen_at = time.time()
        if demand is not None:
            demand.stop()
            demand.drain(DRAIN_S)
    # The block also waited for the last on-demand mints: the night is its own span.
    row.wall_s = night_s
    stats = bench.fake.stats()
    count_at_the_stand_in(row, stats, started_at)
    row.placed = int(summary.get("placed", 0))
    row.tokens = row.placed + int(summary.get("already_placed", 0))
    if summary.get("status") != "done":
        row.notes.append(f"the run ended {summary.get('status')!r}: {summary.get('reason', '')}")
    if row.placed != users:
        row.notes.append(f"{users - row.placed} order(s) not placed")
    if demand is not None:
        row.notes.extend(demand.notes())
        # Each on-demand mint is one POST /v1/enterprise/user-tokens, as a night's batch is.
        row.mints -= len(demand.samples)
    entry = _entry(name, row, demand)
    entry["times"] = _times(stats["times"], started_at, result.date_done, seen_at)
    entry["times"]["coordinator_started_s"] = _since(
        _coordinator_started(app, run_date), started_at
    )
    return entry


def _coordinator_started(app: Any, day: date) -> float | None:
    """When the run's coordinator began (its books' ``started``, our clock)."""
    from tasks.nightly.tasks import run_state

    started = run_state(day, app).books.started
    return float(started) if started is not None else None


def _since(at: float | None, started_at: float) -> float | None:
    return round(at - started_at, 4) if at is not None else None


def _times(
    times: dict[str, float | None], started_at: float, done: Any, seen_at: float
) -> dict[str, float | None]:
    """Where the night's fixed time goes, in seconds since its send (stand-in clock = ours)."""

    def since(at: float | None) -> float | None:
        return _since(at, started_at)

    stored: float | None = None
    if isinstance(done, datetime):
        stored = (done if done.tzinfo else done.replace(tzinfo=timezone.utc)).timestamp()
    return {
        "first_request_s": since(times.get("first_request_at")),
        "last_order_s": since(times.get("last_order_at")),
        "last_request_s": since(times.get("last_request_at")),
        "summary_stored_s": since(stored),
        "summary_seen_s": since(seen_at),
    }


def _entry(name: str, row: Row, demand: OnDemand | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "users": row.users, "night": row.as_json()}
    if demand is not None:
        entry.update(
            every_s=demand.every_s,
            stream=demand.summary(burst=False),
            burst=demand.summary(burst=True) if demand.burst else None,
            # Sent while the night ran (none is sent after it): their requests shared its budget.
            on_demand_requests=len(demand.samples),
            samples=[s.as_json() for s in demand.samples],
        )
    return entry


def section_lanes(bench: Bench) -> None:
    from tasks import app

    c = bench.config
    if not c.lanes_sizes:
        raise BenchError("--lanes-sizes is empty")
    bench.begin_section(
        f"on-demand mints beside the nightly run (one every {c.lanes_every:g} s; nights of "
        f"{', '.join(f'{n:,}' for n in c.lanes_sizes)} users; a burst of {c.lanes_burst})"
    )
    runs: list[dict[str, Any]] = []
    runs.append(run_idle(bench))
    _say(bench, runs[-1])
    smallest = min(c.lanes_sizes)
    index = 0
    for users in sorted(set(c.lanes_sizes)):
        orders = bench.out_dir / f"lanes-orders-{users}.csv"
        write_orders(orders, [f"lanes-{uuid.uuid4().hex[:8]}-{i:07d}" for i in range(users)])
        try:
            if users == smallest:
                runs.append(run_night(bench, users, orders, index, None, "alone"))
                _say(bench, runs[-1])
                index += 1
            runs.append(
                run_night(
                    bench, users, orders, index, _stream(app, c, first_s=c.lanes_every), "stream"
                )
            )
            _say(bench, runs[-1])
            index += 1
            if users == smallest and c.lanes_burst:
                alone = runs[-2]["night"]["wall_s"]
                burst = _stream(app, c, count=0, burst=c.lanes_burst, burst_at_s=alone / 2)
                runs.append(run_night(bench, users, orders, index, burst, "burst"))
                _say(bench, runs[-1])
                index += 1
        finally:
            orders.unlink(missing_ok=True)
    bench.lanes = {
        "every_s": c.lanes_every,
        "burst": c.lanes_burst,
        "slot_s": slot_s(c.rate),
        "latency_bound_s": on_demand_bound_s(c.latency, c.rate),
        "runs": runs,
    }
    if c.smoke:
        _check(runs)


def _say(bench: Bench, entry: dict[str, Any]) -> None:
    night = entry["night"]
    text = f"  lanes: {entry['name']:6} N={entry['users']:>6,}:"
    if entry["users"]:
        text += f" night {night['wall_s']:.1f} s (bound {night['bound_s']:.1f} s)"
    for key in ("stream", "burst"):
        part = entry.get(key)
        if part and part["count"]:
            text += (
                f"; {key} {part['count']} mint(s), p50 {_ms(part['p50'])} p95 "
                f"{_ms(part['p95'])} max {_ms(part['max'])}, {part['failed']} failed"
            )
    if "times" in entry:
        t = entry["times"]
        text += (
            f"; coordinator began at {t['coordinator_started_s']} s, "
            f"first request at {t['first_request_s']} s, last order at {t['last_order_s']} s, "
            f"summary stored at {t['summary_stored_s']} s, seen at {t['summary_seen_s']} s"
        )
    bench.log(text)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _check(runs: list[dict[str, Any]]) -> None:
    """The smoke run's checks: every night placed every order, every on-demand mint minted."""
    for entry in runs:
        if entry["night"]["notes"]:
            raise BenchError(f"lanes, {entry['name']}: {'; '.join(entry['night']['notes'])}")
        for key in ("stream", "burst"):
            part = entry.get(key)
            if part and part["failed"]:
                raise BenchError(f"lanes, {entry['name']}: {part['failed']} on-demand mint(s)")
