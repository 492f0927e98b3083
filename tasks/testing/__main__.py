"""``python -m tasks.testing``: serve the sFOX stand-in until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .faults import (
    _RATE_LIMIT_PER,
)
from .server import FakeSfox

# CLI
# --------------------------------------------------------------------------------------------


def _default_api_key() -> str:
    return (
        os.environ.get("SFOX_ENTERPRISE_API_KEY")
        or os.environ.get("ENTERPRISE_API_KEY")
        or "fake-enterprise-key"
    )


def build_parser(prog: str = "python -m tasks.testing") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a fake sFOX API (user tokens, orders) with fault injection.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 in a container)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8900,
        help="port to listen on (default: 8900; 0 picks a free one)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="enterprise key to accept (default: $SFOX_ENTERPRISE_API_KEY, "
        "$ENTERPRISE_API_KEY, else 'fake-enterprise-key')",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--rate-limit", type=int, default=None, help="requests per window per IP")
    parser.add_argument(
        "--rate-window",
        type=float,
        default=10.0,
        help="seconds of the window --rate-limit counts requests in (default: 10)",
    )
    parser.add_argument(
        "--rate-penalty",
        type=float,
        default=60.0,
        help="seconds every request gets 429 after the limit is exceeded (default: 60)",
    )
    parser.add_argument(
        "--rate-limit-per", choices=sorted(_RATE_LIMIT_PER), default="address",
        help="count the rate limit per client address, as sFOX does (default), or for the "
        "whole server, as if every client sat behind one NAT",
    )  # fmt: skip
    parser.add_argument(
        "--retry-after", action="store_true", help="send Retry-After on rate-limit 429s"
    )
    parser.add_argument("--no-shuffle", action="store_true", help="keep token response order")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="a token request for more than N users answers 400 (default: no limit)",
    )
    parser.add_argument(
        "--token-ttl",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="lifetime of the tokens it issues (default: 86400, a day)",
    )
    parser.add_argument(
        "--refuse", action="extend", nargs="+", default=[], metavar="USER_ID",
        help="user ids whose token requests get 404 user not found",
    )  # fmt: skip
    parser.add_argument(
        "--fail-every", type=int, default=None, metavar="N",
        help="every Nth token request answers 503",
    )  # fmt: skip
    parser.add_argument(
        "--allow-remote-control",
        action="store_true",
        help="accept /_fake/ control requests from non-loopback clients (docker networks)",
    )
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    return parser


#: Options passed to :class:`FakeSfox` under their own names.
_SAME_NAMES = (
    "latency",
    "rate_limit",
    "rate_window",
    "rate_penalty",
    "rate_limit_per",
    "max_batch",
    "token_ttl",
    "fail_every",
    "allow_remote_control",
    "verbose",
)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the fake until SIGINT/SIGTERM (``prog`` names the command in its help)."""
    args = (build_parser(prog) if prog else build_parser()).parse_args(argv)
    try:
        fake = FakeSfox(
            args.api_key or _default_api_key(),
            args.host,
            args.port,
            **{name: getattr(args, name) for name in _SAME_NAMES},
            retry_after_on_limit=args.retry_after,
            shuffle=not args.no_shuffle,
            refused=args.refuse,
        )
    except ValueError as exc:
        print(f"fake_sfox: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    fake.start()
    print(f"fake sFOX listening on http://{args.host}:{fake.port}", flush=True)
    try:
        stop.wait()
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
