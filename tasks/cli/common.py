"""What every ``sfox-tokens`` command shares: exit codes, reading user IDs, tables, progress."""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Users per mint task when the list is split (never above SFOX_MAX_USER_IDS).
DEFAULT_PER_TASK = 1000
#: Lists longer than this get a progress bar when stderr is a terminal.
PROGRESS_MIN_USERS = 100
#: Seconds ``mint`` waits for the workers' results, by default.
DEFAULT_MINT_TIMEOUT = 600.0
#: Seconds between two looks at the workers' progress.
POLL_INTERVAL = 0.2


class UsageError(Exception):
    """The command line asks for something impossible; exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def mask(token: str) -> str:
    """Enough of a plaintext token to tell two apart, never enough to use one."""
    return "••••" + token[-4:] if len(token) > 12 else "••••"


def print_table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def one_line(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text or type(exc).__name__


class Progress:
    """A progress bar on stderr, redrawn in place; silent when disabled."""

    def __init__(
        self, total: int, *, enabled: bool, stream: TextIO | None = None, label: str = "minting"
    ) -> None:
        self.total = total
        self.enabled = enabled
        self.label = label
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._last = -1

    def update(self, done: int) -> None:
        if not self.enabled or done == self._last:
            return
        self._last = done
        width = 30
        filled = int(width * done / self.total) if self.total else width
        elapsed = time.monotonic() - self.started
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{self.total} users  {elapsed:.1f} s"
        )
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own, without breaking the bar."""
        if self.enabled:
            self.stream.write("\n")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last = -1

    def close(self) -> None:
        if self.enabled and self._last >= 0:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class Outcome:
    """What happened to one user."""

    user_id: str
    outcome: str
    expires: str = "-"
    sealed: str | None = None

    @property
    def minted(self) -> bool:
        return self.sealed is not None


def read_user_ids(args: argparse.Namespace) -> list[str]:
    """User IDs from the command line, or from ``--file`` (``-`` is stdin)."""
    from .._settings import MAX_USER_ID_LENGTH

    if args.user_ids and args.file:
        raise UsageError("give user IDs or --file FILE, not both")
    if not args.file:
        if not args.user_ids:
            raise UsageError("give at least one USER_ID, or --file FILE")
        return list(args.user_ids)
    name = "stdin" if args.file == "-" else args.file
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {name}: {one_line(exc)}") from None
    numbered: list[tuple[int, str]] = []
    if name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if "user_id" not in (reader.fieldnames or []):
            raise UsageError(f"{name}: a CSV file needs a user_id column")
        numbered = [(reader.line_num, (row["user_id"] or "").strip()) for row in reader]
        numbered = [(n, u) for n, u in numbered if u]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            user_id = line.strip()
            if user_id and not user_id.startswith("#"):
                numbered.append((number, user_id))
    for number, user_id in numbered:
        if len(user_id) > MAX_USER_ID_LENGTH:
            raise UsageError(
                f"{name}:{number}: a user ID of {len(user_id)} characters; "
                f"the most is {MAX_USER_ID_LENGTH}"
            )
    if not numbered:
        raise UsageError(f"no user IDs in {name}")
    return [user_id for _, user_id in numbered]


def outcomes_from(result: Mapping[str, Any]) -> Iterator[Outcome]:
    for entry in result["tokens"]:
        yield Outcome(entry["partner_user_id"], "minted", entry["expires"], entry["token"])
    for failed in result["failed"]:
        if failed["status"] is None:
            yield Outcome(failed["user_id"], f"failed: {failed['error']}")
        else:
            yield Outcome(failed["user_id"], f"refused ({failed['status']}: {failed['error']})")


def split_into(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def add_waiting_options(
    parser: argparse.ArgumentParser, *, timeout: float, timeout_help: str, progress_help: str
) -> None:
    """--timeout and --progress, for commands that wait on the workers."""
    parser.add_argument(
        "--timeout", type=float, default=timeout, metavar="SECONDS", help=timeout_help
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help=progress_help
    )


def add_command(
    sub: Any, name: str, func: Callable[[argparse.Namespace], int], doc: str | None, **options: Any
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` running ``func``, its texts read from ``doc``.

    ``doc`` is written like a module docstring: a first line ````sfox-tokens NAME``: the
    one-line help``, then paragraphs of description, and last an ``exit codes:`` paragraph,
    the epilog.
    """
    first, _, rest = (doc or "").strip().partition("\n")
    paragraphs = [" ".join(p.split()) for p in rest.split("\n\n") if p.strip()]
    epilog = paragraphs.pop() if paragraphs and paragraphs[-1].startswith("exit codes:") else None
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=first.partition("``: ")[2],
        description=" ".join(paragraphs) or None,
        epilog=epilog,
        **options,
    )
    parser.set_defaults(func=func)
    return parser
