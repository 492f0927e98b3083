"""Settings: one frozen object, read once at the edge and passed inward.

``celeryconfig.py`` turns the environment into plain ``sfox_*`` Celery settings;
:meth:`Settings.from_conf` validates them into this object. Nothing below this
module reads the environment.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tasks._exceptions import ConfigurationError

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_USER_IDS",
    "DEFAULT_MINT_CONCURRENCY",
    "DEFAULT_QUEUE",
    "DEFAULT_RATE_LIMIT",
    "DEFAULT_RATE_LIMIT_PENALTY",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_RESULT_TTL",
    "DEFAULT_TASK_TURN",
    "MAX_BATCH_SIZE",
    "MAX_USER_ID_LENGTH",
    "Rate",
    "RetrySettings",
    "Settings",
    "check_api_url",
    "is_plain_http_off_host",
    "redis_url_of",
]

#: sFOX production.
DEFAULT_API_URL = "https://api.sfox.com"
#: Seconds a mint result (sealed tokens) may live in the result backend.
DEFAULT_RESULT_TTL = 900
#: User IDs per request; sFOX documents no maximum, 100 keeps bodies small.
DEFAULT_BATCH_SIZE = 100
#: Upper bound on ``SFOX_TOKEN_BATCH_SIZE``.
MAX_BATCH_SIZE = 1000
#: sFOX requests one mint task keeps in flight at once (its batches overlap).
DEFAULT_MINT_CONCURRENCY = 4
#: Requests per window shared by every worker: under sFOX's 250 / 10 s, with headroom.
DEFAULT_RATE_LIMIT = "240/10s"
#: Seconds sFOX makes a client wait after a 429 on its general limit.
DEFAULT_RATE_LIMIT_PENALTY = 60.0
#: Most user IDs one mint task accepts; more go through ``with_user_tokens``.
DEFAULT_MAX_USER_IDS = 10_000
#: Longest user ID accepted.
MAX_USER_ID_LENGTH = 256
#: Seconds to open a TCP+TLS connection (a little over a multiple of 3, per TCP retransmits).
DEFAULT_CONNECT_TIMEOUT = 3.05
#: Seconds to wait for sFOX's answer once connected.
DEFAULT_READ_TIMEOUT = 30.0
#: Seconds one run of a package task may go on starting sFOX requests before it hands
#: its progress back to the broker: with the requests then in flight, a task holds its
#: message about a minute at most, however large its work (RabbitMQ's consumer_timeout).
DEFAULT_TASK_TURN = 30.0
#: The queue the package's tasks are sent to, from any app.
DEFAULT_QUEUE = "sfox"

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
#: A rate-limit scope: a short name that is safe inside a Redis key.
_SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Rate:
    """At most ``limit`` requests in any window of ``period`` seconds."""

    limit: int
    period: float

    _PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h)?\s*$")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Parse ``N/Ss`` (also ``N/s``, ``N/500ms``, ``N/1m``)."""
        match = cls._PATTERN.match(text)
        if not match:
            raise ConfigurationError(
                f"SFOX_RATE_LIMIT={text!r} is not of the form N/Ss (for example 240/10s)"
            )
        limit = int(match.group(1))
        amount = float(match.group(2) or 1)
        unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(3) or "s"]
        if limit < 1 or amount <= 0:
            raise ConfigurationError(f"SFOX_RATE_LIMIT={text!r} must allow at least 1 request")
        return cls(limit=limit, period=amount * unit)

    def __str__(self) -> str:
        return f"{self.limit}/{self.period:g}s"


@dataclass(frozen=True)
class RetrySettings:
    """Bounds on retrying one sFOX request. Every wait and count has a named default."""

    #: Attempts for one request before giving up (the first try included).
    attempts: int = 8
    #: Seconds the whole mint may take, from its first start, retries and countdowns included.
    deadline: float = 900.0
    #: First backoff ceiling; doubles each attempt (full jitter picks within it).
    wait_initial: float = 0.5
    #: Largest backoff ceiling.
    wait_max: float = 8.0
    #: Longest wait spent asleep in the worker; longer ones go back to the broker.
    inprocess_wait_max: float = 10.0
    #: Largest ``Retry-After`` honoured, so one odd header cannot park work for hours.
    retry_after_max: float = 300.0


