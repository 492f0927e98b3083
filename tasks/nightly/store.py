"""The Redis records of one date's nightly run: who runs it, its orders, outcomes and summary.

Each order is staged once (keyed by its ``client_order_id``), each outcome is
written once, and a placement always wins over the "already placed" of a
concurrent duplicate: the Lua scripts beside this module make each step safe to
run again. Who runs the date is two keys: the *owner* (a task id) and a short
*lease* its coordinator renews while it works and keeps for its own next turn
between turns; a run whose lease is gone while unfinished has lost its
coordinator, and the next trigger takes it over (:meth:`NightlyRun.take`). The
tasks in :mod:`tasks.nightly.tasks` drive it; the fan-out keeps books of its own.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any, NamedTuple

import redis

from .._redis import lua, script
from ..sfox.orders import OrderOutcome
from .orders import Order, OrderError, client_order_id

__all__ = ["RUN_TTL", "Claim", "NightlyRun", "RunBooks"]

#: Seconds the run's records stay in Redis (the summary lives in the result backend).
RUN_TTL = 3 * 86400

#: Most user IDs listed under one failure reason in the summary.
MAX_IDS_PER_REASON = 1000

#: Rows read and staged per Redis round trip.
_STAGE_BATCH = 500

#: Users read per Redis round trip when the run's users are walked.
_USERS_PAGE = 5000

#: Where the run's Lua lives (take, hand_over, release, lease, drop_lease, stage_order,
#: record .lua: KEYS and ARGV named in each); every script is called through one NightlyRun
#: method.
_LUA = __package__ or "tasks.nightly"


class Claim(NamedTuple):
    """What :meth:`NightlyRun.take` found: a verdict (``take.lua`` names each) and the
    owner before the call (``""`` if none)."""

    verdict: str
    owner: str


@dataclass(frozen=True)
class RunBooks:
    """What a date's records say, for the operator (``sfox-tokens nightly --state``)."""

    run_date: str
    #: The task id that owns the run, if one does.
    owner: str | None
    #: Seconds the coordinator's lease has left; 0 when no coordinator holds it.
    lease_left: float
    #: ``time.time()`` when the run's first coordinator began, if one did.
    started: float | None
    #: Whether the orders are staged, and whether the fan-out was started.
    staged: bool
    dispatched: bool
    users: int
    orders: int
    #: Rows of the orders file that were not orders.
    skipped_rows: int
    #: Outcomes recorded so far, by status (``placed``, ``already_placed``, ``failed``).
    outcomes: Mapping[str, int]
    #: The orders file a trigger named for this run, if one did.
    orders_file: str | None
    #: The summary, once the run finished.
    summary: Mapping[str, Any] | None

    @property
    def phase(self) -> str:
        """``finished``, ``under_way`` (a live lease), ``stalled`` (claimed or staged, no
        live coordinator: the next trigger resumes it) or ``not_started``."""
        if self.summary is not None:
            return "finished"
        if self.lease_left > 0:
            return "under_way"
        if self.owner or self.staged:
            return "stalled"
        return "not_started"


