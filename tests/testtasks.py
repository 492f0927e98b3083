"""Tasks only the tests register in their workers (``--include tests.testtasks``)."""

from __future__ import annotations

from typing import Any

from tasks import app


@app.task(name="tests.echo")
def echo(value: Any) -> Any:
    """Return ``value``: a task with the global result expiry, to compare TTLs."""
    return value


@app.task(name="tests.record_token")
def record_token(tag: str, user_token: dict[str, Any], delay: float = 0.0) -> str:
    """A partner's downstream task: opens the token and notes which user it served."""
    import time

    import redis

    from tasks import unseal

    plaintext = unseal(user_token["token"])
    if delay:
        time.sleep(delay)
    client = redis.Redis.from_url(app.conf.broker_url)
    # Store only a digest: the test compares it with the stand-in's token, never the token.
    import hashlib

    client.hset(
        f"tests:downstream:{tag}",
        user_token["partner_user_id"],
        hashlib.sha256(plaintext.encode()).hexdigest(),
    )
    client.hincrby(f"tests:downstream-calls:{tag}", user_token["partner_user_id"], 1)
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
