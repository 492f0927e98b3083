"""``sfox-tokens fake-sfox``: serve the sFOX stand-in (tasks.testing)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_fake_sfox(args: argparse.Namespace) -> int:
    """Serve the sFOX stand-in; its own parser takes every argument after the subcommand."""
    from ..testing.__main__ import main as serve_stand_in

    return serve_stand_in(args.passthrough, prog="sfox-tokens fake-sfox")


def register(sub: Any) -> None:
    fake = sub.add_parser(
        "fake-sfox",
        help="serve the local sFOX stand-in with its fault switches (see fake-sfox --help)",
        add_help=False,
    )
    fake.set_defaults(func=cmd_fake_sfox, passthrough=[])


#: The subcommands, in the order ``--help`` lists them.
