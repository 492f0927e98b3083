"""The stand-in's order endpoint: sFOX's validation, live tokens, client_order_id."""

from __future__ import annotations

import pytest
import requests

from tasks.testing import FakeSfox
from tests.stand_in.kit import (
    KEY,
    TOKENS,
    order,
    token_for,
)


def test_valid_orders_are_accepted_and_stored_with_their_owner(
    fake: FakeSfox, http: requests.Session
) -> None:
    """A limit order and a market buy by amount get 201 'started' and are kept per user."""
    alice, bob = token_for(http, fake, "alice"), token_for(http, fake, "bob")
    limit = order(http, fake, alice, "sell", client_order_id="c-1")
    assert limit.status_code == 201
    body = limit.json()
    assert body["status"] == "started" and isinstance(body["id"], int)
    assert {k: body[k] for k in ("side", "client_order_id", "user_id", "quantity", "price")} == {
        "side": "sell",
        "client_order_id": "c-1",
        "user_id": "alice",
        "quantity": 1,
        "price": 100.5,
    }
    market = order(http, fake, bob, "buy", algorithm_id=100, quantity=None, price=None, amount=25)
    assert market.status_code == 201 and market.json()["amount"] == 25
    assert [(o.user_id, o.side, o.algorithm_id) for o in fake.orders] == [
        ("alice", "sell", 200),
        ("bob", "buy", 100),
    ]


@pytest.mark.parametrize(
    ("side", "changes", "message"),
    [
        ("hold", {}, "side must be buy or sell"),
        ("buy", {"algorithm_id": 999}, "invalid algorithm_id"),
        ("buy", {"algorithm_id": None}, "algorithm_id is required"),
        ("buy", {"currency_pair": None}, "currency_pair is required"),
        ("buy", {"price": None}, "price is required"),
        ("buy", {"quantity": None}, "quantity is required"),
        ("buy", {"quantity": "1"}, "quantity must be a positive number"),
        ("buy", {"quantity": -2}, "quantity must be a positive number"),
        ("sell", {"algorithm_id": 100, "quantity": None, "amount": 5}, "quantity is required"),
        ("buy", {"algorithm_id": 100, "quantity": None}, "quantity or amount is required"),
        ("buy", {"client_order_id": 12}, "client_order_id must be a non-empty string"),
    ],
)
def test_invalid_orders_are_400(
    fake: FakeSfox,
    http: requests.Session,
    side: str,
    changes: dict[str, object],
    message: str,
) -> None:
    """Each validation rule of the order endpoint answers 400 with its own message."""
    response = order(http, fake, token_for(http, fake, "alice"), side, **changes)
    assert (response.status_code, response.json()) == (400, {"error": message})
    assert fake.orders == []


def test_duplicate_client_order_id_is_rejected_and_counted(
    fake: FakeSfox, http: requests.Session
) -> None:
    """Reusing a client_order_id within 24h is 400 and counted; other users may reuse it."""
    alice, bob = token_for(http, fake, "alice"), token_for(http, fake, "bob")
    assert order(http, fake, alice, client_order_id="dup").status_code == 201
    again = order(http, fake, alice, client_order_id="dup")
    assert (again.status_code, again.json()) == (400, {"error": "client_order_id already exists"})
    assert order(http, fake, bob, client_order_id="dup").status_code == 201
    assert fake.duplicate_order_attempts == 1
    assert len(fake.orders) == 2


def test_orders_need_a_live_user_token(fake: FakeSfox, http: requests.Session) -> None:
    """Orders with no token, an unknown token, the enterprise key or an expired token are 401."""
    token = token_for(http, fake, "alice")
    other = token_for(http, fake, "bob")
    for credential in ("", "f" * 64, KEY):
        response = order(http, fake, credential)
        assert (response.status_code, response.json()) == (401, {"error": "invalid token"})
    assert fake.expire_token(token) is True
    assert fake.expire_token("unknown") is False
    assert order(http, fake, token).status_code == 401
    assert order(http, fake, other).status_code == 201
    assert fake.expire_all_tokens() == 2
    assert order(http, fake, other).status_code == 401
    with FakeSfox(KEY, token_ttl=0) as short_lived:
        assert order(http, short_lived, token_for(http, short_lived, "carol")).status_code == 401


def test_unknown_paths_404_and_wrong_methods_405(fake: FakeSfox, http: requests.Session) -> None:
    """Unknown paths get 404 and known endpoints reject non-POST methods with 405."""
    assert http.get(fake.url + "/v2/whatever").json() == {"error": "not found"}
    assert http.post(fake.url + "/v1/orders/buy/extra").status_code == 404
    assert http.post(fake.url + "/v1/orders").status_code == 404
    wrong = http.get(fake.url + TOKENS)
    assert (wrong.status_code, wrong.headers["Allow"]) == (405, "POST")
    assert http.delete(fake.url + "/v1/orders/buy").status_code == 405
