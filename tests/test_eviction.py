"""Eviction is never silent, a full Redis pauses work, and a Cluster under the limiter is refused.

Each test runs a ``redis-server`` of its own, configured as a partner's might be:
``maxmemory-policy volatile-lru`` (managed Redis's usual default), CONFIG and INFO
disabled, ``cluster-enabled yes``, or ``noeviction`` with a small ``maxmemory``
that a partner's cache fills while a mint runs. Real workers, the real
``sfox-tokens check``, and the sFOX stand-in.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks._redis import CLUSTER_REFUSAL, inspect_redis
from tasks._settings import Settings
from tasks.testing.process import stop_process
from tasks.worker.stores import check_stores
from tests.conftest import REDIS_URL
from tests.services import free_port, run_text, wait_until
from tests.workers import ROOT, Caller, WorkerProcess

pytestmark = pytest.mark.slow

QUEUE = "eviction"
SCRIPT = Path(sys.executable).with_name("sfox-tokens")


class ConfiguredRedis:
    """``redis-server`` on a free port with the given options (and a password, if any)."""

    def __init__(self, directory: Path, *options: str, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.options = list(options)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=1)

    def start(self, timeout: float = 10.0) -> ConfiguredRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                "--logfile", str(self.directory / "redis.log"), *self.options]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self._answers(), timeout, f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, 10)


@pytest.fixture
def server_dir(tmp_path):
    return tmp_path / "redis"


def start_redis(request, directory: Path, *options: str, **kw: Any) -> ConfiguredRedis:
    server = ConfiguredRedis(directory, *options, **kw)
    request.addfinalizer(server.stop)
    return server.start()


def start_worker(request, tmp_path, name: str, env: dict[str, str]) -> WorkerProcess:
    worker = WorkerProcess(name, tmp_path, env={"SFOX_QUEUE": QUEUE, **env}, queues=QUEUE)
    request.addfinalizer(worker.stop)
    return worker.start()


def check(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    out = run_text([SCRIPT, "check", "--timeout", "3"], cwd=ROOT, env={**os.environ, **env})
    lines = {line[6:16].strip(): line for line in out.stdout.splitlines() if line[:4].strip()}
    return out, lines


def test_an_evicting_redis_is_named_at_worker_start_and_check_fails(
    request, tmp_path, server_dir, fake_sfox
):
    """volatile-lru: a WARNING names the Redis (password masked), the policy, what it risks."""
    password = "pw-" + secrets.token_urlsafe(16)
    server = start_redis(
        request, server_dir, "--maxmemory-policy", "volatile-lru", password=password
    )
    env = {
        "CELERY_BROKER_URL": server.url,
        "CELERY_RESULT_BACKEND": server.url,
        "SFOX_API_URL": fake_sfox.url,
    }
    worker = start_worker(request, tmp_path, "lru", env)
    masked = f"redis://:**@127.0.0.1:{server.port}/0"
    (line,) = [ln for ln in worker.log().splitlines() if "maxmemory-policy volatile-lru" in ln]
    assert "WARNING" in line and masked in line, line
    assert "(broker and result backend and limiter)" in line
    for risk in ("queued and unacknowledged tasks", "task results", "the run books"):
        assert risk in line
    out, lines = check(env)
    assert out.returncode == 1
    for name, risk in (("broker", "queued tasks"), ("backend", "task results"),
                       ("rate limit", "the run books")):  # fmt: skip
        assert lines[name].startswith("FAIL"), lines[name]
        assert "maxmemory-policy is volatile-lru" in lines[name] and risk in lines[name]
    for text in (worker.log(), out.stdout, out.stderr):
        assert password not in text


def test_a_redis_that_hides_its_policy(request, server_dir, caplog):
    """CONFIG disabled: INFO tells the policy; INFO disabled as well: the policy is unknown."""
    # As managed Redis does, commands renamed to names no client knows.
    config, info = (
        ["--rename-command", name, f"{name}-{secrets.token_hex(8)}"] for name in ("CONFIG", "INFO")
    )
    config_off = start_redis(request, server_dir / "a", *config)
    assert inspect_redis(config_off.url).policy == "noeviction"
    both_off = start_redis(request, server_dir / "b", *config, *info)
    facts = inspect_redis(both_off.url)
    assert facts.policy is None and facts.evicts
    conf = {"broker_url": "amqp://guest@127.0.0.1:5672//", "result_backend": both_off.url}
    with caplog.at_level(logging.INFO, logger="tasks.stores"):
        check_stores(conf, Settings(limiter_url=both_off.url))
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "maxmemory-policy is unknown" in record.getMessage()
    assert "(result backend and limiter)" in record.getMessage()


def test_a_cluster_under_the_limiter_is_refused(request, tmp_path, server_dir, fake_sfox):
    """cluster_enabled:1 on the limiter's Redis: the worker refuses in one line; check fails."""
    node = start_redis(request, server_dir, "--cluster-enabled", "yes",
                       "--cluster-port", str(free_port()),
                       "--cluster-config-file", str(server_dir / "nodes.conf"))  # fmt: skip
    env = {"SFOX_LIMITER_URL": node.url, "SFOX_API_URL": fake_sfox.url, "SFOX_QUEUE": QUEUE}
    worker = WorkerProcess("cluster", tmp_path, env=env, queues=QUEUE)
    request.addfinalizer(worker.stop)
    with pytest.raises(RuntimeError, match="worker exited"):
        worker.start()
    refusal = CLUSTER_REFUSAL.format(where=node.url)
    refusing = [ln for ln in worker.log().splitlines() if "refusing to start" in ln]
    assert refusing and all(refusal in ln for ln in refusing), worker.log()
    assert f"sfox-tokens: {refusal}" in worker.log()
    out, lines = check(env)
    assert out.returncode == 1
    assert lines["rate limit"].startswith("FAIL") and refusal in lines["rate limit"]


