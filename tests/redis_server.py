"""A Redis server of a test's own: its own port and directory, persistence on, restartable."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

import redis

from tasks.testing.process import stop_process
from tests.services import free_port


class PrivateRedis:
    """``redis-server`` on a free loopback port with an append-only file, for one test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--logfile", str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def restart(self, down_for: float = 0.5) -> None:
        """Stop (its data saved to the append-only file) and start again on the same port."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(redis.RedisError):  # SHUTDOWN closes its own connection
            self.client().shutdown(nosave=False)
        stop_process(self.proc, 10, already_asked=True)


class ConnectionKiller:
    """Drops every normal client connection of a Redis every ``interval`` seconds."""

    def __init__(self, client: redis.Redis, interval: float = 1.0) -> None:
        self.client = client
        self.interval = interval
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(redis.RedisError):
                self.kills += int(self.client.execute_command("CLIENT KILL TYPE normal SKIPME yes"))

    def __enter__(self) -> ConnectionKiller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
