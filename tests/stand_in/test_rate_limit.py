"""The stand-in's rate limit: sFOX's rule per address or per server, and its counts."""

from __future__ import annotations

import time

import pytest
import requests

from tasks.sfox.client import http_adapter
from tasks.testing import FakeSfox
from tests.stand_in.kit import (
    KEY,
    TOKENS,
    issue,
    order,
    token_for,
)


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
