"""What a partner's process does with the package on a quorum ``SFOX_QUEUE``, as a subprocess.

``python -m tests.partner_quorum_calls`` reads its arguments as JSON on standard
input, calls the package through its public API from inside the partner's app
(:mod:`tests.partner_quorum`): ``mint_user_tokens.delay``, a mint with a
countdown, ``with_user_tokens(...).apply_async()`` and the nightly run, and
prints what it found as one JSON object. It runs without ``CELERY_BROKER_URL``:
the partner's app, configured from its own module, is the only way to a broker.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.partner_calls import wait_finished

#: Seconds each call may take before the scenario reports it unfinished.
DEADLINE = 120.0


def scenario(args: dict[str, Any]) -> dict[str, Any]:
    """A mint, a mint sent with a sub-second countdown, a fan-out and a night, all from here."""
    import tasks
    from tests.partner_quorum import app as partner

    out: dict[str, Any] = {"package_task_app": tasks.mint_user_tokens.app.main}
    mint = tasks.mint_user_tokens.delay(args["mint"])
    out["mint"] = [t["partner_user_id"] for t in mint.get(timeout=DEADLINE)["tokens"]]
    later = tasks.mint_user_tokens.apply_async((args["later"],), countdown=0.4)
    out["later"] = [t["partner_user_id"] for t in later.get(timeout=DEADLINE)["tokens"]]
    canvas = tasks.with_user_tokens(
        args["fan"], partner.signature("partner_quorum.record", args=("quorum",)), chunk_size=20
    )
    canvas.apply_async()
    out["finished"] = wait_finished(canvas.run_id)
    out["summary"] = tasks.run_nightly_orders.delay(
        run_date=args["run_date"], orders_file=args["orders_file"]
    ).get(timeout=DEADLINE)
    return out


if __name__ == "__main__":
    print(json.dumps(scenario(json.loads(sys.stdin.read() or "{}"))))
