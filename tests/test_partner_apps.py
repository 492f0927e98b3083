"""The package beside a partner's own Celery app (sidecar) and inside it (embedded).

Every partner process here (its workers, and its own process that calls the
package: ``tests.partner_calls``) runs with the default-broker guard
(``tests.partner_guard``) and without ``CELERY_BROKER_URL``: the partner's app is
configured from its own module, on a Redis of its own port, and any connection
to Redis's or AMQP's default port fails the test instead of passing by luck.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ENTERPRISE_KEY
from tests.downstream_runs import runs_by_user
from tests.partner_guard import guard_env, read_log, write_sitecustomize
from tests.redis_server import PrivateRedis
from tests.test_nightly import write_orders
from tests.test_worker import dump_redis
from tests.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.slow

EMBEDDED_QUEUE = "sfox-embedded"


@pytest.fixture(scope="module")
def partner_redis(tmp_path_factory):
    """The partner's broker and result backend: a Redis on a port of its own."""
    server = PrivateRedis(tmp_path_factory.mktemp("partner-redis")).start()
    yield server
    server.stop()


@pytest.fixture
def partner(partner_redis, fake_sfox, tmp_path):
    """The environment of a guarded partner process, and the guard's log."""
    partner_redis.client().flushall()
    log = tmp_path / "guard.log"
    env = {
        **guard_env(write_sitecustomize(tmp_path / "guard"), log),
        # Neither name is the partner's: its app reads PARTNER_REDIS_URL from its own module.
        "CELERY_BROKER_URL": "",
        "CELERY_RESULT_BACKEND": "",
        "PARTNER_REDIS_URL": partner_redis.url,
        "SFOX_API_URL": fake_sfox.url,
    }
    yield env, log
    assert read_log(log) == "", read_log(log)


def call(scenario: str, env: dict[str, str], **args: object) -> dict:
    """Run ``tests.partner_calls SCENARIO`` as the partner's own process; what it found."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.partner_calls", scenario],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(name: str, tmp_path: Path, env: dict[str, str], **options: object) -> WorkerProcess:
    return WorkerProcess(name, tmp_path, env=env, include=None, loglevel="INFO", **options)


def test_sidecar_neither_worker_takes_the_others_tasks(partner, partner_redis, fake_sfox, tmp_path):
    """Mints sent by name come back; a fan-out reaches every user on the partner's worker once.

    The partner's process imports ``tasks`` after creating its app: its own shared
    task stays on its app, and the package's names send through that app too.
    """
    env, _ = partner
    partner_worker = worker(
        "partner", tmp_path, env, app="tests.partner_app", queues="celery,partner-orders"
    ).start()
    # The package's own worker, configured the package's way: CELERY_BROKER_URL.
    sidecar = worker("sidecar", tmp_path, {**env, "CELERY_BROKER_URL": partner_redis.url})
    sidecar.start()
    try:
        mints = [[f"side-{n}-{i}" for i in range(5)] for n in range(10)]
        fan = [f"side-fan-{i}" for i in range(300)]
        found = call("sidecar", env, mints=mints, own=["side-own-1", "side-own-2"], fan=fan)
    finally:
        partner_worker.stop()
        sidecar.stop()
    assert found["current"] == found["ping_app"] == found["package_task_app"] == "partner"
    assert found["ping"] == "pong"
    assert found["mints"] == mints
    assert found["own"] == ["side-own-1", "side-own-2"]
    issued = {hashlib.sha256(t.encode()).hexdigest() for t in fake_sfox.issued_tokens}
    assert set(found["own_unsealed"]) <= issued
    assert found["finished"]
    runs = runs_by_user(partner_redis.client(), "sidecar")
    assert set(runs) == set(fan) and set(runs.values()) == {1}
    assert "partner.record" not in sidecar.log()  # routed by the partner's app, not ours
    for log in (sidecar.log(), partner_worker.log()):
        assert "unregistered task" not in log.lower()
    # The partner's worker ran the downstream tasks and its own ping; never a package task.
    assert partner_worker.log().count("partner.record[") >= 300
    assert "partner.ping[" in partner_worker.log()
    assert "sfox.mint_user_tokens" not in partner_worker.log()


def test_embedded_the_partners_worker_runs_every_package_task(
    partner, partner_redis, fake_sfox, tmp_path
):
    """Mint (with its TTL), a fan-out and a nightly run, all on the partner's own worker."""
    env, _ = partner
    env = {**env, "SFOX_QUEUE": EMBEDDED_QUEUE}
    fake_sfox.refuse("emb-7", status=404, message="user not found")
    embedded = worker(
        "embedded",
        tmp_path,
        env,
        app="tests.partner_embedded",
        queues=f"celery,{EMBEDDED_QUEUE}",
        concurrency=3,
    ).start()
    users = [f"emb-night-{i}" for i in range(60)]
    fan = [f"emb-fan-{i}" for i in range(120)]
    try:
        found = call(
            "embedded",
            env,
            queue=EMBEDDED_QUEUE,
            mint=[f"emb-{i}" for i in range(20)],
            fan=fan,
            run_date="2026-09-09",
            orders_file=write_orders(tmp_path, users),
        )
    finally:
        embedded.stop()
    client = partner_redis.client()
    assert found["tokens"] == 19 and found["failed"] == ["emb-7"]
    ttl = client.ttl(f"celery-task-meta-{found['mint_id']}")
    assert 0 < ttl <= 900  # SFOX_TOKEN_RESULT_TTL, on the partner's plain Redis backend
    assert found["finished"]
    runs = runs_by_user(client, "embedded")
    assert set(runs) == set(fan) and set(runs.values()) == {1}
    summary = found["summary"]
    assert summary["status"] == "done" and summary["placed"] == 60

    log = embedded.log()
    assert "sfox.jit_mint_chunk" in log  # the log is the worker's
    assert "unregistered task" not in log.lower()
    assert "ConfigurationError" not in log
    redis_text = dump_redis(client)
    for secret in [ENTERPRISE_KEY, *fake_sfox.issued_tokens]:
        assert secret not in log
        assert secret not in redis_text


