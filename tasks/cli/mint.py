"""``sfox-tokens mint``: mint tokens for users and show who got one

Mints sFOX user auth tokens through the workers (or in this process with --local) and
prints a table of user, expiry and outcome. Tokens are masked unless --reveal is given.
Lists longer than --per-task are split into several mint tasks.

With --local it names the rate limiter's Redis it shares with the workers (or
SFOX_LIMITER_URL=memory:// for this process's own budget) and stops within seconds if that
Redis does not answer. A failure that stops the whole mint (sFOX out of reach, a setting
missing on the workers) is said once, in one line on stderr. Without the seal key on this
host minted tokens show as "(sealed)", with one line saying why; the exit code is still 0.

exit codes: 0 every user got a token, 1 some did not (or sFOX, the limiter's Redis or the
workers could not be reached), 2 bad usage or configuration (a setting missing here or on
the workers)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from ..sealing import Sealer


from .check import one_line as check_one_line
from .check import safe_url
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

#: Seconds ``mint --local`` waits for the rate limiter's Redis to answer before giving up.
LIMITER_PROBE_TIMEOUT = 3.0
#: The outcome of a user a whole-mint failure left without a token (the failure is said once).
NOT_MINTED = "not minted (see the error below)"
_GAVE_UP = re.compile(r" after (\d+) failed attempts \([^)]*\); last failure: (.+)$")


def describe_failure(exc: BaseException, elapsed: float | None = None) -> str:
    """One line for a failure that stopped a whole mint (sFOX out of reach, retries spent).

    ``gave up ... after 8 failed attempts (...); last failure: cannot reach sFOX at URL
    (connection refused)`` reads ``cannot reach sFOX at URL (connection refused) after 8
    attempts in 16.9 s``.
    """
    text = one_line(exc)
    found = _GAVE_UP.search(text)
    if not found:
        return text
    attempts = int(found.group(1))
    took = f" in {elapsed:.1f} s" if elapsed is not None else ""
    return f"{found.group(2)} after {attempts} attempt{'s' if attempts != 1 else ''}{took}"


def _is_configuration_error(error: object) -> bool:
    from .._exceptions import ConfigurationError

    return isinstance(error, ConfigurationError) or type(error).__name__ == "ConfigurationError"


def _workers_configuration_error(error: object) -> Exception:
    """The workers' configuration error, in one line for this side of the broker."""
    from .._exceptions import ConfigurationError

    text = one_line(error) if isinstance(error, BaseException) else str(error)
    if text.startswith("no sFOX enterprise API key"):
        text = (
            "no sFOX enterprise API key (SFOX_ENTERPRISE_API_KEY, or ENTERPRISE_API_KEY): "
            "set it where the workers start"
        )
    return ConfigurationError(f"the workers cannot mint: {text}; nothing was minted")


def _progress_of(result: Any, size: int) -> tuple[bool, int]:
    """Whether the task is done, and how many of its ``size`` users it reports done."""
    from celery import states

    state = result.state
    if state in states.READY_STATES:
        return True, size
    if state == "PROGRESS":
        info = result.info
        if isinstance(info, dict) and isinstance(info.get("done"), int):
            return False, max(0, min(size, info["done"]))
    return False, 0


def mint_on_workers(
    user_ids: list[str],
    *,
    per_task: int,
    queue: str | None,
    timeout: float,
    progress: Progress,
) -> tuple[list[Outcome], int, list[str]]:
    """Send the mint to the workers, ``per_task`` users a task.

    The outcomes, the task count, and the failures that stopped whole tasks, each said
    once. A configuration error on the workers (a missing key) is raised.
    """
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
    started = time.monotonic()
    sent = [(mint_user_tokens.apply_async((chunk,), **options), chunk) for chunk in chunks]
    deadline = started + timeout
    finished = [False] * len(sent)
    try:
        while True:
            done = 0
            for index, (result, chunk) in enumerate(sent):
                if finished[index]:
                    done += len(chunk)
                    continue
                finished[index], count = _progress_of(result, len(chunk))
                done += count
            progress.update(done)
            if all(finished) or time.monotonic() > deadline:
                break
            time.sleep(POLL_INTERVAL)
    except KeyboardInterrupt:
        for result, _ in sent:
            if not result.ready():
                result.revoke()
        raise
    elapsed = time.monotonic() - started
    outcomes: list[Outcome] = []
    failures: list[str] = []
    late = 0
    for result, chunk in sent:
        if not result.ready():
            result.revoke()
            late += len(chunk)
            outcomes += [Outcome(u, NOT_MINTED) for u in chunk]
        elif result.successful():
            outcomes += outcomes_from(result.get(timeout=10))
            result.forget()  # the sealed tokens need not wait out their TTL in the backend
        else:
            error = result.result
            if _is_configuration_error(error):
                for other, _ in sent:
                    if not other.ready():
                        other.revoke()
                raise _workers_configuration_error(error)
            failure = describe_failure(error, elapsed)
            if failure not in failures:
                failures.append(failure)
            outcomes += [Outcome(u, NOT_MINTED) for u in chunk]
    if late:
        failures.append(
            f"no result within {timeout:g} s (--timeout) for {late} "
            f"user{'s' if late != 1 else ''}: their tasks were revoked"
        )
    return outcomes, len(sent), failures