@dataclass(frozen=True)
class Settings:
    """Everything the package needs, validated."""

    api_url: str = DEFAULT_API_URL
    api_key: str | None = field(default=None, repr=False)
    result_ttl: int = DEFAULT_RESULT_TTL
    batch_size: int = DEFAULT_BATCH_SIZE
    #: Requests one mint task sends at once; 1 sends its batches one after another.
    mint_concurrency: int = DEFAULT_MINT_CONCURRENCY
    max_user_ids: int = DEFAULT_MAX_USER_IDS
    rate: Rate = field(default_factory=lambda: Rate.parse(DEFAULT_RATE_LIMIT))
    rate_limit_penalty: float = DEFAULT_RATE_LIMIT_PENALTY
    #: Redis URL of the shared limiter; ``None`` means an in-process limiter (embedded mode).
    limiter_url: str | None = None
    seal_keys: tuple[str, ...] = field(default=(), repr=False)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    retry: RetrySettings = field(default_factory=RetrySettings)
    #: Seconds a task run starts requests before it resumes from the broker (SFOX_TASK_TURN).
    task_turn: float = DEFAULT_TASK_TURN
    #: Non-loopback hosts that may be reached over plain http (a dev stand-in on a private network).
    plain_http_hosts: tuple[str, ...] = ()
    #: The budget this worker's requests count against; ``""`` is the one everyone shares.
    rate_limit_scope: str = ""
    #: Local IP address outgoing sFOX requests are sent from; ``None`` lets the OS choose.
    source_address: str | None = None
    #: Port a worker serves its Prometheus metrics on; ``None``: none served.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        check_api_url(self.api_url, self.plain_http_hosts)
        _positive("SFOX_TOKEN_RESULT_TTL", self.result_ttl)
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigurationError(
                f"SFOX_TOKEN_BATCH_SIZE={self.batch_size} must be between 1 and {MAX_BATCH_SIZE}"
            )
        if self.mint_concurrency < 1:
            raise ConfigurationError(
                f"SFOX_MINT_CONCURRENCY={self.mint_concurrency} must be at least 1"
            )
        _positive("SFOX_MAX_USER_IDS", self.max_user_ids)
        if self.rate_limit_penalty < 0:
            raise ConfigurationError("SFOX_RATE_LIMIT_PENALTY must not be negative")
        _positive("SFOX_CONNECT_TIMEOUT", self.connect_timeout)
        _positive("SFOX_READ_TIMEOUT", self.read_timeout)
        _positive("SFOX_TASK_TURN", self.task_turn)
        if self.rate_limit_scope and not _SCOPE.match(self.rate_limit_scope):
            raise ConfigurationError(
                f"SFOX_RATE_LIMIT_SCOPE={self.rate_limit_scope!r} must be 1 to 64 letters, "
                "digits, '.', '_' or '-' (for example egress-a, or an IPv4 egress address)"
            )
        if self.source_address is not None:
            _check_source_address(self.source_address)
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise ConfigurationError(
                f"SFOX_METRICS_PORT={self.metrics_port} must be a TCP port, 1 to 65535"
            )
        retry = self.retry
        _positive("SFOX_RETRY_ATTEMPTS", retry.attempts)
        _positive("SFOX_RETRY_DEADLINE", retry.deadline)
        if retry.wait_initial < 0 or retry.wait_max < retry.wait_initial:
            raise ConfigurationError(
                "SFOX_RETRY_WAIT_INITIAL must be >= 0 and not above SFOX_RETRY_WAIT_MAX"
            )

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> Settings:
        """Build from the ``sfox_*`` Celery settings that ``celeryconfig`` fills.

        The limiter and the run books live in ``sfox_limiter_backend``
        (SFOX_LIMITER_URL) if set, else in this configuration's own broker or result
        backend, whichever is Redis: the app that runs the tasks, which may be a partner's.
        """

        def get(name: str, default: Any) -> Any:
            value = conf.get(name)
            return default if value is None or value == "" else value

        defaults = RetrySettings()
        try:
            retry = RetrySettings(
                attempts=int(get("sfox_retry_attempts", defaults.attempts)),
                deadline=float(get("sfox_retry_deadline", defaults.deadline)),
                wait_initial=float(get("sfox_retry_wait_initial", defaults.wait_initial)),
                wait_max=float(get("sfox_retry_wait_max", defaults.wait_max)),
                inprocess_wait_max=float(
                    get("sfox_retry_inprocess_wait_max", defaults.inprocess_wait_max)
                ),
                retry_after_max=float(get("sfox_retry_after_max", defaults.retry_after_max)),
            )
            seal = get("sfox_token_seal_key", "")
            metrics_port = get("sfox_metrics_port", None)
            return cls(
                api_url=str(get("sfox_api_url", DEFAULT_API_URL)).rstrip("/"),
                api_key=get("sfox_enterprise_api_key", None),
                result_ttl=int(get("sfox_token_result_ttl", DEFAULT_RESULT_TTL)),
                batch_size=int(get("sfox_token_batch_size", DEFAULT_BATCH_SIZE)),
                mint_concurrency=int(get("sfox_mint_concurrency", DEFAULT_MINT_CONCURRENCY)),
                max_user_ids=int(get("sfox_max_user_ids", DEFAULT_MAX_USER_IDS)),
                rate=Rate.parse(str(get("sfox_rate_limit", DEFAULT_RATE_LIMIT))),
                rate_limit_penalty=float(
                    get("sfox_rate_limit_penalty", DEFAULT_RATE_LIMIT_PENALTY)
                ),
                limiter_url=get("sfox_limiter_backend", None)
                or redis_url_of(conf.get("broker_url"), conf.get("result_backend")),
                seal_keys=tuple(k.strip() for k in str(seal).split(",") if k.strip()),
                connect_timeout=float(get("sfox_connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
                read_timeout=float(get("sfox_read_timeout", DEFAULT_READ_TIMEOUT)),
                retry=retry,
                task_turn=float(get("sfox_task_turn", DEFAULT_TASK_TURN)),
                plain_http_hosts=tuple(
                    h.strip().lower()
                    for h in str(get("sfox_plain_http_hosts", "")).split(",")
                    if h.strip()
                ),
                rate_limit_scope=str(get("sfox_rate_limit_scope", "")).strip(),
                source_address=(str(get("sfox_source_address", "")).strip() or None),
                metrics_port=None if metrics_port is None else int(metrics_port),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"a numeric SFOX_* setting is not a number: {exc}") from None

    def require_api_key(self) -> str:
        """The enterprise key, or a clear error saying which variable to set."""
        if not self.api_key:
            raise ConfigurationError(
                "no sFOX enterprise API key: looked for SFOX_ENTERPRISE_API_KEY and "
                "ENTERPRISE_API_KEY in the environment of this process (read by "
                "celeryconfig.py when it was first imported) and for "
                "sfox_enterprise_api_key in the configuration of the Celery app running "
                "the task; set SFOX_ENTERPRISE_API_KEY where the worker starts"
            )
        return self.api_key


def redis_url_of(*urls: Any) -> str | None:
    """The first of ``urls`` that is a Redis URL."""
    for url in urls:
        if isinstance(url, str) and url.startswith(("redis://", "rediss://", "unix://")):
            return url
    return None


def check_api_url(url: str, plain_http_hosts: Collection[str] = ()) -> None:
    """Refuse a base URL that would send the enterprise key in clear over a network.

    ``https://`` is required, except for loopback hosts where a local stand-in runs,
    and for hosts named one by one in ``SFOX_PLAIN_HTTP_HOSTS`` (the stand-in on a
    private docker network).
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and host and (_is_loopback(host) or host in plain_http_hosts):
        return
    raise ConfigurationError(
        f"SFOX_API_URL={url!r} is refused: it must be https:// "
        "(plain http:// is allowed only for loopback hosts such as 127.0.0.1, "
        "or for hosts named in SFOX_PLAIN_HTTP_HOSTS)"
    )


def is_plain_http_off_host(url: str) -> bool:
    """True for a plain http:// URL whose host is not loopback (allowed only by opt-in)."""
    parts = urlsplit(url)
    return parts.scheme == "http" and not _is_loopback((parts.hostname or "").lower())


def _check_source_address(address: str) -> None:
    """An IP address literal, not a name and not a wildcard: the one to send from."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ConfigurationError(
            f"SFOX_SOURCE_ADDRESS={address!r} is not an IP address: give one of this host's "
            "own addresses (for example 10.0.0.5), not a host name"
        ) from None
    if ip.is_unspecified or ip.is_multicast:
        raise ConfigurationError(
            f"SFOX_SOURCE_ADDRESS={address!r} cannot be sent from: give one of this host's "
            "own unicast addresses, or leave it unset to let the system choose"
        )


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigurationError(f"{name}={value} must be greater than 0")
