"""The Redis records of one date's nightly run: who runs it, its orders, outcomes and summary.

Each order is staged once (keyed by its ``client_order_id``), each outcome is
written once, and a placement always wins over the "already placed" of a
concurrent duplicate: the Lua scripts beside this module make each step safe to
run again. Who runs the date is two keys: the *owner* (a task id) and a short
*lease* its coordinator renews while it works and keeps for its own next turn
between turns; a run whose lease is gone while unfinished has lost its
coordinator, and the next trigger takes it over (:meth:`NightlyRun.take`). The
tasks in :mod:`tasks.nightly.tasks` drive it; the fan-out keeps books of its own.

Eviction. Once the orders are staged (:meth:`NightlyRun.mark_staged`), the records
carry no TTL while the run is active, so a Redis on ``volatile-lru`` leaves them
alone; they get :data:`RUN_TTL` when the run ends (:meth:`NightlyRun.close`). Before
that, each carries :data:`RUN_TTL`, so that a run abandoned while staging leaves
nothing that lives forever. A staged run is in the
registry of runs (``sfox:nightly:runs``); each take sweeps it, and a run with no
coordinator for :data:`ABANDONED_AFTER` gets its TTL there. Whatever is lost anyway
(``allkeys-lru`` evicts any key) is found by :meth:`NightlyRun.lost`: staging writes
its counts into the meta, each outcome is counted, and the registry remembers which
dates must have records; a run found short is reported ``lost``, never ``done``.
"""

from __future__ import annotations

import json
import logging
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

__all__ = ["ABANDONED_AFTER", "RUN_TTL", "Claim", "NightlyRun", "RunBooks"]

logger = logging.getLogger("tasks.nightly")

#: Seconds the run's records stay in Redis once it ended or was abandoned (the summary
#: lives in the result backend too).
RUN_TTL = 3 * 86400
#: Seconds a staged, unfinished run may go without a coordinator's take before it counts
#: as abandoned: its records get :data:`RUN_TTL` (a later trigger still resumes it).
ABANDONED_AFTER = 86400
#: The registry of staged runs: active dates (scored by when a sweep next looks at each)
#: and ended ones (scored by when their records expire). Neither carries a TTL.
ACTIVE_RUNS = "sfox:nightly:runs"
ENDED_RUNS = "sfox:nightly:ended"
#: Most dates one sweep of the registry looks at.
_SWEEP_LIMIT = 20

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

    def records(self) -> list[str]:
        """Every key of the run but its lease (which has a TTL of its own)."""
        return [
            self.owner,
            self.meta,
            self.orders,
            self.user_orders,
            self.users,
            self.outcomes,
            self.errors,
            self.reminted,
        ]

    def activate(self) -> None:
        """A coordinator works on the run (it took the date): a staged run's records lose
        any TTL (an abandoned run resumed) and it is active in the registry again; then
        the registry is swept. Before staging, every record keeps its TTL."""
        if self.client.hexists(self.meta, "staged"):
            with self.client.pipeline() as pipe:
                for key in self.records():
                    pipe.persist(key)
                pipe.execute()
            self._register()
        sweep_registry(self.client)

    def _register(self) -> None:
        with self.client.pipeline() as pipe:
            pipe.zadd(ACTIVE_RUNS, {self.day.isoformat(): time.time() + ABANDONED_AFTER})
            pipe.zrem(ENDED_RUNS, self.day.isoformat())
            pipe.execute()

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
        script(self.client, lua(_LUA, "flag"))(keys=[self.meta], args=[name, value, RUN_TTL])

    def mark_staged(self, orders: int) -> None:
        """The ``orders`` read are staged: flag it with the counts, make every record
        persistent while the run is active, and enter the registry."""
        counted = [self.meta, self.orders, self.users, self.errors]
        others = [key for key in self.records() if key not in counted]
        script(self.client, lua(_LUA, "staged"))(keys=[*counted, *others], args=[orders])
        self._register()

    def close(self, summary: Mapping[str, Any]) -> None:
        """The run ended: keep its summary; its records expire in :data:`RUN_TTL`."""
        with self.client.pipeline() as pipe:
            pipe.hset(self.meta, "summary", json.dumps(summary))
            for key in self.records():
                pipe.expire(key, RUN_TTL)
            pipe.zrem(ACTIVE_RUNS, self.day.isoformat())
            pipe.zadd(ENDED_RUNS, {self.day.isoformat(): time.time() + RUN_TTL})
            pipe.execute()

    def lost(self, *, staged: bool = False) -> tuple[str, ...]:
        """What of the run's records Redis lost; empty when they are whole (or finished).

        A date with no staged meta has lost every record when the registry knows it,
        or when the caller does (``staged``: its coordinator staged it, or saw it
        staged); else each key is checked against the count staging (or recording)
        wrote. Counts a run staged before they existed are not there, and not checked.
        """
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.meta)
            pipe.hlen(self.orders)
            pipe.llen(self.users)
            pipe.hlen(self.errors)
            pipe.hlen(self.outcomes)
            pipe.zscore(ACTIVE_RUNS, self.day.isoformat())
            pipe.zscore(ENDED_RUNS, self.day.isoformat())
            raw_meta, *sizes, active, ended = pipe.execute()
        meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
        if "summary" in meta:
            return ()
        if "staged" not in meta:
            known = staged or active is not None
            known = known or (ended is not None and float(ended) > time.time())
            return (
                ("every record of the run: its staged orders, outcomes and flags",) if known else ()
            )
        counted = ("staged_orders", "staged_users", "staged_errors", "recorded")
        names = ("staged orders", "users", "skipped rows", "order outcomes")
        return tuple(
            f"{name}: {meta[count]} written, {size} found"
            for name, count, size in zip(names, counted, sizes, strict=True)
            if count in meta and size < int(meta[count])
        )

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
                self._bound(pipe)
                pipe.execute()
                pending = 0
        self._bound(pipe)
        pipe.execute()
        return orders, errors

    def _bound(self, pipe: Any) -> None:
        """Until :meth:`mark_staged`, the staged records carry :data:`RUN_TTL`: a run
        abandoned while staging leaves nothing that lives forever."""
        for key in (self.orders, self.user_orders, self.users, self.errors):
            pipe.expire(key, RUN_TTL)

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
            keys=[self.outcomes, self.meta],
            args=[coid, value, "1" if outcome.status == "placed" else "0", RUN_TTL],
        )

    def count_remint(self, user_id: str) -> None:
        """Note that ``user_id``'s token was minted again (a set: once per user, however
        often the note is made)."""
        with self.client.pipeline() as pipe:
            pipe.sadd(self.reminted, user_id)
            pipe.ttl(self.meta)
            meta_ttl = pipe.execute()[-1]
        if meta_ttl != -1:  # the run is not active: nothing of it lives forever
            self.client.expire(self.reminted, RUN_TTL)

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
            "lost": [],
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


