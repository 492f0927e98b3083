"""End to end: real Redis, real ``celery -A tasks worker`` processes, the stand-in on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import states

import tasks
from tasks import AuthenticationError, ConfigurationError, mint_user_tokens, unseal
from tasks.testing import Fault
from tests.conftest import ENTERPRISE_KEY
from tests.testtasks import SHORT_RESUME_DEADLINE, echo, waits_past_its_deadline
from tests.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.slow


def test_worker_mints_a_batch_through_faults(worker, fake_sfox):
    """250 users with a 503, a reset and a dropped user all come back sealed and openable."""
    ids = [f"client_account_{i}" for i in range(250)]
    fake_sfox.inject(Fault.status(503), Fault.reset(), Fault.drop_user())
    result = mint_user_tokens.delay(ids).get(timeout=30)
    assert [t["partner_user_id"] for t in result["tokens"]] == ids
    assert result["failed"] == []
    issued = {user: token for token, (user, _) in fake_sfox.issued_tokens.items()}
    for entry in result["tokens"][:10]:
        assert unseal(entry["token"]) == issued[entry["partner_user_id"]]


def test_refused_user_reaches_failed_through_the_worker(worker, fake_sfox):
    """A refused user is reported in failed with sFOX's status; the others are minted."""
    fake_sfox.refuse("ghost", status=404, message="user not found")
    result = mint_user_tokens.delay(["a", "ghost", "b"]).get(timeout=30)
    assert [t["partner_user_id"] for t in result["tokens"]] == ["a", "b"]
    assert result["failed"] == [{"user_id": "ghost", "status": 404, "error": "user not found"}]


def test_long_wait_goes_back_to_the_broker_and_completes(worker, fake_sfox):
    """A Retry-After over the in-process cap becomes a broker countdown, and the task finishes."""
    fake_sfox.inject(Fault.status(503, retry_after=2))
    started = time.monotonic()
    async_result = mint_user_tokens.delay(["a", "b"])
    seen = set()
    while not async_result.ready() and time.monotonic() - started < 30:
        seen.add(async_result.state)
        time.sleep(0.05)
    result = async_result.get(timeout=1)
    assert states.RETRY in seen
    assert len(result["tokens"]) == 2
    assert time.monotonic() - started >= 1.9
    assert fake_sfox.count("/v1/enterprise/user-tokens") == 2


def test_a_task_that_keeps_waiting_fails_at_its_resume_deadline(worker, redis_client):
    """Resumed from the broker until its resume deadline, then failed naming what it awaited."""
    result = waits_past_its_deadline.delay("deadline")
    with pytest.raises(Exception) as failed:
        result.get(timeout=30)
    assert type(failed.value).__name__ == "RetriesExhausted"
    message = str(failed.value)
    assert f"its {SHORT_RESUME_DEADLINE:g} s resume deadline" in message
    assert message.endswith("it was waiting for: a wait that never ends (tests)")
    # Resumed, with its first run's time carried: each run starts 0.25 s after the last.
    runs = int(redis_client.get("tests:resumes:deadline"))
    assert 2 <= runs <= SHORT_RESUME_DEADLINE / 0.25 + 1


def test_401_fails_the_task_fast_with_one_request(worker, fake_sfox):
    """A 401 fails the task at once with AuthenticationError; sFOX sees one request."""
    fake_sfox.inject(Fault.status(401))
    with pytest.raises(AuthenticationError) as caught:
        mint_user_tokens.delay(["a", "b"]).get(timeout=30)
    assert "SFOX_ENTERPRISE_API_KEY" in str(caught.value)
    assert ENTERPRISE_KEY not in str(caught.value)
    assert fake_sfox.count("/v1/enterprise/user-tokens") == 1


@pytest.mark.parametrize(
    "bad", ["u1", [], [""], [None], [7], ["x" * 300], [f"u{i}" for i in range(10_001)]]
)
def test_bad_input_is_refused_before_anything_is_sent(worker, fake_sfox, redis_client, bad):
    """Bad input raises ValueError at the call; no message is queued, sFOX sees nothing."""
    with pytest.raises(ValueError):
        mint_user_tokens.delay(bad)
    assert redis_client.llen("sfox") == 0
    assert fake_sfox.count() == 0


def test_bad_input_sent_anyway_fails_the_task_without_a_request(worker, fake_sfox):
    """A message that skipped the client-side check still fails in the worker, unsent."""
    result = tasks.app.send_task("sfox.mint_user_tokens", args=[["ok", ""]])
    with pytest.raises(ValueError, match="blank"):
        result.get(timeout=30)
    assert fake_sfox.count() == 0


def test_mint_result_expires_within_the_token_ttl(worker, fake_sfox, redis_client):
    """The mint result key carries SFOX_TOKEN_RESULT_TTL; other results keep result_expires."""
    mint = mint_user_tokens.delay(["a"])
    mint.get(timeout=30)
    other = echo.delay("x")
    other.get(timeout=30)
    mint_ttl = redis_client.ttl(f"celery-task-meta-{mint.id}")
    other_ttl = redis_client.ttl(f"celery-task-meta-{other.id}")
    assert 0 < mint_ttl <= 900
    assert mint_ttl >= 890
    assert other_ttl > 86000


