"""CPU cost of one 100-user batch in the package, and where it goes.

Against a stand-in with no latency and no rate limit:

- :func:`in_process` times the in-process path unprofiled, on the process
  CPU clock: the whole :class:`~tasks.minting.Minter` per batch, and its parts
  alone (the sFOX client's request and parsing, sealing 100 tokens, one
  limiter call). Each is the best of a few runs: the machine may be shared,
  and other work only ever adds CPU time.
- :class:`Spy` samples a real prefork worker (main and pool processes) with
  py-spy while it mints: a sampling profiler counting only threads that hold
  the GIL costs the worker almost nothing and sees the Celery glue as well as
  the package. :func:`summarize_spy` splits the samples into components (for
  mint tasks by the deepest package entry point on each stack, for
  ``with_user_tokens`` by the task or process a sample was in) and names the
  hot spots by the function on top of the stack.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Samples per second per process.
SPY_RATE = 1000

#: (component, qualified name, file suffix), matched against each stack frame.
_ENTRY = (
    ("sealing (AES-GCM)", "Sealer.seal", "tasks/sealing.py"),
    ("limiter (Redis EVALSHA)", "RedisLimiter.try_acquire", "tasks/budget/ratelimit.py"),
    ("limiter (Redis EVALSHA)", "RedisLimiter.release", "tasks/budget/ratelimit.py"),
    ("HTTP request + JSON decode (requests)", "SfoxClient._post", "tasks/sfox/client.py"),
    ("token entries: checks, expires", "SfoxClient.create_user_tokens", "tasks/sfox/client.py"),
    ("minter bookkeeping", "Minter._request.<locals>.send", "tasks/minting.py"),
    ("retry wrapper (tenacity)", "RetryPolicy.call", "tasks/budget/retry.py"),
    ("minter bookkeeping", "Minter.mint", "tasks/minting.py"),
)
GLUE = "Celery glue: consume, trace, validate, result, events, ack"


def _cpu(fn: Callable[[], Any]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def in_process(
    fake_url: str,
    api_key: str,
    redis_url: str,
    *,
    users: int,
    batch_size: int = 100,
    repeats: int = 3,
) -> dict[str, Any]:
    """Unprofiled CPU per batch (ms) of the Minter and of its parts alone, best of ``repeats``."""
    from tasks._settings import Rate, RetrySettings
    from tasks.budget.ratelimit import RedisLimiter
    from tasks.budget.retry import RetryPolicy
    from tasks.minting import Minter
    from tasks.sealing import Sealer
    from tasks.sfox.access import SfoxAccess
    from tasks.sfox.client import SfoxClient

    client = SfoxClient(fake_url, api_key)
    # A limit no run reaches: the limiter's cost is measured, never its waits.
    limiter = RedisLimiter.from_url(redis_url, Rate(10_000_000, 10.0))
    sealer = Sealer.for_keys((), api_key, 900)
    minter = Minter(
        SfoxAccess(client, limiter, RetryPolicy(RetrySettings()), sealer, rate_limit_penalty=60.0),
        batch_size=batch_size,
    )
    ids = [f"prof-{index:07d}" for index in range(users)]
    batches = [ids[i : i + batch_size] for i in range(0, users, batch_size)]
    minter.mint(ids[: batch_size * 5])  # warm: connections, imports, script load
    tokens = [f"{index:064x}" for index in range(batch_size)]
    per = 1000.0 / len(batches)

    def best(fn: Callable[[], Any]) -> float:
        # The least disturbed of a few runs: other work on the machine only adds.
        return min(_cpu(fn) for _ in range(repeats)) * per

    def slot() -> str:
        """One request's limiter slot: taken, then released."""
        name = limiter.try_acquire(5.0)[2]
        limiter.release(name)
        return name

    measured = {
        "minter_ms": best(lambda: minter.mint(ids)),
        "client_ms": best(lambda: [client.create_user_tokens(b) for b in batches]),
        "seal_ms": best(lambda: [sealer.seal(t) for _ in batches for t in tokens]),
        "limiter_ms": best(lambda: [slot() for _ in batches]),
    }
    measured["rest_ms"] = measured["minter_ms"] - (
        measured["client_ms"] + measured["seal_ms"] + measured["limiter_ms"]
    )
    client.close()
    return {"users": users, "batches": len(batches), "repeats": repeats, "measured": measured}


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Spy:
    """py-spy recording a process and its subprocesses until :meth:`stop`."""

    def __init__(self, pid: int, out: Path, log: Path) -> None:
        exe = py_spy()
        if exe is None:
            raise FileNotFoundError("py-spy is not installed (pip install -e '.[bench]')")
        self.out = out
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--rate",
                str(SPY_RATE),
                "--nolineno",
                "--full-filenames",
                "--format",
                "raw",
                "--nonblocking",
                "--gil",
                "--output",
                str(out),
            ],
            stdout=self._log,
            stderr=self._log,
        )
        time.sleep(0.5)  # let it attach before the work starts
        if self.proc.poll() is not None:
            self._log.close()
            raise RuntimeError(f"py-spy exited with {self.proc.returncode}; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def _frame_matches(frame: str, name: str, suffix: str) -> bool:
    return frame.startswith(name + " (") and frame.endswith(suffix + ")")


def _short(frame: str) -> str:
    name, _, path = frame.partition(" (")
    path = path.rstrip(")")
    for marker in ("site-packages/", "/wt5/", "/work/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        if "/lib/python3" in path:
            path = "stdlib/" + path.rsplit("/", 1)[-1]
    return f"{path}:{name}"


def classify_mint(code: list[str], processes: list[str]) -> str:
    """A mint task's sample: the deepest package entry point on its stack, else glue."""
    for frame in reversed(code):
        match = next((c for c, n, s in _ENTRY if _frame_matches(frame, n, s)), None)
        if match:
            return match
    return GLUE


#: Components of a with_user_tokens run's worker CPU.
WUT_MAIN = "worker main process: receive, dispatch, events, pool upkeep"
WUT_MINT = "minting in jit_mint_chunk (the Minter)"
WUT_SEND = "sending downstream tasks in jit_mint_chunk"
WUT_DONE = "jit_done task (failures, or a worker without tasks)"
WUT_MARK = "marking users done after the downstream (task_postrun handler)"
WUT_NOOP = "the no-op downstream task's own body"
WUT_POOL = "pool processes: tracing, link callbacks, events, results"


def classify_wut(code: list[str], processes: list[str]) -> str:
    """A with_user_tokens sample: which task, or which part of the worker, it was in."""
    if len(processes) <= 1:
        return WUT_MAIN
    names = [frame.partition(" (")[0] for frame in code]
    if "Minter.mint" in names:
        return WUT_MINT
    if "jit_mint_chunk" in names or "jit_segment" in names:
        return WUT_SEND
    if "_downstream_ended" in names:
        return WUT_MARK
    if "jit_done" in names:
        return WUT_DONE
    if "noop" in names:
        return WUT_NOOP
    return WUT_POOL


def summarize_spy(
    path: Path,
    units: int,
    *,
    rate: int = SPY_RATE,
    top: int = 12,
    classify: Callable[[list[str], list[str]], str] = classify_mint,
    marker: str = "Channel._create_client",
) -> dict[str, Any]:
    """Per-unit CPU (ms) by component and the top functions, from py-spy's raw output.

    A unit is a batch (mint tasks) or a user (with_user_tokens). ``marker`` names a
    function whose inclusive share is reported on its own (kombu building a Redis
    client object for every message it publishes).
    """
    components: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    main_process = 0
    marked = 0
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue  # py-spy reads memory of a running process: a few lines come out garbled
        count = int(count_text)
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        code = [f for f in frames if not f.startswith("process ")]
        if not code:
            continue
        components[classify(code, processes)] += count
        leaves[_short(code[-1])] += count
        if len(processes) <= 1:
            main_process += count
        if any(frame.startswith(marker + " (") for frame in code):
            marked += count
        total += count
    per = 1000.0 / rate / max(units, 1)
    return {
        "units": units,
        "samples": total,
        "total_ms": total * per,
        "main_process_ms": main_process * per,
        "marker": marker,
        "marker_share": marked / total if total else 0.0,
        "components_ms": {name: count * per for name, count in components.most_common()},
        "hot_spots": [
            {"function": name, "ms": count * per, "share": count / total if total else 0.0}
            for name, count in leaves.most_common(top)
        ],
    }
