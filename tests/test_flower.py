"""Flower, for real: ``celery -A tasks flower`` with basic auth beside a real worker.

Each *scenario* runs one kind of job through the worker and says what Flower must
show for each task it started (name, final state, what the info should hold). The
fixture starts Flower, runs every scenario, waits until Flower has seen each task
reach its final state, and snapshots every endpoint of Flower's HTTP API. A new kind
of job (the nightly run) is one more function in :data:`SCENARIOS`.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from tasks import AuthenticationError, mint_user_tokens
from tasks.sealing import SEALED_PREFIX, derive_seal_key
from tasks.testing import FakeSfox, Fault
from tests.conftest import ENTERPRISE_KEY
from tests.services import Response, ServiceProcess, answers, free_port, http_get
from tests.workers import ROOT

pytestmark = pytest.mark.slow

FLOWER_USER = "ops"
FLOWER_PASSWORD = secrets.token_urlsafe(16)
FLOWER_AUTH = f"{FLOWER_USER}:{FLOWER_PASSWORD}"
#: States after which a task changes no more.
FINAL_STATES = {"SUCCESS", "FAILURE", "REVOKED", "REJECTED", "IGNORED"}


@dataclass
class Expected:
    """One task a scenario started, and what Flower must show for it."""

    task_id: str
    name: str
    state: str
    #: Further assertions on the task's ``/api/task/info`` document.
    check: Callable[[dict[str, Any]], None] = lambda info: None
    #: User IDs the scenario sent: Flower may show a few, ``/metrics`` none.
    user_ids: list[str] = field(default_factory=list)


class Flower:
    """A running Flower and what its API answered once every scenario's tasks had ended."""

    def __init__(self, process: ServiceProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.expected: list[Expected] = []
        self.snapshot: dict[str, Response] = {}
        self.secrets: list[str] = []
        self.plaintext_tokens: list[str] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, *, auth: str | None = FLOWER_AUTH) -> Response:
        return http_get(self.url(path), auth=auth, timeout=30)

    def get_json(self, path: str) -> Any:
        response = self.get(path)
        assert response.status == 200, (path, response.status, response.text)
        return response.json()

    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.get_json("/api/tasks")

    def take_snapshot(self, worker_name: str) -> None:
        """Every read endpoint of the API and the UI, answered to an authenticated client."""
        datatable = urlencode(
            {
                "draw": 1,
                "start": 0,
                "length": 100,
                "search[value]": "",
                "order[0][column]": 0,
                "order[0][dir]": "asc",
                "columns[0][data]": "name",
            }
        )
        paths = [
            "/api/workers?refresh=1",
            "/api/workers?refresh=1&status=1",
            "/api/tasks",
            "/api/task/types",
            "/api/queues/length",
            "/metrics",
            "/healthcheck",
            "/?json=1",
            "/workers?json=1",
            f"/tasks/datatable?{datatable}",
            "/tasks",
            "/broker",
            f"/worker/{quote(worker_name)}",
        ]
        for expected in self.expected:
            paths += [
                f"/api/task/info/{expected.task_id}",
                f"/api/task/result/{expected.task_id}",
                f"/task/{expected.task_id}",
            ]
        self.snapshot = {path: self.get(path) for path in paths}


def mint_with_a_refused_user(fake: FakeSfox, flower: Flower) -> list[Expected]:
    """A mint of 12 users, one of whom sFOX refuses: SUCCESS, with a one-line summary."""
    fake.refuse("flower-u7", status=404, message="user not found")
    user_ids = [f"flower-u{i}" for i in range(1, 13)]
    result = mint_user_tokens.delay(user_ids)
    outcome = result.get(timeout=30)
    assert len(outcome["tokens"]) == 11

    def check(info: dict[str, Any]) -> None:
        assert info["args"] == "[12 user IDs: flower-u1, flower-u2, flower-u3, … +9]"
        assert info["kwargs"] == "{}"
        assert info["result"] == "{tokens: 11 sealed, failed: 1 [flower-u7]}"

    return [Expected(result.id, "sfox.mint_user_tokens", "SUCCESS", check, user_ids)]


