"""Minting a list of user IDs into sealed tokens: batching, bisecting, re-asking.

This is the whole algorithm of ``sfox.mint_user_tokens`` without Celery:

- distinct IDs are sent in requests of ``batch_size``, each through the shared
  limiter and the retry policy, up to ``concurrency`` requests at once (each on
  a request thread, with its own retry count; answers are handled on the
  calling thread; a worker keeps its request threads, :class:`RequestThreads`,
  from one mint to the next);
- answers are matched by ``partner_user_id``; a requested ID missing from a
  201 is asked for again once, alone, and is ``failed`` (status ``None``) if
  still missing;
- a batch refused with 400/404/422 is split in halves until the refused IDs
  stand alone: each then goes to ``failed`` with sFOX's status and message,
  at a cost of about 2·log2(batch) extra requests per refused ID;
- tokens are sealed the moment they arrive, so the progress that travels with
  a broker countdown (:class:`Deferred`) never holds a plaintext token;
- a wait too long for the worker (a long ``Retry-After``, the limiter's pause)
  met by any request stops new requests; those in flight finish and are kept,
  or go back on the queue if they must wait too, and then :class:`Deferred`
  carries the whole queue. Any other error is raised once they have finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ._exceptions import InvalidUserIds, RequestRefused
from ._metrics import tokens_minted, users_refused
from ._settings import MAX_USER_ID_LENGTH
from .budget.ratelimit import LimiterWait
from .budget.retry import Budget, Defer
from .sfox.access import SfoxAccess
from .sfox.client import IssuedToken

__all__ = [
    "Deferred",
    "FailedEntry",
    "MintResult",
    "Minter",
    "ProgressHook",
    "RequestThreads",
    "TokenEntry",
    "validate_user_ids",
]

logger = logging.getLogger("tasks.mint")

#: Called as ``hook(done, total)`` on the minting thread each time a batch's answer is
#: handled: ``done`` users have a token or a final refusal, of ``total``. Never given tokens.
ProgressHook = Callable[[int, int], None]

#: Version of the progress format carried across broker countdowns.
_STATE_VERSION = 1


class TokenEntry(TypedDict):
    partner_user_id: str
    token: str  # sealed
    expires: str


class FailedEntry(TypedDict):
    user_id: str
    status: int | None
    error: str


class MintResult(TypedDict):
    tokens: list[TokenEntry]
    failed: list[FailedEntry]


class Deferred(Exception):
    """Resume after ``countdown`` seconds from ``state`` (JSON-able, sealed tokens only)."""

    def __init__(self, countdown: float, reason: str, state: dict[str, Any], counts: bool) -> None:
        super().__init__(f"resume in {countdown:.1f} s: {reason}")
        self.countdown = countdown
        self.reason = reason
        self.state = state
        #: False when the wait is the rate limiter's, which is no failure.
        self.counts = counts


def validate_user_ids(user_ids: object, *, maximum: int) -> list[str]:
    """The distinct IDs in first-given order, or :class:`InvalidUserIds` saying what is wrong."""
    if isinstance(user_ids, (str, bytes)) or not isinstance(user_ids, (list, tuple)):
        raise InvalidUserIds(
            f"user_ids must be a list of user ID strings, not {type(user_ids).__name__}"
        )
    if not user_ids:
        raise InvalidUserIds("user_ids is empty: give at least one user ID")
    for index, user_id in enumerate(user_ids):
        if not isinstance(user_id, str):
            raise InvalidUserIds(f"user_ids[{index}] is a {type(user_id).__name__}, not a string")
        if not user_id.strip():
            raise InvalidUserIds(f"user_ids[{index}] is blank")
        if len(user_id) > MAX_USER_ID_LENGTH:
            raise InvalidUserIds(
                f"user_ids[{index}] is {len(user_id)} characters long; "
                f"the most accepted is {MAX_USER_ID_LENGTH}"
            )
    distinct = list(dict.fromkeys(user_ids))
    if len(distinct) > maximum:
        raise InvalidUserIds(
            f"{len(distinct)} user IDs in one mint task; the most is {maximum} "
            "(SFOX_MAX_USER_IDS): use tasks.with_user_tokens(), which splits large lists"
        )
    return distinct


@dataclass
class _Batch:
    """The user IDs of one request, with that request's own retry accounting."""

    user_ids: list[str]
    #: Failures in a row of this request; ``started_at`` is the whole mint's, for its deadline.
    budget: Budget


