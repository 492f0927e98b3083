"""The stand-in's control API, reset, latency, concurrency and its command line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import requests

from tasks.testing import FakeSfox, Fault
from tests.stand_in.kit import (
    KEY,
    REPO,
    TOKENS,
    issue,
    order,
)


def test_control_api_drives_the_fake_without_being_logged_or_limited(
    http: requests.Session,
) -> None:
    """/_fake/ endpoints queue faults, refuse users, reconfigure, report stats and reset."""
    with FakeSfox(KEY, rate_limit=1, rate_window=5.0, rate_penalty=5.0) as fake:
        control = fake.url + "/_fake/"
        for _ in range(3):
            assert http.get(control + "health").json() == {"ok": True}
        queued = http.post(
            control + "faults",
            json=[{"kind": "status", "code": 503}, {"kind": "reset", "times": 2}],
        )
        assert queued.json() == {"queued": 3, "pending": 3}
        assert http.post(control + "faults", json=[{"kind": "nope"}]).status_code == 400
        assert http.post(control + "reset").json() == {"ok": True}
        assert http.post(control + "refuse", json={"user_id": "ghost", "status": 403}).ok
        assert http.post(control + "config", json={"rate_limit": None, "latency": 0}).ok
        assert http.post(control + "config", json={"rate_limit": "many"}).status_code == 400
        assert http.post(control + "config", json={"colour": "red"}).status_code == 400
        assert issue(http, fake, ["ghost"]).status_code == 403
        assert http.post(control + "unrefuse", json={"user_id": "ghost"}).ok
        token = issue(http, fake, ["ghost"]).json()["data"][0]["token"]
        assert order(http, fake, token, client_order_id="x").status_code == 201
        assert order(http, fake, token, client_order_id="x").status_code == 400
        stats_response = http.get(control + "stats")
        stats = stats_response.json()
        assert token not in stats_response.text and KEY not in stats_response.text
        assert stats["requests"]["total"] == 4
        assert stats["requests"][TOKENS] == 2 and stats["requests"]["/v1/orders"] == 2
        assert stats["orders_placed"] == 1 and stats["duplicate_order_attempts"] == 1
        assert stats["orders"][0]["user_id"] == "ghost"
        assert stats["max_requests_in_window"] == 4 and stats["rate_limited"] == 0
        assert http.post(control + "expire-tokens", json={}).json() == {"expired": 1}
        assert http.get(control + "faults").status_code == 405
        assert http.get(control + "bogus").status_code == 404
        assert fake.count() == 4
        http.post(control + "reset")
        assert (fake.count(), fake.orders, fake.issued_tokens) == (0, [], {})
        assert fake.config.rate_limit is None


def test_reset_keeps_configuration_and_constructor_refusals(http: requests.Session) -> None:
    """reset() wipes state but keeps config and refusals given at construction."""
    with FakeSfox(KEY, max_batch=2, refused=["ghost"]) as fake:
        fake.refuse("temp")
        fake.inject(Fault.status(503))
        fake.reset()
        assert fake.pending_faults == [] and fake.requests_log == []
        assert issue(http, fake, ["temp"]).status_code == 201
        assert issue(http, fake, ["ghost"]).status_code == 404
        assert issue(http, fake, ["a", "b", "c"]).status_code == 400


def test_latency_and_fail_every(http: requests.Session) -> None:
    """latency delays every answer, and fail_every makes every Nth token request a 503."""
    with FakeSfox(KEY, latency=0.1, fail_every=2) as fake:
        started = time.monotonic()
        statuses = [issue(http, fake, ["a"]).status_code for _ in range(4)]
        assert time.monotonic() - started >= 0.4
        assert statuses == [201, 503, 201, 503]


def test_survives_many_concurrent_clients() -> None:
    """Twenty threads of keep-alive clients get every token, uniquely, with consistent counts."""
    with FakeSfox(KEY, latency=0.005) as fake:
        errors: list[BaseException] = []
        tokens: list[str] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            try:
                with requests.Session() as session:
                    for i in range(10):
                        response = issue(session, fake, [f"w{n}-{i}", f"w{n}-{i}-b"])
                        assert response.status_code == 201
                        with lock:
                            tokens.extend(e["token"] for e in response.json()["data"])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(tokens) == len(set(tokens)) == 400
        assert fake.count(TOKENS) == 200 and len(fake.issued_tokens) == 400


def test_cli_serves_until_sigterm_without_printing_the_key() -> None:
    """`python -m tasks.testing` announces its address, honours --refuse, exits on SIGTERM."""
    env = {**os.environ, "SFOX_ENTERPRISE_API_KEY": "cli-secret-key"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.testing", "--port", "0", "--refuse", "ghost"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        url = match.group(0)
        assert requests.get(url + "/_fake/health", timeout=5).json() == {"ok": True}
        headers = {"Authorization": "Bearer cli-secret-key"}
        refused = requests.post(url + TOKENS, json={"data": ["ghost"]}, headers=headers, timeout=5)
        assert refused.status_code == 404
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=5)
        assert process.returncode == 0
        assert "cli-secret-key" not in line + out + err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