def mint_refused_whole(fake: FakeSfox, flower: Flower) -> list[Expected]:
    """A mint whose key sFOX rejects: FAILURE, with the operator's hint and no key."""
    fake.inject(Fault.status(401))
    result = mint_user_tokens.delay(["flower-x1"])
    with pytest.raises(AuthenticationError):
        result.get(timeout=30)

    def check(info: dict[str, Any]) -> None:
        assert "AuthenticationError" in info["exception"]
        assert "Check SFOX_ENTERPRISE_API_KEY" in info["exception"]

    return [Expected(result.id, "sfox.mint_user_tokens", "FAILURE", check, ["flower-x1"])]


def nightly_run_in_progress(fake: FakeSfox, flower: Flower) -> list[Expected]:
    """A nightly run of 40 users: Flower shows PROGRESS with counts while it runs, then SUCCESS."""
    import tempfile
    import time
    from pathlib import Path

    from tasks import run_nightly_orders

    users = [f"flower-n{i}" for i in range(40)]
    orders = Path(tempfile.mkdtemp()) / "orders.csv"
    orders.write_text(
        "user_id,side,currency_pair,algorithm_id,amount\n"
        + "".join(f"{u},buy,btcusd,100,25\n" for u in users)
    )
    fake.configure(latency=0.05)
    result = run_nightly_orders.apply_async(
        kwargs={"run_date": "2026-10-05", "orders_file": str(orders)}
    )
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while not result.ready() and time.monotonic() < deadline:
        info = flower.tasks().get(result.id)
        if info and info.get("state") == "PROGRESS":
            seen.append(info)
        time.sleep(0.05)
    summary = result.get(timeout=10)
    fake.configure(latency=0.0)
    assert summary["placed"] == 40
    assert seen, "Flower never showed the run's PROGRESS state"

    def check(info: dict[str, Any]) -> None:
        assert info["kwargs"] == "{run_date: 2026-10-05, orders: orders.csv}"
        assert info["result"] == "{run 2026-10-05 done: 40 users, 40 placed, 0 already, 0 failed}"

    return [Expected(result.id, "sfox.run_nightly_orders", "SUCCESS", check, users)]


#: Every kind of job the Flower test runs, in order. Each gets the stand-in and the running
#: Flower (to watch a long task's progress while it runs). The nightly run adds itself here.
SCENARIOS: list[Callable[[FakeSfox, Flower], list[Expected]]] = [
    mint_with_a_refused_user,
    mint_refused_whole,
    nightly_run_in_progress,
]


@pytest.fixture(scope="module")
def flower(worker, fake_sfox_server, redis_client, tmp_path_factory):
    """Flower beside the session's worker, after every scenario ran and ended."""
    port = free_port()
    process = ServiceProcess(
        "flower",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--basic-auth={FLOWER_AUTH}",
        ],
        tmp_path_factory.mktemp("flower"),
        cwd=ROOT,
    ).start()
    flower = Flower(process, port)
    try:
        process.wait_for(lambda: answers(flower.url("/healthcheck")), 30, "HTTP")
        # The worker's heartbeat reached Flower: its event capture is running.
        prefix = worker.name.split("@")[0] + "@"

        def worker_seen() -> str | None:
            names = [w["hostname"] for w in flower.get_json("/workers?json=1")["data"]]
            return next((name for name in names if name.startswith(prefix)), None)

        worker_name = process.wait_for(worker_seen, 30, "the worker's heartbeat events")
        fake_sfox_server.reset()
        for scenario in SCENARIOS:
            flower.expected += scenario(fake_sfox_server, flower)
        flower.plaintext_tokens = list(fake_sfox_server.issued_tokens)
        fake_sfox_server.reset()

        def all_final() -> bool:
            tasks = flower.tasks()
            return all(
                tasks.get(e.task_id, {}).get("state") in FINAL_STATES for e in flower.expected
            )

        process.wait_for(all_final, 30, "every scenario's task in a final state")
        flower.secrets = [ENTERPRISE_KEY, derive_seal_key(ENTERPRISE_KEY)]
        flower.take_snapshot(worker_name)
        yield flower
    finally:
        process.stop()


