"""The stand-in's token endpoints: batches, both expiry spellings, refusals, keys."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
import requests

from tasks.testing import FakeSfox
from tests.stand_in.kit import (
    KEY,
    MILLIS_EXPIRES,
    PLAIN_EXPIRES,
    TOKENS,
    issue,
    parse_expires,
    token_for,
)


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