@dataclass
class _Progress:
    """Where a mint stands; round-trips through JSON for broker countdowns.

    Shared by the threads of one mint: every change is made holding ``lock``.
    """

    #: When the mint first started (epoch seconds): the retry deadline counts from it.
    started_at: float
    queue: list[_Batch] = field(default_factory=list)
    reasked: set[str] = field(default_factory=set)
    tokens: dict[str, TokenEntry] = field(default_factory=dict)
    failed: dict[str, FailedEntry] = field(default_factory=dict)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def batch(self, user_ids: Iterable[str]) -> _Batch:
        """A new batch, with no failures yet, under this mint's deadline."""
        return _Batch(list(user_ids), Budget(started_at=self.started_at))

    def to_json(self) -> dict[str, Any]:
        """The state a :class:`Deferred` carries (sealed tokens only).

        The format is version 1's, plus ``retrying``: ``budget`` holds the first
        queued batch's failures, as when one request was in flight at a time,
        and ``retrying`` those of later batches that failed too (``[index,
        failures, last failure]``). A reader that knows only version 1 ignores
        it, and so gives those batches a fresh count; their deadline is the same.
        """
        with self.lock:
            head = self.queue[0].budget if self.queue else Budget(started_at=self.started_at)
            return {
                "v": _STATE_VERSION,
                "budget": Budget(
                    started_at=self.started_at,
                    failures=head.failures,
                    last_failure=head.last_failure,
                ).to_json(),
                "queue": [list(batch.user_ids) for batch in self.queue],
                "retrying": [
                    [index, batch.budget.failures, batch.budget.last_failure]
                    for index, batch in enumerate(self.queue)
                    if index > 0 and batch.budget.failures
                ],
                "reasked": sorted(self.reasked),
                "tokens": list(self.tokens.values()),
                "failed": list(self.failed.values()),
                "requests": self.requests,
            }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, now: float) -> _Progress:
        if data.get("v") != _STATE_VERSION:
            raise ValueError("unknown mint progress format")
        head = Budget.from_json(data.get("budget"), now=now)
        progress = cls(
            started_at=head.started_at,
            reasked=set(data.get("reasked", ())),
            tokens={entry["partner_user_id"]: entry for entry in data.get("tokens", ())},
            failed={entry["user_id"]: entry for entry in data.get("failed", ())},
            requests=int(data.get("requests", 0)),
        )
        progress.queue = [progress.batch(user_ids) for user_ids in data["queue"]]
        if progress.queue:
            progress.queue[0].budget = head
        for index, failures, last_failure in data.get("retrying", ()):
            if 0 <= int(index) < len(progress.queue):
                budget = progress.queue[int(index)].budget
                budget.failures, budget.last_failure = int(failures), str(last_failure)
        return progress


class _Stopped(Exception):
    """A request not (re)tried because its mint is stopping; its batch goes back on the queue."""


@dataclass(frozen=True)
class _Sent:
    """A batch in flight: its place in dispatch order and when it left."""

    order: int
    batch: _Batch
    started: float


def _chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class RequestThreads:
    """Threads for minters' requests, kept from one mint to the next.

    Starting a mint's threads anew for every task cost a worker about 0.3 ms of
    CPU per 100-user batch. Each thread that mints (a prefork process's one, each
    thread of a ``threads`` pool) gets a pool of its own, so one task's requests
    never wait for another's. No request outlives the :meth:`Minter.mint` that
    sent it; the threads wait idle until :meth:`close`.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pools: list[ThreadPoolExecutor] = []

    def pool(self) -> ThreadPoolExecutor:
        """The calling thread's request pool."""
        pool: ThreadPoolExecutor | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = ThreadPoolExecutor(self.size, thread_name_prefix="sfox-mint")
            self._local.pool = pool
            with self._lock:
                self._pools.append(pool)
        return pool

    def close(self) -> None:
        """Let every pool's threads end (they hold no request: each mint waited for its own)."""
        with self._lock:
            pools, self._pools = self._pools, []
        for pool in pools:
            pool.shutdown(wait=False)
        self._local = threading.local()