def test_tasks_appear_with_their_names_and_final_states(flower):
    """Every task the scenarios ran is listed by /api/tasks with its name and final state."""
    tasks = flower.tasks()
    for expected in flower.expected:
        assert expected.task_id in tasks
        assert tasks[expected.task_id]["name"] == expected.name
        assert tasks[expected.task_id]["state"] == expected.state
    assert {e.state for e in flower.expected} >= {"SUCCESS", "FAILURE"}


def test_task_info_is_short_and_useful(flower):
    """Each task's info names it, counts its users and summarises its outcome in a short line."""
    for expected in flower.expected:
        info = flower.snapshot[f"/api/task/info/{expected.task_id}"].json()
        assert info["name"] == expected.name and info["state"] == expected.state
        assert len(info["args"]) <= 120 and len(info["kwargs"]) <= 60
        assert len(str(info["result"])) <= 160
        assert SEALED_PREFIX not in json.dumps(info)  # no ciphertext wall either
        expected.check(info)


def test_metrics_serves_prometheus_counters(flower):
    """/metrics serves Prometheus counters of task events, per task name and type."""
    text = flower.snapshot["/metrics"].text
    assert "# TYPE flower_events_total counter" in text
    for state, event in (("SUCCESS", "task-succeeded"), ("FAILURE", "task-failed")):
        names = {e.name for e in flower.expected if e.state == state}
        for name in names:
            pattern = rf'flower_events_total\{{[^}}]*task="{re.escape(name)}"[^}}]*type="{event}"'
            assert re.search(pattern, text), (name, event)


def test_no_secret_in_any_flower_response(flower):
    """No enterprise key, seal key or plaintext token in any answer, the worker's conf included."""
    snapshot = flower.snapshot
    failing = {path: r.status for path, r in snapshot.items() if r.status != 200}
    assert not failing
    workers = snapshot["/api/workers?refresh=1"].json()
    assert any(w.get("conf") for w in workers.values())  # the worker's conf is really there
    assert len(flower.plaintext_tokens) >= 11
    for path, response in snapshot.items():
        for secret in [*flower.secrets, *flower.plaintext_tokens]:
            assert secret not in response.text, path


UNAUTHENTICATED_PATHS = [
    "/api/workers",
    "/api/tasks",
    "/api/task/types",
    "/api/queues/length",
    "/api/task/info/{task_id}",
    "/api/task/result/{task_id}",
    "/",
    "/workers?json=1",
    "/tasks",
    "/task/{task_id}",
    "/broker",
]


@pytest.mark.parametrize("path", UNAUTHENTICATED_PATHS)
@pytest.mark.parametrize(
    "auth", [None, f"{FLOWER_USER}:wrong", "nobody:"], ids=["none", "wrong", "blank"]
)
def test_unauthenticated_requests_get_401(flower, path, auth):
    """Without the right credentials every API and UI path answers 401 and shows nothing."""
    response = flower.get(path.format(task_id=flower.expected[0].task_id), auth=auth)
    assert response.status == 401
    assert "flower-u" not in response.text


def test_unauthenticated_client_cannot_send_a_task(flower, fake_sfox):
    """A POST to Flower's task API without credentials is refused and sends nothing to sFOX."""
    request = urllib.request.Request(
        flower.url("/api/task/async-apply/sfox.mint_user_tokens"),
        data=json.dumps({"args": [["intruder"]]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 401
    assert fake_sfox.count() == 0


def test_open_probes_carry_counters_only(flower):
    """/healthcheck and /metrics answer without auth (probes, scrapers): no user ID, no secret."""
    assert flower.get("/healthcheck", auth=None).status == 200
    metrics = flower.get("/metrics", auth=None)
    assert metrics.status == 200
    for expected in flower.expected:
        for user_id in expected.user_ids:
            assert user_id not in metrics.text
    for secret in [*flower.secrets, *flower.plaintext_tokens]:
        assert secret not in metrics.text
