"""``sfox-tokens mint``: mint tokens for users and show who got one

Mints sFOX user auth tokens through the workers (or in this process with --local) and
prints a table of user, expiry and outcome. Tokens are masked unless --reveal is given.
Lists longer than --per-task are split into several mint tasks.

exit codes: 0 every user got a token, 1 some did not (or the workers could not be
reached), 2 bad usage or configuration
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..sealing import Sealer


from .common import (
    DEFAULT_MINT_TIMEOUT,
    DEFAULT_PER_TASK,
    EXIT_FAILED,
    EXIT_OK,
    POLL_INTERVAL,
    PROGRESS_MIN_USERS,
    Outcome,
    Progress,
    UsageError,
    add_command,
    add_waiting_options,
    mask,
    one_line,
    outcomes_from,
    print_table,
    read_user_ids,
    split_into,
)


def mint_on_workers(
    user_ids: list[str],
    *,
    per_task: int,
    queue: str | None,
    timeout: float,
    progress: Progress,
) -> tuple[list[Outcome], int]:
    """Send the mint to the workers, ``per_task`` users a task; outcomes and task count."""
    from .. import app, mint_user_tokens
    from .check import probe_broker

    problem = probe_broker(app.conf.broker_url)
    if problem:
        raise ConnectionError(f"cannot send the mint: the broker {problem}")
    if not app.control.ping(timeout=2.0, limit=1):
        raise ConnectionError(
            "no worker answered a ping on the broker: start `celery -A tasks worker`, "
            "or mint in this process with --local"
        )
    chunks = split_into(user_ids, per_task)
    options: dict[str, Any] = {"queue": queue} if queue else {}
    sent = [(mint_user_tokens.apply_async((chunk,), **options), chunk) for chunk in chunks]
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready = [result.ready() for result, _ in sent]
            progress.update(sum(len(c) for (_, c), r in zip(sent, ready, strict=True) if r))
            if all(ready) or time.monotonic() > deadline:
                break
            time.sleep(POLL_INTERVAL)
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
            outcomes += outcomes_from(result.get(timeout=10))
            result.forget()  # the sealed tokens need not wait out their TTL in the backend
        else:
            error = result.result
            what = f"error: {type(error).__name__}: {one_line(error)}"
            outcomes += [Outcome(u, what) for u in chunk]
    return outcomes, len(sent)


def mint_locally(user_ids: list[str], *, progress: Progress) -> list[Outcome]:
    """Mint in this process, one batch at a time, through the shared limiter."""
    from .. import app
    from .._exceptions import ConfigurationError, SfoxError
    from ..minting import Deferred
    from ..worker.runtime import get_runtime

    runtime = get_runtime(app)
    runtime.settings.require_api_key()
    minter = runtime.minter(turn=False)
    outcomes: list[Outcome] = []
    chunks = split_into(user_ids, runtime.settings.batch_size)
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
        outcomes += outcomes_from(result)
        progress.update(len(outcomes))
    return outcomes


def cmd_mint(args: argparse.Namespace) -> int:
    """Mint tokens for the given users and show a table of user, expiry and outcome."""
    from .. import app
    from .._exceptions import ConfigurationError, SealError
    from ..minting import validate_user_ids
    from ..worker.host import settings_for
    from ..worker.runtime import get_runtime

    user_ids = validate_user_ids(read_user_ids(args), maximum=sys.maxsize)
    settings = settings_for(app)
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
        sealer: Sealer | None = get_runtime(app).sealer
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


def register(sub: Any) -> None:
    mint = add_command(sub, "mint", cmd_mint, __doc__)
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
    add_waiting_options(
        mint,
        timeout=DEFAULT_MINT_TIMEOUT,
        timeout_help=f"give up waiting for the workers after this long "
        f"(default {DEFAULT_MINT_TIMEOUT:g})",
        progress_help=f"progress bar on stderr (default: on for over {PROGRESS_MIN_USERS} users "
        "when stderr is a terminal)",
    )
