"""One row of the benchmark's results: a measured (or computed) run, as it goes to JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """One measured (or computed) run."""

    section: str
    approach: str
    users: int
    concurrency: int = 0
    latency: float = 0.0
    wall_s: float = 0.0
    tokens: int = 0
    requests: int = 0
    rate_limited: int = 0
    max_in_window: int = 0
    rss_total_mb: float = 0.0
    rss_largest_mb: float = 0.0
    rss_idle_largest_mb: float = 0.0
    worker_cpu_s: float = 0.0
    fake_cpu_s: float = 0.0
    projected: bool = False
    skipped: str = ""
    notes: list[str] = field(default_factory=list)
    # The nightly and egress sections: requests by kind, as the stand-in counted them.
    #: Batch mint requests (``POST /v1/enterprise/user-tokens``).
    mints: int = 0
    #: Single-user mints: re-mints of a token expired or refused at use.
    remints: int = 0
    #: Order requests.
    orders: int = 0
    #: Orders placed (201), as the run itself reports them.
    placed: int = 0
    #: Users sFOX issued more than one token in the run.
    minted_twice: int = 0
    #: Seconds since minting of the token an order carried: the oldest, and the 99th percentile.
    token_age_max_s: float | None = None
    token_age_p99_s: float | None = None
    #: Seconds from the run's start to the arrival of its last order.
    last_order_s: float = 0.0
    #: The rate-limit bound for this row's requests and budgets, seconds.
    bound_s: float = 0.0
    #: Per client address at the stand-in: requests, 429s, densest window.
    addresses: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["tokens_per_s"] = self.tokens_per_s
        return data