class _RetryNotice(logging.Handler):
    """Says on stderr, once, what a mint in this process is retrying and why."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress
        self.said = False

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if self.said or not str(record.msg).startswith("sFOX %s: attempt") or len(args) < 4:
            return
        self.said = True
        self.progress.note(
            f"sfox-tokens: {args[3]}; retrying, up to {args[2]} attempts "
            "(SFOX_RETRY_ATTEMPTS, within SFOX_RETRY_DEADLINE); Ctrl-C stops"
        )


@contextmanager
def _retry_notices(progress: Progress) -> Iterator[None]:
    """While minting here, the first retry of a request is said on stderr (unless -v logs it)."""
    retry_logger = logging.getLogger("tasks.retry")
    if retry_logger.isEnabledFor(logging.WARNING):
        yield  # -v: the log says it already
        return
    handler = _RetryNotice(progress)
    level, propagate = retry_logger.level, retry_logger.propagate
    retry_logger.addHandler(handler)
    retry_logger.setLevel(logging.WARNING)
    retry_logger.propagate = False
    try:
        yield
    finally:
        retry_logger.removeHandler(handler)
        retry_logger.setLevel(level)
        retry_logger.propagate = propagate


def _limiter_origin(app: Any, url: str) -> str:
    """Where the limiter's URL came from: SFOX_LIMITER_URL, or the broker's or backend's."""
    from .._settings import SettingSource

    source = SettingSource(app.conf, os.environ, app.main)
    if source.get("SFOX_LIMITER_URL", None, key="sfox_limiter_backend"):
        return f"SFOX_LIMITER_URL, from {source.origins['SFOX_LIMITER_URL']}"
    base = url.split("?", 1)[0]
    if str(app.conf.broker_url or "").split("?", 1)[0] == base:
        return "the broker's Redis (CELERY_BROKER_URL; SFOX_LIMITER_URL is not set)"
    return "the result backend's Redis (CELERY_RESULT_BACKEND; SFOX_LIMITER_URL is not set)"


def check_local_limiter(app: Any, limiter_url: str | None, progress: Progress) -> None:
    """Name the rate limiter ``mint --local`` uses, and fail fast if its Redis is silent."""
    from .._exceptions import ConfigurationError
    from .._redis import probe_client, sentinel_master_name, with_master_name
    from .._settings import check_celery_urls

    if not limiter_url:
        check_celery_urls(app.conf, app_name=app.main)  # a broker URL that is no URL, first
        raise ConfigurationError(
            "mint --local needs the workers' rate limiter: set SFOX_LIMITER_URL to their Redis "
            "(redis://, rediss:// or sentinel://), or SFOX_LIMITER_URL=memory:// on a machine "
            "with no Redis (this process's own budget, shared with no worker)"
        )
    if limiter_url == "memory://":
        progress.note(
            "sfox-tokens: minting in this process, no broker or worker; rate limit: this "
            "process's own budget (SFOX_LIMITER_URL=memory://), shared with no worker"
        )
        return
    where = f"{safe_url(limiter_url.split('?', 1)[0])} ({_limiter_origin(app, limiter_url)})"
    progress.note(
        f"sfox-tokens: minting in this process, no broker or worker; rate limit shared "
        f"through the Redis at {where}"
    )
    try:
        client = probe_client(
            with_master_name(limiter_url, sentinel_master_name(limiter_url)),
            LIMITER_PROBE_TIMEOUT,
        )
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, ValueError, OSError) as exc:
        raise ConnectionError(
            f"the rate limiter's Redis at {where} does not answer within "
            f"{LIMITER_PROBE_TIMEOUT:g} s ({check_one_line(exc)}): start it, or set "
            "SFOX_LIMITER_URL=memory:// to mint with this process's own budget"
        ) from None


