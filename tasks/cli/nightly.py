"""``sfox-tokens nightly``: run the nightly orders now and show the summary

Sends sfox.run_nightly_orders to the workers for --date (default today, UTC), shows its
progress, then its summary. A second run for a date that already ran, or is running,
does nothing and says so. The orders file must be readable by the workers at the same
path.

exit codes: 0 every order placed (or the run was already done), 1 some orders failed or
rows were skipped, 2 bad usage or configuration
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    POLL_INTERVAL,
    Progress,
    UsageError,
    add_command,
    add_waiting_options,
    print_table,
)


def cmd_nightly(args: argparse.Namespace) -> int:
    """Trigger the nightly run now, show its progress, then its summary."""
    from datetime import date, datetime, timezone

    from .. import run_nightly_orders

    if args.date:
        try:
            day = date.fromisoformat(args.date)
        except ValueError:
            raise UsageError(f"--date {args.date!r} is not a date of the form YYYY-MM-DD") from None
    else:
        day = datetime.now(timezone.utc).date()
    kwargs: dict[str, Any] = {"run_date": day.isoformat()}
    if args.orders:
        path = Path(args.orders)
        if not path.is_file():
            raise UsageError(f"--orders {args.orders!r} is not a readable file")
        # The workers read the file: give them a path that does not depend on our directory.
        kwargs["orders_file"] = str(path.resolve())
    if args.timeout <= 0:
        raise UsageError("--timeout must be greater than 0")
    options: dict[str, Any] = {}
    if args.queue:
        options["queue"] = args.queue
    result = run_nightly_orders.apply_async(kwargs=kwargs, **options)
    print(f"nightly run for {day}: task {result.id}", file=sys.stderr)
    progress: Progress | None = None
    deadline = time.monotonic() + args.timeout
    try:
        while not result.ready():
            if time.monotonic() > deadline:
                raise UsageError(
                    f"no summary after {args.timeout:g} s; the run goes on: "
                    f"celery -A tasks result {result.id}"
                )
            info = result.info if result.state == "PROGRESS" else None
            if isinstance(info, dict) and info.get("total"):
                if progress is None:
                    progress = Progress(
                        int(info["total"]),
                        enabled=args.progress if args.progress is not None else sys.stderr.isatty(),
                        label="placing",
                    )
                progress.update(int(info.get("done", 0)))
            time.sleep(POLL_INTERVAL)
    finally:
        if progress is not None:
            progress.close()
    summary = result.get(timeout=30)
    return print_nightly(summary)


def print_nightly(summary: Mapping[str, Any]) -> int:
    """The run's summary for a human; the exit code it deserves."""
    if summary.get("status") == "skipped":
        print(f"nightly run for {summary['run_date']}: skipped: {summary['reason']}")
        return EXIT_OK
    rows = [
        ("users", str(summary["users"])),
        ("orders", str(summary["orders"])),
        ("tokens minted", f"{summary['tokens_minted']} ({summary['remints']} re-minted)"),
        ("placed", str(summary["placed"])),
        ("already placed", str(summary["already_placed"])),
        ("failed", str(summary["failed_orders"])),
        ("rows skipped", str(len(summary["skipped_rows"]))),
    ]
    print(
        f"nightly run for {summary['run_date']}: {summary['status']}, {summary.get('duration_s')} s"
    )
    print_table(rows, ("", "count"))
    for reason, failure in summary["failed"].items():
        ids = failure["user_ids"]
        shown = ", ".join(ids[:10]) + (
            f", … +{failure['count'] - 10}" if failure["count"] > 10 else ""
        )
        print(f"failed ({failure['count']}): {reason}: {shown}")
    for row in summary["skipped_rows"]:
        print(f"skipped line {row['line']}: {row['error']}")
    clean = not summary["failed_orders"] and not summary["skipped_rows"]
    return EXIT_OK if clean else EXIT_FAILED


def register(sub: Any) -> None:
    nightly = add_command(sub, "nightly", cmd_nightly, __doc__)
    nightly.add_argument(
        "--date", metavar="YYYY-MM-DD", help="the run's date (default: today, UTC)"
    )
    nightly.add_argument(
        "--orders", metavar="FILE", help="orders file (default: SFOX_NIGHTLY_ORDERS_FILE/SOURCE)"
    )
    nightly.add_argument("--queue", metavar="QUEUE", help="send the run to this queue")
    add_waiting_options(
        nightly,
        timeout=6 * 3600.0,
        timeout_help="stop waiting after this long (the run goes on); default 6 h",
        progress_help="progress bar on stderr (default: on when stderr is a terminal)",
    )
