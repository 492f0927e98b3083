"""The benchmark's CPU section: what one batch costs, in process and in a real worker.

The in-process figure comes from :mod:`bench._profile`; the worker's from psutil
and py-spy's samples of a prefork worker minting, and of one running a
``with_user_tokens`` fan-out into a no-op task.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
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


def _profiled_workers(bench: Bench, profile_name: str) -> tuple[Workers, Path]:
    """One worker, limits off, with the run's concurrency, and where py-spy writes its profile.

    The stand-in and the limiter start empty; the profile file is removed.
    """
    bench.reset()
    workers = Workers(
        bench.worker_env(UNLIMITED_RATE),
        bench.log_dir,
        count=1,
        concurrency=bench.config.concurrency,
        redis_client=bench.redis.client,
    )
    out = bench.log_dir / profile_name
    out.unlink(missing_ok=True)
    return workers, out


def _warm_ids(bench: Bench) -> list[str]:
    """Users enough to warm every pool process up: imports, sessions, pools, keys."""
    c = bench.config
    return [f"warm-{i}" for i in range(c.batch_size * c.concurrency * 2)]


def _spy(
    bench: Bench, workers: Workers, out: Path, log_name: str, summary: dict[str, Any]
) -> _profile.Spy | None:
    """py-spy on the worker, or None with the reason in ``summary["error"]``."""
    try:
        return _profile.Spy(workers.processes[0].pid, out, bench.log_dir / log_name)
    except (OSError, RuntimeError) as exc:
        summary["error"] = f"no py-spy profile: {exc}"
        return None


def _profile_worker(bench: Bench) -> dict[str, Any]:
    """A real prefork worker minting, its CPU from psutil and its stacks from py-spy."""
    c = bench.config
    workers, out = _profiled_workers(bench, "worker-profile.txt")
    ids = [f"prof-{index:07d}" for index in range(c.profile_users)]
    summary: dict[str, Any] = {}
    rounds = []
    with workers:
        bench._mint_tasks(_warm_ids(bench), c.batch_size, 60)
        bench.fake.reset()
        spy = _spy(bench, workers, out, "py-spy.log", summary)
        # A few rounds, the least disturbed counts: the machine may be shared.
        step = math.ceil(len(ids) / PROFILE_ROUNDS)
        sent = 0
        for start in range(0, len(ids), step):
            part = ids[start : start + step]
            cpu0 = workers.cpu_seconds()
            bench._mint_tasks(part, c.grid_chunk, bench._timeout(len(part), UNLIMITED_RATE))
            cpu = workers.cpu_seconds() - cpu0
            total = int(bench.fake.stats()["requests"]["/v1/enterprise/user-tokens"])
            rounds.append(cpu / max(total - sent, 1) * 1000)
            sent = total
        if spy is not None:
            spy.stop()
    if spy is not None and out.exists():
        summary.update(_profile.summarize_spy(out, sent))
    summary.update(
        requests=sent,
        tasks=math.ceil(len(ids) / min(c.grid_chunk, c.max_user_ids)),
        concurrency=c.concurrency,
        rounds_ms=rounds,
        psutil_ms=min(rounds),
    )
    return summary


def _profile_wut(bench: Bench) -> dict[str, Any]:
    """A with_user_tokens run into the no-op, its worker CPU per user and its stacks."""
    c = bench.config
    workers, out = _profiled_workers(bench, "wut-profile.txt")
    ids = [f"wut-{index:07d}" for index in range(c.profile_wut_users)]
    summary: dict[str, Any] = {}
    with workers:
        bench._with_user_tokens(_warm_ids(bench), "warm", 120)
        workers.wait_idle()
        bench.fake.reset()
        spy = _spy(bench, workers, out, "py-spy-wut.log", summary)
        cpu0, started = workers.cpu_seconds(), time.perf_counter()
        users = bench._with_user_tokens(ids, "profile", 600)
        wall = time.perf_counter() - started
        workers.wait_idle()
        cpu = workers.cpu_seconds() - cpu0
        if spy is not None:
            spy.stop()
    requests = int(bench.fake.stats()["requests"]["/v1/enterprise/user-tokens"])
    if spy is not None and out.exists():
        summary.update(_profile.summarize_spy(out, users, classify=_profile.classify_wut))
    summary.update(
        users=users,
        requests=requests,
        concurrency=c.concurrency,
        wall_s=wall,
        psutil_ms_per_user=cpu / max(users, 1) * 1000,
        psutil_ms_per_batch=cpu / max(requests, 1) * 1000,
    )
    return summary
