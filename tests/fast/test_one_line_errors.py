"""One-line errors: transport failures name sFOX's host and port, store URLs are checked
for their shape, and a mint reports its progress per batch, never a token."""

from __future__ import annotations

import socket

import pytest
import requests

from tasks._exceptions import ConfigurationError, TransportError
from tasks._settings import Settings, check_celery_urls, check_url_shape
from tasks.cli.mint import describe_failure
from tasks.sfox.client import SfoxClient, origin_of
from tests.fast.test_minting_in_memory import StubSfox, minter


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_refused_connection_names_sfox_host_and_port():
    """A refused connection says where, and why, and never the key."""
    port = _closed_port()
    client = SfoxClient(f"http://127.0.0.1:{port}", "ek-secret")
    with pytest.raises(TransportError) as raised:
        client.create_user_tokens(["u1"])
    assert (
        raised.value.message == f"cannot reach sFOX at http://127.0.0.1:{port} (connection refused)"
    )


def test_origin_spells_out_the_default_port_and_drops_userinfo():
    assert origin_of("https://api.sfox.com") == "https://api.sfox.com:443"
    assert origin_of("https://u:p@api.sfox.com:8443/v1") == "https://api.sfox.com:8443"


def test_a_gave_up_error_reads_as_one_line():
    exc = TransportError(
        "gave up user-token request for 1 user(s) after 8 failed attempts "
        "(SFOX_RETRY_ATTEMPTS=8); last failure: "
        "cannot reach sFOX at http://h:1 (connection refused)"
    )
    assert describe_failure(exc, 16.94) == (
        "cannot reach sFOX at http://h:1 (connection refused) after 8 attempts in 16.9 s"
    )


@pytest.mark.parametrize(
    "url",
    [
        "rediss//:secret@redis.example:6380/0",
        "rediss:/redis.example",
        "redis://h:port/0",
        "localhost:6379",
    ],
)
def test_a_store_url_that_is_no_url_is_refused_in_one_line(url):
    with pytest.raises(ConfigurationError) as raised:
        check_celery_urls({"broker_url": url}, {"CELERY_BROKER_URL": url}, app_name="x")
    message = raised.value.message
    assert message.startswith("CELERY_BROKER_URL=")
    assert "from CELERY_BROKER_URL in this process's environment" in message
    assert "expected SCHEME://" in message and "secret" not in message and "\n" not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://:pw@h:6380/0",
        "memory://",
        "amqp://g:g@h:5672//",
        "django-db",
        "sentinel://a:26379;sentinel://b:26379",
        "unix:///tmp/r.sock",
    ],
)
def test_good_store_urls_pass(url):
    check_url_shape("CELERY_BROKER_URL", url, "somewhere")


def test_a_malformed_limiter_url_names_the_setting_and_its_source():
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_conf({}, {"SFOX_LIMITER_URL": "rediss//:secret@h:6380/0"})
    message = raised.value.message
    assert "SFOX_LIMITER_URL='rediss//:**@h:6380/0'" in message
    assert "from SFOX_LIMITER_URL in this process's environment" in message
    assert "secret" not in message


def test_a_mint_reports_progress_after_every_batch():
    """The hook hears done/total after each answer: counts only."""
    stub = StubSfox(refuse={"u5"})
    m, _ = minter(stub, batch_size=2)
    heard: list[tuple[int, int]] = []
    m.mint([f"u{i}" for i in range(7)], on_progress=lambda done, total: heard.append((done, total)))
    assert heard[0] == (2, 7) and heard[-1] == (7, 7)
    assert [d for d, _ in heard] == sorted(d for d, _ in heard)
    assert len({d for d, _ in heard}) >= 4


def test_a_failing_progress_hook_does_not_stop_the_mint():
    def broken(done: int, total: int) -> None:
        raise RuntimeError("no")

    m, _ = minter(StubSfox(), batch_size=1)
    assert len(m.mint(["a", "b"], on_progress=broken)["tokens"]) == 2


def test_requests_connection_error_text_is_classified():
    from tasks.sfox.client import transport_reason

    assert transport_reason(requests.ConnectionError("[Errno -2] Name or service not known")) == (
        "host name not found"
    )
    assert transport_reason(requests.exceptions.SSLError("bad cert")) == "TLS handshake failed"
