"""``sfox-tokens demo``: mint tokens against a local sFOX stand-in and show the outcome

Runs the main job end to end on this machine: a local sFOX stand-in, an embedded broker
and worker (or --broker), a batch with a refused user and transient faults; prints a
table with tokens masked.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    add_command,
    mask,
    print_table,
)

#: Forgets the deadline of every binding table in sorted set KEYS[1] that no longer exists
#: (the table's key is ARGV[1] followed by the exchange's name): the tables a finished
#: worker's queues left are gone, and a consumer's refresh adds table and deadline back.
_FORGET_DEADLINES_OF_GONE_TABLES = """
for _, exchange in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. exchange) == 0 then
    redis.call('ZREM', KEYS[1], exchange)
  end
end
"""


def remove_private_queue(app: Any, queue: str) -> None:
    """Delete the demo's queue and its bindings from the user's broker.

    Celery declares the queue on an exchange of the same name; on Redis, kombu keeps that
    binding in ``_kombu.binding.<queue>`` and ``_kombu.binding_permanent.<queue>`` with no
    TTL, for a queue that nothing will consume again. Deleting the queue removes both.
    """
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        channel: Any = connection.default_channel
        # Declared and bound as Celery did, so the channel knows the bindings to delete.
        channel.exchange_declare(exchange=queue, type="direct", durable=True, auto_delete=False)
        channel.queue_declare(queue=queue, durable=True, auto_delete=False)
        channel.queue_bind(queue=queue, exchange=queue, routing_key=queue)
        channel.queue_delete(queue=queue)
        deadlines = getattr(channel, "keyprefix_binding_deadlines", None)
        if deadlines is not None:  # kombu's Redis transport, 5.7 and later
            prefix = channel.global_keyprefix
            with channel.conn_or_acquire() as client:
                client.eval(
                    _FORGET_DEADLINES_OF_GONE_TABLES,
                    1,
                    prefix + deadlines,
                    prefix + channel.keyprefix_queue % ("",),
                )


@contextmanager
def embedded_worker(app: Any, queue: str, *, concurrency: int = 2) -> Iterator[None]:
    """A worker consuming ``queue`` in this process's threads."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        app,
        pool="threads",
        concurrency=concurrency,
        perform_ping_check=False,
        loglevel="WARNING",
        queues=[queue],
        shutdown_timeout=10.0,
    ):
        yield


def cmd_demo(args: argparse.Namespace) -> int:
    """Mint tokens against a local stand-in, through a real worker, and show the outcome."""
    from .. import app, mint_user_tokens, unseal
    from ..budget.ratelimit import IN_PROCESS_URL
    from ..testing import FakeSfox, Fault
    from ..worker.runtime import reset_runtime
    from .check import safe_url

    if args.users < 2:
        raise UsageError("--users must be at least 2")
    key = "demo-" + secrets.token_hex(16)
    users = [f"client_account_{i}" for i in range(1, args.users + 1)]
    refused = users[len(users) // 2]
    fake = FakeSfox(key, refused=[refused]).start()
    fake.refuse(refused, status=404, message="user not found")
    # A few of the faults sFOX documents, met on the way.
    fake.inject(
        Fault.status(503), Fault.reset(), Fault.status(429, retry_after=1), Fault.drop_user()
    )

    queue = f"sfox-demo-{uuid.uuid4().hex[:8]}"
    settings: dict[str, Any] = {
        "sfox_api_url": fake.url,
        "sfox_enterprise_api_key": key,
        "sfox_token_seal_key": None,
        "sfox_token_batch_size": max(1, args.users // 3),
        "sfox_retry_wait_initial": 0.05,
        "sfox_retry_wait_max": 0.5,
        "task_default_queue": queue,
    }
    # Celery prefers these to the app's configuration: the demo's broker is the one it names.
    os.environ.pop("CELERY_BROKER_URL", None)
    os.environ.pop("CELERY_RESULT_BACKEND", None)
    if args.broker:
        settings.update(broker_url=args.broker, result_backend=args.broker)
        settings["sfox_limiter_url"] = (
            args.broker if args.broker.startswith("redis") else IN_PROCESS_URL
        )
        print(f"broker: {safe_url(args.broker)} (private queue {queue})")
    else:
        # A host in the URL: without one kombu warns, on every connection it clones, that
        # it falls back to 'localhost' (the memory transport ignores the host either way).
        settings.update(
            broker_url="memory://localhost/",
            result_backend="cache+memory://",
            # One process, one embedded worker: its own budget is the only one.
            sfox_limiter_url=IN_PROCESS_URL,
        )
        print("broker: embedded in-process broker and worker (pass --broker URL to use yours)")
    app.conf.update(settings)
    reset_runtime()
    print(f"sFOX stand-in: {fake.url} (refuses {refused}; injects 503, reset, 429, a lost user)")
    print(f"minting tokens for {len(users)} users…\n")

    started = time.monotonic()
    try:
        with embedded_worker(app, queue):
            sent = mint_user_tokens.apply_async((users,), queue=queue)
            result = sent.get(timeout=120)
            sent.forget()  # the tokens are shown below; nothing else will read them
    finally:
        fake.stop()
        if args.broker:
            try:
                remove_private_queue(app, queue)
            except Exception as exc:  # the demo's outcome stands; say what was left
                print(f"could not delete the private queue {queue}: {exc}", file=sys.stderr)
    elapsed = time.monotonic() - started

    rows = []
    for entry in result["tokens"]:
        plain = unseal(entry["token"])
        rows.append(
            (
                entry["partner_user_id"],
                "minted",
                entry["expires"],
                mask(plain),
                entry["token"][:16] + "…",
            )
        )
    for failed in result["failed"]:
        rows.append((failed["user_id"], f"failed ({failed['status']})", "-", "-", failed["error"]))
    order = {user: index for index, user in enumerate(users)}
    rows.sort(key=lambda row: order[row[0]])
    print_table(rows, ("user", "outcome", "expires", "token", "sealed / error"))
    print(
        f"\n{len(result['tokens'])} minted, {len(result['failed'])} failed, "
        f"{fake.count('/v1/enterprise/user-tokens')} requests to sFOX, {elapsed:.1f} s"
    )
    return EXIT_OK if len(result["tokens"]) == len(users) - 1 else EXIT_FAILED


def register(sub: Any) -> None:
    demo = add_command(sub, "demo", cmd_demo, __doc__)
    demo.add_argument("--broker", metavar="URL", help="use this broker (a private queue on it)")
    demo.add_argument("--users", type=int, default=12, help="how many users (default 12)")
