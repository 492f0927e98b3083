"""Budgets per egress IP: limiter scopes, the source address, and both through a real worker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tasks import mint_user_tokens
from tasks._exceptions import ConfigurationError, RateLimited, TransportError
from tasks._settings import Rate, Settings, SettingSource
from tasks.budget.ratelimit import LimiterWait, RedisLimiter, held
from tasks.cli.check import _check_rate, _check_sfox
from tasks.sfox.client import SfoxClient, Timeouts
from tasks.testing import FakeSfox
from tasks.worker.runtime import Runtime
from tests.conftest import ENTERPRISE_KEY, REDIS_URL
from tests.workers import WorkerProcess

#: Loopback aliases standing in for a multi-homed host's egress addresses.
EGRESS = ("127.0.0.2", "127.0.0.3")


@pytest.fixture
def limited_fake() -> Iterator[FakeSfox]:
    """A stand-in allowing 10 requests per 30 s per address: no test here outlasts a window."""
    with FakeSfox(ENTERPRISE_KEY, rate_limit=10, rate_window=30.0, rate_penalty=30.0) as fake:
        yield fake


def client_from(fake: FakeSfox, address: str | None) -> SfoxClient:
    return SfoxClient(fake.url, ENTERPRISE_KEY, timeouts=Timeouts(1.0, 1.0), source_address=address)


def send_until_the_limiter_says_wait(limiter: RedisLimiter, client: SfoxClient) -> int:
    """Mint one user per request while the limiter grants a slot at once; how many were sent."""
    sent = 0
    while True:
        try:
            with held(limiter, max_wait=0.0, hold=2.0):
                with contextlib.suppress(RateLimited):  # counted by the stand-in
                    client.create_user_tokens([f"u{sent}"])
                sent += 1
        except LimiterWait:
            return sent


# ---- settings --------------------------------------------------------------------------------


def test_scope_and_source_address_are_read_and_default_to_one_shared_budget():
    """Unset, there is no scope and no source address; set, both are read as given."""
    assert (Settings().rate_limit_scope, Settings().source_address) == ("", None)
    s = Settings.from_conf({"sfox_rate_limit_scope": "egress-a", "sfox_source_address": "::1"}, {})
    assert (s.rate_limit_scope, s.source_address) == ("egress-a", "::1")
    assert (
        Settings.from_conf({"sfox_rate_limit_scope": "10.0.0.5"}, {}).rate_limit_scope == "10.0.0.5"
    )


@pytest.mark.parametrize(
    ("conf", "name"),
    [
        ({"sfox_rate_limit_scope": "egress a"}, "SFOX_RATE_LIMIT_SCOPE"),
        ({"sfox_rate_limit_scope": "a:b"}, "SFOX_RATE_LIMIT_SCOPE"),
        ({"sfox_rate_limit_scope": "x" * 65}, "SFOX_RATE_LIMIT_SCOPE"),
        ({"sfox_source_address": "egress.example.com"}, "SFOX_SOURCE_ADDRESS"),
        ({"sfox_source_address": "0.0.0.0"}, "SFOX_SOURCE_ADDRESS"),
        ({"sfox_source_address": "224.0.0.1"}, "SFOX_SOURCE_ADDRESS"),
    ],
)
def test_bad_scope_or_source_address_is_refused_by_name(conf, name):
    """A scope unfit for a Redis key, or a source that is no unicast IP, names its variable."""
    with pytest.raises(ConfigurationError, match=name):
        Settings.from_conf(conf, {})


def test_runtime_builds_the_scoped_limiter_and_the_bound_client(redis_client):
    """A worker's runtime hands the scope to its limiter and the address to its client."""
    runtime = Runtime(
        Settings(
            api_key=ENTERPRISE_KEY,
            limiter_url=REDIS_URL,
            rate_limit_scope="egress-x",
            source_address=EGRESS[0],
        )
    )
    try:
        assert isinstance(runtime.limiter, RedisLimiter)
        assert runtime.limiter.scope == "egress-x"
        assert runtime.client.source_address == EGRESS[0]
    finally:
        runtime.close()


