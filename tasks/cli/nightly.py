"""``sfox-tokens nightly``: run the nightly orders now, show where a date's run stands, resume it

Sends sfox.run_nightly_orders to the workers for --date (default today, UTC), shows its
progress, then its summary. A date whose run finished is skipped, one whose coordinator
is at work is left to it, and one whose run failed or stalled is resumed where it stands:
no order is placed twice. The orders file must be readable by the workers at the same
path.

--state shows the date's run from its records, one fact a line (owner, lease, orders
staged, users done, outcomes, the summary once finished), and sends nothing. --resume
goes on with a run that stalled (claimed, unfinished, no live coordinator) and starts
none that never began.

exit codes: 0 every order placed, the run was done or under way already, or the state
was shown; 1 some orders failed, rows were skipped, or the run is unfinished; 2 bad usage
or configuration (no orders configured, or nothing to resume)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    POLL_INTERVAL,
    Progress,
    UsageError,
    add_command,
    add_waiting_options,
    print_table,
)

#: Exit code of each status a trigger returns instead of a summary.
_VERDICT_EXIT = {
    "skipped": EXIT_OK,
    "under_way": EXIT_OK,
    "handed_over": EXIT_OK,
    "not_configured": EXIT_USAGE,
    "unfinished": EXIT_FAILED,
    "lost": EXIT_FAILED,
}

#: How ``--state`` names each phase of a run.
_PHASES = {
    "finished": "finished",
    "under_way": "under way",
    "stalled": "stalled: no live coordinator; a trigger (or --resume) goes on with it",
    "not_started": "not started",
}


def cmd_nightly(args: argparse.Namespace) -> int:
    """Trigger, show or resume the date's run."""
    day = _run_date(args.date)
    if args.timeout <= 0:
        raise UsageError("--timeout must be greater than 0")
    orders_file: str | None = None
    if args.orders:
        path = Path(args.orders)
        if not path.is_file():
            raise UsageError(f"--orders {args.orders!r} is not a readable file")
        # The workers read the file: give them a path that does not depend on our directory.
        orders_file = str(path.resolve())
    if args.state:
        return show_state(day)
    if args.resume:
        resumable, recorded_file = _resumable(day)
        if not resumable:
            return EXIT_OK
        orders_file = orders_file or recorded_file
    return _trigger(day, orders_file, args)


def _run_date(text: str | None) -> date:
    if not text:
        return datetime.now(timezone.utc).date()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--date {text!r} is not a date of the form YYYY-MM-DD") from None


def _trigger(day: date, orders_file: str | None, args: argparse.Namespace) -> int:
    """Send the run for ``day``, follow its progress, print what it returned."""
    from .. import run_nightly_orders

    kwargs: dict[str, Any] = {"run_date": day.isoformat()}
    if orders_file:
        kwargs["orders_file"] = orders_file
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


def _resumable(day: date) -> tuple[bool, str | None]:
    """Whether the run for ``day`` stalled (else say why not), and the orders file it named."""
    from ..nightly.tasks import run_state

    books = run_state(day).books
    if books.phase == "not_started":
        raise UsageError(
            f"nothing to resume: no run for {day} began; start one with "
            f"sfox-tokens nightly --date {day}"
        )
    if books.phase == "stalled":
        print(f"nightly run for {day}: stalled; resuming it", file=sys.stderr)
        return True, books.orders_file
    owner = f" (task {books.owner})" if books.owner else ""
    print(f"nightly run for {day}: {_PHASES[books.phase]}{owner}: nothing to resume")
    return False, None


def show_state(day: date) -> int:
    """Print where the run for ``day`` stands, one fact a line."""
    from ..nightly.tasks import run_state

    state = run_state(day)
    books = state.books
    print(f"nightly run for {day}: {_PHASES[books.phase]}")
    if books.phase == "not_started":
        if state.lost:
            print(f"records lost (evicted): {', '.join(state.lost)}")
            return EXIT_FAILED
        return EXIT_OK
    lease = f"live, {books.lease_left:.1f} s left" if books.lease_left > 0 else "none"
    facts = [
        ("owner", f"task {books.owner}" if books.owner else "none"),
        ("lease", lease),
        ("started", _when(books.started)),
        ("orders file", books.orders_file or "as configured"),
        ("orders staged", f"{books.orders} for {books.users} users" if books.staged else "no"),
        ("rows skipped", str(books.skipped_rows)),
    ]
    if state.progress is None:
        facts.append(("fan-out", "not started"))
    else:
        progress = state.progress
        facts.append(("order tasks sent", f"{progress.dispatched} of {books.users} users"))
        facts.append(("users done", f"{progress.done} of {books.users}"))
        facts.append(("users refused a token", str(progress.failed)))
    outcomes = books.outcomes
    facts += [
        ("placed", str(outcomes.get("placed", 0))),
        ("already placed", str(outcomes.get("already_placed", 0))),
        ("failed", str(outcomes.get("failed", 0))),
    ]
    if state.lost:
        facts.append(("records lost (evicted)", ", ".join(state.lost)))
    for name, value in facts:
        print(f"{name}: {value}")
    if books.summary is not None:
        print_nightly(books.summary)
    return EXIT_FAILED if state.lost else EXIT_OK


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_nightly(summary: Mapping[str, Any]) -> int:
    """The run's summary (or what the trigger found) for a human; the exit code it deserves."""
    status = str(summary.get("status"))
    if status in _VERDICT_EXIT:
        print(f"nightly run for {summary['run_date']}: {status}: {summary['reason']}")
        return _VERDICT_EXIT[status]
    rows = [
        ("users", str(summary["users"])),
        ("orders", str(summary["orders"])),
        ("tokens minted", f"{summary['tokens_minted']} ({summary['remints']} re-minted)"),
        ("placed", str(summary["placed"])),
        ("already placed", str(summary["already_placed"])),
        ("failed", str(summary["failed_orders"])),
        ("rows skipped", str(len(summary["skipped_rows"]))),
    ]
    print(f"nightly run for {summary['run_date']}: {status}, {summary.get('duration_s')} s")
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
    what = nightly.add_mutually_exclusive_group()
    what.add_argument(
        "--state",
        action="store_true",
        help="show where the date's run stands, from its records; send nothing",
    )
    what.add_argument(
        "--resume",
        action="store_true",
        help="go on with the date's run if it stalled; start none that never began",
    )
    add_waiting_options(
        nightly,
        timeout=6 * 3600.0,
        timeout_help="stop waiting after this long (the run goes on); default 6 h",
        progress_help="progress bar on stderr (default: on when stderr is a terminal)",
    )
