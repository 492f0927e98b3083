"""What the stand-in's own tests share: its key, paths and small request helpers."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import requests

from tasks.testing import FakeSfox

KEY = "test-enterprise-key-0123456789"
TOKENS = "/v1/enterprise/user-tokens"
PLAIN_EXPIRES = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
MILLIS_EXPIRES = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
REPO = Path(__file__).resolve().parents[1]


def issue(
    http: requests.Session, fake: FakeSfox, ids: list[str], key: str | None = KEY
) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return http.post(fake.url + TOKENS, json={"data": ids}, headers=headers, timeout=5)


def token_for(http: requests.Session, fake: FakeSfox, user_id: str) -> str:
    response = issue(http, fake, [user_id])
    assert response.status_code == 201
    return str(response.json()["data"][0]["token"])


def order(
    http: requests.Session, fake: FakeSfox, token: str, side: str = "buy", **body: object
) -> requests.Response:
    payload: dict[str, object] = {
        "currency_pair": "btcusd",
        "algorithm_id": 200,
        "quantity": 1,
        "price": 100.5,
    }
    payload.update(body)
    return http.post(
        f"{fake.url}/v1/orders/{side}",
        json=payload,
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )


def parse_expires(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
