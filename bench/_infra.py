"""The real parts a benchmark run starts and watches: Redis, the stand-in, workers.

- :class:`BenchRedis`: the benchmark's own Redis database. It is checked,
  locked against a second benchmark, and emptied before every run, so each
  starts with an empty limiter window and no leftover messages.
- :class:`FakeProcess`: ``python -m tasks.testing`` in its own process (its
  CPU must not share a GIL with the client being measured), driven through
  its ``/_fake/`` control API.
- :class:`Workers`: ``celery -A tasks worker -P prefork`` processes, with
  their CPU seconds and, through :class:`Sampler`, their peak RSS.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from tasks.testing.process import stop_process

#: A package rate no run reaches: the limiter still runs, it never waits.
UNLIMITED_RATE = "10000000/10s"

ROOT = Path(__file__).resolve().parent.parent
#: The benchmark's Redis unless told otherwise; other engineers' tests use 14 and 15.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
#: Key that keeps a second benchmark off the same database while one runs.
LOCK_KEY = "bench:lock"
#: How long a lock outlives a benchmark that died without releasing it.
LOCK_TTL = 3600
#: Seconds a worker or the stand-in may take to come up.
START_TIMEOUT = 60.0

MB = 1024 * 1024


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why and what to do."""


class BenchRedis:
    """The benchmark's Redis database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: redis.Redis[bytes] = redis.Redis.from_url(url, socket_timeout=10)
        self._token = uuid.uuid4().hex

    def check(self) -> None:
        """Raise :class:`BenchError` unless Redis answers at :attr:`url`."""
        try:
            if not self.client.ping():
                raise BenchError(f"Redis at {self.url} did not answer PING")
        except redis.RedisError as exc:
            raise BenchError(
                f"Redis is not answering at {self.url} ({type(exc).__name__}): start it "
                "(.ci/ensure-redis) or pass --redis-url"
            ) from None

    def lock(self) -> None:
        """Take the database for this benchmark, or say who has it."""
        if not self.client.set(LOCK_KEY, self._token, nx=True, ex=LOCK_TTL):
            raise BenchError(
                f"another benchmark holds {self.url} (key {LOCK_KEY}); wait for it, or use "
                "another database with --redis-url / SFOX_BENCH_REDIS_URL"
            )

    def unlock(self) -> None:
        if self.client.get(LOCK_KEY) == self._token.encode():
            self.client.delete(LOCK_KEY)

    def wipe(self) -> None:
        """Empty the database but for the lock: queues, results, runs, limiter logs and pauses.

        Done before every run, so each starts on an empty limiter window.
        """
        for key in self.client.scan_iter(count=1000):
            if key != LOCK_KEY.encode():
                self.client.delete(key)


class FakeProcess:
    """The sFOX stand-in as a subprocess."""

    def __init__(self, api_key: str, log_dir: Path) -> None:
        self.api_key = api_key
        self.log_dir = log_dir
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._http = requests.Session()
        self._http.trust_env = False

    def start(
        self, *, latency: float, rate_limit: int | None, rate_window: float, rate_penalty: float
    ) -> FakeProcess:
        args = [
            sys.executable, "-m", "tasks.testing", "--port", "0",
            "--latency", str(latency),
            "--rate-window", str(rate_window), "--rate-penalty", str(rate_penalty),
        ]  # fmt: skip
        if rate_limit is not None:
            args += ["--rate-limit", str(rate_limit)]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.log_dir / "fake_sfox.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, "SFOX_ENTERPRISE_API_KEY": self.api_key},
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(http://\S+)", line)
        if not match:
            self.stop()
            raise BenchError(f"the sFOX stand-in did not start: {line!r}")
        self.url = match.group(1)
        self.process = psutil.Process(self.proc.pid)
        return self

    def _control(self, method: str, name: str, payload: Any = None) -> Any:
        response = self._http.request(method, f"{self.url}/_fake/{name}", json=payload, timeout=30)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        """Forget requests, tokens, penalties and the per-IP window (configuration stays)."""
        self._control("POST", "reset")

    def configure(self, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._control("POST", "config", changes)
        return result

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._control("GET", "stats")
        stats.pop("orders", None)
        return stats

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        stop_process(self.proc, 10)
        if getattr(self, "_stderr", None):
            self._stderr.close()


def tree(process: psutil.Process) -> list[psutil.Process]:
    """``process`` and its live descendants."""
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    """User + system CPU of the processes, and of the children they have reaped."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


@dataclass
class Peak:
    """Peak resident memory seen by a :class:`Sampler`, in bytes."""

    #: Largest sum over the watched processes at one moment (worker main + pool processes).
    total: int = 0
    #: Largest single pool process (or the single watched process).
    largest: int = 0
    samples: int = 0


