"""The ``sfox-tokens`` command line.

Subcommands print one-line errors and exit with meaningful codes:
0 success, 1 the job ran but something failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def mask(token: str) -> str:
    """Enough of a plaintext token to tell two apart, never enough to use one."""
    return "••••" + token[-4:] if len(token) > 12 else "••••"


def print_table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


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
        hostname=f"{queue}@{socket.gethostname()}",
        shutdown_timeout=10.0,
    ):
        yield


def cmd_demo(args: argparse.Namespace) -> int:
    """Mint tokens against a local stand-in, through a real worker, and show the outcome."""
    from tasks import app, mint_user_tokens, unseal
    from tasks._runtime import reset_runtime
    from tasks.fake_sfox import FakeSfox, Fault

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
    if args.broker:
        settings.update(broker_url=args.broker, result_backend=args.broker)
        settings["sfox_limiter_url"] = args.broker if args.broker.startswith("redis") else None
        print(f"broker: {_safe_url(args.broker)} (private queue {queue})")
    else:
        settings.update(
            broker_url="memory://", result_backend="cache+memory://", sfox_limiter_url=None
        )
        os.environ.pop("CELERY_BROKER_URL", None)
        os.environ.pop("CELERY_RESULT_BACKEND", None)
        print("broker: embedded in-process broker and worker (pass --broker URL to use yours)")
    app.conf.update(settings)
    reset_runtime()
    print(f"sFOX stand-in: {fake.url} (refuses {refused}; injects 503, reset, 429, a lost user)")
    print(f"minting tokens for {len(users)} users…\n")

    started = time.monotonic()
    try:
        with embedded_worker(app, queue):
            result = mint_user_tokens.apply_async((users,), queue=queue).get(timeout=120)
    finally:
        fake.stop()
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


def _safe_url(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfox-tokens",
        description="Mint sFOX user auth tokens with Celery, and operate the workers that do it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="mint tokens against a local sFOX stand-in and show the outcome",
        description="Runs the main job end to end on this machine: a local sFOX stand-in, "
        "an embedded broker and worker (or --broker), a batch with a refused user and "
        "transient faults; prints a table with tokens masked.",
    )
    demo.add_argument("--broker", metavar="URL", help="use this broker (a private queue on it)")
    demo.add_argument("--users", type=int, default=12, help="how many users (default 12)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tasks._exceptions import SfoxError

    try:
        return int(args.func(args))
    except SfoxError as exc:
        print(f"sfox-tokens: {exc.message}", file=sys.stderr)
        return EXIT_USAGE if type(exc).__name__ == "ConfigurationError" else EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