def mint_locally(user_ids: list[str], *, progress: Progress) -> tuple[list[Outcome], list[str]]:
    """Mint in this process, one batch at a time, through the shared limiter.

    The outcomes, and the failure that stopped the mint (said once), if any.
    """
    from .. import app
    from .._exceptions import ConfigurationError, SfoxError
    from ..minting import Deferred
    from ..worker.runtime import get_runtime

    runtime = get_runtime(app)
    runtime.settings.require_api_key()
    check_local_limiter(app, runtime.settings.limiter_url, progress)
    minter = runtime.minter(turn=False)
    outcomes: list[Outcome] = []
    chunks = split_into(user_ids, runtime.settings.batch_size)
    started = time.monotonic()
    with _retry_notices(progress):
        for index, chunk in enumerate(chunks):
            state: dict[str, Any] | None = None
            while True:
                try:
                    result = minter.mint(chunk, state)
                    break
                except Deferred as deferred:
                    progress.note(
                        f"sfox-tokens: waiting {deferred.countdown:.1f} s: {deferred.reason}"
                    )
                    time.sleep(deferred.countdown)
                    state = deferred.state
                except ConfigurationError:
                    raise
                except SfoxError as exc:
                    rest = [u for c in chunks[index:] for u in c]
                    outcomes += [Outcome(u, NOT_MINTED) for u in rest]
                    return outcomes, [describe_failure(exc, time.monotonic() - started)]
            outcomes += outcomes_from(result)
            progress.update(len(outcomes))
    return outcomes, []


def cmd_mint(args: argparse.Namespace) -> int:
    """Mint tokens for the given users and show a table of user, expiry and outcome."""
    from .. import app
    from .._exceptions import ConfigurationError, SealError
    from .._settings import check_celery_urls
    from ..minting import validate_user_ids
    from ..worker.host import settings_for
    from ..worker.runtime import get_runtime

    user_ids = validate_user_ids(read_user_ids(args), maximum=sys.maxsize)
    if not args.local:
        check_celery_urls(app.conf, app_name=app.main)
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
            outcomes, failures = mint_locally(user_ids, progress=progress)
            how = "in this process"
        else:
            outcomes, tasks, failures = mint_on_workers(
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

    if failures and all(o.outcome == NOT_MINTED for o in outcomes):
        # Nobody got anywhere: the reason, once, is the whole answer.
        for failure in failures:
            print(f"sfox-tokens: {failure}", file=sys.stderr)
        return EXIT_FAILED
    order = {user_id: index for index, user_id in enumerate(user_ids)}
    rows = []
    unopened: str | None = None
    for outcome in sorted(outcomes, key=lambda o: order.get(o.user_id, len(order))):
        shown = "-"
        if outcome.sealed is not None:
            plain = None
            if sealer is None:
                unopened = unopened or _NO_SEAL_KEY
            else:
                try:
                    plain = sealer.unseal(outcome.sealed)
                except SealError:
                    if args.reveal:
                        raise
                    unopened = unopened or _WRONG_SEAL_KEY
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
    if unopened:
        print(f"sfox-tokens: {unopened}", file=sys.stderr)
    for failure in failures:
        print(f"sfox-tokens: {failure}", file=sys.stderr)
    return EXIT_OK if minted == len(user_ids) else EXIT_FAILED


#: Why minted tokens are shown as "(sealed)": said once, under the table.
_NO_SEAL_KEY = (
    "tokens shown as (sealed): this host has no seal key to mask or reveal them; set "
    "SFOX_TOKEN_SEAL_KEY (or SFOX_ENTERPRISE_API_KEY, which it is derived from) as on the workers"
)
_WRONG_SEAL_KEY = (
    "tokens shown as (sealed): this host's seal key does not open them; set "
    "SFOX_TOKEN_SEAL_KEY (or SFOX_ENTERPRISE_API_KEY) to the workers'"
)


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
