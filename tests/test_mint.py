"""The minting algorithm against the real stand-in over loopback, without Celery.

Waits are injected: ``sleep`` records what would have been slept.
"""

from __future__ import annotations

import math

import pytest

from tasks._client import SfoxClient, Timeouts
from tasks._exceptions import AuthenticationError, InvalidUserIds, RetriesExhausted
from tasks._mint import Deferred, Minter, validate_user_ids
from tasks._ratelimit import LocalLimiter, RedisLimiter
from tasks._retry import RetryPolicy
from tasks._seal import Sealer
from tasks._settings import Rate, RetrySettings
from tasks.fake_sfox import Fault
from tests.conftest import ENTERPRISE_KEY, REDIS_URL


class Sleeps(list):
    """An injected ``sleep`` that records instead of sleeping, and a clock it advances."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000.0

    def __call__(self, seconds: float) -> None:
        if seconds > 0:
            self.append(seconds)
            self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def sealer() -> Sealer:
    return Sealer.for_keys([], ENTERPRISE_KEY, 900)


def make_minter(fake, sleeps, sealer, *, limiter=None, batch_size=100, **retry):
    retry.setdefault("wait_initial", 0.01)
    retry.setdefault("wait_max", 0.05)
    client = SfoxClient(fake.url, ENTERPRISE_KEY, timeouts=Timeouts(connect=0.5, read=0.5))
    return Minter(
        client,
        limiter or LocalLimiter(Rate(1000, 1.0), clock=sleeps.clock),
        RetryPolicy(RetrySettings(**retry), sleep=sleeps, clock=sleeps.clock),
        sealer,
        batch_size=batch_size,
        rate_limit_penalty=60.0,
        sleep=sleeps,
        clock=sleeps.clock,
    )


def token_requests(fake) -> int:
    return fake.count("/v1/enterprise/user-tokens")


def test_tokens_match_by_user_not_position(fake_sfox, sleeps, sealer):
    """Shuffled answers are matched by partner_user_id and returned in request order, sealed."""
    ids = [f"user-{i}" for i in range(30)]
    result = make_minter(fake_sfox, sleeps, sealer).mint(ids)
    assert [t["partner_user_id"] for t in result["tokens"]] == ids
    assert result["failed"] == []
    issued = {user: token for token, (user, _exp) in fake_sfox.issued_tokens.items()}
    for entry in result["tokens"]:
        assert entry["token"] != issued[entry["partner_user_id"]]
        assert sealer.unseal(entry["token"]) == issued[entry["partner_user_id"]]
        assert entry["expires"].endswith("Z") and "." not in entry["expires"]


def test_large_lists_are_split_into_batches(fake_sfox, sleeps, sealer):
    """250 IDs at batch size 100 make exactly three requests."""
    ids = [f"u{i}" for i in range(250)]
    result = make_minter(fake_sfox, sleeps, sealer, batch_size=100).mint(ids)
    assert len(result["tokens"]) == 250
    sizes = [len(r.user_ids) for r in fake_sfox.requests_log]
    assert sizes == [100, 100, 50]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_retried(fake_sfox, sleeps, sealer, status):
    """A run of 5xx answers is retried with backoff until sFOX answers."""
    fake_sfox.inject(*[Fault.status(status)] * 3)
    result = make_minter(fake_sfox, sleeps, sealer).mint(["a", "b"])
    assert len(result["tokens"]) == 2
    assert token_requests(fake_sfox) == 4
    assert len(sleeps) == 3 and all(0 <= s <= 0.05 for s in sleeps)


def test_429_with_retry_after_is_honoured(fake_sfox, sleeps, sealer):
    """A 429 with Retry-After pauses the limiter for exactly that long before the retry."""
    limiter = LocalLimiter(Rate(1000, 1.0), clock=sleeps.clock)
    fake_sfox.inject(Fault.status(429, retry_after=3))
    result = make_minter(fake_sfox, sleeps, sealer, limiter=limiter, inprocess_wait_max=10).mint(
        ["a"]
    )
    assert len(result["tokens"]) == 1
    assert sleeps == [3.0]


def test_429_without_retry_after_waits_the_penalty(fake_sfox, sleeps, sealer):
    """A bare 429 pauses for SFOX_RATE_LIMIT_PENALTY; past the in-process cap it defers."""
    fake_sfox.inject(Fault.status(429))
    minter = make_minter(fake_sfox, sleeps, sealer)
    with pytest.raises(Deferred) as caught:
        minter.mint(["a", "b"])
    assert 59 <= caught.value.countdown <= 60
    assert caught.value.counts is False  # a limiter wait spends no retry budget
    assert sleeps == []


def test_429_pauses_every_worker_sharing_the_limiter(fake_sfox, sleeps, sealer, redis_client):
    """After one worker's 429, another worker on the same Redis limiter waits too."""
    rate = Rate(1000, 1.0)
    first = make_minter(
        fake_sfox,
        sleeps,
        sealer,
        limiter=RedisLimiter.from_url(REDIS_URL, rate),
        inprocess_wait_max=1,
    )
    other = RedisLimiter.from_url(REDIS_URL, rate)
    fake_sfox.inject(Fault.status(429, retry_after=5))
    with pytest.raises(Deferred):
        first.mint(["a"])
    wait, paused = other.try_acquire()
    assert paused and 4 <= wait <= 5


