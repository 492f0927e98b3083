"""What the stand-in saw, for tests and the benchmark: counts, windows, token ages, stats.

A mixin of :class:`~tasks.testing.server.FakeSfox`, reading the records that
the request handling writes; it holds no secret and returns none.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .faults import (
    ORDERS_PATH,
    TOKENS_PATH,
    FakeSfoxConfig,
    Fault,
    Order,
    RequestRecord,
    _LiveRecord,
)


class Inspection:
    """The read side of the stand-in's records."""

    _lock: threading.Lock
    _config: FakeSfoxConfig
    _log: list[_LiveRecord]
    _tokens: dict[str, tuple[str, datetime]]
    _orders: list[Order]
    _faults: deque[Fault]
    _refused: dict[str, tuple[int, str]]
    _duplicates: int
    _rate_limited: int
    _rate_limited_by_ip: dict[str, int]
    _token_ages: list[float]
    _mints_by_user: dict[str, int]
    _wall_offset: float

    @property
    def requests_log(self) -> list[RequestRecord]:
        """Snapshots of every non-control request, in arrival order."""
        with self._lock:
            return [record.snapshot() for record in self._log]

    @property
    def issued_tokens(self) -> dict[str, tuple[str, datetime]]:
        """token -> (user_id, expiry) for every token this fake has handed out."""
        with self._lock:
            return dict(self._tokens)

    @property
    def orders(self) -> list[Order]:
        with self._lock:
            return list(self._orders)

    @property
    def duplicate_order_attempts(self) -> int:
        with self._lock:
            return self._duplicates

    @property
    def rate_limited_count(self) -> int:
        """How many 429s the rate limiter served (scripted 429 faults are not included)."""
        with self._lock:
            return self._rate_limited

    def count(self, path_prefix: str = "") -> int:
        """Number of logged requests whose path starts with ``path_prefix``."""
        with self._lock:
            return sum(1 for record in self._log if record.path.startswith(path_prefix))

    def max_requests_in_window(
        self, window_s: float, path_prefix: str | None = None, *, ip: str | None = None
    ) -> int:
        """Most requests that arrived within any ``window_s``-second span (half-open).

        ``ip`` counts only the requests from that client address.
        """
        if not window_s > 0:
            raise ValueError("window_s must be > 0")
        with self._lock:
            times = sorted(
                r.time
                for r in self._log
                if (path_prefix is None or r.path.startswith(path_prefix)) and ip in (None, r.ip)
            )
        return _densest(times, window_s)

    def rate_limited_by_address(self) -> dict[str, int]:
        """The limiter's 429s per client address (scripted 429 faults are not included)."""
        with self._lock:
            return dict(self._rate_limited_by_ip)

    def token_ages_at_use(self) -> list[float]:
        """For each order request, seconds since the token it carried was minted."""
        with self._lock:
            return list(self._token_ages)

    def _by_address(self, window_s: float) -> dict[str, dict[str, int]]:
        """Requests, 429s and the densest window of each client address."""
        with self._lock:
            times: dict[str, list[float]] = {}
            counts: dict[str, dict[str, int]] = {}
            for record in self._log:
                times.setdefault(record.ip, []).append(record.time)
                entry = counts.setdefault(
                    record.ip,
                    {"requests": 0, "token_requests": 0, "order_requests": 0, "rate_limited": 0},
                )
                entry["requests"] += 1
                if record.path.startswith(TOKENS_PATH):
                    entry["token_requests"] += 1
                elif record.path.startswith(ORDERS_PATH):
                    entry["order_requests"] += 1
            for ip, limited in self._rate_limited_by_ip.items():
                counts.setdefault(
                    ip, {"requests": 0, "token_requests": 0, "order_requests": 0, "rate_limited": 0}
                )["rate_limited"] = limited
        for ip, entry in counts.items():
            entry["max_requests_in_window"] = _densest(sorted(times.get(ip, [])), window_s)
        return dict(sorted(counts.items()))

    def _token_use_stats_locked(self) -> dict[str, Any]:
        ages = sorted(self._token_ages)
        minted_twice = sum(1 for n in self._mints_by_user.values() if n > 1)
        return {
            "orders": len(ages),
            "max_s": round(ages[-1], 3) if ages else None,
            "p99_s": round(_percentile(ages, 0.99), 3) if ages else None,
            "p50_s": round(_percentile(ages, 0.5), 3) if ages else None,
            "users_minted": len(self._mints_by_user),
            "users_minted_more_than_once": minted_twice,
        }

    def stats(self) -> dict[str, Any]:
        """Counters for the control API and for humans; contains no tokens or keys."""
        cfg = self._config
        with self._lock:
            by_path: dict[str, int] = {}
            by_status: dict[str, int] = {}
            for record in self._log:
                by_path[record.path] = by_path.get(record.path, 0) + 1
                by_status[str(record.status)] = by_status.get(str(record.status), 0) + 1
            total = len(self._log)
            token_requests = sum(1 for r in self._log if r.path.startswith(TOKENS_PATH))
            order_requests = sum(1 for r in self._log if r.path.startswith(ORDERS_PATH))
            result: dict[str, Any] = {
                "requests": {
                    "total": total,
                    TOKENS_PATH: token_requests,
                    ORDERS_PATH: order_requests,
                    "other": total - token_requests - order_requests,
                },
                "requests_by_path": by_path,
                "status_counts": by_status,
                "tokens_issued": len(self._tokens),
                "token_use": self._token_use_stats_locked(),
                "times": {
                    "first_request_at": self._wall(self._log[0].time) if self._log else None,
                    "last_request_at": self._wall(self._log[-1].time) if self._log else None,
                    "last_order_at": (
                        self._wall(max(o.placed_at for o in self._orders)) if self._orders else None
                    ),
                },
                "rate_limited": self._rate_limited,
                "orders_placed": len(self._orders),
                "duplicate_order_attempts": self._duplicates,
                "faults_pending": len(self._faults),
                "refused": sorted(self._refused),
                "orders": [order.to_dict() for order in self._orders],
            }
        result["rate_window"] = cfg.rate_window
        result["max_requests_in_window"] = self.max_requests_in_window(cfg.rate_window)
        result["max_token_requests_in_window"] = self.max_requests_in_window(
            cfg.rate_window, TOKENS_PATH
        )
        result["by_address"] = self._by_address(cfg.rate_window)
        result["config"] = dataclasses.asdict(cfg)
        return result

    def _wall(self, monotonic: float) -> float:
        return round(self._wall_offset + monotonic, 4)


def _densest(times: Sequence[float], window_s: float) -> int:
    """Most of the sorted ``times`` within any half-open ``window_s``-second span."""
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def _percentile(ordered: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of sorted, non-empty ``ordered``."""
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]
