"""The package beside a partner's own Celery app (sidecar) and inside it (embedded)."""

from __future__ import annotations

import json

import pytest

from tasks import run_progress, with_user_tokens
from tests.conftest import ENTERPRISE_KEY
from tests.services import eventually
from tests.test_nightly import write_orders
from tests.test_worker import dump_redis
from tests.testtasks import runs_by_user
from tests.workers import WorkerProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def partner_worker(fake_sfox, redis_client, tmp_path):
    """The partner's worker on Celery's default queue and its own, never importing tasks."""
    worker = WorkerProcess(
        "partner",
        tmp_path,
        app="tests.partner_app",
        include=None,
        queues="celery,partner-orders",
        loglevel="INFO",
    ).start()
    yield worker
    worker.stop()


def test_sidecar_neither_worker_takes_the_others_tasks(
    worker, partner_worker, fake_sfox, redis_client
):
    """Mints sent by name come back; a fan-out reaches every user on the partner's worker once."""
    from tests.partner_app import app as partner

    ids = [[f"side-{n}-{i}" for i in range(5)] for n in range(10)]
    # Half with queue=, half through the partner's task_routes ("sfox.*" -> sfox).
    sent = [partner.send_task("sfox.mint_user_tokens", args=[u], queue="sfox") for u in ids[:5]]
    sent += [partner.send_task("sfox.mint_user_tokens", args=[u]) for u in ids[5:]]
    for result, users in zip(sent, ids, strict=True):
        tokens = result.get(timeout=60)["tokens"]
        assert [t["partner_user_id"] for t in tokens] == users

    fan = [f"side-fan-{i}" for i in range(300)]
    canvas = with_user_tokens(
        fan, partner.signature("partner.record", args=("sidecar",)), chunk_size=25, ahead=2
    )
    canvas.apply_async()
    assert eventually(lambda: run_progress(canvas.run_id).finished, timeout=120), run_progress(
        canvas.run_id
    )
    runs = runs_by_user(redis_client, "sidecar")
    assert set(runs) == set(fan) and set(runs.values()) == {1}
    assert "partner.record" not in worker.log()  # routed by the partner's app, not ours
    for log in (worker.log(), partner_worker.log()):
        assert "unregistered task" not in log.lower()
    # The partner's worker ran the downstream tasks and reported each end to SFOX_QUEUE.
    assert partner_worker.log().count("partner.record[") >= 300
    assert "sfox.mint_user_tokens" not in partner_worker.log()


EMBEDDED_QUEUE = "sfox-embedded"


@pytest.fixture
def embedded_worker(fake_sfox, redis_client, tmp_path):
    """The partner's app with the package's tasks inside, alone on its queues."""
    worker = WorkerProcess(
        "embedded",
        tmp_path,
        env={"SFOX_QUEUE": EMBEDDED_QUEUE, "SFOX_API_URL": fake_sfox.url},
        app="tests.partner_embedded",
        include=None,
        queues=f"celery,{EMBEDDED_QUEUE}",
        concurrency=3,
    ).start()
    yield worker
    worker.stop()


def test_embedded_the_partners_worker_runs_every_package_task(
    embedded_worker, fake_sfox, redis_client, tmp_path
):
    """Mint (with its TTL), a fan-out and a nightly run, all on the partner's own worker."""
    from tests.partner_embedded import app as partner

    fake_sfox.refuse("emb-7", status=404, message="user not found")
    mint = partner.send_task(
        "sfox.mint_user_tokens", args=[[f"emb-{i}" for i in range(20)]], queue=EMBEDDED_QUEUE
    )
    result = mint.get(timeout=60)
    assert len(result["tokens"]) == 19 and result["failed"][0]["user_id"] == "emb-7"
    ttl = redis_client.ttl(f"celery-task-meta-{mint.id}")
    assert 0 < ttl <= 900  # SFOX_TOKEN_RESULT_TTL, on the partner's plain Redis backend

    fan = [f"emb-fan-{i}" for i in range(120)]
    canvas = with_user_tokens(
        fan, partner.signature("partner_embedded.record", args=("embedded",)), chunk_size=20
    )
    canvas.apply_async(queue=EMBEDDED_QUEUE)
    assert eventually(lambda: run_progress(canvas.run_id).finished, timeout=120)
    runs = runs_by_user(redis_client, "embedded")
    assert set(runs) == set(fan) and set(runs.values()) == {1}

    users = [f"emb-night-{i}" for i in range(60)]
    summary = partner.send_task(
        "sfox.run_nightly_orders",
        kwargs={"run_date": "2026-09-09", "orders_file": write_orders(tmp_path, users)},
        queue=EMBEDDED_QUEUE,
    ).get(timeout=120)
    assert summary["status"] == "done" and summary["placed"] == 60

    log = embedded_worker.log()
    assert "emb-fan-0" in log or "sfox.jit_mint_chunk" in log  # the log is the worker's
    assert "unregistered task" not in log.lower()
    assert "ConfigurationError" not in log
    redis_text = dump_redis(redis_client)
    for secret in [ENTERPRISE_KEY, *fake_sfox.issued_tokens]:
        assert secret not in log
        assert secret not in redis_text
    assert json.dumps(summary)  # the summary is plain JSON


def test_a_missing_key_names_where_it_was_looked_for(fake_sfox, redis_client, tmp_path):
    """With no key anywhere, a mint on the embedded worker fails naming where it looked."""
    from tests.partner_embedded import app as partner

    worker = WorkerProcess(
        "nokey",
        tmp_path,
        env={"SFOX_ENTERPRISE_API_KEY": "", "SFOX_API_URL": fake_sfox.url},
        app="tests.partner_embedded",
        include=None,
        queues=EMBEDDED_QUEUE,
        loglevel="INFO",
    ).start()
    try:
        result = partner.send_task("sfox.mint_user_tokens", args=[["u1"]], queue=EMBEDDED_QUEUE)
        with pytest.raises(Exception) as failure:
            result.get(timeout=60)
    finally:
        worker.stop()
    text = str(failure.value)
    assert "SFOX_ENTERPRISE_API_KEY" in text and "environment" in text
    assert "configuration of the Celery app" in text
    assert fake_sfox.count() == 0
