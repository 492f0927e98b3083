"""What a partner's own process does with the package, run as a subprocess of its own.

``python -m tests.partner_calls SCENARIO`` reads the scenario's arguments as JSON
on standard input and prints what it found as one JSON object. The tests run it
with the default-broker guard (``tests.partner_guard``) and without
``CELERY_BROKER_URL``, so the partner's app, configured from its own module, is
the only way anything can reach a broker.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

#: Seconds a scenario waits for a run to finish before it reports it unfinished.
RUN_DEADLINE = 120.0


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def wait_finished(run_id: str, deadline_s: float = RUN_DEADLINE) -> bool:
    """Whether the run ``run_id`` finished within ``deadline_s`` seconds."""
    from tasks import run_progress

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if run_progress(run_id).finished:
            return True
        time.sleep(0.2)
    return False


def sidecar(args: dict[str, Any]) -> dict[str, Any]:
    """The partner's app sends the package's tasks by name, and runs a fan-out of its own."""
    import importlib

    from celery import current_app

    from tests.partner_app import app as partner
    from tests.partner_app import ping

    tasks = importlib.import_module("tasks")  # after the partner's app exists, as partners do
    out: dict[str, Any] = {
        "current": current_app.main,
        "ping_app": ping.app.main,
        "package_task_app": tasks.mint_user_tokens.app.main,
    }
    out["ping"] = ping.delay().get(timeout=30)
    batches = args["mints"]
    sent = [partner.send_task("sfox.mint_user_tokens", args=[u], queue="sfox") for u in batches[:5]]
    sent += [partner.send_task("sfox.mint_user_tokens", args=[u]) for u in batches[5:]]
    out["mints"] = [[t["partner_user_id"] for t in r.get(timeout=60)["tokens"]] for r in sent]
    own = tasks.mint_user_tokens.delay(args["own"]).get(timeout=60)
    out["own"] = [t["partner_user_id"] for t in own["tokens"]]
    out["own_unsealed"] = [_digest(tasks.unseal(t["token"])) for t in own["tokens"]]
    canvas = tasks.with_user_tokens(
        args["fan"], partner.signature("partner.record", args=("sidecar",)), chunk_size=25, ahead=2
    )
    canvas.apply_async()
    out["finished"] = wait_finished(canvas.run_id)
    return out


def embedded(args: dict[str, Any]) -> dict[str, Any]:
    """The partner's own worker runs the package's tasks: a mint, a fan-out, a night."""
    import tasks
    from tests.partner_embedded import app as partner

    queue = args["queue"]
    mint = partner.send_task("sfox.mint_user_tokens", args=[args["mint"]], queue=queue)
    result = mint.get(timeout=60)
    out: dict[str, Any] = {
        "mint_id": mint.id,
        "tokens": len(result["tokens"]),
        "failed": [f["user_id"] for f in result["failed"]],
    }
    canvas = tasks.with_user_tokens(
        args["fan"], partner.signature("partner_embedded.record", args=("embedded",)), chunk_size=20
    )
    canvas.apply_async(queue=queue)
    out["finished"] = wait_finished(canvas.run_id)
    out["summary"] = partner.send_task(
        "sfox.run_nightly_orders",
        kwargs={"run_date": args["run_date"], "orders_file": args["orders_file"]},
        queue=queue,
    ).get(timeout=120)
    return out


def missing_key(args: dict[str, Any]) -> dict[str, Any]:
    """A mint on a worker with no key fails; the caller catches the package's exception."""
    import tasks
    from tests.partner_embedded import app as partner

    result = partner.send_task("sfox.mint_user_tokens", args=[["u1"]], queue=args["queue"])
    try:
        result.get(timeout=60)
    except tasks.ConfigurationError as exc:
        return {"caught": "tasks.ConfigurationError", "message": exc.message}
    except Exception as exc:  # reported, for the test to show
        return {"caught": f"{type(exc).__module__}.{type(exc).__name__}", "message": str(exc)}
    return {"caught": None}


SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sidecar": sidecar,
    "embedded": embedded,
    "missing_key": missing_key,
}

if __name__ == "__main__":
    found = SCENARIOS[sys.argv[1]](json.loads(sys.stdin.read() or "{}"))
    print(json.dumps(found))
