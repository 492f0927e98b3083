"""The worker's own Prometheus metrics: names, exact counts across pool processes, no secrets."""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
from collections import Counter
from datetime import date
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasks import _metrics, mint_user_tokens, place_user_order
from tasks._metrics import METRIC_NAMES
from tasks.budget.ratelimit import PACE_AHEAD
from tasks.nightly.store import NightlyRun
from tasks.sealing import Sealer, derive_seal_key
from tasks.testing import Fault
from tests.conftest import ENTERPRISE_KEY
from tests.services import free_port, http_get
from tests.test_nightly import stage_one_order
from tests.workers import WorkerProcess

QUEUE = "metrics-tests"


def scrape(port: int) -> str:
    response = http_get(f"http://127.0.0.1:{port}/metrics")
    assert response.status == 200
    return response.text


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the scrape: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


# -- in one process ------------------------------------------------------------------


def _count_in_a_child() -> None:
    _metrics.tokens_minted(2)
    _metrics.request_done("order", 201, 0.01)


def test_hooks_do_nothing_until_served():
    """Without a server (the CLI, the tests, a worker without the port) a hook is a no-op."""
    assert _metrics._current is None
    _metrics.request_done("user_tokens", 201, 0.1)
    _metrics.tokens_minted(3)
    _metrics.users_refused(1)
    _metrics.token_reminted()
    _metrics.rate_limit_paused()
    _metrics.limiter_waited(1.5)
    assert _metrics._current is None


def test_served_counts_add_up_across_forked_processes_and_the_directory_goes():
    """Counts of this process and of a forked child are summed; close() removes the directory."""
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    server = _metrics.serve(free_port(), host="127.0.0.1")
    directory = Path(server.directory)
    try:
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == server.directory
        _metrics.tokens_minted(5)
        _metrics.request_done("user_tokens", None, 0.2)
        _metrics.limiter_waited(0.75)
        child = multiprocessing.get_context("fork").Process(target=_count_in_a_child)
        child.start()
        child.join(30)
        assert child.exitcode == 0
        text = scrape(server.port)
        assert value(text, "sfox_tokens_minted_total") == 7
        assert value(text, "sfox_requests_total", endpoint="user_tokens", status="error") == 1
        assert value(text, "sfox_requests_total", endpoint="order", status="201") == 1
        assert value(text, "sfox_request_duration_seconds_count", endpoint="order") == 1
        assert value(text, "sfox_rate_limit_wait_seconds_total") == 0.75
        assert len(list(directory.glob("*.db"))) >= 2  # one file per process
    finally:
        server.close()
    assert not directory.exists()
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") == before
    assert _metrics._current is None


# -- a real worker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_worker(fake_sfox_server, redis_client, tmp_path_factory):
    """A prefork worker serving metrics, each task in a fresh pool process (max 1 per child)."""
    port = free_port()
    worker = WorkerProcess(
        "metrics",
        tmp_path_factory.mktemp("metrics-worker"),
        env={
            "SFOX_API_URL": fake_sfox_server.url,
            "SFOX_METRICS_PORT": str(port),
            # One request at a time and four users a batch: the order of requests is fixed.
            "SFOX_MINT_CONCURRENCY": "1",
            "SFOX_TOKEN_BATCH_SIZE": "4",
            "CELERY_TASK_DEFAULT_QUEUE": QUEUE,
        },
        concurrency=2,
        queues=QUEUE,
        extra_args=["--max-tasks-per-child", "1"],
    ).start()
    worker.port = port
    yield worker
    worker.stop()


