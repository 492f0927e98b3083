"""The stand-in's scripted faults: each served once, as scripted, in order."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tasks.testing import FakeSfox, Fault, http_date
from tests.stand_in.kit import (
    KEY,
    TOKENS,
    issue,
    order,
    token_for,
)


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