def fill(client: redis.Redis, prefix: str = "partner:cache:") -> None:
    """A partner's cache of 4 MB, then maxmemory 1 MB below what Redis holds: it is full.

    Not filled write by write up to maxmemory: a refused write frees its own
    buffer, and the next small one would fit again.
    """
    value = b"x" * 64 * 1024
    for n in range(64):
        client.set(f"{prefix}{n}", value)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used - 1024 * 1024)
    try:
        client.set(f"{prefix}probe", b"x")
    except redis.exceptions.OutOfMemoryError:
        return
    raise AssertionError("Redis took a write above its maxmemory")


def free(client: redis.Redis, prefix: str = "partner:cache:") -> None:
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def result_of(store: redis.Redis, task_id: str, timeout: float) -> dict[str, Any]:
    def done() -> Any:
        raw = store.get(f"celery-task-meta-{task_id}")
        meta = json.loads(raw) if raw else None
        return meta if meta and meta["status"] == "SUCCESS" else None

    meta: dict[str, Any] = wait_until(done, timeout, f"the result of {task_id}")
    return meta


def test_a_full_redis_pauses_a_mint_that_finishes_once_memory_frees(
    request, tmp_path, server_dir, fake_sfox
):
    """noeviction, full mid-mint: ERROR lines name memory, the worker lives, the mint finishes."""
    server = start_redis(request, server_dir, "--maxmemory-policy", "noeviction")
    fake_sfox.configure(latency=0.2)
    env = {
        "CELERY_BROKER_URL": server.url,
        "CELERY_RESULT_BACKEND": server.url,
        "SFOX_API_URL": fake_sfox.url,
        "SFOX_TOKEN_BATCH_SIZE": "10",
        "SFOX_MINT_CONCURRENCY": "1",
        "SFOX_RATE_LIMIT": "5000/1s",
    }
    worker = start_worker(request, tmp_path, "full", env)
    caller = Caller(server.url, QUEUE)
    request.addfinalizer(caller.close)
    client = server.client()
    users = [f"full-{i}" for i in range(60)]
    task_id = str(caller.send("sfox.mint_user_tokens", args=[users]).id)
    wait_until(lambda: fake_sfox.requests_log, 20, "the mint's first request")
    fill(client)
    # The limiter's writes wait in place first (a few seconds), then the result does.
    wait_until(lambda: "is out of memory" in worker.log(), 30, "an ERROR line naming memory")
    waiting = f"the result of task {task_id} waits"
    wait_until(lambda: waiting in worker.log(), 40, "the result waiting for memory")
    assert worker.proc is not None and worker.proc.poll() is None, worker.log()
    stored = client.get(f"celery-task-meta-{task_id}")  # STARTED, not yet its result
    assert stored is None or json.loads(stored)["status"] != "SUCCESS", stored
    free(client)
    meta = result_of(client, task_id, 90)
    assert [t["partner_user_id"] for t in meta["result"]["tokens"]] == users
    log = worker.log()
    errors = [ln for ln in log.splitlines() if "is out of memory" in ln]
    assert errors and all("ERROR" in ln and "maxmemory" in ln for ln in errors), errors
    assert "Unrecoverable error" not in log
    assert worker.proc.poll() is None, log