def test_connection_reset_mid_response_is_retried(fake_sfox, sleeps, sealer):
    """A connection reset mid-response is a transport failure, retried."""
    fake_sfox.inject(Fault.reset())
    result = make_minter(fake_sfox, sleeps, sealer).mint(["a", "b"])
    assert len(result["tokens"]) == 2 and len(sleeps) == 1


def test_read_timeout_is_retried(fake_sfox, sleeps, sealer):
    """A read timeout is retried; the slow answer is not waited for."""
    fake_sfox.inject(Fault.delay(1.5))
    result = make_minter(fake_sfox, sleeps, sealer).mint(["a"])
    assert len(result["tokens"]) == 1 and len(sleeps) == 1


@pytest.mark.parametrize("body", ['{"data": "oops"}', "not json", '{"data": [{"token": 1}]}', "[]"])
def test_malformed_201_is_retried(fake_sfox, sleeps, sealer, body):
    """A 201 whose body is not the documented shape is transient and retried."""
    fake_sfox.inject(Fault.malformed(body))
    result = make_minter(fake_sfox, sleeps, sealer).mint(["a", "b"])
    assert len(result["tokens"]) == 2 and token_requests(fake_sfox) == 2


def test_user_missing_from_answer_is_asked_again_alone(fake_sfox, sleeps, sealer):
    """A user left out of a 201 is asked for once more, alone, and then minted."""
    fake_sfox.inject(Fault.drop_user("b"))
    result = make_minter(fake_sfox, sleeps, sealer).mint(["a", "b", "c"])
    assert [t["partner_user_id"] for t in result["tokens"]] == ["a", "b", "c"]
    assert [r.user_ids for r in fake_sfox.requests_log][-1] == ["b"]


def test_user_missing_twice_is_failed_with_null_status(fake_sfox, sleeps, sealer):
    """A user left out twice goes to failed with status None; the others keep their tokens."""
    fake_sfox.inject(Fault.drop_user("b"), Fault.drop_user("b"))
    result = make_minter(fake_sfox, sleeps, sealer).mint(["a", "b", "c"])
    assert [t["partner_user_id"] for t in result["tokens"]] == ["a", "c"]
    assert result["failed"] == [
        {"user_id": "b", "status": None, "error": "sFOX left this user out of its answer twice"}
    ]
    assert token_requests(fake_sfox) == 2


def test_extra_user_in_answer_is_dropped(fake_sfox, sleeps, sealer, caplog):
    """An entry for an unrequested user is dropped and logged without its token."""
    fake_sfox.inject(Fault.extra_user("intruder"))
    result = make_minter(fake_sfox, sleeps, sealer).mint(["a"])
    assert [t["partner_user_id"] for t in result["tokens"]] == ["a"]
    assert "intruder" in caplog.text
    for token in fake_sfox.issued_tokens:
        assert token not in caplog.text


def test_401_fails_fast_with_one_request(fake_sfox, sleeps, sealer):
    """A 401 fails the whole mint at once, tells to check the key, and never echoes it."""
    fake_sfox.inject(Fault.status(401))
    with pytest.raises(AuthenticationError) as caught:
        make_minter(fake_sfox, sleeps, sealer).mint(["a", "b"])
    assert "SFOX_ENTERPRISE_API_KEY" in str(caught.value)
    assert ENTERPRISE_KEY not in str(caught.value)
    assert token_requests(fake_sfox) == 1 and sleeps == []


@pytest.mark.parametrize("status", [403, 405, 406])
def test_other_permanent_statuses_fail_fast(fake_sfox, sleeps, sealer, status):
    """403, 405 and 406 are permanent: one request, no retry."""
    fake_sfox.inject(Fault.status(status))
    with pytest.raises(Exception) as caught:
        make_minter(fake_sfox, sleeps, sealer).mint(["a"])
    assert str(status) in str(caught.value)
    assert token_requests(fake_sfox) == 1