# ---- the limiter's scopes ----------------------------------------------------------------------


def test_default_scope_keeps_the_keys_it_had_and_a_scope_gets_its_own(redis_client):
    """Unscoped keys are unchanged (a rolling upgrade keeps one budget); a scope is namespaced."""
    rate = Rate(5, 10.0)
    RedisLimiter.from_url(REDIS_URL, rate).try_acquire()
    RedisLimiter.from_url(REDIS_URL, rate).pause(5)
    RedisLimiter.from_url(REDIS_URL, rate, scope="egress-a").try_acquire()
    RedisLimiter.from_url(REDIS_URL, rate, scope="egress-a").pause(5)
    keys = {k.decode() for k in redis_client.scan_iter(match="sfox:ratelimit:*")}
    assert keys == {
        "sfox:ratelimit:5/10:log",
        "sfox:ratelimit:5/10:on-demand",
        "sfox:ratelimit:5/10:pace",
        "sfox:ratelimit:pause",
        "sfox:ratelimit:scope:egress-a:5/10:log",
        "sfox:ratelimit:scope:egress-a:5/10:on-demand",
        "sfox:ratelimit:scope:egress-a:5/10:pace",
        "sfox:ratelimit:scope:egress-a:pause",
    }


def test_each_scope_has_a_window_and_a_429_pause_of_its_own(redis_client):
    """A full window or a pause in one scope leaves another scope's budget untouched."""
    rate = Rate(3, 30.0)
    a = RedisLimiter.from_url(REDIS_URL, rate, scope="egress-a")
    b = RedisLimiter.from_url(REDIS_URL, rate, scope="egress-b")
    assert all(a.try_acquire()[0] == 0 for _ in range(3))
    wait, paused, _ = a.try_acquire()
    assert wait > 0 and not paused
    assert b.try_acquire()[0] == 0
    b.pause(30)
    assert b.try_acquire()[1] is True
    a2 = RedisLimiter.from_url(REDIS_URL, rate, scope="egress-a")
    assert a2.try_acquire()[1] is False  # egress-a is full, not paused
    assert RedisLimiter.from_url(REDIS_URL, rate).try_acquire()[0] == 0  # the default scope


def test_per_account_limiter_is_one_for_every_scope(redis_client):
    """sFOX's per-account limit follows the account, not the IP: siblings ignore the scope."""
    rate = Rate(2, 30.0)
    a = RedisLimiter.from_url(REDIS_URL, Rate(100, 30.0), scope="egress-a")
    b = RedisLimiter.from_url(REDIS_URL, Rate(100, 30.0), scope="egress-b")
    assert a.sibling(rate, "account:alice").try_acquire()[0] == 0
    assert b.sibling(rate, "account:alice").try_acquire()[0] == 0
    assert b.sibling(rate, "account:alice").try_acquire()[0] > 0


# ---- the source address --------------------------------------------------------------------------


def test_client_sends_from_its_source_address(limited_fake):
    """With a source address, sFOX (the stand-in) sees the request come from that address."""
    for address in (None, *EGRESS):
        client = client_from(limited_fake, address)
        try:
            client.create_user_tokens(["alice"])
        finally:
            client.close()
    assert [r.ip for r in limited_fake.requests_log] == ["127.0.0.1", *EGRESS]


def test_source_address_not_on_this_host_is_a_transport_error(limited_fake):
    """An address the host does not have fails to bind: a transport error, nothing sent."""
    client = client_from(limited_fake, "192.0.2.1")  # TEST-NET-1, never a local address
    try:
        with pytest.raises(TransportError):
            client.create_user_tokens(["alice"])
    finally:
        client.close()
    assert limited_fake.requests_log == []


