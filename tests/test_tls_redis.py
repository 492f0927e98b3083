"""Managed Redis as it usually runs: TLS, a password, a private CA.

One real ``redis-server`` (TLS only, ``requirepass``, a certificate from a
throwaway CA) carries the broker, the result backend and the shared limiter of
a real worker. Through it: a mint from the command line, a ``with_user_tokens``
fan-out into a downstream task, and ``sfox-tokens check``. The Redis password
then appears in no log line (the worker logs at DEBUG), no command output, no
page of Flower's (the worker's configuration included) and no metric.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from tasks.testing import Fault
from tests.conftest import ENTERPRISE_KEY
from tests.services import Response, ServiceProcess, answers, free_port, http_get
from tests.tlsredis import TlsRedis
from tests.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).with_name("sfox-tokens")
FLOWER_AUTH = "ops:tls-test-flower"
FAN_OUT = """
import hashlib, json, sys, time
import redis
from tasks import app, with_user_tokens
from tests.testtasks import record_token, runs_by_user

users = json.loads(sys.argv[1])
with_user_tokens(users, record_token.s("tls"), chunk_size=5).apply_async()
client = redis.Redis.from_url(app.conf.broker_url)
deadline = time.monotonic() + 60
while client.hlen("tests:downstream:tls") < len(users) and time.monotonic() < deadline:
    time.sleep(0.1)
calls = runs_by_user(client, "tls")
digests = {k.decode(): v.decode() for k, v in client.hgetall("tests:downstream:tls").items()}
print(json.dumps({"calls": calls, "digests": digests}))
"""


@dataclass
class TlsRun:
    """What the stack said while it ran over TLS Redis."""

    redis: TlsRedis
    worker: WorkerProcess
    metrics_port: int
    outputs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    flower_pages: dict[str, Response] = field(default_factory=dict)
    flower_log: str = ""
    issued: dict[str, str] = field(default_factory=dict)


def _env(tls: TlsRedis, fake_url: str, **more: str) -> dict[str, str]:
    import os

    return {
        **os.environ,
        "CELERY_BROKER_URL": tls.url,
        "CELERY_RESULT_BACKEND": tls.url,
        "SFOX_API_URL": fake_url,
        **more,
    }


def _flower_pages(env: dict[str, str], worker: WorkerProcess, log_dir: Path) -> tuple[dict, str]:
    port = free_port()
    flower = ServiceProcess(
        "flower-tls",
        [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}",
         "--address=127.0.0.1", f"--basic-auth={FLOWER_AUTH}"],
        log_dir,
        env=env,
        cwd=ROOT,
    ).start()  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        flower.wait_for(lambda: answers(base + "/healthcheck"), 30, "HTTP")
        prefix = worker.name.split("@")[0] + "@"

        def worker_conf() -> str | None:
            workers = http_get(base + "/api/workers?refresh=1", auth=FLOWER_AUTH).json()
            return next(
                (n for n, w in workers.items() if n.startswith(prefix) and w.get("conf")), None
            )

        name = flower.wait_for(worker_conf, 30, "the worker's configuration")
        paths = ["/api/workers?refresh=1", f"/worker/{quote(name)}", "/workers?json=1", "/broker",
                 "/api/queues/length", "/metrics", "/tasks", "/api/tasks"]  # fmt: skip
        pages = {path: http_get(base + path, auth=FLOWER_AUTH, timeout=30) for path in paths}
    finally:
        flower.stop()
    return pages, flower.log()


@pytest.fixture(scope="module")
def tls_run(fake_sfox_server, tmp_path_factory):
    """The worker, the CLI and Flower over TLS Redis; every process stopped, whatever happens."""
    directory = tmp_path_factory.mktemp("tls-redis")
    tls = TlsRedis(directory).start()
    worker = None
    try:
        metrics_port = free_port()
        env = _env(tls, fake_sfox_server.url)
        worker = WorkerProcess(
            "tls", directory, env={**env, "SFOX_METRICS_PORT": str(metrics_port)}
        ).start()
        run = TlsRun(tls, worker, metrics_port)
        fake_sfox_server.reset()
        fake_sfox_server.inject(Fault.status(503), Fault.status(429))

        def cli(name: str, *args: str) -> None:
            run.outputs[name] = subprocess.run(
                [str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip

        cli("mint", "mint", "tls-a", "tls-b", "tls-c")
        users = [f"tls-fan-{i}" for i in range(12)]
        run.outputs["fan-out"] = subprocess.run(
            [sys.executable, "-c", FAN_OUT, json.dumps(users)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        cli("check", "check")
        run.outputs["metrics"] = subprocess.CompletedProcess(
            [], 0, http_get(f"http://127.0.0.1:{metrics_port}/metrics").text, ""
        )
        run.issued = {token: user for token, (user, _) in fake_sfox_server.issued_tokens.items()}
        run.flower_pages, run.flower_log = _flower_pages(env, worker, directory)
        yield run
    finally:
        if worker is not None:
            worker.stop()
        tls.stop()
        fake_sfox_server.reset()


def test_a_mint_from_the_command_line_goes_through(tls_run):
    """`sfox-tokens mint` reaches the worker over TLS and gets every token back."""
    out = tls_run.outputs["mint"]
    assert out.returncode == 0, out.stdout + out.stderr
    for user in ("tls-a", "tls-b", "tls-c"):
        assert user in out.stdout


def test_a_fan_out_reaches_every_user_once(tls_run):
    """with_user_tokens over TLS: each of 12 users' downstream task ran once with its token."""
    import hashlib

    out = tls_run.outputs["fan-out"]
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    users = [f"tls-fan-{i}" for i in range(12)]
    assert seen["calls"] == {user: 1 for user in users}
    issued = {user: hashlib.sha256(t.encode()).hexdigest() for t, user in tls_run.issued.items()}
    assert seen["digests"] == {user: issued[user] for user in users}


def test_check_passes_over_tls(tls_run):
    """`sfox-tokens check`: broker, backend and limiter answer over TLS; all seven pass."""
    out = tls_run.outputs["check"]
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all 7 checks passed" in out.stdout
    assert out.stdout.count("rediss://") >= 3


def test_the_password_appears_nowhere(tls_run):
    """No log line, command output, Flower page or metric holds the Redis password."""
    password = tls_run.redis.password
    assert tls_run.worker.log(), "the worker logged nothing"
    places = {"worker log": tls_run.worker.log(), "flower log": tls_run.flower_log}
    for name, out in tls_run.outputs.items():
        places[f"{name} output"] = out.stdout + out.stderr
    for path, response in tls_run.flower_pages.items():
        places[f"Flower {path}"] = response.text
    # The worker's configuration as Flower shows it (its queue-length API is another matter:
    # Flower reads TLS settings for it from broker_use_ssl only, not from the URL).
    worker_page = next(path for path in tls_run.flower_pages if path.startswith("/worker/"))
    for path in ("/api/workers?refresh=1", worker_page):
        assert tls_run.flower_pages[path].status == 200, path
    conf = next(iter(tls_run.flower_pages["/api/workers?refresh=1"].json().values()))["conf"]
    assert conf["broker_url"].startswith("rediss://")  # the configuration is really there
    for name, text in places.items():
        assert password not in text, name
        assert ENTERPRISE_KEY not in text, name
    assert "sfox_requests_total" in places["metrics output"]