def test_a_missing_key_names_where_it_was_looked_for(partner, fake_sfox, tmp_path):
    """With no key anywhere, a mint on the embedded worker fails naming where it looked.

    The caller, which imported the package, catches it as the package's own exception.
    """
    env, _ = partner
    env = {**env, "SFOX_QUEUE": EMBEDDED_QUEUE, "SFOX_ENTERPRISE_API_KEY": ""}
    nokey = worker("nokey", tmp_path, env, app="tests.partner_embedded", queues=EMBEDDED_QUEUE)
    nokey.start()
    try:
        found = call("missing_key", env, queue=EMBEDDED_QUEUE)
    finally:
        nokey.stop()
    assert found["caught"] == "tasks.ConfigurationError", found
    text = found["message"]
    assert "SFOX_ENTERPRISE_API_KEY" in text and "environment" in text
    assert "configuration of the Celery app 'partner-embedded'" in text
    assert fake_sfox.count() == 0


def test_a_worker_with_no_redis_for_the_limiter_refuses_to_start(partner, tmp_path):
    """A RabbitMQ broker and no Redis anywhere: the worker stops at once, naming the setting."""
    env, _ = partner
    refused = worker(
        "no-limiter",
        tmp_path,
        {
            **env,
            "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5673//",
            "CELERY_RESULT_BACKEND": "rpc://",
        },
    )
    with pytest.raises(RuntimeError, match="SFOX_LIMITER_URL"):
        refused.start(timeout=30)


def test_a_worker_with_a_broker_url_that_is_no_url_refuses_to_start(partner, tmp_path):
    """`rediss//...` (no colon): the worker stops at once in one line naming the setting."""
    env, _ = partner
    refused = worker(
        "bad-url",
        tmp_path,
        {**env, "CELERY_BROKER_URL": "rediss//:hunter2pass@127.0.0.1:6380/0"},
    )
    with pytest.raises(RuntimeError, match="CELERY_BROKER_URL") as failure:
        refused.start(timeout=30)
    assert "is not a URL" in str(failure.value)
    assert "hunter2pass" not in refused.log()
