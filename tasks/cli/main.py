"""The ``sfox-tokens`` command line: mint, nightly, check, unseal, demo, fake-sfox.

Every subcommand has ``--help``, prints errors as one line on stderr, and exits
with a meaningful code: 0 all went well, 1 the job ran but something failed (a
refused user, a failed check, an unreachable broker), 2 bad usage or
configuration. Plaintext tokens reach the terminal only with ``mint --reveal``
and ``unseal``.

Each subcommand is a module of this package whose ``register`` adds its parser and
sets ``func``; :data:`COMMANDS` lists them. What they share is in :mod:`tasks.cli.common`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["COMMANDS", "build_parser", "main"]

from . import check, demo, fake_sfox, mint, nightly, unseal
from .common import (
    EXIT_FAILED,
    EXIT_USAGE,
    Parser,
    UsageError,
    one_line,
)

COMMANDS: tuple[Callable[[Any], None], ...] = (
    mint.register,
    nightly.register,
    check.register,
    unseal.register,
    demo.register,
    fake_sfox.register,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sfox-tokens",
        description="Mint sFOX user auth tokens with Celery, and operate the workers that do it. "
        "Configuration comes from the environment (see the README).",
        epilog="exit codes: 0 ok, 1 the job ran but something failed, 2 bad usage or "
        "configuration. `sfox-tokens COMMAND --help` describes each command.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what the package does (INFO) on stderr"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    for command_parser in sub.choices.values():
        command_parser.set_defaults(parser=command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if hasattr(args, "passthrough"):
        args.passthrough = extra
    elif extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.verbose:
            logging.getLogger("tasks.cli").exception("the command failed")
        return _report(exc)


def _report(exc: Exception) -> int:
    """One line on stderr for ``exc``; the exit code it deserves."""
    from .._exceptions import ConfigurationError, InvalidUserIds, SfoxError

    if isinstance(exc, (UsageError, ConfigurationError, InvalidUserIds)):
        code, text = EXIT_USAGE, one_line(exc)
    elif isinstance(exc, (SfoxError, ConnectionError)):
        code, text = EXIT_FAILED, one_line(exc)
    else:
        # The broker, the backend or the network failed under us (kombu's
        # OperationalError, redis-py's errors, timeouts): say which, in one line.
        code, text = EXIT_FAILED, f"{type(exc).__name__}: {one_line(exc)}"
    print(f"sfox-tokens: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
