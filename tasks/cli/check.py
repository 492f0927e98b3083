"""``sfox-tokens check``: configuration sanity checks, one verdict per concern.

Each check reads only the piece of configuration it is about, so one bad setting
does not hide the state of the others. None prints a secret (URLs are shown with
their passwords masked, the key only as "set"), every network step has a short
timeout, and none has a side effect at sFOX: reachability is an unauthenticated
``HEAD`` of the base URL. That sends no key and mints nothing; it proves DNS,
TLS and a route to sFOX, not that the key is accepted, which only a real mint
can prove. Any HTTP answer counts as reachable except 502, 503 and 504.

Every Redis checked (the broker, the result backend, the limiter's) must answer,
keep ``maxmemory-policy noeviction`` (any other policy may evict queued tasks,
results, the limiter or the run books: a FAIL), and, for the limiter, not be a
Redis Cluster node. A ``sentinel://`` URL is checked through its sentinels: they
name the master, which must answer.
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import requests
from kombu.connection import Connection
from kombu.utils.url import maybe_sanitize_url

from .._exceptions import ConfigurationError, SfoxError
from .._redis import (
    CLUSTER_REFUSAL,
    REDIS_SCHEMES,
    RedisFacts,
    inspect_redis,
    is_sentinel,
    masked_url,
    probe_client,
    sentinel_master_name,
    with_master_name,
)
from .._settings import (
    DEFAULT_API_URL,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RATE_LIMIT,
    DEFAULT_RESULT_TTL,
    Rate,
    Settings,
    SettingSource,
    check_api_url,
    check_celery_urls,
    limiter_url_for,
)
from ..budget.ratelimit import scope_prefix
from ..sealing import Sealer
from ..sfox.client import http_adapter, transport_reason
from .common import EXIT_FAILED, EXIT_OK, UsageError, add_command

__all__ = [
    "DEFAULT_CHECK_TIMEOUT",
    "DOWN_STATUSES",
    "Check",
    "probe_broker",
    "run_checks",
    "safe_url",
]

#: Seconds any one network step of a check may take.
DEFAULT_CHECK_TIMEOUT = 5.0
#: Answers to the sFOX probe that mean the API is down (a gateway before it says so).
DOWN_STATUSES = frozenset({502, 503, 504})
#: What eviction would lose, per Redis checked.
_AT_RISK = {
    "broker": "queued tasks",
    "backend": "task results",
    "rate limit": "the shared rate limiter and the run books",
}


@dataclass(frozen=True)
class Check:
    """One verdict: ``ok`` True (ok), False (FAIL) or None (skipped)."""

    name: str
    ok: bool | None
    detail: str

    @property
    def status(self) -> str:
        return {True: "ok", False: "FAIL", None: "skip"}[self.ok]

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<10}  {self.detail}"


def safe_url(url: str) -> str:
    """``url`` with any password masked (each part of a ``;`` list: Sentinel, failover)."""
    try:
        return ";".join(str(maybe_sanitize_url(part)) for part in url.split(";"))
    except ValueError:  # a URL kombu cannot read (a port that is not a number)
        return masked_url(url)


def _redis_name(url: str, master_name: str | None) -> str:
    named = f" (master {master_name!r})" if is_sentinel(url) and master_name else ""
    return safe_url(url) + named


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _url(conf: Mapping[str, Any], name: str) -> str | None:
    # Celery's own settings object resolves CELERY_BROKER_URL / CELERY_RESULT_BACKEND here.
    value = getattr(conf, name, None)
    return str(value) if isinstance(value, str) and value else conf.get(name) or None


def _setting(source: SettingSource, name: str, default: Any) -> Any:
    """The setting ``name`` (``sfox_x``), looked up as every part of the package does."""
    return source.get(name.upper(), default)


def probe_broker(
    url: str, timeout: float = DEFAULT_CHECK_TIMEOUT, *, master_name: str | None = None
) -> str | None:
    """None when the broker at ``url`` answers, else why not (one line, no password).

    A ``sentinel://`` broker answers when a sentinel names ``master_name``'s master
    and the master answers.
    """
    try:
        if url.startswith(REDIS_SCHEMES):
            inspect_redis(url, master_name=master_name, timeout=timeout)
        else:
            with Connection(url, connect_timeout=timeout) as conn:  # type: ignore[no-untyped-call]
                conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # any failure to connect is the answer here
        return f"{safe_url(url)} does not answer: {one_line(exc)}"
    return None


def _malformed(
    conf: Mapping[str, Any], app_name: str | None, name: str, setting: str
) -> Check | None:
    """A FAIL for a broker or backend URL that is no URL at all (``rediss//host``), else None."""
    try:
        check_celery_urls(conf, app_name=app_name, names=(setting,))
    except ConfigurationError as exc:
        return Check(name, False, exc.message)
    return None


def _check_settings(conf: Mapping[str, Any], app_name: str | None) -> Check:
    try:
        s = Settings.from_conf(conf, app_name=app_name)
    except ConfigurationError as exc:
        return Check("settings", False, exc.message)
    return Check(
        "settings",
        True,
        f"valid: batches of {s.batch_size}, up to {s.max_user_ids} user IDs a task, "
        f"results live {s.result_ttl} s, {s.retry.attempts} attempts within "
        f"{s.retry.deadline:g} s",
    )


def _master_name(conf: Mapping[str, Any], options: str) -> str | None:
    found = conf.get(options) or {}
    name = found.get("master_name") if isinstance(found, Mapping) else None
    return str(name) if name else None


def _inspect(
    name: str, url: str, master_name: str | None, timeout: float
) -> tuple[RedisFacts | None, Check | None]:
    """The facts of the Redis at ``url``, or the FAIL that says why there are none."""
    where = _redis_name(url, master_name)
    if is_sentinel(url) and not master_name:
        options = "CELERY_RESULT_BACKEND" if name == "backend" else "CELERY_BROKER"
        return None, Check(
            name,
            False,
            f"{where} is a Sentinel URL with no master name: set master_name in "
            f'{options}_TRANSPORT_OPTIONS (for example {{"master_name": "mymaster"}})',
        )
    try:
        return inspect_redis(url, master_name=master_name, timeout=timeout), None
    except (redis.RedisError, ValueError, OSError) as exc:
        return None, Check(name, False, f"{where} does not answer: {one_line(exc)}")


def _policy_check(name: str, where: str, facts: RedisFacts, detail: str = "") -> Check:
    """FAIL unless the Redis keeps every key (``noeviction``); unknown passes, saying so."""
    if facts.policy is None:
        return Check(
            name,
            True,
            f"{where} answers{detail}; its maxmemory-policy is unknown (CONFIG and INFO "
            "refused): make sure it is noeviction",
        )
    if facts.evicts:
        return Check(
            name,
            False,
            f"{where} answers, but its maxmemory-policy is {facts.policy}: when memory fills "
            f"Redis may evict {_AT_RISK[name]}; set maxmemory-policy noeviction",
        )
    return Check(name, True, f"{where} answers (maxmemory-policy noeviction){detail}")


def _check_redis(
    name: str,
    url: str | None,
    timeout: float,
    *,
    broker: bool,
    master_name: str | None = None,
) -> Check:
    if not url:
        return Check(name, False, "not configured")
    if not url.startswith(REDIS_SCHEMES):
        if not broker:
            return Check(name, None, f"{safe_url(url)}: only Redis result backends are checked")
        problem = probe_broker(url, timeout)
        return Check(name, problem is None, problem or f"{safe_url(url)} answers")
    facts, failed = _inspect(name, url, master_name, timeout)
    if facts is None:
        assert failed is not None
        return failed
    return _policy_check(name, _redis_name(url, master_name), facts)


def _check_key(conf: SettingSource) -> Check:
    name = "SFOX_ENTERPRISE_API_KEY"
    if not conf.get(name, None, also="ENTERPRISE_API_KEY"):
        return Check(
            "api key",
            False,
            f"not set: looked for {conf.places(name, also='ENTERPRISE_API_KEY')}; "
            "minting fails without",
        )
    return Check("api key", True, f"set, from {conf.origins[name]} (not shown)")


def _check_sfox(conf: SettingSource, timeout: float) -> Check:
    url = str(_setting(conf, "sfox_api_url", DEFAULT_API_URL)).rstrip("/")
    hosts = [h.strip().lower() for h in str(_setting(conf, "sfox_plain_http_hosts", "")).split(",")]
    try:
        check_api_url(url, [h for h in hosts if h])
        connect = min(
            float(_setting(conf, "sfox_connect_timeout", DEFAULT_CONNECT_TIMEOUT)), timeout
        )
    except ConfigurationError as exc:
        return Check("sFOX", False, exc.message)
    except (TypeError, ValueError):
        connect = min(DEFAULT_CONNECT_TIMEOUT, timeout)
    source = str(_setting(conf, "sfox_source_address", "")).strip() or None
    session = requests.Session()
    # The same network path as the client: no proxy or .netrc from the environment, and
    # the source address its requests leave from.
    session.trust_env = False
    adapter = http_adapter(1, source)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    sent_from = f" from {source}" if source else ""
    try:
        response = session.head(url + "/", timeout=(connect, timeout), allow_redirects=False)
    except requests.RequestException as exc:
        hint = (
            f" (is {source}, SFOX_SOURCE_ADDRESS, an address of this host?)"
            if source and isinstance(exc, requests.ConnectionError)
            else ""
        )
        why = (
            transport_reason(exc)
            if isinstance(exc, requests.ConnectionError)
            and not isinstance(exc, requests.ConnectTimeout)
            else type(exc).__name__
        )
        return Check("sFOX", False, f"{url} does not answer{sent_from}: {why}{hint}")
    finally:
        session.close()
    status = response.status_code
    how = f"HTTP {status} to an unauthenticated HEAD /; no key sent, nothing minted"
    # sFOX documents nothing about HEAD /: any answer proves DNS, TLS and a route, whatever
    # its status (a 404, or a 501 from a server without HEAD), except the gateway statuses
    # that say the API behind it is down.
    if status in DOWN_STATUSES:
        return Check("sFOX", False, f"{url}{sent_from} is down or in maintenance ({how})")
    return Check("sFOX", True, f"{url} answers{sent_from} ({how})")


def _check_seal(conf: SettingSource) -> Check:
    keys = [k.strip() for k in str(_setting(conf, "sfox_token_seal_key", "")).split(",")]
    keys = [k for k in keys if k]
    try:
        ttl = int(_setting(conf, "sfox_token_result_ttl", DEFAULT_RESULT_TTL))
        key = conf.get("SFOX_ENTERPRISE_API_KEY", None, also="ENTERPRISE_API_KEY")
        sealer = Sealer.for_keys(keys, key, ttl)
        probe = secrets.token_urlsafe(16)
        if sealer.unseal(sealer.seal(probe)) != probe:
            return Check("seal key", False, "a token sealed and opened came back different")
    except (SfoxError, TypeError, ValueError) as exc:
        message = exc.message if isinstance(exc, SfoxError) else one_line(exc)
        return Check("seal key", False, message)
    if keys:
        source = f"SFOX_TOKEN_SEAL_KEY ({len(keys)} key{'s' if len(keys) > 1 else ''})"
    else:
        source = "derived from the enterprise key"
    return Check("seal key", True, f"{source}: seals and opens; tokens open for {ttl} s")


def _check_rate(conf: SettingSource, timeout: float) -> Check:
    text = str(_setting(conf, "sfox_rate_limit", DEFAULT_RATE_LIMIT))
    try:
        rate = Rate.parse(text)
    except ConfigurationError as exc:
        return Check("rate limit", False, exc.message)
    what = f"{rate.limit} requests per {rate.period:g} s"
    url = limiter_url_for(conf, conf.conf)
    if not url or url == "memory://":
        return Check(
            "rate limit",
            False,
            f"{what}, but no Redis to share it: set SFOX_LIMITER_URL (redis://, rediss:// or "
            "sentinel://), or use a Redis broker or result backend; workers refuse to start "
            "without one",
        )
    url = str(url)
    master_name = sentinel_master_name(url)
    where = _redis_name(url, master_name)
    if is_sentinel(url) and not master_name:
        return Check(
            "rate limit",
            False,
            f"{what}; its Redis {where} is a Sentinel URL with no master name: set "
            "SFOX_LIMITER_MASTER_NAME, or master_name in CELERY_BROKER_TRANSPORT_OPTIONS",
        )
    scope = str(_setting(conf, "sfox_rate_limit_scope", "")).strip()
    who = f"the workers of scope {scope!r}" if scope else "all workers"
    try:
        facts = inspect_redis(url, timeout=timeout)
        if facts.cluster:
            return Check("rate limit", False, CLUSTER_REFUSAL.format(where=where))
        client = probe_client(with_master_name(url, master_name), timeout)
        try:
            pause_ms = int(client.pttl(f"{scope_prefix(scope)}:pause"))
        finally:
            client.close()
    except (redis.RedisError, ValueError, OSError) as exc:
        return Check(
            "rate limit", False, f"{what}; its Redis {where} does not answer: {one_line(exc)}"
        )
    paused = f"; a 429 pause holds {who} for {pause_ms / 1000:.0f} s more" if pause_ms > 0 else ""
    return _policy_check(
        "rate limit", where, facts, f": {what}, shared by {who} through it{paused}"
    )


def run_checks(
    conf: Mapping[str, Any],
    *,
    timeout: float = DEFAULT_CHECK_TIMEOUT,
    app_name: str | None = None,
) -> Iterator[Check]:
    """Every check, in order, each as soon as it is done.

    Each reads its own settings the way every part of the package does (the
    app's configuration, then the environment), so one bad setting does not hide
    the state of the others.
    """
    source = SettingSource(conf, os.environ, app_name)
    yield _check_settings(conf, app_name)
    for name, setting, options in (
        ("broker", "broker_url", "broker_transport_options"),
        ("backend", "result_backend", "result_backend_transport_options"),
    ):
        yield _malformed(conf, app_name, name, setting) or _check_redis(
            name,
            _url(conf, setting),
            timeout,
            broker=name == "broker",
            master_name=_master_name(conf, options),
        )
    yield _check_key(source)
    yield _check_sfox(source, timeout)
    yield _check_seal(source)
    yield _check_rate(source, timeout)


def cmd_check(args: argparse.Namespace) -> int:
    """Check the configuration, one line per check; exit 1 if any fails."""
    from .. import app

    if args.timeout <= 0:
        raise UsageError("--timeout must be greater than 0")
    failed = total = 0
    for check in run_checks(app.conf, timeout=args.timeout, app_name=app.main):
        print(check.line(), flush=True)
        total += 1
        failed += check.ok is False
    print(
        f"\n{total - failed} of {total} checks passed" if failed else f"\nall {total} checks passed"
    )
    return EXIT_FAILED if failed else EXIT_OK


COMMAND_DOC = """
``sfox-tokens check``: check the configuration: broker, backend, key, sFOX, seal key, rate limit

Checks the configuration this host would run with, one line each: the settings parse,
the broker and result backend answer, the enterprise key is set (never printed), sFOX
answers an unauthenticated HEAD of its base URL (no key sent, nothing minted; any status
but 502, 503 or 504 means reachable), the seal key seals and opens, the rate limit
parses and its Redis answers. Every Redis must keep maxmemory-policy noeviction, and the
limiter's must not be a Redis Cluster node; a sentinel:// URL is checked through its
sentinels and master.

exit codes: 0 all checks passed, 1 a check failed, 2 bad usage
"""


def register(sub: Any) -> None:
    check = add_command(sub, "check", cmd_check, COMMAND_DOC)
    check.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CHECK_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for any one answer (default {DEFAULT_CHECK_TIMEOUT:g})",
    )
