"""The benchmark's CPU section: what one batch costs, in process and in a real worker.

The in-process figure comes from :mod:`bench._profile`; the worker's from psutil
and py-spy's samples of a prefork worker minting, and of one running a
``with_user_tokens`` fan-out into a no-op task.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from bench import _profile
from bench._infra import UNLIMITED_RATE, Workers

if TYPE_CHECKING:
    from bench.run import Bench

#: The profiled worker mints in this many rounds; the least disturbed one counts.
PROFILE_ROUNDS = 3


def section_profile(bench: Bench) -> None:
    """CPU per batch: in process, in a real worker, and per user of a with_user_tokens run."""
    c = bench.config
    bench.log(f"CPU per {c.batch_size}-user batch: stand-in with no latency, no limits")
    bench.fake.configure(latency=0.0, rate_limit=None)
    bench.reset()
    bench.profile["in_process"] = _profile.in_process(
        bench.fake.url, bench.api_key, c.redis_url, users=c.profile_users,
        batch_size=c.batch_size,
    )  # fmt: skip
    bench.profile["worker"] = _profile_worker(bench)
    bench.profile["wut"] = wut = _profile_wut(bench)
    bench.log(
        f"  with_user_tokens: {wut['psutil_ms_per_user']:.2f} ms of worker CPU per user "
        f"({wut['users']:,} users in {wut['wall_s']:.1f} s)"
    )
    measured = bench.profile["in_process"]["measured"]
    worker = bench.profile["worker"]
    bench.log(
        f"  in-process Minter {measured['minter_ms']:.2f} ms/batch; prefork worker "
        f"{worker.get('psutil_ms', 0):.2f} ms/batch (psutil), "
        f"{worker.get('total_ms', 0):.2f} ms/batch (py-spy samples)"
    )
    bench.fake.configure(latency=c.latency, rate_limit=c.sfox_limit)


class _ProfiledWorker:
    """One worker, limits off, at the run's concurrency, with py-spy on it once it is warm.

    The stand-in and the limiter start empty. :meth:`watch` starts py-spy (after the warm-up);
    leaving the block stops py-spy, then the worker. Whatever stopped py-spy from starting is
    in ``summary["error"]``; :meth:`summarize` adds its samples to ``summary``.
    """

    def __init__(self, bench: Bench, name: str) -> None:
        bench.reset()
        self._bench = bench
        self._name = name
        self.workers = Workers(
            bench.worker_env(UNLIMITED_RATE),
            bench.log_dir,
            count=1,
            concurrency=bench.config.concurrency,
            redis_client=bench.redis.client,
        )
        self.out = bench.log_dir / f"{name}-profile.txt"
        self.out.unlink(missing_ok=True)
        self.summary: dict[str, Any] = {}
        self._spy: _profile.Spy | None = None

    def __enter__(self) -> _ProfiledWorker:
        self.workers.__enter__()
        return self

    def watch(self) -> None:
        """Start py-spy on the worker now."""
        log = self._bench.log_dir / f"py-spy-{self._name}.log"
        try:
            self._spy = _profile.Spy(self.workers.processes[0].pid, self.out, log)
        except (OSError, RuntimeError) as exc:
            self.summary["error"] = f"no py-spy profile: {exc}"

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._spy is not None:
                self._spy.stop()
        finally:
            self.workers.__exit__(*exc_info)

    def summarize(self, units: int, **kwargs: Any) -> None:
        """py-spy's samples per unit of work, into ``summary``."""
        if self._spy is not None and self.out.exists():
            self.summary.update(_profile.summarize_spy(self.out, units, **kwargs))


def _warm_ids(bench: Bench) -> list[str]:
    """Users enough to warm every pool process up: imports, sessions, pools, keys."""
    c = bench.config
    return [f"warm-{i}" for i in range(c.batch_size * c.concurrency * 2)]


def _profile_worker(bench: Bench) -> dict[str, Any]:
    """A real prefork worker minting, its CPU from psutil and its stacks from py-spy."""
    c = bench.config
    ids = [f"prof-{index:07d}" for index in range(c.profile_users)]
    rounds = []
    with _ProfiledWorker(bench, "worker") as profiled:
        workers = profiled.workers
        bench._mint_tasks(_warm_ids(bench), c.batch_size, 60)
        bench.fake.reset()
        profiled.watch()
        # A few rounds, the least disturbed counts: the machine may be shared.
        step = math.ceil(len(ids) / PROFILE_ROUNDS)
        sent = 0
        cpu_total = 0.0
        for start in range(0, len(ids), step):
            part = ids[start : start + step]
            cpu0 = workers.cpu_seconds()
            bench._mint_tasks(part, c.grid_chunk, bench._timeout(len(part), UNLIMITED_RATE))
            cpu = workers.cpu_seconds() - cpu0
            cpu_total += cpu
            total = int(bench.fake.stats()["requests"]["/v1/enterprise/user-tokens"])
            rounds.append(cpu / max(total - sent, 1) * 1000)
            sent = total
    profiled.summarize(sent)
    profiled.summary.update(
        requests=sent,
        tasks=math.ceil(len(ids) / min(c.grid_chunk, c.max_user_ids)),
        concurrency=c.concurrency,
        rounds_ms=rounds,
        cpu_s=cpu_total,
        psutil_ms=_least_disturbed(rounds, cpu_total / max(sent, 1) * 1000),
    )
    return profiled.summary


def _least_disturbed(rounds: list[float], mean: float) -> float:
    """The smallest round that counted any CPU, else the mean over every round.

    The kernel counts CPU in clock ticks (10 ms): a short round on a busy machine
    can read as zero, which is no measurement at all.
    """
    counted = [r for r in rounds if r > 0]
    return min(counted) if counted else mean


def _profile_wut(bench: Bench) -> dict[str, Any]:
    """A with_user_tokens run into the no-op, its worker CPU per user and its stacks."""
    c = bench.config
    ids = [f"wut-{index:07d}" for index in range(c.profile_wut_users)]
    with _ProfiledWorker(bench, "wut") as profiled:
        workers = profiled.workers
        bench._with_user_tokens(_warm_ids(bench), "warm", 120)
        workers.wait_idle()
        bench.fake.reset()
        profiled.watch()
        cpu0, started = workers.cpu_seconds(), time.perf_counter()
        users = bench._with_user_tokens(ids, "profile", 600)
        wall = time.perf_counter() - started
        workers.wait_idle()
        cpu = workers.cpu_seconds() - cpu0
    requests = int(bench.fake.stats()["requests"]["/v1/enterprise/user-tokens"])
    profiled.summarize(users, classify=_profile.classify_wut)
    profiled.summary.update(
        users=users,
        requests=requests,
        concurrency=c.concurrency,
        wall_s=wall,
        psutil_ms_per_user=cpu / max(users, 1) * 1000,
        psutil_ms_per_batch=cpu / max(requests, 1) * 1000,
    )
    return profiled.summary
