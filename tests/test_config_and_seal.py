"""Settings validation, the URL rule, token sealing and expires/Retry-After parsing."""

from __future__ import annotations

import base64
import time
from email.utils import formatdate

import pytest
from cryptography.fernet import Fernet

from tasks._exceptions import ConfigurationError, MalformedResponse, SealError
from tasks._settings import Settings, check_api_url
from tasks.sealing import SEALED_PREFIX, Sealer, derive_seal_key
from tasks.sfox.client import normalise_expires, parse_retry_after


@pytest.mark.parametrize(
    "url",
    [
        "https://api.sfox.com",
        "https://api.staging.sfox.com/",
        "http://127.0.0.1:8900",
        "http://localhost:1",
        "http://[::1]:80",
        "http://127.5.5.5",
    ],
)
def test_allowed_api_urls(url):
    """https anywhere, plain http only on loopback."""
    check_api_url(url)


@pytest.mark.parametrize(
    "url", ["http://api.sfox.com", "http://10.0.0.5", "ftp://127.0.0.1", "api.sfox.com", ""]
)
def test_refused_api_urls(url):
    """Anything that would send the key in clear over a network is refused."""
    with pytest.raises(ConfigurationError, match="SFOX_API_URL"):
        check_api_url(url)


def test_settings_from_conf_parses_and_defaults():
    """Strings from the environment become typed settings; unset ones take the defaults."""
    s = Settings.from_conf(
        {"sfox_rate_limit": "100/5s", "sfox_token_batch_size": "50", "sfox_retry_attempts": "3"}, {}
    )
    assert (s.rate.limit, s.rate.period, s.batch_size, s.retry.attempts) == (100, 5.0, 50, 3)
    assert s.result_ttl == 900 and s.api_url == "https://api.sfox.com"
    assert s.mint_concurrency == 4
    assert Settings.from_conf({"sfox_mint_concurrency": "1"}, {}).mint_concurrency == 1


@pytest.mark.parametrize(
    ("conf", "names"),
    [
        ({"sfox_token_batch_size": "0"}, "SFOX_TOKEN_BATCH_SIZE"),
        ({"sfox_token_batch_size": "5000"}, "SFOX_TOKEN_BATCH_SIZE"),
        ({"sfox_token_result_ttl": "-1"}, "SFOX_TOKEN_RESULT_TTL"),
        ({"sfox_mint_concurrency": "0"}, "SFOX_MINT_CONCURRENCY"),
        ({"sfox_mint_concurrency": "four"}, "number"),
        ({"sfox_rate_limit": "fast"}, "SFOX_RATE_LIMIT"),
        ({"sfox_read_timeout": "abc"}, "number"),
    ],
)
def test_bad_settings_are_refused_with_the_variable_named(conf, names):
    """A bad value is a ConfigurationError that names what to fix."""
    with pytest.raises(ConfigurationError, match=names):
        Settings.from_conf(conf, {})


def test_missing_key_is_a_clear_error():
    """Asking for the key when none is set names both variables to set."""
    with pytest.raises(ConfigurationError, match=r"SFOX_ENTERPRISE_API_KEY.*ENTERPRISE_API_KEY"):
        Settings().require_api_key()


def test_settings_repr_hides_the_key():
    """The enterprise key and seal keys never show in the settings' repr."""
    s = Settings(api_key="very-secret-key", seal_keys=("k",))
    assert "very-secret-key" not in repr(s) and "seal_keys" not in repr(s)


def test_seal_round_trip_and_opacity():
    """A sealed token opens to the original and does not contain it."""
    sealer = Sealer.for_keys([], "enterprise", 900)
    sealed = sealer.seal("plain-token-123")
    assert "plain-token-123" not in sealed
    assert sealer.unseal(sealed) == "plain-token-123"


def test_derived_key_is_shared_by_workers_with_the_same_enterprise_key():
    """Two workers deriving from one enterprise key can open each other's seals."""
    assert derive_seal_key("ek") == derive_seal_key("ek") != derive_seal_key("other")
    sealed = Sealer.for_keys([], "ek", 900).seal("t")
    assert Sealer.for_keys([], "ek", 900).unseal(sealed) == "t"


def test_seal_refuses_tokens_older_than_the_ttl():
    """A sealed token older than the TTL is refused, saying it is too old."""
    now = [time.time()]
    sealer = Sealer([derive_seal_key("ek")], 900, clock=lambda: now[0])
    sealed = sealer.seal("t")
    now[0] += 899
    assert sealer.unseal(sealed) == "t"
    now[0] += 2
    with pytest.raises(SealError, match="older than SFOX_TOKEN_RESULT_TTL"):
        sealer.unseal(sealed)


def test_seal_refuses_another_key_and_garbage():
    """A token sealed under another key, or garbage, is refused without echoing it."""
    sealed = Sealer([Fernet.generate_key().decode()], 900).seal("t")
    sealer = Sealer([Fernet.generate_key().decode()], 900)
    for bad in (sealed, "not-a-token", "gAAAA" + "x" * 80):
        with pytest.raises(SealError, match="not sealed under this seal key") as caught:
            sealer.unseal(bad)
        assert bad not in str(caught.value)


