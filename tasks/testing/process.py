"""Stopping a subprocess the test suite, the benchmark or a partner's tests started.

One recipe for every helper process (a worker, the stand-in, a Redis, a profiler): ask it
to stop, wait a bounded time, then kill it, so that no test or benchmark leaves one behind.
"""

from __future__ import annotations

import signal
import subprocess

__all__ = ["stop_process"]


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None,
    timeout: float = 15.0,
    *,
    sig: int = signal.SIGTERM,
    already_asked: bool = False,
) -> int | None:
    """Send ``sig`` (unless ``already_asked``), wait ``timeout`` seconds, then kill.

    Returns the exit code, or None when there was no process.
    """
    if proc is None:
        return None
    if proc.poll() is None:
        if not already_asked:
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode
