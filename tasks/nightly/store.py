"""The Redis records of one date's nightly run: its orders, outcomes, lease and summary.

Each order is staged once (keyed by its ``client_order_id``), each outcome is
written once, and a placement always wins over the "already placed" of a
concurrent duplicate: the Lua scripts beside this module make each step safe to
run again. The tasks in :mod:`tasks.nightly.tasks` drive it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import date
from typing import Any

import redis

from .._redis import lua, script
from ..fanout.store import JitRun
from ..sfox.orders import OrderOutcome
from .orders import Order, OrderError, client_order_id

__all__ = ["RUN_TTL", "NightlyRun"]

#: Seconds the run's records stay in Redis (the summary lives in the result backend).
RUN_TTL = 3 * 86400

#: Most user IDs listed under one failure reason in the summary.
MAX_IDS_PER_REASON = 1000

#: Rows read and staged per Redis round trip.
_STAGE_BATCH = 500

#: Where the run's Lua lives (stage_order, record, lease, drop_lease .lua: KEYS and ARGV named
#: in each); every script is called through one NightlyRun method.
_LUA = __package__ or "tasks.nightly"


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
        self.jit = JitRun(client, f"nightly-{day.isoformat()}")

    # -- ownership -------------------------------------------------------------------

    def claim(self, task_id: str) -> str | None:
        """Own the date for ``task_id``; the other owner's id if someone else does."""
        if self.client.set(self.owner, task_id, nx=True, ex=RUN_TTL):
            return None
        current = self.client.get(self.owner)
        holder = current.decode() if current else ""
        return None if holder == task_id else holder

    def lease_for(self, token: str, seconds: float) -> bool:
        """Take the lease for ``token``, or renew it if it is ``token``'s already."""
        return bool(
            script(self.client, lua(_LUA, "lease"))(
                keys=[self.lease], args=[token, int(seconds * 1000)]
            )
        )

    def drop_lease(self, token: str) -> None:
        script(self.client, lua(_LUA, "drop_lease"))(keys=[self.lease], args=[token])

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

    def users_not_done(self) -> list[str]:
        """Users staged whose order task has not ended and whom sFOX did not refuse."""
        done = {u.decode() for u in self.client.smembers(self.jit.done_set)}
        done.update(self.jit.failed())
        users = (u.decode() for u in self.client.lrange(self.users, 0, -1))
        return [u for u in users if u not in done]

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

    def summary(self, status: str, started: float | None = None) -> dict[str, Any]:
        """The run's summary: counts, and the user IDs behind each failure reason.

        Every staged order is counted once: placed, already placed, or failed
        with a reason, including an order whose user was refused a token and
        one that has no outcome at all (its task ended without recording one).
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
        refused = {
            user_id: (
                f"token refused ({refusal.get('status')}): {refusal.get('error', '')}"
                if refusal.get("status") is not None
                else "token not issued: sFOX left the user out of its answer twice"
            )
            for user_id, refusal in self.jit.failed().items()
        }
        for coid, raw in self.client.hscan_iter(self.orders, count=1000):
            if coid.decode() in seen:
                continue
            user_id = Order.from_json(raw).user_id
            failed[refused.get(user_id, _NO_OUTCOME)].append(user_id)
        remints = self.remints()
        progress = self.jit.progress()
        errors = [json.loads(v) for v in self.client.hvals(self.errors)]
        errors.sort(key=lambda e: e["line"])
        return {
            "run_date": self.day.isoformat(),
            "status": status,
            "users": self.user_count(),
            "orders": int(self.client.hlen(self.orders)),
            "tokens_minted": progress.dispatched + remints,
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


#: The reason given for a staged order that no task recorded an outcome for.
_NO_OUTCOME = "no outcome recorded: the order task ended without placing or refusing it"
