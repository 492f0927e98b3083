"""Minting a list of user IDs into sealed tokens: batching, bisecting, re-asking.

This is the whole algorithm of ``sfox.mint_user_tokens`` without Celery:

- distinct IDs are sent in requests of ``batch_size``, each through the shared
  limiter and the retry policy;
- answers are matched by ``partner_user_id``; a requested ID missing from a
  201 is asked for again once, alone, and is ``failed`` (status ``None``) if
  still missing;
- a batch refused with 400/404/422 is split in halves until the refused IDs
  stand alone: each then goes to ``failed`` with sFOX's status and message,
  at a cost of about 2·log2(batch) extra requests per refused ID;
- tokens are sealed the moment they arrive, so the progress that travels with
  a broker countdown (:class:`Deferred`) never holds a plaintext token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from tasks._client import IssuedToken, SfoxClient
from tasks._exceptions import InvalidUserIds, RateLimited, RequestRefused
from tasks._ratelimit import Limiter, LimiterWait, acquire
from tasks._retry import Budget, Defer, RetryPolicy
from tasks._seal import Sealer
from tasks._settings import MAX_USER_ID_LENGTH

__all__ = [
    "Deferred",
    "FailedEntry",
    "MintResult",
    "Minter",
    "TokenEntry",
    "validate_user_ids",
]

logger = logging.getLogger("tasks.mint")

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
class _Progress:
    """Where a mint stands; round-trips through JSON for broker countdowns."""

    budget: Budget
    queue: list[list[str]]
    reasked: set[str] = field(default_factory=set)
    tokens: dict[str, TokenEntry] = field(default_factory=dict)
    failed: dict[str, FailedEntry] = field(default_factory=dict)
    requests: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "v": _STATE_VERSION,
            "budget": self.budget.to_json(),
            "queue": self.queue,
            "reasked": sorted(self.reasked),
            "tokens": list(self.tokens.values()),
            "failed": list(self.failed.values()),
            "requests": self.requests,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, now: float) -> _Progress:
        if data.get("v") != _STATE_VERSION:
            raise ValueError("unknown mint progress format")
        return cls(
            budget=Budget.from_json(data.get("budget"), now=now),
            queue=[list(batch) for batch in data["queue"]],
            reasked=set(data.get("reasked", ())),
            tokens={entry["partner_user_id"]: entry for entry in data.get("tokens", ())},
            failed={entry["user_id"]: entry for entry in data.get("failed", ())},
            requests=int(data.get("requests", 0)),
        )


def _chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class Minter:
    """Mints tokens for lists of user IDs with one client, limiter, policy and sealer."""

    def __init__(
        self,
        client: SfoxClient,
        limiter: Limiter,
        policy: RetryPolicy,
        sealer: Sealer,
        *,
        batch_size: int,
        rate_limit_penalty: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.policy = policy
        self.sealer = sealer
        self.batch_size = batch_size
        self.rate_limit_penalty = rate_limit_penalty
        self._sleep = sleep
        self._clock = clock

    def mint(self, user_ids: Sequence[str], state: dict[str, Any] | None = None) -> MintResult:
        """Mint every ID in ``user_ids`` (already validated and distinct).

        ``state`` resumes a mint that raised :class:`Deferred`.
        """
        now = self._clock()
        progress = (
            _Progress.from_json(state, now=now)
            if state
            else _Progress(
                budget=Budget(started_at=now), queue=list(_chunks(user_ids, self.batch_size))
            )
        )
        while progress.queue:
            batch = progress.queue[0]
            started = time.monotonic()
            try:
                issued = self._request(batch, progress)
            except RequestRefused as exc:
                progress.queue.pop(0)
                self._refused(batch, exc, progress)
                continue
            except Defer as exc:
                raise Deferred(exc.countdown, exc.reason, progress.to_json(), counts=True) from None
            except LimiterWait as exc:
                reason = "rate-limit pause after a 429" if exc.paused else "rate limit window full"
                logger.info(
                    "rate limiter asks for %.1f s (%s): task goes back to the broker, "
                    "%d of %d users done",
                    exc.seconds,
                    reason,
                    len(progress.tokens) + len(progress.failed),
                    len(user_ids),
                )
                raise Deferred(exc.seconds, reason, progress.to_json(), counts=False) from None
            progress.queue.pop(0)
            self._accept(batch, issued, progress)
            logger.info(
                "minted %d of %d token(s) in one request in %.0f ms",
                sum(1 for uid in batch if uid in issued),
                len(batch),
                (time.monotonic() - started) * 1000,
            )
        return MintResult(
            tokens=[progress.tokens[uid] for uid in user_ids if uid in progress.tokens],
            failed=[progress.failed[uid] for uid in user_ids if uid in progress.failed],
        )

    def _request(self, batch: list[str], progress: _Progress) -> dict[str, IssuedToken]:
        what = f"user-token request for {len(batch)} user(s)"

        def send() -> dict[str, IssuedToken]:
            acquire(
                self.limiter,
                max_wait=min(
                    self.policy.settings.inprocess_wait_max, self.policy.remaining(progress.budget)
                ),
                sleep=self._sleep,
            )
            progress.requests += 1
            try:
                return self.client.create_user_tokens(batch)
            except RateLimited as exc:
                self.policy.pause_after_429(self.limiter, exc, self.rate_limit_penalty, what)
                raise

        return self.policy.call(send, progress.budget, what=what)

    def _accept(
        self, batch: list[str], issued: dict[str, IssuedToken], progress: _Progress
    ) -> None:
        missing = []
        for user_id in batch:
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
            progress.queue[0:0] = [[user_id] for user_id in missing]

    def _refused(self, batch: list[str], exc: RequestRefused, progress: _Progress) -> None:
        if len(batch) == 1:
            user_id = batch[0]
            progress.failed[user_id] = FailedEntry(
                user_id=user_id, status=exc.status, error=exc.error
            )
            logger.warning("users refused by sFOX: 1 (%s: %s %s)", user_id, exc.status, exc.error)
            return
        middle = len(batch) // 2
        logger.info(
            "sFOX refused a batch of %d with %s (%s): splitting it to find the refused user(s)",
            len(batch),
            exc.status,
            exc.error,
        )
        progress.queue[0:0] = [batch[:middle], batch[middle:]]
