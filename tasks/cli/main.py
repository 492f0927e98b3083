"""The ``sfox-tokens`` command line: mint, nightly, check, unseal, demo, fake-sfox.

Every subcommand has ``--help``, prints errors as one line on stderr, and exits
with a meaningful code: 0 all went well, 1 the job ran but something failed (a
refused user, a failed check, an unreachable broker), 2 bad usage or
configuration. Plaintext tokens reach the terminal only with ``mint --reveal``
and ``unseal``.

Subcommands register themselves through :data:`COMMANDS`: each entry adds its
parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

if TYPE_CHECKING:
    from tasks.sealing import Sealer

__all__ = ["COMMANDS", "build_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Users per mint task when the list is split (never above SFOX_MAX_USER_IDS).
DEFAULT_PER_TASK = 1000
#: Lists longer than this get a progress bar when stderr is a terminal.
PROGRESS_MIN_USERS = 100
#: Seconds ``mint`` waits for the workers' results, by default.
DEFAULT_MINT_TIMEOUT = 600.0
#: Seconds between two looks at the workers' progress.
_POLL_INTERVAL = 0.2


class UsageError(Exception):
    """The command line asks for something impossible; exit 2."""


class _Parser(argparse.ArgumentParser):
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text or type(exc).__name__


# -- mint ---------------------------------------------------------------------------


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
    from tasks._settings import MAX_USER_ID_LENGTH

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
        raise UsageError(f"cannot read {name}: {_one_line(exc)}") from None
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


def _outcomes_from(result: Mapping[str, Any]) -> Iterator[Outcome]:
    for entry in result["tokens"]:
        yield Outcome(entry["partner_user_id"], "minted", entry["expires"], entry["token"])
    for failed in result["failed"]:
        if failed["status"] is None:
            yield Outcome(failed["user_id"], f"failed: {failed['error']}")
        else:
            yield Outcome(failed["user_id"], f"refused ({failed['status']}: {failed['error']})")


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def mint_on_workers(
    user_ids: list[str],
    *,
    per_task: int,
    queue: str | None,
    timeout: float,
    progress: Progress,
) -> tuple[list[Outcome], int]:
    """Send the mint to the workers, ``per_task`` users a task; outcomes and task count."""
    from tasks import app, mint_user_tokens
    from tasks.cli.check import probe_broker

    problem = probe_broker(app.conf.broker_url)
    if problem:
        raise ConnectionError(f"cannot send the mint: the broker {problem}")
    if not app.control.ping(timeout=2.0, limit=1):
        raise ConnectionError(
            "no worker answered a ping on the broker: start `celery -A tasks worker`, "
            "or mint in this process with --local"
        )
    chunks = _chunks(user_ids, per_task)
    options: dict[str, Any] = {"queue": queue} if queue else {}
    sent = [(mint_user_tokens.apply_async((chunk,), **options), chunk) for chunk in chunks]
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready = [result.ready() for result, _ in sent]
            progress.update(sum(len(c) for (_, c), r in zip(sent, ready, strict=True) if r))
            if all(ready) or time.monotonic() > deadline:
                break
            time.sleep(_POLL_INTERVAL)
    except KeyboardInterrupt:
        for result, _ in sent:
            if not result.ready():
                result.revoke()
        raise
    outcomes: list[Outcome] = []
    for result, chunk in sent:
        if not result.ready():
            result.revoke()
            outcomes += [
                Outcome(u, f"no result within {timeout:g} s (task revoked)") for u in chunk
            ]
        elif result.successful():
            outcomes += _outcomes_from(result.get(timeout=10))
            result.forget()  # the sealed tokens need not wait out their TTL in the backend
        else:
            error = result.result
            what = f"error: {type(error).__name__}: {_one_line(error)}"
            outcomes += [Outcome(u, what) for u in chunk]
    return outcomes, len(sent)


def mint_locally(user_ids: list[str], *, progress: Progress) -> list[Outcome]:
    """Mint in this process, one batch at a time, through the shared limiter."""
    from tasks import app
    from tasks._exceptions import ConfigurationError, SfoxError
    from tasks.minting import Deferred
    from tasks.worker.runtime import get_runtime

    runtime = get_runtime(app.conf)
    runtime.settings.require_api_key()
    minter = runtime.minter(turn=False)
    outcomes: list[Outcome] = []
    chunks = _chunks(user_ids, runtime.settings.batch_size)
    for index, chunk in enumerate(chunks):
        state: dict[str, Any] | None = None
        while True:
            try:
                result = minter.mint(chunk, state)
                break
            except Deferred as deferred:
                progress.note(f"waiting {deferred.countdown:.1f} s: {deferred.reason}")
                time.sleep(deferred.countdown)
                state = deferred.state
            except ConfigurationError:
                raise
            except SfoxError as exc:
                rest = [u for c in chunks[index:] for u in c]
                outcomes += [
                    Outcome(u, f"error: {type(exc).__name__}: {exc.message}") for u in rest
                ]
                return outcomes
        outcomes += _outcomes_from(result)
        progress.update(len(outcomes))
    return outcomes


def cmd_mint(args: argparse.Namespace) -> int:
    """Mint tokens for the given users and show a table of user, expiry and outcome."""
    from tasks import app
    from tasks._exceptions import ConfigurationError, SealError
    from tasks._settings import Settings
    from tasks.minting import validate_user_ids
    from tasks.worker.runtime import get_runtime

    user_ids = validate_user_ids(read_user_ids(args), maximum=sys.maxsize)
    settings = Settings.from_conf(app.conf)
    per_task = (
        args.per_task if args.per_task is not None else min(DEFAULT_PER_TASK, settings.max_user_ids)
    )
    if not 1 <= per_task <= settings.max_user_ids:
        raise UsageError(
            f"--per-task must be between 1 and {settings.max_user_ids} (SFOX_MAX_USER_IDS)"
        )
    if args.timeout <= 0:
        raise UsageError("--timeout must be greater than 0")
    show_progress = (
        args.progress
        if args.progress is not None
        else sys.stderr.isatty() and len(user_ids) > PROGRESS_MIN_USERS
    )
    # Masks need the seal key, --reveal cannot do without it: know before minting anything.
    try:
        sealer: Sealer | None = get_runtime(app.conf).sealer
    except ConfigurationError:
        if args.reveal:
            raise
        sealer = None
    progress = Progress(len(user_ids), enabled=show_progress)
    started = time.monotonic()
    try:
        if args.local:
            outcomes, how = mint_locally(user_ids, progress=progress), "in this process"
        else:
            outcomes, tasks = mint_on_workers(
                user_ids,
                per_task=per_task,
                queue=args.queue,
                timeout=args.timeout,
                progress=progress,
            )
            how = f"{tasks} task{'s' if tasks != 1 else ''} on the workers"
    finally:
        progress.close()
    elapsed = time.monotonic() - started

    order = {user_id: index for index, user_id in enumerate(user_ids)}
    rows = []
    for outcome in sorted(outcomes, key=lambda o: order.get(o.user_id, len(order))):
        shown = "-"
        if outcome.sealed is not None:
            try:
                plain = sealer.unseal(outcome.sealed) if sealer else None
            except SealError:
                if args.reveal:
                    raise
                plain = None
            shown = "(sealed)" if plain is None else plain if args.reveal else mask(plain)
        rows.append((outcome.user_id, outcome.expires, outcome.outcome, shown))
    if args.reveal:
        print(
            "sfox-tokens: plaintext tokens below: use them now, do not store them", file=sys.stderr
        )
    print_table(rows, ("user", "expires", "outcome", "token"))
    minted = sum(o.minted for o in outcomes)
    print(
        f"\n{minted} minted, {len(user_ids) - minted} not, of {len(user_ids)} "
        f"user{'s' if len(user_ids) != 1 else ''}; {how}, {elapsed:.1f} s"
    )
    return EXIT_OK if minted == len(user_ids) else EXIT_FAILED


def _add_mint(sub: Any) -> None:
    mint = sub.add_parser(
        "mint",
        help="mint tokens for users and show who got one",
        description="Mints sFOX user auth tokens through the workers (or in this process with "
        "--local) and prints a table of user, expiry and outcome. Tokens are masked unless "
        "--reveal is given. Lists longer than --per-task are split into several mint tasks.",
        epilog="exit codes: 0 every user got a token, 1 some did not (or the workers could not "
        "be reached), 2 bad usage or configuration",
    )
    mint.add_argument("user_ids", nargs="*", metavar="USER_ID", help="user IDs to mint for")
    mint.add_argument(
        "--file",
        metavar="FILE",
        help="read user IDs from FILE, one a line ('#' comments allowed), or from a CSV "
        "file's user_id column (*.csv); '-' reads stdin",
    )
    mint.add_argument(
        "--local", action="store_true", help="mint in this process instead of on the workers"
    )
    mint.add_argument(
        "--reveal", action="store_true", help="print plaintext tokens (default: masked)"
    )
    mint.add_argument("--queue", metavar="QUEUE", help="send the mint tasks to this queue")
    mint.add_argument(
        "--per-task",
        type=int,
        metavar="N",
        help=f"users per mint task (default {DEFAULT_PER_TASK}, at most SFOX_MAX_USER_IDS)",
    )
    _add_waiting(
        mint,
        timeout=DEFAULT_MINT_TIMEOUT,
        timeout_help=f"give up waiting for the workers after this long "
        f"(default {DEFAULT_MINT_TIMEOUT:g})",
        progress_help=f"progress bar on stderr (default: on for over {PROGRESS_MIN_USERS} users "
        "when stderr is a terminal)",
    )
    mint.set_defaults(func=cmd_mint)


def _add_waiting(
    parser: argparse.ArgumentParser, *, timeout: float, timeout_help: str, progress_help: str
) -> None:
    """--timeout and --progress, for commands that wait on the workers."""
    parser.add_argument(
        "--timeout", type=float, default=timeout, metavar="SECONDS", help=timeout_help
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help=progress_help
    )


# -- nightly ------------------------------------------------------------------------


def cmd_nightly(args: argparse.Namespace) -> int:
    """Trigger the nightly run now, show its progress, then its summary."""
    from datetime import date, datetime, timezone

    from tasks import run_nightly_orders

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
            time.sleep(_POLL_INTERVAL)
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


def _add_nightly(sub: Any) -> None:
    nightly = sub.add_parser(
        "nightly",
        help="run the nightly orders now and show the summary",
        description="Sends sfox.run_nightly_orders to the workers for --date (default today, "
        "UTC), shows its progress, then its summary. A second run for a date that already "
        "ran, or is running, does nothing and says so. The orders file must be readable by "
        "the workers at the same path.",
        epilog="exit codes: 0 every order placed (or the run was already done), 1 some orders "
        "failed or rows were skipped, 2 bad usage or configuration",
    )
    nightly.add_argument(
        "--date", metavar="YYYY-MM-DD", help="the run's date (default: today, UTC)"
    )
    nightly.add_argument(
        "--orders", metavar="FILE", help="orders file (default: SFOX_NIGHTLY_ORDERS_FILE/SOURCE)"
    )
    nightly.add_argument("--queue", metavar="QUEUE", help="send the run to this queue")
    _add_waiting(
        nightly,
        timeout=6 * 3600.0,
        timeout_help="stop waiting after this long (the run goes on); default 6 h",
        progress_help="progress bar on stderr (default: on when stderr is a terminal)",
    )
    nightly.set_defaults(func=cmd_nightly)


# -- check --------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Check the configuration, one line per check; exit 1 if any fails."""
    from tasks import app
    from tasks.cli.check import run_checks

    if args.timeout <= 0:
        raise UsageError("--timeout must be greater than 0")
    failed = total = 0
    for check in run_checks(app.conf, timeout=args.timeout):
        print(check.line(), flush=True)
        total += 1
        failed += check.ok is False
    print(
        f"\n{total - failed} of {total} checks passed" if failed else f"\nall {total} checks passed"
    )
    return EXIT_FAILED if failed else EXIT_OK


