"""How the sFOX client reads an answer: which status means retry, fix the key, or drop a user."""

from __future__ import annotations

import json

import pytest
import requests

import tasks
from tasks.sfox.client import SfoxClient, parse_retry_after

KEY = "ek-secret"


def answer(status: int, body: object = None, headers: dict[str, str] | None = None):
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(body).encode() if body is not None else b"not json"
    response.headers.update(headers or {})
    response.reason = "reason"
    return response


@pytest.fixture
def client():
    return SfoxClient("https://api.sfox.com", KEY)


def test_a_2xx_object_is_the_body(client):
    """A JSON object under 2xx comes back as it is."""
    assert client._classify(answer(200, {"data": []}), "token") == {"data": []}


@pytest.mark.parametrize("body", [None, [1, 2]])
def test_a_2xx_that_is_not_an_object_is_malformed(client, body):
    """Not JSON, or not an object: transient, so retried."""
    with pytest.raises(tasks.MalformedResponse):
        client._classify(answer(200, body), "token")


def test_429_is_rate_limited_with_its_retry_after(client):
    """A 429 carries Retry-After seconds to the shared pause."""
    with pytest.raises(tasks.RateLimited) as info:
        client._classify(answer(429, {"error": "slow"}, {"Retry-After": "7"}), "token")
    assert info.value.retry_after == 7


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient(client, status):
    """5xx answers are retried."""
    with pytest.raises(tasks.ServerError):
        client._classify(answer(status, {"error": "down"}), "token")


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_blame_the_key_or_the_user_token(client, status):
    """To the enterprise key: fix the key; to a user token: mint that user a new one."""
    with pytest.raises(tasks.AuthenticationError):
        client._classify(answer(status, {"error": "no"}), "token")
    with pytest.raises(tasks.TokenRejected):
        client._classify(answer(status, {"error": "no"}), "order", user_token=True)


@pytest.mark.parametrize("status", [400, 404, 422])
def test_refusals_keep_sfoxs_error_text(client, status):
    """400/404/422 may be one user's fault: the error text travels with it."""
    with pytest.raises(tasks.RequestRefused) as info:
        client._classify(answer(status, {"error": "user not found"}), "token")
    assert info.value.error == "user not found"


def test_a_redirect_is_permanent(client):
    """A 3xx means SFOX_API_URL points at the wrong place."""
    with pytest.raises(tasks.PermanentError, match="SFOX_API_URL"):
        client._classify(answer(302, {}), "token")


def test_the_key_never_reaches_a_message(client):
    """An error text echoing the enterprise key is scrubbed."""
    with pytest.raises(tasks.RequestRefused) as info:
        client._classify(answer(400, {"error": f"bad key {KEY}"}), "token")
    assert KEY not in str(info.value)


def test_retry_after_in_seconds_or_as_a_date():
    """Both forms sFOX may send are read; nonsense is ignored."""
    assert parse_retry_after("3") == 3
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10
    assert parse_retry_after("soon") is None
