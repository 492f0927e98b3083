"""SFOX_PLAIN_HTTP_HOSTS: the one, explicit way to reach a stand-in over plain http off loopback."""

from __future__ import annotations

import pytest

from tasks._exceptions import ConfigurationError
from tasks._settings import Settings, check_api_url, is_plain_http_off_host
from tasks.sfox.client import SfoxClient
from tests.workers import WorkerProcess


def test_named_host_may_be_plain_http():
    """A host named in SFOX_PLAIN_HTTP_HOSTS is accepted over http://, case-insensitively."""
    s = Settings.from_conf(
        {"sfox_api_url": "http://Fake-Sfox:8900", "sfox_plain_http_hosts": " fake-sfox , other "},
        {},
    )
    assert s.plain_http_hosts == ("fake-sfox", "other")
    assert is_plain_http_off_host(s.api_url)


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("http://api.sfox.com", ("fake-sfox",)),
        ("http://fake-sfox.evil.example", ("fake-sfox",)),
        ("http://fake-sfox:8900", ()),
        ("http://:8900", ("",)),
    ],
)
def test_other_hosts_stay_refused(url, hosts):
    """Only the exact names listed are allowed; an empty list allows nothing off loopback."""
    with pytest.raises(ConfigurationError, match="SFOX_PLAIN_HTTP_HOSTS"):
        check_api_url(url, hosts)


def test_client_applies_the_same_rule():
    """The HTTP client refuses a plain http host unless it is given the same allowance."""
    with pytest.raises(ConfigurationError):
        SfoxClient("http://fake-sfox:8900", "key")
    SfoxClient("http://fake-sfox:8900", "key", plain_http_hosts=("fake-sfox",)).close()


def test_https_and_loopback_are_not_flagged():
    """Only plain http off loopback is flagged for the worker's start-up warning."""
    assert not is_plain_http_off_host("https://api.sfox.com")
    assert not is_plain_http_off_host("http://127.0.0.1:8900")


@pytest.mark.slow
def test_worker_accepts_a_named_plain_http_host_and_says_so(tmp_path, redis_client):
    """A worker with the dev profile's URL and allowance starts, warning that it is dev-only."""
    proc = WorkerProcess.solo(
        "devurl",
        tmp_path,
        "http://fake-sfox:8900",
        {"SFOX_PLAIN_HTTP_HOSTS": "fake-sfox"},
        loglevel="INFO",
    )
    proc.start()
    proc.stop()
    assert "SFOX_API_URL http://fake-sfox:8900 is plain http://" in proc.log()
    assert "sFOX at http://fake-sfox:8900;" in proc.log()