def _add_check(sub: Any) -> None:
    from tasks.cli.check import DEFAULT_CHECK_TIMEOUT

    check = sub.add_parser(
        "check",
        help="check the configuration: broker, backend, key, sFOX, seal key, rate limit",
        description="Checks the configuration this host would run with, one line each: the "
        "settings parse, the broker and result backend answer, the enterprise key is set "
        "(never printed), sFOX answers an unauthenticated HEAD of its base URL (no key sent, "
        "nothing minted; any status but 502, 503 or 504 means reachable), the seal key seals "
        "and opens, the rate limit parses and its Redis answers.",
        epilog="exit codes: 0 all checks passed, 1 a check failed, 2 bad usage",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CHECK_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for any one answer (default {DEFAULT_CHECK_TIMEOUT:g})",
    )
    check.set_defaults(func=cmd_check)


# -- unseal -------------------------------------------------------------------------


def cmd_unseal(args: argparse.Namespace) -> int:
    """Print the plaintext of each sealed token read on stdin, one a line."""
    from tasks import app
    from tasks._exceptions import SealError
    from tasks.worker.runtime import get_runtime

    if sys.stdin.isatty():
        print("paste sealed tokens, one a line, then Ctrl-D", file=sys.stderr)
    sealed = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if not sealed:
        raise UsageError("no sealed token on stdin: pipe one in (… | sfox-tokens unseal)")
    sealer = get_runtime(app.conf).sealer
    plain = []
    for number, token in enumerate(sealed, 1):
        try:
            plain.append(sealer.unseal(token))
        except SealError as exc:
            where = f"line {number}: " if len(sealed) > 1 else ""
            raise SealError(where + exc.message) from None
    print("\n".join(plain))
    return EXIT_OK