def test_a_full_broker_refuses_an_ack_and_the_worker_goes_on(
    request, tmp_path, server_dir, fake_sfox, redis_client
):
    """An ack a full broker refuses still ends the task; its record goes once memory frees."""
    server = start_redis(request, server_dir, "--maxmemory-policy", "noeviction")
    fake_sfox.configure(latency=0.2)
    env = {
        "CELERY_BROKER_URL": server.url,
        "CELERY_RESULT_BACKEND": REDIS_URL,
        "SFOX_LIMITER_URL": REDIS_URL,
        "SFOX_API_URL": fake_sfox.url,
        "SFOX_TOKEN_BATCH_SIZE": "10",
        "SFOX_MINT_CONCURRENCY": "1",
        "SFOX_RATE_LIMIT": "5000/1s",
    }
    worker = start_worker(request, tmp_path, "fullbroker", env)
    caller = Caller(server.url, QUEUE)
    request.addfinalizer(caller.close)
    client = server.client()
    users = [f"ack-{i}" for i in range(40)]
    first = str(caller.send("sfox.mint_user_tokens", args=[users]).id)
    wait_until(lambda: fake_sfox.requests_log, 20, "the mint's first request")
    fill(client)
    meta = result_of(redis_client, first, 30)
    assert [t["partner_user_id"] for t in meta["result"]["tokens"]] == users
    wait_until(lambda: "acknowledging a finished task" in worker.log(), 20, "the refused ack")
    assert worker.proc is not None and worker.proc.poll() is None, worker.log()
    assert client.hlen("unacked") == 1  # its record: the ack could not remove it
    free(client)
    wait_until(lambda: client.hlen("unacked") == 0, 30, "the record removed at a sweep")
    second = str(caller.send("sfox.mint_user_tokens", args=[["after-1"]]).id)
    result_of(redis_client, second, 30)
    log = worker.log()
    assert log.count(f"Task sfox.mint_user_tokens[{first}] succeeded") == 1, log
    assert "Unrecoverable error" not in log
    assert worker.proc.poll() is None, log


def test_a_requeue_a_full_broker_refuses_is_put_back_once_memory_frees(request, server_dir):
    """kombu on the package's transport: reject(requeue) into a full Redis raises nothing."""
    from kombu import Connection

    from tasks.worker import transport

    server = start_redis(request, server_dir, "--maxmemory-policy", "noeviction")
    client = server.client()
    with Connection(server.url, transport=transport.Transport) as conn:
        queue = conn.SimpleQueue("eviction-requeue")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        fill(client)
        message.reject(requeue=True)  # refused by Redis: owed, not raised
        assert message.delivery_tag in transport._unrestored
        assert client.hexists("unacked", message.delivery_tag)  # still recorded, not lost
        free(client)
        conn.default_channel.qos.restore_visible()
        again = queue.get(timeout=5)
        assert again.payload == {"n": 1}
        again.ack()
        assert client.hlen("unacked") == 0
        queue.close()
