"""Placing one user's order with that user's token: the order side of the sFOX client.

Knows nothing of Celery. The sealed token is opened at the moment of use; a
token that has expired (or that sFOX answers with 401) is replaced once by
minting one for that user alone, and the order is tried again. Every sFOX
call goes through the shared per-IP limiter and the user's own per-account
limiter (sFOX allows 60 order requests per second per account), and through
the same retry policy as minting. A timeout after sending is safe to retry:
the ``client_order_id`` makes sFOX refuse a second copy, which is recorded as
"already placed". An order's retry :class:`~tasks.budget.retry.Budget` is the
caller's to carry across a wait taken outside the worker (a long
``Retry-After``): resumed with it, the order keeps its first attempt's
``SFOX_RETRY_DEADLINE`` instead of starting a new one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .._exceptions import (
    PermanentError,
    RequestRefused,
    RetriesExhausted,
    SealError,
    TokenRejected,
)
from .._metrics import token_reminted
from .._settings import Rate
from ..budget.ratelimit import held
from ..budget.retry import Budget
from .access import SfoxAccess

__all__ = ["ACCOUNT_RATE", "OrderOutcome", "OrderPlacer", "is_duplicate_rejection"]

logger = logging.getLogger("tasks.orders")

#: sFOX's documented order limit per account.
ACCOUNT_RATE = Rate(60, 1.0)

#: Words that mark sFOX's (undocumented) answer to a reused client_order_id.
_DUPLICATE_MARKERS = ("client_order_id", "duplicate", "already")


def is_duplicate_rejection(exc: Exception) -> bool:
    """Whether a refusal reads as "this client_order_id was used already".

    sFOX does not document the status or text; any 4xx refusal that mentions
    the id or a duplicate is taken as one, since our ids are deterministic.
    """
    if not isinstance(exc, (RequestRefused, PermanentError)) or isinstance(exc, TokenRejected):
        return False
    text = (getattr(exc, "error", "") or exc.message).lower()
    return any(marker in text for marker in _DUPLICATE_MARKERS)


@dataclass(frozen=True)
class OrderOutcome:
    """What became of one order."""

    #: ``placed``, ``already_placed`` or ``failed``.
    status: str
    reason: str = ""
    order_id: Any = None


class TokenHolder:
    """One user's token for the length of a task: sealed at rest, re-minted at most once."""

    def __init__(self, user_id: str, entry: dict[str, Any]) -> None:
        self.user_id = user_id
        self.sealed = str(entry.get("token", ""))
        self.expires = str(entry.get("expires", ""))
        self.reminted = False


class OrderPlacer:
    """Places orders for users with their own tokens."""

    def __init__(
        self, access: SfoxAccess, *, on_remint: Callable[[str], None] = lambda _user: None
    ) -> None:
        self.client, self.limiter = access.client, access.limiter
        self.policy, self.sealer = access.policy, access.sealer
        self.rate_limit_penalty = access.rate_limit_penalty
        self._sleep = access.sleep
        self._clock = access.clock
        self._on_remint = on_remint

    def budget(self, carried: dict[str, Any] | None = None) -> Budget:
        """An order's retry budget: the one ``carried`` from an earlier run, else a new one."""
        return Budget.from_json(carried, now=self._clock())

    def place(
        self, holder: TokenHolder, side: str, body: dict[str, Any], budget: Budget | None = None
    ) -> OrderOutcome:
        """Place one order; an :class:`OrderOutcome` for every outcome but a deferral.

        ``budget`` is this order's, spent in place: on a deferral it holds what to
        carry (:meth:`Budget.to_json`) to the resumed call, whose deadline it keeps.
        """
        budget = budget if budget is not None else self.budget()
        what = f"order {body.get('client_order_id')} for {holder.user_id}"
        for _ in range(2):  # the second pass only after one re-mint
            token = self._plaintext(holder, budget)
            try:
                answer = self.policy.call(
                    functools.partial(self._send, holder.user_id, token, side, body),
                    budget,
                    what=what,
                )
            except TokenRejected:
                if holder.reminted:
                    return OrderOutcome("failed", "token refused by sFOX after a fresh mint")
                logger.info(
                    "user %s: sFOX refused the token (401); minting a new one", holder.user_id
                )
                self._remint(holder, budget)
                continue
            except (RequestRefused, PermanentError) as exc:
                if is_duplicate_rejection(exc):
                    return OrderOutcome("already_placed", "client_order_id used before")
                return OrderOutcome("failed", f"order rejected ({exc.status}): {_error(exc)}")
            except RetriesExhausted as exc:
                return OrderOutcome("failed", f"sFOX unavailable: {exc.message}")
            return OrderOutcome("placed", order_id=answer.get("id"))
        return OrderOutcome("failed", "token refused by sFOX after a fresh mint")

    def _plaintext(self, holder: TokenHolder, budget: Budget) -> str:
        if not holder.reminted and self._expired(holder.expires):
            logger.info(
                "user %s: token expired at %s; minting a new one", holder.user_id, holder.expires
            )
            self._remint(holder, budget)
        try:
            return self.sealer.unseal(holder.sealed)
        except SealError:
            if holder.reminted:
                raise
            logger.info("user %s: sealed token too old to open; minting a new one", holder.user_id)
            self._remint(holder, budget)
            return self.sealer.unseal(holder.sealed)

    def _expired(self, expires: str) -> bool:
        try:
            moment = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        except ValueError:
            return False  # unknown: let sFOX judge, a 401 leads to a re-mint
        return moment.timestamp() <= self._clock() + 5

    def _remint(self, holder: TokenHolder, budget: Budget) -> None:
        def send() -> Any:
            with self._turn("a re-mint"):
                return self.client.create_user_token(holder.user_id)

        issued = self.policy.call(send, budget, what=f"token re-mint for {holder.user_id}")
        holder.sealed = self.sealer.seal(issued.token)
        holder.expires = issued.expires
        holder.reminted = True
        token_reminted()
        self._on_remint(holder.user_id)

    def _send(self, user_id: str, token: str, side: str, body: dict[str, Any]) -> dict[str, Any]:
        account = self.limiter.sibling(ACCOUNT_RATE, f"account:{user_id}")
        with self._turn("an order"), held(account, **self._slot_options()):
            return self.client.create_order(token, side, body)

    def _turn(self, what: str) -> AbstractContextManager[str]:
        """One request's slot of the shared per-IP limiter; a 429 pauses every worker."""
        return self.policy.turn(
            self.limiter, penalty=self.rate_limit_penalty, what=what, **self._slot_options()
        )

    def _slot_options(self) -> dict[str, Any]:
        return {
            "max_wait": min(self.policy.settings.inprocess_wait_max, self.policy.turn_left()),
            "hold": self.client.timeouts.longest,
            "sleep": self._sleep,
        }


def _error(exc: Exception) -> str:
    return getattr(exc, "error", "") or getattr(exc, "message", str(exc))