class Sampler:
    """Samples the RSS of a changing set of processes in a thread, keeping the peaks.

    ``roots`` returns the processes to watch; each is read with its live
    descendants. The largest single process excludes a root that has
    children (a Celery worker's main process), so it is a pool process.
    """

    def __init__(self, roots: Callable[[], list[psutil.Process]], interval: float = 0.1) -> None:
        self._roots = roots
        self.interval = interval
        self.peak = Peak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _sample(self) -> None:
        total = 0
        largest = 0
        for root in self._roots():
            members = tree(root)
            for process in members:
                try:
                    rss = int(process.memory_info().rss)
                except psutil.Error:
                    continue
                total += rss
                if process is not root or len(members) == 1:
                    largest = max(largest, rss)
        self.peak.total = max(self.peak.total, total)
        self.peak.largest = max(self.peak.largest, largest)
        self.peak.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()


class Workers:
    """``count`` Celery worker processes of ``concurrency`` pool processes each."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        count: int = 1,
        concurrency: int = 4,
        pool: str = "prefork",
        redis_client: redis.Redis[bytes],
        command: list[str] | None = None,
        worker_envs: Sequence[dict[str, str]] = (),
    ) -> None:
        self.env = env
        #: Settings of the worker of that index only, on top of ``env`` (its egress address).
        self.worker_envs = list(worker_envs)
        self.log_dir = log_dir
        self.count = count
        self.concurrency = concurrency
        self.pool = pool
        self.redis = redis_client
        #: Replaces ``python -m celery`` (the CPU profiler wraps the worker this way).
        self.command = command or [sys.executable, "-m", "celery"]
        self.tag = uuid.uuid4().hex[:8]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.processes: list[psutil.Process] = []
        self._logs: list[Any] = []

    def start(self) -> Workers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            name = f"bench{index}-{self.tag}@%h"
            log = open(self.log_dir / f"worker-{self.tag}-{index}.log", "ab")  # noqa: SIM115
            self._logs.append(log)
            args = [
                *self.command, "-A", "tasks", "worker",
                "-P", self.pool, "-c", str(self.concurrency), "-l", "WARNING", "-n", name,
                "--without-gossip", "--without-mingle", "--include", "bench.tasks",
            ]  # fmt: skip
            env = {**self.env, **(self.worker_envs[index] if index < len(self.worker_envs) else {})}
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)
            self.procs.append(proc)
            self.processes.append(psutil.Process(proc.pid))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    self.stop()
                    raise BenchError(
                        f"a worker exited with {proc.returncode} at start; see {self.log_dir}"
                    )
            ready = sum(1 for _ in self.redis.scan_iter(match=f"bench:ready:*{self.tag}*"))
            if ready >= self.count:
                return self
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"workers did not become ready in {START_TIMEOUT:g} s; see {self.log_dir}")

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no message is queued or unacknowledged (in kombu's Redis layout).

        With late acks a message stays unacknowledged until its task ends, so this is
        "every task sent so far has run": stopping workers with work in flight can leave
        a warm shutdown waiting for it.
        """
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline:
            queue = self.env.get("SFOX_QUEUE") or "sfox"
            batch = self.env.get("SFOX_BATCH_QUEUE") or f"{queue}.batch"
            busy = self.redis.llen(queue) + self.redis.llen(batch) + self.redis.hlen("unacked")
            quiet = quiet + 1 if busy == 0 else 0
            if quiet >= 3:
                return True
            time.sleep(0.05)
        return False

    def logs(self) -> list[str]:
        """What the workers have logged so far."""
        texts = []
        for path in sorted(self.log_dir.glob(f"worker-{self.tag}-*.log")):
            texts.append(path.read_text(errors="replace"))
        return texts

    def cpu_seconds(self) -> float:
        return cpu_seconds(p for root in self.processes for p in tree(root))

    def stop(self, timeout: float = 20.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, process in zip(self.procs, self.processes, strict=True):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for child in tree(process):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                proc.wait(5)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> Workers:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def mb(value: float) -> float:
    """Bytes to MiB."""
    return value / MB


@contextlib.contextmanager
def measured(row: Any, workers: Workers, fake: Any = None) -> Iterator[None]:
    """Run the block with ``workers`` started and sampled; note its time, CPU and peak RSS.

    Fills ``row``'s wall time (the block alone), the workers' and the stand-in's
    CPU seconds, and the peak RSS of the largest process and of all of them.
    """
    with workers, Sampler(lambda: workers.processes) as sampler:
        time.sleep(0.3)
        row.rss_idle_largest_mb = mb(sampler.peak.largest)
        cpu0 = workers.cpu_seconds()
        fake0 = fake.cpu_seconds() if fake is not None else 0.0
        started = time.perf_counter()
        yield
        row.wall_s = time.perf_counter() - started
        # The last tasks (callbacks, done marks) may still be running: let them end first.
        workers.wait_idle()
        row.worker_cpu_s = workers.cpu_seconds() - cpu0
        if fake is not None:
            row.fake_cpu_s = fake.cpu_seconds() - fake0
    row.rss_total_mb = mb(sampler.peak.total)
    row.rss_largest_mb = mb(sampler.peak.largest)
