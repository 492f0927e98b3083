"""The benchmark's own logic: its baseline limiter, the profile summary, the report's verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._plain import SlidingWindow, parse_rate
from bench._profile import GLUE, summarize_spy


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
        f"{main};{pool};trace_task (/x/celery/app/trace.py);Minter.mint (/x/tasks/_mint.py);"
        "Minter._accept (/x/tasks/_mint.py);Sealer.seal (/x/tasks/_seal.py);"
        "Fernet._encrypt_from_parts (/x/site-packages/cryptography/fernet.py) 30"
    )
    loop = f"{main};Hub.create_loop (/x/site-packages/kombu/asynchronous/hub.py) 10"
    raw = tmp_path / "profile.txt"
    raw.write_text(f"{seal}\n{loop}\n")

    # When it is summarized over 2 batches at 1000 samples per second
    summary = summarize_spy(raw, 2, rate=1000)

    # Then the samples land in their components, per batch, and the hot spot is named
    assert summary["components_ms"] == {"sealing (Fernet)": 15.0, GLUE: 5.0}
    assert summary["main_process_ms"] == 5.0
    assert (
        summary["hot_spots"][0]["function"] == "cryptography/fernet.py:Fernet._encrypt_from_parts"
    )
