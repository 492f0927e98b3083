"""The benchmark's smoke mode: the whole benchmark at tiny N, on real parts, no timings asserted.

It runs in its own Redis database (``SFOX_BENCH_SMOKE_REDIS_URL``, default
db 14), never the suite's (15) nor a full benchmark's (13): the benchmark
empties its database at start and starts workers of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
BENCH_REDIS_URL = os.environ.get("SFOX_BENCH_SMOKE_REDIS_URL", "redis://127.0.0.1:6379/14")

pytest.importorskip(
    "psutil", reason="the benchmark needs the bench extra: pip install -e '.[bench]'"
)
pytest.importorskip("matplotlib", reason="the benchmark needs the bench extra")


@pytest.fixture
def bench_redis() -> str:
    """The benchmark's database, if it is not the suite's and no benchmark holds it."""
    if BENCH_REDIS_URL.rstrip("/") == REDIS_URL.rstrip("/"):
        pytest.fail(f"SFOX_BENCH_SMOKE_REDIS_URL must not be the suite's database {REDIS_URL}")
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not answering at {BENCH_REDIS_URL}")
    if client.exists("bench:lock"):
        pytest.skip(f"a benchmark is running on {BENCH_REDIS_URL}; set SFOX_BENCH_SMOKE_REDIS_URL")
    return BENCH_REDIS_URL


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_smoke_run_measures_every_approach_and_writes_its_report(
    bench_redis: str, tmp_path: Path
) -> None:
    """`python -m bench.run --smoke` runs every section and writes RESULTS.md, chart.png, JSON.

    That includes the nightly run (the package's task and the plain loop) and the
    egress runs, each address sending from its own loopback alias.
    """
    # Given a private output folder and the benchmark's own database
    command = [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)]
    command += ["--redis-url", bench_redis]

    # When the smoke benchmark runs (in a process group of its own, so that whatever
    # happens to this test, its workers and servers are stopped with it)
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    proc.stdout, proc.stderr = stdout, stderr

    # Then it succeeds and every measured approach minted a token for every user
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    measured = [
        row
        for row in results["rows"]
        if not row["skipped"]
        and not row["projected"]
        and row["approach"] not in ("bound", "sliding-window minimum")
    ]
    approaches = {row["approach"] for row in measured}
    assert {
        "package: mint tasks",
        "plain loop, 1 thread",
        "naive, 1 request per user",
        "Celery alone: a no-op task per user, no minting",
    } <= approaches
    for row in measured:
        assert row["tokens"] == row["users"], row
        assert row["rate_limited"] == 0, row
        # Celery alone mints nothing: its users arrive without a request to sFOX.
        minting = not row["approach"].startswith("Celery alone")
        assert (row["requests"] > 0) == minting, row
    package = [row for row in measured if row["approach"].startswith("package")]
    assert all(row["rss_largest_mb"] > 0 and row["worker_cpu_s"] > 0 for row in package)
    assert {row["section"] for row in measured} == {"rate", "grid", "nightly", "egress"}
    # The nightly run: every user's one order placed, by the package and by the plain loop
    nightly = [row for row in measured if row["section"] == "nightly"]
    assert {row["approach"].split(":")[0].split(",")[0] for row in nightly} == {
        "package",
        "plain nightly loop",
    }
    for row in nightly:
        assert row["placed"] == row["users"] <= row["orders"], row
        assert row["mints"] > 0 and row["token_age_max_s"] is not None, row
        assert row["rss_largest_mb"] > 0, row
    # The egress runs: each address's requests arrived from that address, none refused
    egress = [row for row in measured if row["section"] == "egress"]
    assert sorted(len(row["addresses"]) for row in egress) == [1, 2, 2]
    for row in egress:
        expected = [f"127.0.0.{2 + i}" for i in range(len(row["addresses"]))]
        assert sorted(row["addresses"]) == expected, row
        assert all(entry["rate_limited"] == 0 for entry in row["addresses"].values()), row
        assert sum(entry["requests"] for entry in row["addresses"].values()) == row["requests"]
    assert results["profile"]["in_process"]["measured"]["minter_ms"] > 0
    # CPU is counted in 10 ms ticks: the whole profile counts some, any one round may not.
    assert results["profile"]["worker"]["cpu_s"] > 0
    assert results["profile"]["worker"]["psutil_ms"] > 0
    # And its report, chart and raw results are where it was told
    report = (tmp_path / "RESULTS.md").read_text()
    assert report.startswith("# Benchmark results")
    assert "## Targets" in report
    assert "## The nightly run at sFOX's limit" in report
    assert "## Budgets per egress address" in report
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # And it gave its database back
    assert not redis.Redis.from_url(bench_redis).exists("bench:lock")
