"""The minting algorithm on its own: a stub sFOX, the in-memory limiter, no sleeping."""

from __future__ import annotations

from tasks import RequestRefused, ServerError
from tasks._settings import Rate, RetrySettings
from tasks.budget.ratelimit import LocalLimiter
from tasks.budget.retry import RetryPolicy
from tasks.minting import Minter
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


def minter(stub, *, batch_size=2):
    sealer = Sealer([derive_seal_key("ek")], 900)
    access = SfoxAccess(
        stub,
        LocalLimiter(Rate.parse("1000/1s")),
        RetryPolicy(RetrySettings(wait_initial=0.0), sleep=lambda s: None, jitter=lambda a, b: 0),
        sealer,
        rate_limit_penalty=0.0,
        sleep=lambda s: None,
    )
    return Minter(access, batch_size=batch_size), sealer


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