def test_a_seal_is_tamper_proof_and_not_from_the_future():
    """A changed byte, a changed stamp or a stamp ahead of the clock is refused."""
    now = [time.time()]
    sealer = Sealer([derive_seal_key("ek")], 900, clock=lambda: now[0])
    sealed = sealer.seal("token-text")
    assert sealed.startswith(SEALED_PREFIX) and "token-text" not in sealed
    raw = bytearray(base64.urlsafe_b64decode(sealed[len(SEALED_PREFIX) :]))
    for index in (0, 7, 8, 20, len(raw) - 1):  # the stamp, the nonce, the tag
        changed = bytearray(raw)
        changed[index] ^= 1
        bad = SEALED_PREFIX + base64.urlsafe_b64encode(bytes(changed)).decode()
        with pytest.raises(SealError, match="not sealed under this seal key"):
            sealer.unseal(bad)
    for bad in (SEALED_PREFIX, SEALED_PREFIX + "!!", SEALED_PREFIX + "AAAA"):
        with pytest.raises(SealError, match="not sealed under this seal key"):
            sealer.unseal(bad)
    now[0] -= 120  # this worker's clock two minutes behind the one that sealed
    with pytest.raises(SealError, match="not sealed under this seal key"):
        sealer.unseal(sealed)
    now[0] += 90  # within a minute: clocks disagree a little
    assert sealer.unseal(sealed) == "token-text"


def test_tokens_an_earlier_release_sealed_with_fernet_still_open_within_the_ttl():
    """A worker upgraded mid-run opens what an older one sealed, under the same rules."""
    key = derive_seal_key("ek")
    now = [time.time()]
    sealer = Sealer([key], 900, clock=lambda: now[0])
    legacy = Fernet(key).encrypt_at_time(b"old-token", int(now[0])).decode()
    assert sealer.unseal(legacy) == "old-token"
    with pytest.raises(SealError, match="not sealed under this seal key"):
        Sealer([Fernet.generate_key().decode()], 900).unseal(legacy)
    now[0] += 901
    with pytest.raises(SealError, match="older than SFOX_TOKEN_RESULT_TTL"):
        sealer.unseal(legacy)


def test_key_rotation_opens_old_and_seals_new():
    """With new,old keys, tokens sealed under old still open; new seals use new."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    old_sealed = Sealer([old], 900).seal("t")
    rotated = Sealer([new, old], 900)
    assert rotated.unseal(old_sealed) == "t"
    assert Sealer([new], 900).unseal(rotated.seal("u")) == "u"


def test_bad_seal_key_is_a_configuration_error():
    """A seal key that is not a Fernet key says how to make one."""
    with pytest.raises(ConfigurationError, match=r"Fernet\.generate_key"):
        Sealer(["short"], 900)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2022-02-08T03:28:56Z", "2022-02-08T03:28:56Z"),
        ("2024-05-14T19:22:09.901Z", "2024-05-14T19:22:09Z"),
        ("2024-05-14T19:22:09.9Z", "2024-05-14T19:22:09Z"),
        ("2024-05-14T19:22:09.123456789Z", "2024-05-14T19:22:09Z"),
        ("2024-05-14T21:22:09+02:00", "2024-05-14T19:22:09Z"),
        ("2024-05-14T19:22:09", "2024-05-14T19:22:09Z"),
    ],
)
def test_expires_is_normalised(text, expected):
    """expires with or without fractions or offsets becomes UTC with Z."""
    assert normalise_expires(text) == expected


def test_malformed_expires_is_refused_every_time():
    """A malformed expires raises on each call: the parse cache keeps only successes."""
    for _ in range(2):
        with pytest.raises(MalformedResponse, match="not an ISO-8601 time"):
            normalise_expires("tomorrow")


def test_retry_after_forms():
    """Retry-After as seconds or an HTTP date; junk is ignored."""
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    assert 28 <= parse_retry_after(formatdate(now + 30, usegmt=True), now=now) <= 30
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ENTERPRISE_API_KEY": "docs-name"}, "docs-name"),
        ({"ENTERPRISE_API_KEY": "docs-name", "SFOX_ENTERPRISE_API_KEY": "ours"}, "ours"),
        ({}, "None"),
    ],
)
def test_enterprise_key_falls_back_to_the_name_in_sfoxs_docs(env, expected):
    """ENTERPRISE_API_KEY is read when SFOX_ENTERPRISE_API_KEY is unset, never preferred."""
    import os
    import subprocess
    import sys

    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ENTERPRISE_API_KEY", "SFOX_ENTERPRISE_API_KEY")
    }
    code = (
        "from tasks import app; from tasks.worker.host import settings_for; "
        "print(settings_for(app).api_key)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("cron", ["0 2 * *", "61 2 * * *", "a b c d e"])
def test_bad_nightly_cron_is_refused_naming_the_variable(cron):
    """A malformed SFOX_NIGHTLY_CRON stops the configuration from loading, saying why."""
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import tasks.celeryconfig"],
        env={**os.environ, "SFOX_NIGHTLY_CRON": cron, "SFOX_NIGHTLY_ORDERS_FILE": "orders.csv"},
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "SFOX_NIGHTLY_CRON" in out.stderr


def test_nightly_cron_becomes_the_beat_entry():
    """SFOX_NIGHTLY_CRON (UTC) is the schedule of the beat entry for sfox.run_nightly_orders."""
    import os
    import subprocess
    import sys

    code = (
        "import tasks.celeryconfig as c; e = c.beat_schedule['sfox-nightly-orders']; "
        "print(e['task'], sorted(e['schedule'].hour), sorted(e['schedule'].minute), c.timezone)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SFOX_NIGHTLY_CRON": "30 3 * * *", "SFOX_NIGHTLY_ORDERS_FILE": "o.csv"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["sfox.run_nightly_orders", "[3]", "[30]", "UTC"]


def test_no_beat_entry_without_nightly_orders():
    """With no nightly orders configured, the package's beat has nothing to fire."""
    import os
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SFOX_NIGHTLY_ORDERS_FILE", "SFOX_NIGHTLY_ORDERS_SOURCE")
    }
    code = "import tasks.celeryconfig as c; print(len(c.beat_schedule))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "0", out.stderr