def test_worker_refuses_to_start_with_a_plain_http_url(tmp_path):
    """A non-loopback http:// SFOX_API_URL stops the worker at start-up with a clear error."""
    proc = WorkerProcess(
        "badurl", tmp_path, env={"SFOX_API_URL": "http://api.sfox.com"}, concurrency=1
    )
    with pytest.raises(RuntimeError) as caught:
        proc.start(timeout=30)
    assert "must be https://" in str(caught.value)


def test_missing_key_fails_minting_with_a_clear_error(fake_sfox, tmp_path, redis_client):
    """Without an enterprise key the worker starts, and a mint fails naming the variable."""
    proc = WorkerProcess.solo("nokey", tmp_path, fake_sfox.url, {"SFOX_ENTERPRISE_API_KEY": ""})
    proc.start()
    try:
        result = mint_user_tokens.apply_async((["a"],), queue="nokey")
        with pytest.raises(ConfigurationError, match="SFOX_ENTERPRISE_API_KEY"):
            result.get(timeout=30)
    finally:
        proc.stop()
    assert fake_sfox.count() == 0


def test_two_workers_share_the_rate_limit(fake_sfox, tmp_path, redis_client):
    """Two workers of two processes each never exceed SFOX_RATE_LIMIT together; no 429."""
    # Requests that take a while: without latency a task lasts milliseconds, and one worker can
    # take all eight before its twin's first poll (1 s on kombu 5.4).
    fake_sfox.configure(rate_limit=25, rate_window=2.0, rate_penalty=5.0, latency=0.25)
    env = {"SFOX_RATE_LIMIT": "20/2s", "SFOX_TOKEN_BATCH_SIZE": "5", "SFOX_API_URL": fake_sfox.url}
    workers = [
        WorkerProcess(f"lim{i}", tmp_path, env=env, concurrency=2, queues="limits", loglevel="INFO")
        for i in range(2)
    ]
    for w in workers:
        w.start()
    try:
        jobs = [
            mint_user_tokens.apply_async(([f"w{j}-u{i}" for i in range(25)],), queue="limits")
            for j in range(8)
        ]
        results = [job.get(timeout=60) for job in jobs]
    finally:
        for w in workers:
            w.stop()
    assert all(len(r["tokens"]) == 25 for r in results)
    assert fake_sfox.count("/v1/enterprise/user-tokens") == 40
    # Arrival times carry a little network jitter; allow 2 % of the window for it.
    assert fake_sfox.max_requests_in_window(2.0 * 0.98) <= 20
    assert fake_sfox.rate_limited_count == 0
    # Both workers did part of the work.
    assert all("minted" in w.log() for w in workers)


def test_no_secret_in_logs_events_or_redis(worker, events, fake_sfox, redis_client):
    """Neither the enterprise key nor any plaintext token is in the DEBUG log, events or Redis."""
    fake_sfox.refuse("refused-user", status=422, message="user deactivated")
    fake_sfox.inject(Fault.status(503), Fault.extra_user("intruder"), Fault.malformed('{"x": 1}'))
    ids = [f"secret-scan-{i}" for i in range(120)] + ["refused-user"]
    mint = mint_user_tokens.delay(ids)
    result = mint.get(timeout=30)
    fake_sfox.inject(Fault.status(401))
    with pytest.raises(AuthenticationError):
        mint_user_tokens.delay(["a"]).get(timeout=30)
    time.sleep(1.0)  # let the last events arrive
    secrets_ = [ENTERPRISE_KEY, *fake_sfox.issued_tokens]
    assert len(secrets_) > 100 and len(result["tokens"]) == 120

    log = worker.log()
    assert "secret-scan-0" in log  # the log really is the worker's
    event_text = json.dumps(events.events, default=str)
    assert mint.id in event_text
    redis_text = dump_redis(redis_client)
    assert mint.id in redis_text
    for secret in secrets_:
        assert secret not in log
        assert secret not in event_text
        assert secret not in redis_text


def dump_redis(client) -> str:
    """Every key and value in the test database, as text."""
    parts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            value = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = b""
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


def test_demo_runs_end_to_end_on_an_embedded_broker():
    """`sfox-tokens demo` mints through a real worker, reports the refused user, masks tokens.

    Its output carries only the package's own lines: no Celery warning about the
    embedded broker's URL.
    """
    script = Path(sys.executable).with_name("sfox-tokens")
    out = subprocess.run(
        [str(script), "demo"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "embedded in-process broker" in out.stdout
    assert "11 minted, 1 failed" in out.stdout
    assert "failed (404)" in out.stdout and "••••" in out.stdout
    assert "No hostname was supplied" not in out.stdout + out.stderr
