"""Tests for tasks.testing: the fake must behave like sFOX, and misbehave exactly as scripted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from tasks.sfox.client import http_adapter
from tasks.testing import FakeSfox, Fault, http_date

KEY = "test-enterprise-key-0123456789"
TOKENS = "/v1/enterprise/user-tokens"
PLAIN_EXPIRES = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
MILLIS_EXPIRES = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake() -> Iterator[FakeSfox]:
    with FakeSfox(KEY) as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


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


# ---- token issuing -------------------------------------------------------------------------


def test_batch_issues_one_token_per_user_in_shuffled_order(
    fake: FakeSfox, http: requests.Session
) -> None:
    """A batch gets 201 with a 64-hex token per requested id, never in request order."""
    ids = [f"user-{i}" for i in range(6)]
    for _ in range(3):
        response = issue(http, fake, ids)
        assert response.status_code == 201
        data = response.json()["data"]
        returned = [entry["partner_user_id"] for entry in data]
        assert sorted(returned) == sorted(ids)
        assert returned != ids
        for entry in data:
            assert re.fullmatch(r"[0-9a-f]{64}", entry["token"])
            assert fake.issued_tokens[entry["token"]][0] == entry["partner_user_id"]
    two = issue(http, fake, ["a", "b"]).json()["data"]
    assert [entry["partner_user_id"] for entry in two] == ["b", "a"]


def test_expires_alternates_between_both_documented_formats(
    fake: FakeSfox, http: requests.Session
) -> None:
    """Across calls both expiry spellings occur, each ~24h ahead and equal to the stored expiry."""
    seen = []
    for _ in range(4):
        entry = issue(http, fake, ["solo"]).json()["data"][0]
        seen.append(entry["expires"])
        expires = parse_expires(entry["expires"])
        assert fake.issued_tokens[entry["token"]][1] == expires
        ahead = expires - datetime.now(timezone.utc)
        assert timedelta(hours=23, minutes=59) < ahead <= timedelta(hours=24)
    assert any(PLAIN_EXPIRES.match(text) for text in seen)
    assert any(MILLIS_EXPIRES.match(text) for text in seen)


def test_one_batch_mixes_both_expiry_formats_each_equal_to_the_stored_expiry(
    fake: FakeSfox, http: requests.Session
) -> None:
    """Within one batch the spellings alternate, and each token's text matches what is stored."""
    data = issue(http, fake, [f"u{i}" for i in range(6)]).json()["data"]
    texts = [entry["expires"] for entry in data]
    assert sum(1 for text in texts if PLAIN_EXPIRES.match(text)) == 3
    assert sum(1 for text in texts if MILLIS_EXPIRES.match(text)) == 3
    for entry in data:
        assert fake.issued_tokens[entry["token"]][1] == parse_expires(entry["expires"])


def test_shuffle_can_be_switched_off(http: requests.Session) -> None:
    """With shuffle=False the response keeps the request order."""
    with FakeSfox(KEY, shuffle=False) as fake:
        ids = [f"u{i}" for i in range(8)]
        data = issue(http, fake, ids).json()["data"]
        assert [entry["partner_user_id"] for entry in data] == ids