def test_refused_user_among_50_is_isolated_by_bisection(fake_sfox, sleeps, sealer):
    """One refused user among 50 costs only it: bisect isolates it in O(log n) requests."""
    ids = [f"user-{i:02d}" for i in range(50)]
    fake_sfox.refuse("user-37", status=404, message="user not found")
    result = make_minter(fake_sfox, sleeps, sealer).mint(ids)
    assert len(result["tokens"]) == 49
    assert result["failed"] == [{"user_id": "user-37", "status": 404, "error": "user not found"}]
    assert token_requests(fake_sfox) <= 1 + 2 * math.ceil(math.log2(50))


def test_several_refused_users_with_their_own_statuses(fake_sfox, sleeps, sealer):
    """Each refused user is reported with sFOX's status and message; the rest are minted."""
    ids = [f"u{i}" for i in range(40)]
    fake_sfox.refuse("u3", status=422, message="user deactivated")
    fake_sfox.refuse("u30", status=400, message="bad user")
    result = make_minter(fake_sfox, sleeps, sealer, batch_size=20).mint(ids)
    assert len(result["tokens"]) == 38
    assert result["failed"] == [
        {"user_id": "u3", "status": 422, "error": "user deactivated"},
        {"user_id": "u30", "status": 400, "error": "bad user"},
    ]


def test_retries_exhausted_names_last_status(fake_sfox, sleeps, sealer):
    """When attempts run out the error names the last status seen."""
    fake_sfox.inject(*[Fault.status(503)] * 5)
    with pytest.raises(RetriesExhausted) as caught:
        make_minter(fake_sfox, sleeps, sealer, attempts=3).mint(["a"])
    assert "503" in str(caught.value) and "3 failed attempts" in str(caught.value)
    assert token_requests(fake_sfox) == 3


def test_deadline_bounds_the_whole_effort(fake_sfox, sealer):
    """A Retry-After that would pass the deadline ends the mint with the last status."""
    fake_sfox.inject(Fault.status(503, retry_after=30))
    minter = make_minter(fake_sfox, Sleeps(), sealer, deadline=10)
    with pytest.raises(RetriesExhausted) as caught:
        minter.mint(["a"])
    assert "deadline" in str(caught.value) and "503" in str(caught.value)


def test_long_retry_after_defers_and_resumes_without_redoing_work(fake_sfox, sleeps, sealer):
    """A long wait raises Deferred with the work so far; resuming finishes the rest only."""
    ids = [f"u{i}" for i in range(30)]
    minter = make_minter(fake_sfox, sleeps, sealer, batch_size=10)
    calls = {"n": 0}
    original = minter.client.create_user_tokens

    def first_ok_then_fault(batch):
        # The first batch is answered; the second meets a 503 asking for 120 s.
        calls["n"] += 1
        if calls["n"] == 2:
            fake_sfox.inject(Fault.status(503, retry_after=120))
        return original(batch)

    minter.client.create_user_tokens = first_ok_then_fault  # type: ignore[method-assign]
    with pytest.raises(Deferred) as caught:
        minter.mint(ids)
    state = caught.value.state
    assert caught.value.countdown == 120 and caught.value.counts is True
    assert len(state["tokens"]) == 10
    for entry in state["tokens"]:
        assert entry["token"] not in fake_sfox.issued_tokens  # sealed in the carried state
    before = token_requests(fake_sfox)
    result = minter.mint(ids, state)
    assert [t["partner_user_id"] for t in result["tokens"]] == ids
    assert token_requests(fake_sfox) - before == 2  # only the two unfinished batches


@pytest.mark.parametrize(
    "bad",
    [
        "user-1",
        b"user-1",
        {"a": 1},
        None,
        [],
        [1, 2],
        ["ok", ""],
        ["ok", "   "],
        ["x" * 257],
        [f"u{i}" for i in range(10_001)],
    ],
)
def test_bad_input_is_refused(bad):
    """Each kind of bad input is refused with a clear InvalidUserIds (a ValueError)."""
    with pytest.raises(InvalidUserIds) as caught:
        validate_user_ids(bad, maximum=10_000)
    assert isinstance(caught.value, ValueError) and str(caught.value)


def test_too_many_ids_points_to_with_user_tokens():
    """Past the per-task maximum, the error says to use with_user_tokens."""
    with pytest.raises(InvalidUserIds, match="with_user_tokens"):
        validate_user_ids([f"u{i}" for i in range(11)], maximum=10)


def test_duplicates_are_minted_once(fake_sfox, sleeps, sealer):
    """Repeated IDs are requested once and returned once, in first-given order."""
    ids = validate_user_ids(["b", "a", "b", "c", "a"], maximum=100)
    result = make_minter(fake_sfox, sleeps, sealer).mint(ids)
    assert [t["partner_user_id"] for t in result["tokens"]] == ["b", "a", "c"]
    assert fake_sfox.requests_log[0].user_ids and len(fake_sfox.requests_log[0].user_ids) == 3