def _add_unseal(sub: Any) -> None:
    unseal = sub.add_parser(
        "unseal",
        help="print the plaintext of sealed tokens read on stdin",
        description="Reads sealed tokens on stdin, one a line, and prints each one's plaintext "
        "user auth token on stdout. Needs the workers' seal key (SFOX_TOKEN_SEAL_KEY, or "
        "the enterprise key it is derived from); a token older than SFOX_TOKEN_RESULT_TTL "
        "no longer opens.",
        epilog="exit codes: 0 every token opened, 1 one did not (nothing is printed), "
        "2 nothing on stdin or no seal key",
    )
    unseal.set_defaults(func=cmd_unseal)


# -- demo ---------------------------------------------------------------------------


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
    from tasks import app, mint_user_tokens, unseal
    from tasks.cli.check import safe_url
    from tasks.testing import FakeSfox, Fault
    from tasks.worker.runtime import reset_runtime

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
    if args.broker:
        settings.update(broker_url=args.broker, result_backend=args.broker)
        settings["sfox_limiter_backend"] = args.broker if args.broker.startswith("redis") else None
        print(f"broker: {safe_url(args.broker)} (private queue {queue})")
    else:
        # A host in the URL: without one kombu warns, on every connection it clones, that
        # it falls back to 'localhost' (the memory transport ignores the host either way).
        settings.update(
            broker_url="memory://localhost/",
            result_backend="cache+memory://",
            sfox_limiter_backend=None,
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


def _add_demo(sub: Any) -> None:
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


# -- fake-sfox ----------------------------------------------------------------------


def cmd_fake_sfox(args: argparse.Namespace) -> int:
    """Serve the sFOX stand-in; its own parser takes every argument after the subcommand."""
    from tasks.testing.__main__ import main as serve_stand_in

    return serve_stand_in(args.passthrough, prog="sfox-tokens fake-sfox")


def _add_fake_sfox(sub: Any) -> None:
    fake = sub.add_parser(
        "fake-sfox",
        help="serve the local sFOX stand-in with its fault switches (see fake-sfox --help)",
        add_help=False,
    )
    fake.set_defaults(func=cmd_fake_sfox, passthrough=[])


#: The subcommands, in the order ``--help`` lists them.
COMMANDS: tuple[Callable[[Any], None], ...] = (
    _add_mint,
    _add_nightly,
    _add_check,
    _add_unseal,
    _add_demo,
    _add_fake_sfox,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sfox-tokens",
        description="Mint sFOX user auth tokens with Celery, and operate the workers that do it. "
        "Configuration comes from the environment (see the README).",
        epilog="exit codes: 0 ok, 1 the job ran but something failed, 2 bad usage or "
        "configuration. `sfox-tokens COMMAND --help` describes each command.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what the package does (INFO) on stderr"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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
    from tasks._exceptions import ConfigurationError, InvalidUserIds, SfoxError

    if isinstance(exc, (UsageError, ConfigurationError, InvalidUserIds)):
        code, text = EXIT_USAGE, _one_line(exc)
    elif isinstance(exc, (SfoxError, ConnectionError)):
        code, text = EXIT_FAILED, _one_line(exc)
    else:
        # The broker, the backend or the network failed under us (kombu's
        # OperationalError, redis-py's errors, timeouts): say which, in one line.
        code, text = EXIT_FAILED, f"{type(exc).__name__}: {_one_line(exc)}"
    print(f"sfox-tokens: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