class Minter:
    """Mints tokens for lists of user IDs with one client, limiter, policy and sealer.

    One :meth:`mint` keeps up to ``concurrency`` requests in flight, on the
    calling thread's pool of ``threads`` or, without, on threads of its own that
    end with the call.
    """

    def __init__(
        self,
        access: SfoxAccess,
        *,
        batch_size: int,
        concurrency: int = 1,
        threads: RequestThreads | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.client, self.limiter = access.client, access.limiter
        self.policy, self.sealer = access.policy, access.sealer
        self.batch_size = batch_size
        #: Requests in flight at once; 1 sends batches one after another on the caller's thread.
        self.concurrency = concurrency
        self.rate_limit_penalty = access.rate_limit_penalty
        self._threads = threads if threads is not None and threads.size >= concurrency else None
        self._sleep = access.sleep
        self._clock = access.clock

    def mint(
        self,
        user_ids: Sequence[str],
        state: dict[str, Any] | None = None,
        *,
        on_progress: ProgressHook | None = None,
    ) -> MintResult:
        """Mint every ID in ``user_ids`` (already validated and distinct).

        ``state`` resumes a mint that raised :class:`Deferred`. ``on_progress(done,
        total)`` is called on this thread after each answer is handled (a counting
        hook: it is given no token, and an error it raises is logged and ignored).
        """
        now = self._clock()
        if state:
            progress = _Progress.from_json(state, now=now)
        else:
            progress = _Progress(started_at=now)
            progress.queue = [progress.batch(c) for c in _chunks(user_ids, self.batch_size)]
        # One batch (a with_user_tokens chunk) is sent from here: no threads to start.
        # A pool starts its threads as requests need them, up to the concurrency.
        if self.concurrency == 1 or len(progress.queue) <= 1:
            self._run(progress, len(user_ids), None, on_progress)
        elif self._threads is not None:
            self._run(progress, len(user_ids), self._threads.pool(), on_progress)
        else:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="sfox-mint") as pool:
                self._run(progress, len(user_ids), pool, on_progress)
        return MintResult(
            tokens=[progress.tokens[uid] for uid in user_ids if uid in progress.tokens],
            failed=[progress.failed[uid] for uid in user_ids if uid in progress.failed],
        )

    def _run(
        self,
        progress: _Progress,
        total: int,
        pool: ThreadPoolExecutor | None,
        on_progress: ProgressHook | None = None,
    ) -> None:
        """Send the queue, up to ``concurrency`` requests at once, and handle each answer.

        Answers are handled here, on the calling thread, in the order they come.
        A long wait (:class:`Defer`, :class:`LimiterWait`) or any other error
        stops new batches; those in flight finish first, so no thread outlives
        this call and no batch is lost or sent twice. Then the error is raised,
        or, for waits, the batches that must wait go back to the front of the
        queue and :class:`Deferred` carries it.
        """
        limit = self.concurrency if pool is not None else 1
        stopping = threading.Event()
        in_flight: dict[Future[dict[str, IssuedToken]], _Sent] = {}
        waits: list[Defer | LimiterWait] = []
        put_back: list[_Sent] = []
        error: Exception | None = None
        sent = 0
        try:
            while True:
                while not stopping.is_set() and len(in_flight) < limit:
                    if self.policy.turn_left() <= 0:
                        # The task has held its message long enough: the rest resumes later.
                        stopping.set()
                        waits.append(Defer(0.0, "the task's turn is over (SFOX_TASK_TURN)"))
                        break
                    with progress.lock:
                        if not progress.queue:
                            break
                        batch = progress.queue.pop(0)
                    started = time.monotonic()
                    future = self._start(pool, batch, progress, stopping)
                    in_flight[future] = _Sent(sent, batch, started)
                    sent += 1
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in [f for f in in_flight if f in done]:
                    item = in_flight.pop(future)
                    try:
                        issued = future.result()
                    except RequestRefused as exc:
                        with progress.lock:
                            self._refused(item.batch, exc, progress)
                    except (Defer, LimiterWait, _Stopped) as exc:
                        stopping.set()
                        put_back.append(item)
                        if not isinstance(exc, _Stopped):
                            waits.append(exc)
                    except Exception as exc:
                        stopping.set()
                        error = error or exc
                    else:
                        with progress.lock:
                            self._accept(item.batch, issued, progress)
                        logger.info(
                            "minted %d of %d token(s) in one request in %.0f ms",
                            sum(1 for uid in item.batch.user_ids if uid in issued),
                            len(item.batch.user_ids),
                            (time.monotonic() - item.started) * 1000,
                        )
                if on_progress is not None:
                    _report(on_progress, progress, total)
        finally:
            # Anything raised here (a soft time limit) stops the other threads' retries too,
            # and the requests in flight end before this call does.
            stopping.set()
            wait(in_flight)
        if error is not None:
            raise error
        if waits:
            with progress.lock:
                progress.queue[0:0] = [item.batch for item in sorted(put_back, key=_dispatched)]
            raise self._deferred(max(waits, key=_wait_seconds), progress, total)

    def _start(
        self,
        pool: ThreadPoolExecutor | None,
        batch: _Batch,
        progress: _Progress,
        stopping: threading.Event,
    ) -> Future[dict[str, IssuedToken]]:
        """Send ``batch`` on a pool thread, or right here, to completion, without a pool."""
        if pool is not None:
            return pool.submit(self._request, batch, progress, stopping)
        future: Future[dict[str, IssuedToken]] = Future()
        try:
            future.set_result(self._request(batch, progress, stopping))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _deferred(self, exc: Defer | LimiterWait, progress: _Progress, total: int) -> Deferred:
        if isinstance(exc, Defer):
            return Deferred(exc.countdown, exc.reason, progress.to_json(), counts=True)
        reason = exc.reason
        with progress.lock:
            done = len(progress.tokens) + len(progress.failed)
        logger.info(
            "rate limiter asks for %.1f s (%s): task goes back to the broker, %d of %d users done",
            exc.seconds,
            reason,
            done,
            total,
        )
        return Deferred(exc.seconds, reason, progress.to_json(), counts=False)

    def _request(
        self, batch: _Batch, progress: _Progress, stopping: threading.Event
    ) -> dict[str, IssuedToken]:
        """One request for ``batch``, retried under its budget (runs on a pool thread)."""
        what = f"user-token request for {len(batch.user_ids)} user(s)"

        def send() -> dict[str, IssuedToken]:
            if stopping.is_set():
                raise _Stopped(what)
            with self.policy.turn(
                self.limiter,
                max_wait=self.policy.max_inprocess_wait(batch.budget),
                hold=self.client.timeouts.longest,
                penalty=self.rate_limit_penalty,
                what=what,
                sleep=self._sleep,
            ):
                with progress.lock:
                    progress.requests += 1
                return self.client.create_user_tokens(batch.user_ids)

        return self.policy.call(send, batch.budget, what=what)

    def _accept(self, batch: _Batch, issued: dict[str, IssuedToken], progress: _Progress) -> None:
        """Seal ``batch``'s tokens, queue its missing users alone (caller holds the lock)."""
        tokens_minted(len(issued))  # the client keeps requested users only, once each
        missing = []
        for user_id in batch.user_ids:
            token = issued.get(user_id)
            if token is not None:
                progress.tokens[user_id] = TokenEntry(
                    partner_user_id=user_id,
                    token=self.sealer.seal(token.token),
                    expires=token.expires,
                )
            elif user_id in progress.reasked:
                progress.failed[user_id] = FailedEntry(
                    user_id=user_id,
                    status=None,
                    error="sFOX left this user out of its answer twice",
                )
                users_refused(1)
                logger.warning("user %s: left out of sFOX's answer twice; failed", user_id)
            else:
                missing.append(user_id)
        if missing:
            logger.warning(
                "sFOX's answer left out %d requested user(s); asking again alone: %s",
                len(missing),
                ", ".join(missing[:20]),
            )
            progress.reasked.update(missing)
            progress.queue[0:0] = [progress.batch([user_id]) for user_id in missing]

    def _refused(self, batch: _Batch, exc: RequestRefused, progress: _Progress) -> None:
        """Fail a lone refused user, or queue both halves (caller holds the lock)."""
        user_ids = batch.user_ids
        if len(user_ids) == 1:
            user_id = user_ids[0]
            progress.failed[user_id] = FailedEntry(
                user_id=user_id, status=exc.status, error=exc.error
            )
            users_refused(1)
            logger.warning("users refused by sFOX: 1 (%s: %s %s)", user_id, exc.status, exc.error)
            return
        middle = len(user_ids) // 2
        logger.info(
            "sFOX refused a batch of %d with %s (%s): splitting it to find the refused user(s)",
            len(user_ids),
            exc.status,
            exc.error,
        )
        progress.queue[0:0] = [progress.batch(user_ids[:middle]), progress.batch(user_ids[middle:])]


def _report(on_progress: ProgressHook, progress: _Progress, total: int) -> None:
    """Tell ``on_progress`` how many users are done; a failing hook never stops a mint."""
    with progress.lock:
        done = len(progress.tokens) + len(progress.failed)
    try:
        on_progress(done, total)
    except Exception:
        logger.warning("the mint's progress hook failed; minting goes on", exc_info=True)


def _dispatched(item: _Sent) -> int:
    return item.order


def _wait_seconds(exc: Defer | LimiterWait) -> float:
    return exc.countdown if isinstance(exc, Defer) else exc.seconds
