"""The stand-in's control API under ``/_fake/`` (loopback only unless allowed).

Out-of-process users (the demo, the compose stack, the benchmark) script
faults, refuse users, change the configuration and read the stats through it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .faults import CONTROL_PREFIX, Fault, _is_int
from .http import (
    _error,
    _is_loopback,
    _json_response,
    _parse_json,
    _Request,
    _Response,
)

if TYPE_CHECKING:
    from .server import FakeSfox


def handle_control(fake: FakeSfox, req: _Request) -> _Response:
    """Answer a request under ``/_fake/``: health, stats, config, faults, refusals, reset."""
    if not fake.allow_remote_control and not _is_loopback(req.ip):
        return _error(403, "control API is loopback-only")
    name = req.path[len(CONTROL_PREFIX) :]
    getters = {"health", "stats", "config"}
    posters = {"faults", "refuse", "unrefuse", "config", "reset", "expire-tokens"}
    if name not in getters | posters:
        return _error(404)
    if req.method in ("GET", "HEAD") and name in getters:
        if name == "health":
            return _json_response(200, {"ok": True})
        if name == "stats":
            return _json_response(200, fake.stats())
        return _json_response(200, dataclasses.asdict(fake.config))
    if req.method != "POST" or name not in posters:
        allow = ", ".join(m for m, s in (("GET", getters), ("POST", posters)) if name in s)
        return _Response(
            405, json.dumps({"error": "method not allowed"}).encode(), [("Allow", allow)]
        )
    if req.body.strip():
        ok, payload = _parse_json(req.body)
        if not ok:
            return _error(400, "invalid JSON body")
    else:
        payload = {}
    try:
        return _control_post(fake, name, payload)
    except ValueError as exc:
        return _error(400, str(exc))


def _control_post(fake: FakeSfox, name: str, payload: Any) -> _Response:
    if name == "faults":
        items = payload if isinstance(payload, list) else [payload]
        faults: list[Fault] = []
        for item in items:
            times = item.get("times", 1) if isinstance(item, Mapping) else 1
            if not _is_int(times) or times < 1:
                raise ValueError("times must be an integer >= 1")
            faults.extend([Fault.from_dict(item)] * times)
        fake.inject(*faults)
        return _json_response(200, {"queued": len(faults), "pending": len(fake.pending_faults)})
    if name == "reset":
        fake.reset()
        return _json_response(200, {"ok": True})
    if not isinstance(payload, dict):
        raise ValueError("body must be a JSON object")
    if name == "config":
        return _json_response(200, dataclasses.asdict(fake.configure(**payload)))
    if name == "expire-tokens":
        user_id = payload.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise ValueError("user_id must be a string")
        return _json_response(200, {"expired": fake.expire_all_tokens(user_id)})
    user_id = payload.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user_id must be a non-empty string")
    if name == "unrefuse":
        fake.unrefuse(user_id)
    else:
        message = payload.get("message", "user not found")
        if not isinstance(message, str):
            raise ValueError("message must be a string")
        fake.refuse(user_id, payload.get("status", 404), message)
    return _json_response(200, {"ok": True})