@pytest.mark.slow
def test_a_worker_counts_a_mint_with_faults_exactly(metrics_worker, fake_sfox, redis_client):
    """A mint through a 503, a reset, a 429, a lost user and a refused one, then a re-mint.

    Each task runs in a pool process of its own, so the counts the worker serves
    are sums over processes, two of which have ended. They match the requests the
    stand-in saw, and the scrape holds no user ID, token or key.
    """
    users = [f"metrics-user-{i}" for i in range(7)] + ["metrics-ghost"]
    fake_sfox.refuse("metrics-ghost", status=404, message="user not found")
    fake_sfox.inject(Fault.drop_user(), Fault.status(503), Fault.reset(), Fault.status(429))
    result = mint_user_tokens.apply_async((users,), queue=QUEUE).get(timeout=60)
    assert len(result["tokens"]) == 7 and [f["user_id"] for f in result["failed"]] == [
        "metrics-ghost"
    ]

    # A downstream order whose sealed token is too old to open: one re-mint, then the order.
    day = date(2026, 11, 25)
    stage_one_order(redis_client, day, "metrics-late")
    old = Sealer([derive_seal_key(ENTERPRISE_KEY)], 900, clock=lambda: 0.0)
    entry = {"partner_user_id": "metrics-late", "token": old.seal("stale"), "expires": ""}
    placed = place_user_order.apply_async(
        kwargs={"run_date": day.isoformat(), "user_token": entry}, queue=QUEUE
    ).get(timeout=60)
    assert placed["placed"] == 1 and NightlyRun(redis_client, day).remints() == 1

    text = scrape(metrics_worker.port)
    requests = {
        (dict(labels)["endpoint"], dict(labels)["status"]): count
        for (name, labels), count in samples(text).items()
        if name == "sfox_requests_total"
    }
    # drop_user on the first batch; then 503, reset and 429 on the lost user asked alone;
    # the second batch holds the refused user: 404, two halves, 404, 201, 404.
    assert requests == {
        ("user_tokens", "201"): 4,
        ("user_tokens", "404"): 3,
        ("user_tokens", "503"): 1,
        ("user_tokens", "429"): 1,
        ("user_tokens", "error"): 1,
        ("user_token", "201"): 1,
        ("order", "201"): 1,
    }
    seen = Counter(
        (
            "order" if r.path.startswith("/v1/orders") else
            "user_token" if r.path.count("/") > 3 else "user_tokens",
            str(r.status or "error"),
        )
        for r in fake_sfox.requests_log
    )  # fmt: skip
    assert requests == dict(seen)
    assert value(text, "sfox_request_duration_seconds_count", endpoint="user_tokens") == 10
    assert value(text, "sfox_tokens_minted_total") == 8  # 7, and the re-mint
    assert value(text, "sfox_users_refused_total") == 1
    assert value(text, "sfox_token_remints_total") == 1
    assert value(text, "sfox_rate_limit_pauses_total") == 1
    # The shared pause after the 429 is SFOX_RATE_LIMIT_PENALTY (0.5 s); the retry waited it out.
    # The order is batch work, paced: it may also wait for the slots the mint's 11 requests
    # took, less the PACE_AHEAD it may take early, one every period / limit (240/10s).
    pace = (sum(requests.values()) - 1 - PACE_AHEAD) * 10 / 240
    assert 0 < value(text, "sfox_rate_limit_wait_seconds_total") <= 0.5 + pace
    assert {f.name for f in text_string_to_metric_families(text)} >= {
        name.removesuffix("_total") for name in METRIC_NAMES
    }

    secrets = [ENTERPRISE_KEY, derive_seal_key(ENTERPRISE_KEY), *fake_sfox.issued_tokens]
    for secret in secrets:
        assert secret not in text
    assert not re.search(r"metrics-(user|ghost|late)", text)
    assert "127.0.0.1" not in text and "redis" not in text


@pytest.mark.slow
def test_the_directory_goes_with_the_worker(fake_sfox, redis_client, tmp_path):
    """A worker creates its metrics directory at start and removes it when it stops."""
    worker = WorkerProcess.solo(
        "metrics-dir", tmp_path, fake_sfox.url, {"SFOX_METRICS_PORT": str(free_port())}
    ).start()
    try:
        found = re.search(r"counts kept in (\S+)", worker.log())
        assert found, worker.log()
        directory = Path(found.group(1))
        assert directory.is_dir()
    finally:
        worker.stop()
    assert not directory.exists()


@pytest.mark.slow
def test_a_worker_whose_metrics_port_is_taken_refuses_to_start(fake_sfox, tmp_path):
    """Metrics asked for and not served would go unnoticed: the worker stops, saying why."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = WorkerProcess.solo(
            "metrics-taken", tmp_path, fake_sfox.url, {"SFOX_METRICS_PORT": str(port)}
        )
        try:
            with pytest.raises(RuntimeError) as caught:
                worker.start(timeout=30)
        finally:
            worker.stop()
    assert f"cannot serve metrics on SFOX_METRICS_PORT={port}" in str(caught.value)
