"""Redis URLs the package reads: Sentinel lists, their master's name, masked passwords, TLS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from celery import Celery
from celery.backends.redis import RedisBackend, SentinelBackend
from kombu import pools

from tasks._exceptions import ConfigurationError
from tasks._redis import (
    STORE_ERRORS,
    OutOfMemoryError,
    _sentinel_spec,
    masked_url,
    redis_client,
    sentinel_master_name,
    with_master_name,
)
from tasks._settings import Settings
from tasks.cli.check import safe_url
from tasks.worker.backend import ResultTTL, backend_with_ttl, ttl_backend_class
from tasks.worker.transport import SentinelTransport, Transport

SENTINELS = "sentinel://:secret@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"


def test_a_sentinel_url_names_every_sentinel_and_gives_the_master_its_credentials():
    """As for kombu and Celery: the first part's password and database are the master's."""
    hosts, name, master, sentinel = _sentinel_spec(with_master_name(SENTINELS, "main"))
    assert hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)]
    assert name == "main"
    assert master == {"password": "secret", "db": 2}
    assert sentinel == {}


def test_tls_and_the_sentinels_own_password_come_from_the_query():
    """ssl_* parameters turn TLS on for sentinels and master alike; sentinel_password is theirs."""
    url = (
        "sentinel://:pw@h1:1?master_name=m&ssl_cert_reqs=required&ssl_ca_certs=/ca.pem"
        "&sentinel_password=spw;sentinel://h2:2"
    )
    _hosts, name, master, sentinel = _sentinel_spec(url)
    assert name == "m"
    tls = {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"}
    assert master == {"password": "pw", **tls}
    assert sentinel == {"password": "spw", **tls}


def test_a_sentinel_url_without_a_master_name_is_refused():
    with pytest.raises(ValueError, match="master"):
        _sentinel_spec(SENTINELS)


def test_the_sentinel_client_is_built_without_connecting():
    """redis_client follows the master through the sentinels; nothing connects until used."""
    client = redis_client(with_master_name(SENTINELS, "main"))
    pool = client.connection_pool
    assert pool.service_name == "main"
    assert [(c.connection_pool.connection_kwargs["host"]) for c in pool.sentinel_manager.sentinels]
    assert pool.connection_kwargs["socket_timeout"] == 5.0


@pytest.mark.parametrize(
    ("url", "transport"),
    [("redis://127.0.0.1:1/0", Transport), (SENTINELS, SentinelTransport)],
)
def test_the_apps_pooled_broker_connections_are_on_the_packages_transport(url, transport):
    """Publishes go through app.pool: its connections pick the package's transport too."""
    app = Celery("pooled", set_as_current=False, amqp="tasks.worker.transport:AMQP")
    app.conf.broker_transport_options = {"master_name": "main"}
    connection = app.connection_for_write(url)
    pooled = pools.connections[connection].acquire()  # how Celery makes app.pool
    assert connection.get_transport_cls() is transport
    assert pooled.get_transport_cls() is transport
    pooled.release()


def test_masked_urls_keep_no_password_for_any_part():
    url = with_master_name(SENTINELS, "main") + "?sentinel_password=spw"
    for text in (masked_url(url), safe_url(url)):
        assert "secret" not in text and "spw" not in text
        assert "10.0.0.2:26380" in text
    assert safe_url("rediss://:pw@h:6380/0?ssl_cert_reqs=required") == "rediss://:**@h:6380/0"


def test_master_name_goes_on_the_url_once():
    url = with_master_name(SENTINELS, "main")
    assert sentinel_master_name(url) == "main"
    assert with_master_name(url, "other") == url
    assert sentinel_master_name(with_master_name(url, "other", replace=True)) == "other"
    assert with_master_name("redis://h/0", "main") == "redis://h/0"


def test_the_limiter_follows_the_brokers_sentinel_master():
    """Unset SFOX_LIMITER_URL: the broker's sentinels and master; SFOX_LIMITER_MASTER_NAME wins."""
    conf = {
        "broker_url": SENTINELS,
        "result_backend": "redis://cache/1",
        "broker_transport_options": {"master_name": "main", "sentinel_kwargs": {"password": "s"}},
    }
    url = Settings.from_conf(conf, {}).limiter_url
    assert url is not None and sentinel_master_name(url) == "main"
    assert _sentinel_spec(url)[3] == {"password": "s"}
    named = Settings.from_conf(conf, {"SFOX_LIMITER_MASTER_NAME": "books"}).limiter_url
    assert named is not None and sentinel_master_name(named) == "books"
    own = Settings.from_conf(
        {"broker_url": "amqp://", "result_backend_transport_options": {"master_name": "b"}},
        {"SFOX_LIMITER_URL": "sentinel://h:1;sentinel://h:2"},
    ).limiter_url
    assert own is not None and sentinel_master_name(own) == "b"


def test_a_sentinel_limiter_without_a_master_name_says_what_to_set():
    with pytest.raises(ConfigurationError, match="SFOX_LIMITER_MASTER_NAME") as caught:
        Settings.from_conf({"broker_url": SENTINELS}, {})
    assert "secret" not in caught.value.message


def test_a_full_redis_is_a_store_outage():
    assert issubclass(OutOfMemoryError, STORE_ERRORS)


def test_every_redis_backend_class_gets_a_ttl_twin():
    """Plain and TLS Redis share RedisBackend; Sentinel's subclass gets its own twin."""
    twin = ttl_backend_class(SentinelBackend)
    assert issubclass(twin, SentinelBackend) and issubclass(twin, ResultTTL)
    assert ttl_backend_class(SentinelBackend) is twin
    assert ttl_backend_class(twin) is twin
    assert issubclass(ttl_backend_class(RedisBackend), ResultTTL)
    app = Celery("ttl-twins", set_as_current=False)
    app.conf.result_backend_transport_options = {"master_name": "main"}
    sentinel = SentinelBackend(app=app, url=with_master_name(SENTINELS, "main"))
    assert isinstance(backend_with_ttl(sentinel, app), twin)
    tls = RedisBackend(app=app, url="rediss://:pw@h:6380/0?ssl_cert_reqs=required")
    assert isinstance(backend_with_ttl(tls, app), ResultTTL)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ('{"master_name": "main"}', "main"),
        ("", None),
    ],
)
def test_transport_options_come_from_the_environment(options, expected):
    """CELERY_BROKER_TRANSPORT_OPTIONS merges into the package app; its backend follows."""
    code = (
        "import json; from tasks import app\n"
        "print(json.dumps([app.conf.broker_transport_options.get('master_name'),\n"
        "  app.conf.result_backend_transport_options.get('master_name'),\n"
        "  app.conf.broker_transport_options['visibility_timeout']]))\n"
    )
    env = {**os.environ, "CELERY_BROKER_URL": SENTINELS, "CELERY_BROKER_TRANSPORT_OPTIONS": options}
    env.pop("CELERY_RESULT_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [expected, expected, 1800]


def test_transport_options_that_are_not_a_json_object_are_refused():
    env = {**os.environ, "CELERY_BROKER_TRANSPORT_OPTIONS": '["master_name"]'}
    out = subprocess.run(
        [sys.executable, "-c", "import tasks; tasks.app.conf.broker_transport_options"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "CELERY_BROKER_TRANSPORT_OPTIONS must be a JSON object" in out.stderr
