"""The stand-in's order endpoint: ``POST /v1/orders/<side>`` with a user's token.

A mixin of :class:`~tasks.testing.server.FakeSfox`: it checks the token and the body as sFOX
documents them, refuses a ``client_order_id`` used again within its window, and records the
order and how old the token was when it arrived.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, cast

from .faults import (
    ALGORITHM_IDS,
    CLIENT_ORDER_ID_TTL,
    MARKET_ALGORITHM,
    ORDER_SIDES,
    Order,
    _is_int,
    _is_number,
)
from .http import _bearer, _error, _json_response, _parse_json, _Request, _Response


class OrderDesk:
    """Placing orders with user tokens the stand-in issued."""

    _lock: threading.Lock
    _tokens: dict[str, tuple[str, datetime]]
    _token_born: dict[str, float]
    _token_ages: list[float]
    _client_order_ids: dict[tuple[str, str], float]
    _duplicates: int
    _next_order_id: int
    _orders: list[Order]

    def _place_order(self, req: _Request, side: str) -> _Response:
        credential = _bearer(req.headers)
        with self._lock:
            entry = self._tokens.get(credential) if credential is not None else None
            owner = (
                entry[0] if entry is not None and entry[1] > datetime.now(timezone.utc) else None
            )
            if entry is not None:
                # How old the token was when its order arrived.
                born = self._token_born[cast(str, credential)]
                self._token_ages.append(max(0.0, req.arrived - born))
        if owner is None:
            return _error(401, "invalid token")
        if side not in ORDER_SIDES:
            return _error(400, "side must be buy or sell")
        ok, body = _parse_json(req.body)
        if not ok or not isinstance(body, dict):
            return _error(400, "invalid JSON body")
        problem = _validate_order(side, body)
        if problem is not None:
            return _error(400, problem)
        client_order_id = body.get("client_order_id")
        with self._lock:
            now = time.monotonic()
            if client_order_id is not None:
                used_at = self._client_order_ids.get((owner, client_order_id))
                if used_at is not None and now - used_at < CLIENT_ORDER_ID_TTL:
                    self._duplicates += 1
                    return _error(400, "client_order_id already exists")
                self._client_order_ids[(owner, client_order_id)] = now
            order = Order(
                id=self._next_order_id,
                user_id=owner,
                side=side,
                currency_pair=body["currency_pair"],
                algorithm_id=body["algorithm_id"],
                quantity=body.get("quantity"),
                price=body.get("price"),
                amount=body.get("amount"),
                client_order_id=client_order_id,
                placed_at=req.arrived,
            )
            self._next_order_id += 1
            self._orders.append(order)
        return _json_response(201, order.to_dict())


def _validate_order(side: str, body: Mapping[str, Any]) -> str | None:
    """The first thing wrong with an order body, or None."""
    pair = body.get("currency_pair")
    if not isinstance(pair, str) or not pair:
        return "currency_pair is required"
    algorithm_id = body.get("algorithm_id")
    if algorithm_id is None:
        return "algorithm_id is required"
    if not _is_int(algorithm_id) or algorithm_id not in ALGORITHM_IDS:
        return "invalid algorithm_id"
    for name in ("quantity", "price", "amount"):
        value = body.get(name)
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
            return f"{name} must be a positive number"
    client_order_id = body.get("client_order_id")
    if client_order_id is not None and (
        not isinstance(client_order_id, str) or not client_order_id
    ):
        return "client_order_id must be a non-empty string"
    has = {name: body.get(name) is not None for name in ("quantity", "price", "amount")}
    if algorithm_id == MARKET_ALGORITHM:
        if side == "buy" and not (has["quantity"] or has["amount"]):
            return "quantity or amount is required"
        if side == "sell" and not has["quantity"]:
            return "quantity is required"
        return None
    if not has["price"]:
        return "price is required"
    if not has["quantity"]:
        return "quantity is required"
    return None
