"""Tasks only the tests register in their workers (``--include tests.testtasks``)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from tasks import app
from tasks.minting import Deferred
from tasks.worker.base import SfoxTask
from tests.downstream_runs import note_run, runs_by_user

__all__ = [
    "batch_step",
    "count_run",
    "echo",
    "flaky_downstream",
    "note_run",
    "record_token",
    "runs_by_user",
    "waits_past_its_deadline",
]


@app.task(name="tests.echo")
def echo(value: Any) -> Any:
    """Return ``value``: a task with the global result expiry, to compare TTLs."""
    return value


@app.task(name="tests.batch_step", base=SfoxTask, ignore_result=True)
def batch_step(index: int) -> int:
    """Batch work that does nothing: the lanes' tests queue hundreds of it."""
    return index


def _client() -> Any:
    # A partner's task that rides through dropped connections as the package does.
    from tasks._redis import redis_client, with_master_name
    from tasks._settings import redis_url_of

    # The broker may be RabbitMQ: the results' Redis then; Sentinel: the broker's master.
    url = redis_url_of(app.conf.broker_url, app.conf.result_backend) or ""
    master = (app.conf.broker_transport_options or {}).get("master_name")
    return redis_client(with_master_name(url, master))


@app.task(bind=True, name="tests.count_run", ignore_result=True)
def count_run(self: Any, tag: str) -> None:
    """Counts its runs, by task id, in ``tests:runs:<tag>``."""
    _client().hincrby(f"tests:runs:{tag}", self.request.id, 1)


@app.task(name="tests.record_token")
def record_token(tag: str, user_token: dict[str, Any], delay: float = 0.0) -> str:
    """A partner's downstream task: opens the token and notes which user it served."""
    from tasks import unseal

    plaintext = unseal(user_token["token"])
    if delay:
        time.sleep(delay)
    client = _client()
    # Store only a digest: the test compares it with the stand-in's token, never the token.
    client.hset(
        f"tests:downstream:{tag}",
        user_token["partner_user_id"],
        hashlib.sha256(plaintext.encode()).hexdigest(),
    )
    note_run(client, tag, user_token["partner_user_id"])
    return user_token["partner_user_id"]


@app.task(bind=True, name="tests.flaky_downstream")
def flaky_downstream(
    self: Any,
    tag: str,
    user_token: dict[str, Any],
    fail: tuple[str, ...] | list[str] = (),
    retry_once: tuple[str, ...] | list[str] = (),
    retry_countdown: float = 1.0,
    ignore: tuple[str, ...] | list[str] = (),
    replace: tuple[str, ...] | list[str] = (),
) -> str:
    """A downstream that fails, retries once, ignores itself or replaces itself, by user.

    Every attempt is counted in ``tests:flaky-attempts:<tag>``; an attempt that
    succeeds adds its user to ``tests:flaky-ok:<tag>``. A replaced user's
    replacement is this task again, without the replacing.
    """
    import redis
    from celery.exceptions import Ignore

    user_id = user_token["partner_user_id"]
    client = redis.Redis.from_url(app.conf.broker_url)
    client.hincrby(f"tests:flaky-attempts:{tag}", user_id, 1)
    if user_id in fail:
        raise RuntimeError(f"downstream refuses {user_id}")
    if user_id in ignore:
        raise Ignore()
    if user_id in replace:
        raise self.replace(flaky_downstream.si(tag, user_token=user_token))
    if user_id in retry_once and self.request.retries == 0:
        raise self.retry(countdown=retry_countdown, max_retries=1)
    client.sadd(f"tests:flaky-ok:{tag}", user_id)
    return user_id


#: The resume deadline of ``tests.waits_past_its_deadline``: a few short resumes.
SHORT_RESUME_DEADLINE = 2.0


@app.task(
    bind=True,
    base=SfoxTask,
    name="tests.waits_past_its_deadline",
    resume_deadline=SHORT_RESUME_DEADLINE,
)
def waits_past_its_deadline(self: Any, tag: str, _resume: dict[str, Any] | None = None) -> None:
    """A package task whose wait never ends: each run goes back to the broker for 0.25 s.

    Counts its runs in ``tests:resumes:<tag>`` (and in its carried state).
    """
    runs = int((_resume or {}).get("runs", 0)) + 1
    _client().incr(f"tests:resumes:{tag}")
    raise Deferred(0.25, "a wait that never ends (tests)", {"runs": runs}, False)