def test_check_probes_sfox_from_the_source_address_and_names_the_scope(limited_fake):
    """`sfox-tokens check` reaches sFOX from the source address and reports the scope's pause."""
    probe = _check_sfox(
        SettingSource(
            {"sfox_api_url": limited_fake.url, "sfox_source_address": EGRESS[1]}, {}, None
        ),
        2.0,
    )
    assert probe.ok is True and f"from {EGRESS[1]}" in probe.detail
    assert limited_fake.requests_log[-1].ip == EGRESS[1]
    bad = _check_sfox(
        SettingSource(
            {"sfox_api_url": limited_fake.url, "sfox_source_address": "192.0.2.1"}, {}, None
        ),
        2.0,
    )
    assert bad.ok is False and "SFOX_SOURCE_ADDRESS" in bad.detail


def test_check_reports_the_pause_of_its_own_scope(redis_client):
    """The rate-limit check reads the pause of the configured scope, not the default one."""
    RedisLimiter.from_url(REDIS_URL, Rate(5, 10.0), scope="egress-b").pause(30)
    conf = {"sfox_limiter_url": REDIS_URL, "sfox_rate_limit_scope": "egress-b"}
    scoped = _check_rate(SettingSource(conf, {}, None), 2.0)
    assert "scope 'egress-b'" in scoped.detail and "pause" in scoped.detail
    plain = SettingSource({"sfox_limiter_url": REDIS_URL}, {}, None)
    assert "pause" not in _check_rate(plain, 2.0).detail


# ---- both together -------------------------------------------------------------------------------


def test_two_egress_addresses_each_spend_their_own_budget_with_no_429(redis_client, limited_fake):
    """Scope per egress IP: twice the requests of one shared budget, and no 429 at either."""
    rate = Rate(10, 30.0)
    sent = {}
    for address in EGRESS:
        client = client_from(limited_fake, address)
        try:
            # One lane, never paced: each scope's window alone.
            limiter = RedisLimiter.from_url(
                REDIS_URL, rate, scope=f"egress-{address}", batch_share=0.0
            )
            sent[address] = send_until_the_limiter_says_wait(limiter, client)
        finally:
            client.close()
    assert sent == {EGRESS[0]: 10, EGRESS[1]: 10}
    by_address = limited_fake.stats()["by_address"]
    assert {ip: by_address[ip]["requests"] for ip in EGRESS} == sent
    assert limited_fake.rate_limited_count == 0


def test_scopes_behind_one_nat_overrun_the_shared_ip(redis_client, limited_fake):
    """Two scopes whose traffic leaves through one public IP overrun it: that is the wrong case."""
    limited_fake.configure(rate_limit_per="server")  # every client counts as one address
    rate = Rate(10, 30.0)
    for address in EGRESS:
        client = client_from(limited_fake, address)
        try:
            limiter = RedisLimiter.from_url(
                REDIS_URL, rate, scope=f"nat-{address}", batch_share=0.0
            )
            send_until_the_limiter_says_wait(limiter, client)
        finally:
            client.close()
    assert limited_fake.rate_limited_count == 10


@pytest.mark.slow
def test_worker_mints_from_its_source_address_under_its_scope(limited_fake, redis_client, tmp_path):
    """A worker with SFOX_SOURCE_ADDRESS and SFOX_RATE_LIMIT_SCOPE sends from it, counts there."""
    worker = WorkerProcess.solo(
        "egress",
        tmp_path,
        limited_fake.url,
        {"SFOX_SOURCE_ADDRESS": EGRESS[1], "SFOX_RATE_LIMIT_SCOPE": "egress-b"},
        loglevel="INFO",
    )
    worker.start()
    try:
        result = mint_user_tokens.apply_async((["alice", "bob"],), queue="egress").get(timeout=30)
    finally:
        worker.stop()
    assert len(result["tokens"]) == 2
    assert {r.ip for r in limited_fake.requests_log} == {EGRESS[1]}
    scoped = [k.decode() for k in redis_client.scan_iter(match="sfox:ratelimit:scope:egress-b:*")]
    assert scoped and not redis_client.exists("sfox:ratelimit:240/10:log")
    assert f"in the budget 'egress-b'; sending from {EGRESS[1]};" in worker.log()
