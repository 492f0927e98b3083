"""The benchmark's own logic: its baseline limiter, the profile summary, the report's verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._lanes import on_demand_bound_s, percentiles, slot_s
from bench._plain import (
    SlidingWindow,
    nightly_bound_s,
    nightly_requests,
    parse_rate,
    run_nightly,
    write_orders,
)
from bench._profile import GLUE, summarize_spy
from bench._report_lanes import night_table
from tasks.testing import FakeSfox


class FakeClock:
    """A clock that only moves when the limiter sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_sliding_window_never_lets_more_than_the_limit_into_any_window() -> None:
    """No span of `period` seconds, wherever it starts, holds more than `limit` acquisitions."""
    # Given a 5-per-second window on a clock that moves only by its waits
    clock = FakeClock()
    window = SlidingWindow(5, 1.0, clock=clock, sleep=clock.sleep)

    # When 23 requests go through it one after another
    times = []
    for _ in range(23):
        window.acquire()
        times.append(clock.now)

    # Then the first five go at once, and any six consecutive ones span a full period
    assert times[:5] == [0.0] * 5
    assert all(later - earlier >= 1.0 for earlier, later in zip(times, times[5:], strict=False))
    assert times[-1] == pytest.approx(4.0, abs=0.01)


def test_parse_rate_reads_the_package_format() -> None:
    """`240/10s` is 240 requests per 10 seconds."""
    assert parse_rate("240/10s") == (240, 10.0)


def test_summarize_spy_counts_each_sample_for_its_deepest_package_frame(tmp_path: Path) -> None:
    """Sealing inside mint counts as sealing; frames outside the package count as Celery glue."""
    # Given py-spy raw output: one pool-process stack in Sealer.seal, one in the worker's loop
    main = 'process 1:"celery worker"'
    pool = 'process 2:"celery worker"'
    seal = (
        f"{main};{pool};trace_task (/x/celery/app/trace.py);Minter.mint (/x/tasks/minting.py);"
        "Minter._accept (/x/tasks/minting.py);Sealer.seal (/x/tasks/sealing.py);"
        "AESGCM.encrypt (/x/site-packages/cryptography/aead.py) 30"
    )
    loop = f"{main};Hub.create_loop (/x/site-packages/kombu/asynchronous/hub.py) 10"
    raw = tmp_path / "profile.txt"
    raw.write_text(f"{seal}\n{loop}\n")

    # When it is summarized over 2 batches at 1000 samples per second
    summary = summarize_spy(raw, 2, rate=1000)

    # Then the samples land in their components, per batch, and the hot spot is named
    assert summary["components_ms"] == {"sealing (AES-GCM)": 15.0, GLUE: 5.0}
    assert summary["main_process_ms"] == 5.0
    assert summary["hot_spots"][0]["function"] == "cryptography/aead.py:AESGCM.encrypt"


def test_nightly_bound_is_the_requests_past_the_first_window_at_the_rate() -> None:
    """One mint per batch and one order per user; the first `limit` go at once, the rest at rate."""
    assert nightly_requests(1000, 100) == 1010
    assert nightly_bound_s(1010, "240/10s") == pytest.approx((1010 - 240) / 24)
    # Two budgets (egress addresses) double both the free first window and the rate.
    assert nightly_bound_s(1010, "240/10s", budgets=2) == pytest.approx((1010 - 480) / 48)
    assert nightly_bound_s(100, "240/10s") == 0.0


def test_plain_nightly_loop_places_every_order_once_with_tokens_minted_in_batches(
    tmp_path: Path,
) -> None:
    """The partner's loop mints a batch per 10 users and places each user's order once."""
    # Given an orders file of 50 users and a stand-in with sFOX's per-address rule
    orders = tmp_path / "orders.csv"
    write_orders(orders, [f"u{i:03d}" for i in range(50)])
    with FakeSfox("bench-key", rate_limit=250, rate_window=10.0) as fake:
        # When the plain nightly loop runs with two threads
        outcome = run_nightly(
            fake.url, "bench-key", str(orders), batch_size=10, rate=(240, 10.0), threads=2
        )
        stats = fake.stats()

    # Then every order is placed once, with one batch mint per 10 users and no re-mint
    assert (outcome.placed, outcome.orders, outcome.mints, outcome.remints) == (50, 50, 5, 0)
    assert outcome.errors == [] and outcome.rate_limited == 0
    assert stats["orders_placed"] == 50 and stats["duplicate_order_attempts"] == 0
    assert stats["token_use"]["users_minted_more_than_once"] == 0
    assert {o["client_order_id"] for o in stats["orders"]} == {
        f"plain-u{i:03d}-nightly" for i in range(50)
    }


def test_percentiles_take_the_nearest_rank_and_say_none_for_no_samples() -> None:
    """p50, p95 and max of on-demand latencies are samples themselves (nearest rank)."""
    values = [float(v) for v in range(1, 21)]  # 1.0 .. 20.0, shuffled order must not matter
    assert percentiles(values[::-1]) == {"p50": 10.0, "p95": 19.0, "max": 20.0}
    assert percentiles([0.3]) == {"p50": 0.3, "p95": 0.3, "max": 0.3}
    assert percentiles([]) == {"p50": None, "p95": None, "max": None}


def test_on_demand_bound_is_one_request_latency_plus_one_slot_of_the_window() -> None:
    """At 240/10s a slot is 10/240 s; with 50 ms latency an on-demand mint needs 0.0917 s."""
    assert slot_s("240/10s") == pytest.approx(10 / 240)
    assert on_demand_bound_s(0.05, "240/10s") == pytest.approx(0.05 + 10 / 240)


def test_lanes_night_table_counts_the_on_demand_share_against_the_night_alone() -> None:
    """Beside 30 on-demand mints a night shows their share (30 slots) and its time over alone."""

    # Given a lanes result: a night alone and the same night beside a stream of 30 mints
    def night(wall: float) -> dict[str, object]:
        return {"wall_s": wall, "bound_s": 91.0, "rate_limited": 0, "notes": []}

    results = {
        "config": {"latency": 0.05, "rate": "240/10s", "batch_size": 100},
        "lanes": {
            "slot_s": 10 / 240,
            "latency_bound_s": 0.05 + 10 / 240,
            "runs": [
                {"name": "alone", "users": 2400, "night": night(100.0)},
                {
                    "name": "stream",
                    "users": 2400,
                    "every_s": 3.0,
                    "on_demand_requests": 30,
                    "night": night(102.5),
                },
            ],
        },
    }

    # When the report's table is made
    rows = night_table(results).splitlines()

    # Then the stream's row shows 30 requests, 1.25 s of share, and 2.5 s over the night alone
    stream = next(row for row in rows if "one every 3 s" in row)
    cells = [cell.strip() for cell in stream.strip("|").split("|")]
    assert cells[7:11] == ["30", "1.25", "90%", "+2.5"]
    assert cells[4] == f"{91.0 / 102.5:.0%}"
    # And the sliding-window minimum of 2,424 requests: 10 whole windows after the first
    assert cells[5:7] == ["100.0", f"{100 / 102.5:.0%}"]