class NightlyRun:
    """The Redis records of one date's run."""

    def __init__(self, client: redis.Redis[bytes], day: date) -> None:
        self.client = client
        self.day = day
        base = f"sfox:nightly:{{{day.isoformat()}}}"
        self.owner = f"{base}:owner"
        self.lease = f"{base}:lease"
        self.meta = f"{base}:meta"
        self.orders = f"{base}:orders"
        self.user_orders = f"{base}:user-orders"
        self.users = f"{base}:users"
        self.outcomes = f"{base}:outcomes"
        self.errors = f"{base}:errors"
        self.reminted = f"{base}:reminted"
        #: The id of the run's fan-out (its own books).
        self.fanout_id = f"nightly-{day.isoformat()}"

    # -- ownership -------------------------------------------------------------------

    def take(self, task_id: str, token: str, seconds: float) -> Claim:
        """Own the date for ``task_id`` and hold its lease with ``token``, if it may.

        It may when no one owns the date, when it owns it already (its next turn),
        or when the owner's coordinator is gone (no live lease); never once the run
        finished, nor while another task's lease is live.
        """
        verdict, owner = script(self.client, lua(_LUA, "take"))(
            keys=[self.owner, self.lease, self.meta],
            args=[task_id, token, int(seconds * 1000), RUN_TTL],
        )
        return Claim(_text(verdict), _text(owner))

    def lease_for(self, token: str, seconds: float) -> bool:
        """Take the lease for ``token``, or renew it if it is ``token``'s already."""
        return bool(
            script(self.client, lua(_LUA, "lease"))(
                keys=[self.lease], args=[token, int(seconds * 1000)]
            )
        )

    def drop_lease(self, token: str) -> None:
        script(self.client, lua(_LUA, "drop_lease"))(keys=[self.lease], args=[token])

    def hand_over(self, token: str, task_id: str, seconds: float) -> None:
        """End a turn: keep the lease held with ``token`` for ``task_id``'s next turn."""
        script(self.client, lua(_LUA, "hand_over"))(
            keys=[self.lease], args=[token, task_id, int(seconds * 1000)]
        )

    def release(self, task_id: str, token: str) -> bool:
        """Give the date up: the run failed before its orders were staged.

        Drops the lease, and the ownership unless the orders are staged; whether
        the date is unclaimed now.
        """
        return bool(
            script(self.client, lua(_LUA, "release"))(
                keys=[self.owner, self.lease, self.meta], args=[task_id, token]
            )
        )

    def flag(self, name: str) -> str | None:
        value = self.client.hget(self.meta, name)
        return value.decode() if value is not None else None

    def set_flag(self, name: str, value: str) -> None:
        with self.client.pipeline() as pipe:
            pipe.hset(self.meta, name, value)
            pipe.expire(self.meta, RUN_TTL)
            pipe.execute()

    # -- staging ---------------------------------------------------------------------

    def stage(self, items: Iterable[Order | OrderError]) -> tuple[int, int]:
        """Store each order once and each row error; ``(orders, errors)`` seen."""
        stage_order = script(self.client, lua(_LUA, "stage_order"))
        orders = errors = 0
        pipe = self.client.pipeline(transaction=False)
        pending = 0
        for item in items:
            if isinstance(item, OrderError):
                errors += 1
                pipe.hset(self.errors, str(item.line), json.dumps(item.to_dict()))
            else:
                orders += 1
                coid = client_order_id(self.day, item.user_id, item.ref)
                stage_order(
                    keys=[self.orders, self.user_orders, self.users],
                    args=[coid, item.to_json(), item.user_id],
                    client=pipe,
                )
            pending += 1
            if pending >= _STAGE_BATCH:
                pipe.execute()
                pending = 0
        for key in (self.orders, self.user_orders, self.users, self.errors):
            pipe.expire(key, RUN_TTL)
        pipe.execute()
        return orders, errors

    def user_count(self) -> int:
        return int(self.client.llen(self.users))

    def iter_users(self) -> Iterator[str]:
        """The run's users in staging order, read a page at a time."""
        for start in range(0, self.user_count(), _USERS_PAGE):
            yield from (
                u.decode() for u in self.client.lrange(self.users, start, start + _USERS_PAGE - 1)
            )

    def users_not_in(self, ended: set[str], limit: int) -> list[str]:
        """Up to ``limit`` staged users not in ``ended``, in staging order."""
        missing: list[str] = []
        for user_id in self.iter_users():
            if user_id not in ended:
                missing.append(user_id)
                if len(missing) >= limit:
                    break
        return missing

    def orders_of(self, user_id: str) -> list[tuple[str, Order]]:
        raw = self.client.hget(self.user_orders, user_id)
        coids = [c for c in (raw or b"").decode().split(",") if c]
        if not coids:
            return []
        bodies = self.client.hmget(self.orders, coids)
        return [(c, Order.from_json(b)) for c, b in zip(coids, bodies, strict=True) if b]

    # -- outcomes --------------------------------------------------------------------

    def outcome(self, coid: str) -> dict[str, Any] | None:
        raw = self.client.hget(self.outcomes, coid)
        return json.loads(raw) if raw else None

    def record(self, coid: str, user_id: str, outcome: OrderOutcome) -> None:
        value = json.dumps({"user_id": user_id, "status": outcome.status, "reason": outcome.reason})
        script(self.client, lua(_LUA, "record"))(
            keys=[self.outcomes], args=[coid, value, "1" if outcome.status == "placed" else "0"]
        )
        self.client.expire(self.outcomes, RUN_TTL)

    def count_remint(self, user_id: str) -> None:
        """Note that ``user_id``'s token was minted again (a set: once per user, however
        often the note is made)."""
        with self.client.pipeline() as pipe:
            pipe.sadd(self.reminted, user_id)
            pipe.expire(self.reminted, RUN_TTL)
            pipe.execute()

    def remints(self) -> int:
        return int(self.client.scard(self.reminted))

    # -- the summary -----------------------------------------------------------------

    def summary(
        self,
        status: str,
        started: float | None = None,
        *,
        refused: Mapping[str, Mapping[str, Any]],
        tokens_dispatched: int,
    ) -> dict[str, Any]:
        """The run's summary: counts, and the user IDs behind each failure reason.

        Every staged order is counted once: placed, already placed, or failed
        with a reason, including an order whose user was refused a token and
        one that has no outcome at all (its task ended without recording one).
        ``refused`` are the users the fan-out was refused a token for (with their
        ``failed`` entries), ``tokens_dispatched`` the tokens it handed on.
        """
        placed = already = 0
        failed: dict[str, list[str]] = defaultdict(list)
        seen: set[str] = set()
        for coid, raw in self.client.hscan_iter(self.outcomes, count=1000):
            seen.add(coid.decode())
            entry = json.loads(raw)
            if entry["status"] == "placed":
                placed += 1
            elif entry["status"] == "already_placed":
                already += 1
            else:
                failed[entry["reason"]].append(entry["user_id"])
        why_refused = {
            user_id: (
                f"token refused ({refusal.get('status')}): {refusal.get('error', '')}"
                if refusal.get("status") is not None
                else "token not issued: sFOX left the user out of its answer twice"
            )
            for user_id, refusal in refused.items()
        }
        for coid, raw in self.client.hscan_iter(self.orders, count=1000):
            if coid.decode() in seen:
                continue
            user_id = Order.from_json(raw).user_id
            failed[why_refused.get(user_id, _NO_OUTCOME)].append(user_id)
        remints = self.remints()
        errors = [json.loads(v) for v in self.client.hvals(self.errors)]
        errors.sort(key=lambda e: e["line"])
        return {
            "run_date": self.day.isoformat(),
            "status": status,
            "users": self.user_count(),
            "orders": int(self.client.hlen(self.orders)),
            "tokens_minted": tokens_dispatched + remints,
            "remints": remints,
            "placed": placed,
            "already_placed": already,
            "failed": {
                reason: {"count": len(ids), "user_ids": sorted(set(ids))[:MAX_IDS_PER_REASON]}
                for reason, ids in sorted(failed.items())
            },
            "failed_orders": sum(len(ids) for ids in failed.values()),
            "skipped_rows": errors,
            "duration_s": round(time.time() - started, 1) if started else None,
        }

    # -- the operator's view ----------------------------------------------------------

    def books(self) -> RunBooks:
        """What the records say about the run now."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.get(self.owner)
            pipe.pttl(self.lease)
            pipe.hgetall(self.meta)
            pipe.llen(self.users)
            pipe.hlen(self.orders)
            pipe.hlen(self.errors)
            owner, lease_ms, raw_meta, users, orders, errors = pipe.execute()
        meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
        outcomes: Counter[str] = Counter(
            json.loads(raw)["status"]
            for _, raw in self.client.hscan_iter(self.outcomes, count=1000)
        )
        return RunBooks(
            run_date=self.day.isoformat(),
            owner=owner.decode() if owner else None,
            lease_left=max(0, int(lease_ms)) / 1000,
            started=float(meta["started"]) if "started" in meta else None,
            staged="staged" in meta,
            dispatched="dispatched" in meta,
            users=int(users),
            orders=int(orders),
            skipped_rows=int(errors),
            outcomes=dict(outcomes),
            orders_file=meta.get("orders_file"),
            summary=json.loads(meta["summary"]) if "summary" in meta else None,
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


#: The reason given for a staged order that no task recorded an outcome for.
_NO_OUTCOME = "no outcome recorded: the order task ended without placing or refusing it"
