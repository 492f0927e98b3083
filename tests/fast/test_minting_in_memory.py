"""The minting algorithm on its own: a stub sFOX, the in-memory limiter, no sleeping."""

from __future__ import annotations

import threading

from tasks import RequestRefused, ServerError
from tasks._settings import Rate, RetrySettings
from tasks.budget.ratelimit import LocalLimiter
from tasks.budget.retry import RetryPolicy
from tasks.minting import Minter, RequestThreads
from tasks.sealing import Sealer, derive_seal_key
from tasks.sfox.access import SfoxAccess
from tasks.sfox.client import IssuedToken, Timeouts


class StubSfox:
    """Answers batches from a script of outcomes; records every batch it was sent."""

    timeouts = Timeouts()

    def __init__(self, *, refuse=(), drop=(), fail_first=0):
        self.refuse, self.drop, self.fail_first = set(refuse), set(drop), fail_first
        self.batches: list[list[str]] = []

    def create_user_tokens(self, user_ids):
        self.batches.append(list(user_ids))
        if self.fail_first:
            self.fail_first -= 1
            raise ServerError("sFOX answered 503", status=503)
        if self.refuse & set(user_ids):
            raise RequestRefused("user not found", status=404, error="user not found")
        return {
            u: IssuedToken(u, f"tok-{u}", "2026-11-28T02:00:00Z")
            for u in user_ids
            if u not in self.drop
        }

    def create_user_token(self, user_id):
        return self.create_user_tokens([user_id])[user_id]


def minter(stub, *, batch_size=2, concurrency=1, threads=None):
    sealer = Sealer([derive_seal_key("ek")], 900)
    access = SfoxAccess(
        stub,
        LocalLimiter(Rate.parse("1000/1s")),
        RetryPolicy(RetrySettings(wait_initial=0.0), sleep=lambda s: None, jitter=lambda a, b: 0),
        sealer,
        rate_limit_penalty=0.0,
        sleep=lambda s: None,
    )
    return Minter(access, batch_size=batch_size, concurrency=concurrency, threads=threads), sealer


def test_every_user_gets_a_sealed_token_in_the_order_given():
    """Batches of batch_size; tokens come back sealed, in the order of the IDs."""
    stub = StubSfox()
    m, sealer = minter(stub)
    result = m.mint(["u1", "u2", "u3"])
    assert stub.batches == [["u1", "u2"], ["u3"]]
    assert [t["partner_user_id"] for t in result["tokens"]] == ["u1", "u2", "u3"]
    assert sealer.unseal(result["tokens"][0]["token"]) == "tok-u1"
    assert result["failed"] == []


def test_a_transient_failure_is_retried():
    """A 503 is tried again; the users still get their tokens."""
    stub = StubSfox(fail_first=1)
    result = minter(stub)[0].mint(["u1"])
    assert len(stub.batches) == 2
    assert [t["partner_user_id"] for t in result["tokens"]] == ["u1"]


def test_a_refused_user_fails_alone():
    """A batch refused for one user is split until that user fails on their own."""
    result = minter(StubSfox(refuse={"bad"}), batch_size=4)[0].mint(["u1", "bad", "u2"])
    assert [t["partner_user_id"] for t in result["tokens"]] == ["u1", "u2"]
    assert [f["user_id"] for f in result["failed"]] == ["bad"]
    assert result["failed"][0]["status"] == 404


def test_a_user_left_out_twice_fails_with_no_status():
    """sFOX leaving a user out of its answer twice fails that user with status null."""
    result = minter(StubSfox(drop={"u2"}))[0].mint(["u1", "u2"])
    assert [f["user_id"] for f in result["failed"]] == ["u2"]
    assert result["failed"][0]["status"] is None


class SlowStub(StubSfox):
    """Records which thread sent each batch, and whether one was still in flight at return."""

    def __init__(self):
        super().__init__()
        self.threads: set[str] = set()
        self.in_flight = 0

    def create_user_tokens(self, user_ids):
        self.threads.add(threading.current_thread().name)
        self.in_flight += 1
        try:
            return super().create_user_tokens(user_ids)
        finally:
            self.in_flight -= 1


def test_request_threads_are_kept_from_one_mint_to_the_next():
    """With RequestThreads, the next mint's requests go out on the same threads."""
    threads = RequestThreads(2)
    stub = SlowStub()
    m = minter(stub, concurrency=2, threads=threads)[0]
    first = m.mint([f"a{i}" for i in range(8)])
    assert stub.in_flight == 0 and len(first["tokens"]) == 8
    kept = _request_threads()
    assert kept and stub.threads <= {t.name for t in kept}
    m.mint([f"b{i}" for i in range(8)])
    # The first mint's threads are still there, and still the pool's: at most its size.
    assert kept <= _request_threads() and len(_request_threads()) <= 2
    assert stub.in_flight == 0
    other = []
    worker = threading.Thread(target=lambda: other.append(threads.pool()))
    worker.start()
    worker.join()
    assert other[0] is not threads.pool()  # each minting thread has a pool of its own
    threads.close()
    fresh = threads.pool()
    assert fresh is not other[0]
    threads.close()


def _request_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("sfox-mint") and t.is_alive()}
