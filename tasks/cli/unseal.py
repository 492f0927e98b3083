"""``sfox-tokens unseal``: print the plaintext of sealed tokens read on stdin

Reads sealed tokens on stdin, one a line, and prints each one's plaintext user auth
token on stdout. Needs the workers' seal key (SFOX_TOKEN_SEAL_KEY, or the enterprise key
it is derived from); a token older than SFOX_TOKEN_RESULT_TTL no longer opens.

exit codes: 0 every token opened, 1 one did not (nothing is printed), 2 nothing on stdin
or no seal key
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import (
    EXIT_OK,
    UsageError,
    add_command,
)


def cmd_unseal(args: argparse.Namespace) -> int:
    """Print the plaintext of each sealed token read on stdin, one a line."""
    from .. import app
    from .._exceptions import SealError
    from ..worker.runtime import get_runtime

    if sys.stdin.isatty():
        print("paste sealed tokens, one a line, then Ctrl-D", file=sys.stderr)
    sealed = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if not sealed:
        raise UsageError("no sealed token on stdin: pipe one in (… | sfox-tokens unseal)")
    sealer = get_runtime(app).sealer
    plain = []
    for number, token in enumerate(sealed, 1):
        try:
            plain.append(sealer.unseal(token))
        except SealError as exc:
            where = f"line {number}: " if len(sealed) > 1 else ""
            raise SealError(where + exc.message) from None
    print("\n".join(plain))
    return EXIT_OK


def register(sub: Any) -> None:
    add_command(sub, "unseal", cmd_unseal, __doc__)
