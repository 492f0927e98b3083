"""The minting algorithm against the real stand-in over loopback, without Celery.

Waits are injected: ``sleep`` records what would have been slept.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

import pytest

from tasks._exceptions import AuthenticationError, InvalidUserIds, RetriesExhausted, ServerError
from tasks._settings import Rate, RetrySettings
from tasks.budget.ratelimit import LocalLimiter, RedisLimiter
from tasks.budget.retry import RetryPolicy
from tasks.minting import Deferred, Minter, _Progress, validate_user_ids
from tasks.sealing import Sealer
from tasks.sfox.access import SfoxAccess
from tasks.sfox.client import SfoxClient, Timeouts
from tasks.testing import Fault
from tests.conftest import ENTERPRISE_KEY, REDIS_URL


class Sleeps(list):
    """An injected ``sleep`` that records instead of sleeping, and a clock it advances."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000.0
        self._lock = threading.Lock()  # a mint's threads may sleep at once

    def __call__(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
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


def make_minter(fake, sleeps, sealer, *, limiter=None, batch_size=100, concurrency=1, **retry):
    retry.setdefault("wait_initial", 0.01)
    retry.setdefault("wait_max", 0.05)
    client = SfoxClient(fake.url, ENTERPRISE_KEY, timeouts=Timeouts(connect=0.5, read=0.5))
    access = SfoxAccess(
        client,
        limiter or LocalLimiter(Rate(1000, 1.0), clock=sleeps.clock),
        RetryPolicy(RetrySettings(**retry), sleep=sleeps, clock=sleeps.clock),
        sealer,
        rate_limit_penalty=60.0,
        sleep=sleeps,
        clock=sleeps.clock,
    )
    return Minter(access, batch_size=batch_size, concurrency=concurrency)


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
    wait, paused, _ = other.try_acquire()
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


# -- several requests at once ------------------------------------------------------------


def mint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sfox-mint")]


def minted_per_user(fake, user_ids) -> Counter[str]:
    """How many tokens the stand-in issued to each of ``user_ids``.

    Only these: a slow answer an earlier test stopped waiting for may still mint its user.
    """
    wanted = set(user_ids)
    return Counter(user for user, _exp in fake.issued_tokens.values() if user in wanted)


def test_concurrent_requests_overlap_at_the_stand_in(fake_sfox, sleeps, sealer):
    """With concurrency 4, four requests are in flight at the stand-in at once."""
    fake_sfox.configure(latency=0.2)
    ids = [f"u{i:03d}" for i in range(80)]
    minter = make_minter(fake_sfox, sleeps, sealer, batch_size=10, concurrency=4)
    started = time.monotonic()
    result = minter.mint(ids)
    elapsed = time.monotonic() - started
    assert [t["partner_user_id"] for t in result["tokens"]] == ids
    assert token_requests(fake_sfox) == 8
    # Each answer takes 0.2 s: four arrivals within 0.2 s were all in flight together.
    assert fake_sfox.max_requests_in_window(0.2) == 4
    assert elapsed < 1.2  # one after another takes 8 x 0.2 = 1.6 s
    assert minted_per_user(fake_sfox, ids) == Counter(ids)
    assert len(minter.client._sessions) == 4  # one session per request in flight
    assert mint_threads() == []


def test_concurrency_one_keeps_the_sequential_order(fake_sfox, sleeps, sealer):
    """At concurrency 1 every request is made on the calling thread, in the sequential order."""
    ids = [f"u{i}" for i in range(12)]
    fake_sfox.refuse("u5", status=404, message="user not found")
    minter = make_minter(fake_sfox, sleeps, sealer, batch_size=4, concurrency=1)
    original = minter.client.create_user_tokens
    callers = set()

    def recording(batch):
        callers.add(threading.current_thread().name)
        if batch == ["u8", "u9", "u10", "u11"]:
            fake_sfox.inject(Fault.drop_user("u9"))
        return original(batch)

    minter.client.create_user_tokens = recording  # type: ignore[method-assign]
    result = minter.mint(ids)
    assert [r.user_ids for r in fake_sfox.requests_log] == [
        ["u0", "u1", "u2", "u3"],
        ["u4", "u5", "u6", "u7"],
        ["u4", "u5"],
        ["u4"],
        ["u5"],
        ["u6", "u7"],
        ["u8", "u9", "u10", "u11"],
        ["u9"],
    ]
    assert callers == {threading.current_thread().name}
    assert [t["partner_user_id"] for t in result["tokens"]] == [u for u in ids if u != "u5"]
    assert result["failed"] == [{"user_id": "u5", "status": 404, "error": "user not found"}]


def test_bisection_and_reask_work_with_concurrency(fake_sfox, sleeps, sealer):
    """Refused users are isolated and missing users re-asked while four requests overlap."""
    fake_sfox.configure(latency=0.02)
    ids = [f"user-{i:03d}" for i in range(120)]
    fake_sfox.refuse("user-053", status=404, message="user not found")
    fake_sfox.refuse("user-077", status=422, message="user deactivated")
    # Two of the first four requests (all in flight together) leave out their first user.
    fake_sfox.inject(Fault.drop_user(), Fault.drop_user())
    minter = make_minter(fake_sfox, sleeps, sealer, batch_size=10, concurrency=4)
    result = minter.mint(ids)
    good = [u for u in ids if u not in ("user-053", "user-077")]
    assert [t["partner_user_id"] for t in result["tokens"]] == good
    assert result["failed"] == [
        {"user_id": "user-053", "status": 404, "error": "user not found"},
        {"user_id": "user-077", "status": 422, "error": "user deactivated"},
    ]
    assert minted_per_user(fake_sfox, ids) == Counter(good)  # nobody minted twice, nobody lost
    alone = [r.user_ids[0] for r in fake_sfox.requests_log if len(r.user_ids) == 1]
    reasked = [u for u in alone if u in ("user-000", "user-010", "user-020", "user-030")]
    assert len(reasked) == 2
    assert fake_sfox.max_requests_in_window(0.02) > 1  # overlapped
    # 12 batches, each refused ID costs about 2*log2(10) more, each dropped one 1.
    assert token_requests(fake_sfox) <= 12 + 2 * 2 * math.ceil(math.log2(10)) + 2


@pytest.mark.parametrize(
    ("fault", "countdown", "counts"),
    [
        (Fault.status(429, retry_after=30), 30, False),  # the limiter's pause: no failure
        (Fault.status(503, retry_after=120), 120, True),  # a long Retry-After: a failure
    ],
    ids=["429", "503"],
)
def test_long_wait_mid_run_with_concurrency_defers_and_resumes_exactly_once(
    fake_sfox, sleeps, sealer, fault, countdown, counts
):
    """A long wait mid-run stops new requests, keeps those in flight, and resumes the rest.

    No user is minted twice or lost, the carried state holds no plaintext token,
    and it counts every request made.
    """
    fake_sfox.configure(latency=0.05)
    ids = [f"u{i:03d}" for i in range(200)]
    limiter = LocalLimiter(Rate(1000, 1.0), clock=sleeps.clock)
    minter = make_minter(fake_sfox, sleeps, sealer, limiter=limiter, batch_size=10, concurrency=4)
    original = minter.client.create_user_tokens
    lock = threading.Lock()
    calls = {"n": 0}

    def fault_on_the_sixth(batch):
        with lock:
            calls["n"] += 1
            if calls["n"] == 6:
                fake_sfox.inject(fault)
        return original(batch)

    minter.client.create_user_tokens = fault_on_the_sixth  # type: ignore[method-assign]
    with pytest.raises(Deferred) as caught:
        minter.mint(ids)
    assert mint_threads() == []
    deferred = caught.value
    assert deferred.countdown == countdown and deferred.counts is counts
    state = deferred.state
    assert state["requests"] == token_requests(fake_sfox)
    done = [t["partner_user_id"] for t in state["tokens"]]
    queued = [u for batch in state["queue"] for u in batch]
    assert 5 <= len(done) // 10 < 20  # the batches answered before and in flight were kept
    assert sorted(done + queued) == ids  # each user either done or queued, exactly once
    assert Counter(done) == minted_per_user(fake_sfox, ids)
    for entry in state["tokens"]:
        assert entry["token"] not in fake_sfox.issued_tokens  # sealed in the carried state
    # The one request that met the fault carries its failure into the next run.
    failures = state["budget"]["failures"] + sum(f for _i, f, _l in state.get("retrying", []))
    assert failures == 1
    if fault.code == 429:
        assert limiter.try_acquire()[1] is True  # every worker sharing the limiter waits

    sleeps.now += countdown  # the broker's countdown
    before = token_requests(fake_sfox)
    minter.client.create_user_tokens = original  # type: ignore[method-assign]
    result = minter.mint(ids, state)
    assert [t["partner_user_id"] for t in result["tokens"]] == ids
    assert result["failed"] == []
    assert token_requests(fake_sfox) - before == len(state["queue"])
    assert minted_per_user(fake_sfox, ids) == Counter(ids)  # none minted twice, none lost
    issued = {user: token for token, (user, _exp) in fake_sfox.issued_tokens.items()}
    assert all(sealer.unseal(t["token"]) == issued[t["partner_user_id"]] for t in result["tokens"])


def test_auth_failure_stops_every_thread(fake_sfox, sleeps, sealer):
    """A 401 mid-run ends the mint with AuthenticationError once the requests in flight end."""
    fake_sfox.configure(latency=0.05)
    ids = [f"u{i:03d}" for i in range(400)]
    fake_sfox.inject(Fault.delay(0), Fault.delay(0), Fault.status(401))
    minter = make_minter(fake_sfox, sleeps, sealer, batch_size=10, concurrency=4)
    with pytest.raises(AuthenticationError):
        minter.mint(ids)
    assert mint_threads() == []  # no thread left running
    sent = token_requests(fake_sfox)
    assert sent <= 3 + 4  # at most the requests in flight when the 401 came back
    time.sleep(0.2)
    assert token_requests(fake_sfox) == sent  # and nothing is sent afterwards


def test_one_flaky_batch_cannot_outrun_the_attempt_limit(fake_sfox, sleeps, sealer):
    """Each request in flight counts its own failures: others' successes do not reset them."""
    ids = [f"u{i:03d}" for i in range(100)]
    minter = make_minter(fake_sfox, sleeps, sealer, batch_size=10, concurrency=4, attempts=3)
    original = minter.client.create_user_tokens
    lock = threading.Lock()
    flaky = {"n": 0}

    def u050_always_fails(batch):
        if "u050" in batch:
            with lock:
                flaky["n"] += 1
            raise ServerError("sFOX answered 503 to a user tokens request", status=503)
        return original(batch)

    minter.client.create_user_tokens = u050_always_fails  # type: ignore[method-assign]
    with pytest.raises(RetriesExhausted, match="3 failed attempts"):
        minter.mint(ids)
    assert flaky["n"] == 3
    assert mint_threads() == []


def test_progress_keeps_each_batch_failures_across_a_countdown():
    """The carried state keeps every queued batch's failures; a version-1 state still reads."""
    progress = _Progress(started_at=100.0)
    progress.queue = [progress.batch(["a"]), progress.batch(["b"]), progress.batch(["c"])]
    progress.queue[0].budget.failures, progress.queue[0].budget.last_failure = 2, "503"
    progress.queue[2].budget.failures, progress.queue[2].budget.last_failure = 1, "reset"
    state = progress.to_json()
    assert state["v"] == 1
    assert state["budget"] == {"started_at": 100.0, "failures": 2, "last_failure": "503"}
    assert state["retrying"] == [[2, 1, "reset"]]
    again = _Progress.from_json(state, now=500.0)
    assert [(b.user_ids, b.budget.failures, b.budget.started_at) for b in again.queue] == [
        (["a"], 2, 100.0),
        (["b"], 0, 100.0),
        (["c"], 1, 100.0),
    ]
    del state["retrying"]  # as a worker without concurrency wrote it
    older = _Progress.from_json(state, now=500.0)
    assert [b.budget.failures for b in older.queue] == [2, 0, 0]