def sweep_registry(client: redis.Redis[bytes], now: float | None = None) -> None:
    """Look at the registry's dates that are due: bound the abandoned, forget the ended.

    A staged run whose lease no coordinator held for :data:`ABANDONED_AFTER` is
    abandoned: its records get :data:`RUN_TTL`. One whose records are gone is
    reported lost. Ended dates leave the registry once their records expired. At
    most :data:`_SWEEP_LIMIT` dates a call: each take sweeps.
    """
    now = time.time() if now is None else now
    client.zremrangebyscore(ENDED_RUNS, "-inf", now)
    for raw in client.zrangebyscore(ACTIVE_RUNS, "-inf", now, start=0, num=_SWEEP_LIMIT):
        _look_at(NightlyRun(client, date.fromisoformat(raw.decode())), now)


def _look_at(run: NightlyRun, now: float) -> None:
    with run.client.pipeline() as pipe:
        pipe.pttl(run.lease)
        pipe.hexists(run.meta, "staged")
        pipe.ttl(run.meta)
        lease_ms, staged, ttl = pipe.execute()
    day = run.day.isoformat()
    if lease_ms > 0 and ttl == -1:
        run.client.zadd(ACTIVE_RUNS, {day: now + ABANDONED_AFTER}, xx=True)
        return
    if not staged:
        logger.error("nightly run for %s is lost: Redis evicted its records before it ended", day)
    elif ttl == -1:
        logger.warning(
            "nightly run for %s abandoned: no coordinator for %.0f s; its records expire in %d s "
            "unless a trigger resumes it",
            day,
            ABANDONED_AFTER,
            RUN_TTL,
        )
        with run.client.pipeline() as pipe:
            for key in run.records():
                pipe.expire(key, RUN_TTL)
            pipe.execute()
    with run.client.pipeline() as pipe:
        pipe.zrem(ACTIVE_RUNS, day)
        pipe.zadd(ENDED_RUNS, {day: now + (ttl if ttl > 0 else RUN_TTL)})
        pipe.execute()
