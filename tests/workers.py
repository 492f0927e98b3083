"""Real Celery worker processes and an event recorder for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.testing.process import stop_process

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """``celery -A tasks worker`` in a subprocess, logging at DEBUG to a file."""

    def __init__(
        self,
        name: str,
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        concurrency: int = 2,
        pool: str = "prefork",
        queues: str | None = None,
        loglevel: str = "DEBUG",
        extra_args: Sequence[str] = (),
        app: str = "tasks",
        include: str | None = "tests.testtasks",
        cwd: Path = ROOT,
    ) -> None:
        self.cwd = cwd
        self.name = f"{name}-{uuid.uuid4().hex[:6]}@%h"
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-l",
            loglevel,
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            self.name,
            "--without-gossip",
            "--without-mingle",
        ]
        if include:
            self.args += ["--include", include]
        if queues:
            self.args += ["-Q", queues]
        self.args += list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def solo(
        cls,
        name: str,
        log_dir: Path,
        api_url: str,
        env: dict[str, str] | None = None,
        **options: Any,
    ) -> WorkerProcess:
        """One pool process, on a queue of its own named ``name``, minting from ``api_url``."""
        options.setdefault("concurrency", 1)
        options.setdefault("queues", name)
        return cls(name, log_dir, env={"SFOX_API_URL": api_url, **(env or {})}, **options)

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if " ready." in self.log():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"worker did not become ready:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.proc, timeout)
        if getattr(self, "_log", None):
            self._log.close()


class Caller:
    """Sends tasks by name to ``queue`` on the broker at ``url``, as another app would.

    Through a connection of its own: Celery prefers CELERY_BROKER_URL (the
    suite's Redis database) over any broker an app is given. Results come from
    the result backend the environment names.
    """

    def __init__(self, url: str, queue: str) -> None:
        from celery import Celery

        self.queue = queue
        self.app = Celery("caller")
        self.app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_publish_retry_policy={"max_retries": 12, "interval_step": 0.5, "interval_max": 2},
        )
        self.connection = self.app.connection_for_write(url)

    def send(self, name: str, **options: Any) -> Any:
        """The task's AsyncResult."""
        return self.app.send_task(name, connection=self.connection, queue=self.queue, **options)

    def close(self) -> None:
        self.connection.release()


class EventRecorder:
    """Receives every event on the broker in a thread and keeps them."""

    def __init__(self) -> None:
        from tasks import app

        self.app = app
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        # Some tests kill every client connection (CLIENT KILL): connect again then.
        while not self._stop.is_set():
            try:
                self._capture()
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.2)

    def _capture(self) -> None:
        with self.app.connection_for_read() as conn:
            receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self._ready.set()
            while not self._stop.is_set():
                try:
                    receiver.capture(limit=None, timeout=0.5, wakeup=False)
                except (TimeoutError, OSError):
                    continue
                except Exception as exc:
                    if "timed out" in str(exc) or "timeout" in type(exc).__name__.lower():
                        continue
                    raise

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def start_event_recorder() -> EventRecorder:
    recorder = EventRecorder()
    recorder._thread.start()
    recorder._ready.wait(10)
    time.sleep(0.3)
    return recorder