def test_missing_or_wrong_key_is_401_and_never_echoed_or_logged(
    fake: FakeSfox, http: requests.Session
) -> None:
    """No key, a wrong key or a user token as key get 401 'invalid api key'; no key is stored."""
    user_token = token_for(http, fake, "alice")
    wrong = "wrong-key-that-must-not-leak"
    for key in (None, wrong, user_token):
        response = issue(http, fake, ["bob"], key=key)
        assert response.status_code == 401
        assert response.json() == {"error": "invalid api key"}
    unbearered = http.post(fake.url + TOKENS, json={"data": ["x"]}, headers={"Authorization": KEY})
    assert unbearered.status_code == 401
    log_text = repr(fake.requests_log)
    assert wrong not in log_text and KEY not in log_text and user_token not in log_text
    assert [r.auth for r in fake.requests_log] == [
        "enterprise",
        "none",
        "invalid",
        "user_token",
        "none",
    ]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"{}", b'{"data": []}', b'{"data": "alice"}', b'{"data": ["ok", 7]}', b"[]"],
)
def test_bad_token_request_bodies_are_400(
    fake: FakeSfox, http: requests.Session, body: bytes
) -> None:
    """Non-JSON bodies and data that is not a non-empty list of strings get 400."""
    response = http.post(
        fake.url + TOKENS,
        data=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert fake.issued_tokens == {}


def test_refused_user_spoils_the_whole_batch(fake: FakeSfox, http: requests.Session) -> None:
    """One refused id fails the batch with its status and mints nothing; unrefuse restores it."""
    fake.refuse("ghost")
    response = issue(http, fake, ["alice", "ghost", "bob"])
    assert response.status_code == 404
    assert response.json() == {"error": "user not found"}
    fake.refuse("frozen", status=403, message="account frozen")
    response = issue(http, fake, ["frozen", "ghost"])
    assert (response.status_code, response.json()) == (403, {"error": "account frozen"})
    assert fake.issued_tokens == {}
    fake.unrefuse("ghost")
    fake.unrefuse("frozen")
    assert issue(http, fake, ["alice", "ghost", "frozen"]).status_code == 201


def test_max_batch_rejects_oversized_batches(http: requests.Session) -> None:
    """Beyond max_batch ids the request is 400 'too many users'; at the limit it succeeds."""
    with FakeSfox(KEY, max_batch=3) as fake:
        assert issue(http, fake, ["a", "b", "c"]).status_code == 201
        response = issue(http, fake, ["a", "b", "c", "d"])
        assert (response.status_code, response.json()) == (400, {"error": "too many users"})


def test_single_user_endpoint(fake: FakeSfox, http: requests.Session) -> None:
    """The single endpoint returns one entry for the path's user, honours refusals and the key."""
    headers = {"Authorization": f"Bearer {KEY}"}
    response = http.post(f"{fake.url}{TOKENS}/user%2042", headers=headers)
    assert response.status_code == 201
    data = response.json()["data"]
    assert data["partner_user_id"] == "user 42"
    assert fake.issued_tokens[data["token"]][0] == "user 42"
    assert fake.requests_log[-1].user_ids == ["user 42"]
    fake.refuse("ghost", status=410, message="gone")
    response = http.post(f"{fake.url}{TOKENS}/ghost", headers=headers)
    assert (response.status_code, response.json()) == (410, {"error": "gone"})
    assert http.post(f"{fake.url}{TOKENS}/alice").status_code == 401


# ---- fault injection -----------------------------------------------------------------------


def test_status_fault_is_served_once_with_retry_after(
    fake: FakeSfox, http: requests.Session
) -> None:
    """A status fault answers its code, default body and Retry-After once, then is consumed."""
    when = http_date(5)
    fake.inject(
        Fault.status(503, retry_after=7),
        Fault.status(429, retry_after=when),
        Fault.status(500, body={"message": "custom"}),
    )
    first = issue(http, fake, ["a"])
    assert (first.status_code, first.json()) == (503, {"error": "service unavailable"})
    assert first.headers["Retry-After"] == "7"
    second = issue(http, fake, ["a"])
    assert second.status_code == 429 and second.headers["Retry-After"] == when
    third = issue(http, fake, ["a"])
    assert (third.status_code, third.json()) == (500, {"message": "custom"})
    fourth = issue(http, fake, ["a"])
    assert fourth.status_code == 201 and "Retry-After" not in fourth.headers
    assert fake.pending_faults == []


def test_reset_fault_breaks_the_connection_once(fake: FakeSfox, http: requests.Session) -> None:
    """A reset fault makes requests raise a connection error; the next request succeeds."""
    fake.inject(Fault.reset())
    with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        issue(http, fake, ["a"])
    assert issue(http, fake, ["a"]).status_code == 201
    assert [r.status for r in fake.requests_log] == [0, 201]
    assert len(fake.issued_tokens) == 1


def test_delay_fault_triggers_client_read_timeout_once(
    fake: FakeSfox, http: requests.Session
) -> None:
    """A delay fault outlasts a short client timeout once; the following request is prompt."""
    fake.inject(Fault.delay(0.6))
    with pytest.raises(requests.ReadTimeout):
        http.post(
            fake.url + TOKENS,
            json={"data": ["a"]},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=0.2,
        )
    started = time.monotonic()
    assert issue(http, fake, ["a"]).status_code == 201
    assert time.monotonic() - started < 0.3


@pytest.mark.parametrize("text", ['{"data": "oops"}', "not json"])
def test_malformed_fault_returns_raw_body_once(
    fake: FakeSfox, http: requests.Session, text: str
) -> None:
    """A malformed fault answers 201 application/json with the scripted raw text, once."""
    fake.inject(Fault.malformed(text))
    response = issue(http, fake, ["a"])
    assert response.status_code == 201
    assert response.headers["Content-Type"] == "application/json"
    assert response.text == text
    assert isinstance(issue(http, fake, ["a"]).json()["data"], list)


def test_drop_user_fault_omits_one_user_once(fake: FakeSfox, http: requests.Session) -> None:
    """drop_user leaves out the first (or named) user and mints nothing for it, once."""
    fake.inject(Fault.drop_user(), Fault.drop_user("c"))
    first = {e["partner_user_id"] for e in issue(http, fake, ["a", "b", "c"]).json()["data"]}
    second = {e["partner_user_id"] for e in issue(http, fake, ["a", "b", "c"]).json()["data"]}
    third = {e["partner_user_id"] for e in issue(http, fake, ["a", "b", "c"]).json()["data"]}
    assert (first, second, third) == ({"b", "c"}, {"a", "b"}, {"a", "b", "c"})
    assert len(fake.issued_tokens) == 7


def test_extra_user_fault_adds_an_unrequested_entry_once(
    fake: FakeSfox, http: requests.Session
) -> None:
    """extra_user appends a real token for an id nobody requested, once."""
    fake.inject(Fault.extra_user(), Fault.extra_user("mallory"))
    first = [e["partner_user_id"] for e in issue(http, fake, ["a", "b"]).json()["data"]]
    second = [e["partner_user_id"] for e in issue(http, fake, ["a"]).json()["data"]]
    third = [e["partner_user_id"] for e in issue(http, fake, ["a"]).json()["data"]]
    assert sorted(first) == ["a", "b", "intruder"]
    assert sorted(second) == ["a", "mallory"]
    assert third == ["a"]


def test_faults_match_by_path_prefix_in_fifo_order(fake: FakeSfox, http: requests.Session) -> None:
    """Order faults skip token requests, token faults skip orders, and each queue is FIFO."""
    token = token_for(http, fake, "alice")
    fake.inject(
        Fault.status(502, path="/v1/orders"),
        Fault.status(503),
        Fault.status(504),
    )
    assert issue(http, fake, ["a"]).status_code == 503
    assert order(http, fake, token).status_code == 502
    assert order(http, fake, token).status_code == 201
    assert issue(http, fake, ["a"]).status_code == 504
    assert issue(http, fake, ["a"]).status_code == 201


def test_fault_dict_round_trip_and_validation() -> None:
    """Fault.from_dict accepts every constructor's to_dict form and rejects nonsense."""
    faults = [
        Fault.status(503, "down", retry_after=3),
        Fault.status(500, body={"x": 1}, path="/v1/orders"),
        Fault.reset(),
        Fault.delay(0.25),
        Fault.malformed("not json"),
        Fault.drop_user(),
        Fault.drop_user("u"),
        Fault.extra_user(),
    ]
    for fault in faults:
        assert Fault.from_dict(json.loads(json.dumps(fault.to_dict()))) == fault
    for bad in (
        {"kind": "explode"},
        {"kind": "status", "code": 99},
        {"kind": "status", "code": "503"},
        {"kind": "delay", "seconds": -1},
        {"kind": "malformed"},
        {"kind": "reset", "surprise": 1},
    ):
        with pytest.raises(ValueError):
            Fault.from_dict(bad)


# ---- rate limiting -------------------------------------------------------------------------


def test_rate_limit_returns_429_then_penalises_the_ip(http: requests.Session) -> None:
    """Request N+1 in a window is 429, and 429s persist for the penalty even after the window."""
    with FakeSfox(KEY, rate_limit=4, rate_window=0.3, rate_penalty=0.7) as fake:
        statuses = [issue(http, fake, ["a"]).status_code for _ in range(5)]
        assert statuses == [201, 201, 201, 201, 429]
        limited = issue(http, fake, ["a"])
        assert limited.json() == {"error": "rate limit exceeded"}
        assert "Retry-After" not in limited.headers
        time.sleep(0.4)  # the window has drained, the penalty has not
        assert issue(http, fake, ["a"]).status_code == 429
        time.sleep(0.4)
        assert issue(http, fake, ["a"]).status_code == 201
        assert fake.rate_limited_count == 3
        assert fake.stats()["rate_limited"] == 3


def test_rate_limit_retry_after_is_optional(http: requests.Session) -> None:
    """With retry_after_on_limit the limiter's 429 carries a whole-second Retry-After."""
    with FakeSfox(
        KEY, rate_limit=1, rate_window=0.5, rate_penalty=0.3, retry_after_on_limit=True
    ) as fake:
        assert issue(http, fake, ["a"]).status_code == 201
        limited = issue(http, fake, ["a"])
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"


def test_rate_limit_counts_every_endpoint_and_is_off_by_default(http: requests.Session) -> None:
    """The limiter counts 404s and orders too, while a default fake never answers 429."""
    with FakeSfox(KEY) as fake:
        assert all(issue(http, fake, ["a"]).status_code == 201 for _ in range(30))
    with FakeSfox(KEY, rate_limit=2, rate_window=0.5, rate_penalty=0.3) as fake:
        assert http.get(fake.url + "/nowhere").status_code == 404
        assert http.post(fake.url + "/v1/orders/buy", json={}).status_code == 401
        assert issue(http, fake, ["a"]).status_code == 429


def bound_session(address: str) -> requests.Session:
    """A session whose connections leave from ``address`` (a loopback alias)."""
    session = requests.Session()
    adapter = http_adapter(2, address)
    session.mount("http://", adapter)
    session.trust_env = False
    return session


def test_rate_limit_is_per_client_address_and_reported_per_address() -> None:
    """Each client address has its own budget and penalty, and stats show each one's counts."""
    with (
        FakeSfox(KEY, rate_limit=2, rate_window=30.0, rate_penalty=30.0) as fake,
        bound_session("127.0.0.2") as two,
        bound_session("127.0.0.3") as three,
    ):
        assert [issue(two, fake, ["a"]).status_code for _ in range(3)] == [201, 201, 429]
        # The other address is untouched by the first one's penalty.
        assert [issue(three, fake, ["b"]).status_code for _ in range(2)] == [201, 201]
        by_address = fake.stats()["by_address"]
        assert by_address["127.0.0.2"] == {
            "requests": 3, "token_requests": 3, "order_requests": 0, "rate_limited": 1,
            "max_requests_in_window": 3,
        }  # fmt: skip
        assert by_address["127.0.0.3"]["rate_limited"] == 0
        assert by_address["127.0.0.3"]["max_requests_in_window"] == 2
        assert fake.rate_limited_by_address() == {"127.0.0.2": 1}
        assert fake.max_requests_in_window(30.0, ip="127.0.0.3") == 2


def test_rate_limit_per_server_is_one_budget_for_every_address() -> None:
    """rate_limit_per="server" counts all addresses together, as if behind one NAT."""
    with (
        FakeSfox(KEY, rate_limit=2, rate_window=30.0, rate_penalty=30.0) as fake,
        bound_session("127.0.0.2") as two,
        bound_session("127.0.0.3") as three,
    ):
        fake.configure(rate_limit_per="server")
        assert issue(two, fake, ["a"]).status_code == 201
        assert issue(three, fake, ["b"]).status_code == 201
        assert issue(two, fake, ["a"]).status_code == 429
        assert issue(three, fake, ["b"]).status_code == 429
        assert fake.rate_limited_by_address() == {"127.0.0.2": 1, "127.0.0.3": 1}
        with pytest.raises(ValueError, match="rate_limit_per"):
            fake.configure(rate_limit_per="planet")


def test_stats_report_token_age_at_use_and_users_minted_twice(
    fake: FakeSfox, http: requests.Session
) -> None:
    """Each order's token age is kept; users given a second token are counted."""
    first = token_for(http, fake, "alice")
    token_for(http, fake, "bob")
    time.sleep(0.2)  # alice's first token is at least this old when used
    assert order(http, fake, first, client_order_id="o1").status_code == 201
    again = token_for(http, fake, "alice")
    assert order(http, fake, again, client_order_id="o2").status_code == 201
    ages = fake.token_ages_at_use()
    assert len(ages) == 2 and ages[0] >= 0.2 and ages[1] < ages[0]
    use = fake.stats()["token_use"]
    assert use["orders"] == 2 and use["max_s"] == round(ages[0], 3)
    assert use["users_minted"] == 2 and use["users_minted_more_than_once"] == 1
    times = fake.stats()["times"]
    assert times["first_request_at"] <= times["last_order_at"] <= times["last_request_at"]


def test_max_requests_in_window_matches_sent_bursts(fake: FakeSfox, http: requests.Session) -> None:
    """max_requests_in_window finds the densest burst, optionally per path prefix."""
    for _ in range(3):
        issue(http, fake, ["a"])
    time.sleep(0.5)
    for _ in range(2):
        http.get(fake.url + "/elsewhere")
    issue(http, fake, ["a"])
    assert fake.max_requests_in_window(0.25) == 3
    assert fake.max_requests_in_window(0.25, TOKENS) == 3
    assert fake.max_requests_in_window(0.25, "/elsewhere") == 2
    assert fake.max_requests_in_window(5.0) == 6
    assert fake.max_requests_in_window(5.0, TOKENS) == 4
    assert fake.count(TOKENS) == 4 and fake.count() == 6
    assert [r.user_count for r in fake.requests_log] == [1, 1, 1, 0, 0, 1]


# ---- orders --------------------------------------------------------------------------------


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


# ---- control API, lifecycle, concurrency ---------------------------------------------------


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
