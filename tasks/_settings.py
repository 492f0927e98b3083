"""Settings: one frozen object, resolved once per Celery app at the edge and passed inward.

:meth:`Settings.from_conf` looks every setting up the same way, for every part of
the package: the running app's configuration (``sfox_*``; a Django project's
``CELERY_SFOX_*``), then the environment (``SFOX_*``), then the default.
Nothing below this module reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ._exceptions import ConfigurationError
from ._redis import (
    REDIS_SCHEMES,
    is_sentinel,
    sentinel_master_name,
    with_master_name,
    with_sentinel_auth,
)

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_USER_IDS",
    "DEFAULT_MINT_CONCURRENCY",
    "DEFAULT_NIGHTLY_CRON",
    "DEFAULT_NIGHTLY_LEASE",
    "DEFAULT_NIGHTLY_RESEND_AFTER",
    "DEFAULT_QUEUE",
    "DEFAULT_RATE_LIMIT",
    "DEFAULT_RATE_LIMIT_PENALTY",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_RESULT_TTL",
    "DEFAULT_TASK_TURN",
    "MAX_BATCH_SIZE",
    "MAX_USER_ID_LENGTH",
    "NightlySettings",
    "Rate",
    "RetrySettings",
    "SettingSource",
    "Settings",
    "check_api_url",
    "check_celery_urls",
    "check_url_shape",
    "is_plain_http_off_host",
    "limiter_url_for",
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
#: What the batch queue's name adds to ``SFOX_QUEUE`` when ``SFOX_BATCH_QUEUE`` is unset.
BATCH_QUEUE_SUFFIX = ".batch"
#: Share of every rate-limit window that batch work keeps while on-demand mints wait.
DEFAULT_BATCH_SHARE = 0.5
#: The highest ``SFOX_BATCH_SHARE``: on-demand mints always keep a tenth of the window first.
MAX_BATCH_SHARE = 0.9
#: When beat fires the nightly run: 02:00 UTC.
DEFAULT_NIGHTLY_CRON = "0 2 * * *"
#: Seconds a nightly coordinator's lease lasts without renewal; a crashed run resumes after it.
DEFAULT_NIGHTLY_LEASE = 30.0
#: Seconds without a user finishing, once every chunk is minted, after which the order tasks
#: of the users not done are sent again: longer than an order task holds its message plus a
#: countdown.
DEFAULT_NIGHTLY_RESEND_AFTER = 600.0

#: What ``SFOX_LIMITER_URL`` may be: Redis (one server, or a master behind Sentinel), or
#: this process alone (tests, eager mode).
_LIMITER_SCHEMES = (*REDIS_SCHEMES, "memory://")
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
class NightlySettings:
    """Where the nightly orders come from, when the run fires, and how it is paced."""

    #: CSV or JSONL file of orders (SFOX_NIGHTLY_ORDERS_FILE).
    orders_file: str | None = None
    #: ``module:function`` returning the orders (SFOX_NIGHTLY_ORDERS_SOURCE).
    orders_source: str | None = None
    #: When beat fires the run, cron text in UTC (SFOX_NIGHTLY_CRON).
    cron: str = DEFAULT_NIGHTLY_CRON
    #: Seconds a coordinator's lease lasts without renewal (SFOX_NIGHTLY_LEASE).
    lease: float = DEFAULT_NIGHTLY_LEASE
    #: Seconds the run may stand still before the order tasks of users not done are sent
    #: again (SFOX_NIGHTLY_RESEND_AFTER).
    resend_after: float = DEFAULT_NIGHTLY_RESEND_AFTER

    @property
    def configured(self) -> bool:
        """Whether any orders are configured at all."""
        return bool(self.orders_file or self.orders_source)


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
    #: A ``sentinel://`` URL carries its master's name as ``?master_name=`` (resolved from
    #: SFOX_LIMITER_MASTER_NAME or the app's transport options: :func:`limiter_url_for`).
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
    #: The queue every package task is sent to, from any app (SFOX_QUEUE).
    queue: str = DEFAULT_QUEUE
    #: The queue batch work is sent to (SFOX_BATCH_QUEUE): ``with_user_tokens``'s chunks and
    #: the nightly run's tasks; ``""`` means ``SFOX_QUEUE`` + ``.batch`` (:attr:`batch_queue_name`).
    batch_queue: str = ""
    #: Share of each rate-limit window batch work keeps while on-demand mints wait
    #: (SFOX_BATCH_SHARE).
    batch_share: float = DEFAULT_BATCH_SHARE
    #: The nightly run's orders and pacing.
    nightly: NightlySettings = field(default_factory=lambda: NightlySettings())
    #: Every place the enterprise key was looked for, for the error that says it is missing.
    key_places: str = field(
        default="SFOX_ENTERPRISE_API_KEY, then ENTERPRISE_API_KEY in the environment",
        repr=False,
        compare=False,
    )

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
        if self.limiter_url and not self.limiter_url.startswith(_LIMITER_SCHEMES):
            raise ConfigurationError(
                f"SFOX_LIMITER_URL={mask_any_url(self.limiter_url)!r} must be a redis://, "
                "rediss://, unix:// or sentinel:// URL (or memory:// for one process alone, "
                f"in tests): expected {URL_FORM}"
            )
        if self.limiter_url and not is_sentinel(self.limiter_url):
            problem = _url_shape_problem(self.limiter_url)
            if problem:
                raise ConfigurationError(
                    f"SFOX_LIMITER_URL={mask_any_url(self.limiter_url)!r} {problem}: "
                    f"expected {URL_FORM}"
                )
        if self.limiter_url and is_sentinel(self.limiter_url):
            _check_sentinel_url(self.limiter_url)
        if not self.queue:
            raise ConfigurationError("SFOX_QUEUE must name a queue")
        if not 0 <= self.batch_share <= MAX_BATCH_SHARE:
            raise ConfigurationError(
                f"SFOX_BATCH_SHARE={self.batch_share!r} must be between 0 and {MAX_BATCH_SHARE}"
            )
        _positive("SFOX_NIGHTLY_LEASE", self.nightly.lease)
        _positive("SFOX_NIGHTLY_RESEND_AFTER", self.nightly.resend_after)
        retry = self.retry
        _positive("SFOX_RETRY_ATTEMPTS", retry.attempts)
        _positive("SFOX_RETRY_DEADLINE", retry.deadline)
        if retry.wait_initial < 0 or retry.wait_max < retry.wait_initial:
            raise ConfigurationError(
                "SFOX_RETRY_WAIT_INITIAL must be >= 0 and not above SFOX_RETRY_WAIT_MAX"
            )

    @classmethod
    def from_conf(
        cls,
        conf: Mapping[str, Any] | None,
        environ: Mapping[str, str] | None = None,
        *,
        app_name: str | None = None,
    ) -> Settings:
        """Resolve every setting: ``conf``'s ``sfox_*`` key, else ``SFOX_*`` in ``environ``.

        ``conf`` is the configuration of the Celery app that runs the package (a
        partner's, whose Django ``CELERY_SFOX_*`` settings Celery's namespace turns
        into ``sfox_*``); ``environ`` is this process's environment by default. The
        limiter and the run books live at ``SFOX_LIMITER_URL`` if set, else in that
        app's own broker or result backend, whichever is Redis. An error names the
        setting and every place it was looked for, or where its value came from.
        """
        source = SettingSource(conf, os.environ if environ is None else environ, app_name)
        try:
            return cls._resolve(source, conf)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc.message} ({source.explain(exc.message)})") from None

    @classmethod
    def _resolve(cls, source: SettingSource, conf: Mapping[str, Any] | None) -> Settings:
        get = source.get
        defaults = RetrySettings()
        try:
            retry = RetrySettings(
                attempts=int(get("SFOX_RETRY_ATTEMPTS", defaults.attempts)),
                deadline=float(get("SFOX_RETRY_DEADLINE", defaults.deadline)),
                wait_initial=float(get("SFOX_RETRY_WAIT_INITIAL", defaults.wait_initial)),
                wait_max=float(get("SFOX_RETRY_WAIT_MAX", defaults.wait_max)),
                inprocess_wait_max=float(
                    get("SFOX_RETRY_INPROCESS_WAIT_MAX", defaults.inprocess_wait_max)
                ),
                retry_after_max=float(get("SFOX_RETRY_AFTER_MAX", defaults.retry_after_max)),
            )
            seal = get("SFOX_TOKEN_SEAL_KEY", "")
            metrics_port = get("SFOX_METRICS_PORT", None)
            return cls(
                api_url=str(get("SFOX_API_URL", DEFAULT_API_URL)).rstrip("/"),
                api_key=get("SFOX_ENTERPRISE_API_KEY", None, also="ENTERPRISE_API_KEY"),
                result_ttl=int(get("SFOX_TOKEN_RESULT_TTL", DEFAULT_RESULT_TTL)),
                batch_size=int(get("SFOX_TOKEN_BATCH_SIZE", DEFAULT_BATCH_SIZE)),
                mint_concurrency=int(get("SFOX_MINT_CONCURRENCY", DEFAULT_MINT_CONCURRENCY)),
                max_user_ids=int(get("SFOX_MAX_USER_IDS", DEFAULT_MAX_USER_IDS)),
                rate=Rate.parse(str(get("SFOX_RATE_LIMIT", DEFAULT_RATE_LIMIT))),
                rate_limit_penalty=float(
                    get("SFOX_RATE_LIMIT_PENALTY", DEFAULT_RATE_LIMIT_PENALTY)
                ),
                limiter_url=limiter_url_for(source, conf),
                seal_keys=tuple(k.strip() for k in str(seal).split(",") if k.strip()),
                connect_timeout=float(get("SFOX_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)),
                read_timeout=float(get("SFOX_READ_TIMEOUT", DEFAULT_READ_TIMEOUT)),
                retry=retry,
                task_turn=float(get("SFOX_TASK_TURN", DEFAULT_TASK_TURN)),
                plain_http_hosts=tuple(
                    h.strip().lower()
                    for h in str(get("SFOX_PLAIN_HTTP_HOSTS", "")).split(",")
                    if h.strip()
                ),
                rate_limit_scope=str(get("SFOX_RATE_LIMIT_SCOPE", "")).strip(),
                source_address=(str(get("SFOX_SOURCE_ADDRESS", "")).strip() or None),
                metrics_port=None if metrics_port is None else int(metrics_port),
                queue=str(get("SFOX_QUEUE", DEFAULT_QUEUE)).strip(),
                batch_queue=str(get("SFOX_BATCH_QUEUE", "")).strip(),
                batch_share=float(get("SFOX_BATCH_SHARE", DEFAULT_BATCH_SHARE)),
                nightly=NightlySettings(
                    orders_file=get("SFOX_NIGHTLY_ORDERS_FILE", None),
                    orders_source=get("SFOX_NIGHTLY_ORDERS_SOURCE", None),
                    cron=str(get("SFOX_NIGHTLY_CRON", DEFAULT_NIGHTLY_CRON)),
                    lease=float(get("SFOX_NIGHTLY_LEASE", DEFAULT_NIGHTLY_LEASE)),
                    resend_after=float(
                        get("SFOX_NIGHTLY_RESEND_AFTER", DEFAULT_NIGHTLY_RESEND_AFTER)
                    ),
                ),
                key_places=source.places("SFOX_ENTERPRISE_API_KEY", also="ENTERPRISE_API_KEY"),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"a numeric SFOX_* setting is not a number: {exc}") from None

    @property
    def batch_queue_name(self) -> str:
        """Where batch work goes: ``SFOX_BATCH_QUEUE``, else ``SFOX_QUEUE`` + ``.batch``."""
        return self.batch_queue or f"{self.queue}{BATCH_QUEUE_SUFFIX}"

    def require_api_key(self) -> str:
        """The enterprise key, or a clear error naming every place it was looked for."""
        if not self.api_key:
            raise ConfigurationError(
                f"no sFOX enterprise API key: looked for {self.key_places}; "
                "set SFOX_ENTERPRISE_API_KEY where the worker starts"
            )
        return self.api_key

    def require_limiter_url(self, *, shared: bool = False) -> str:
        """Where the limiter and the run books live, or a clear error saying what to set.

        ``shared``: a Redis every worker shares is required (a worker, the run books);
        ``memory://`` (one process's own budget) is refused then.
        """
        if self.limiter_url == "memory://" and shared:
            raise ConfigurationError(
                "SFOX_LIMITER_URL=memory:// is one process's own budget, for tests and eager "
                "mode only: a worker and the run books need Redis (redis://, rediss:// or "
                "sentinel://)"
            )
        if not self.limiter_url:
            raise ConfigurationError(
                "no Redis for the shared rate limiter and the run books: set SFOX_LIMITER_URL "
                "(redis://, rediss:// or sentinel://), or give the Celery app a Redis broker or "
                "result backend; without one, every process would keep its own budget and exceed "
                "sFOX's rate limit together"
            )
        return self.limiter_url


class SettingSource:
    """Where the package's settings are looked up, in order, and where each value came from.

    First the running Celery app's configuration (``sfox_api_url``; Celery's
    namespace maps a Django project's ``CELERY_SFOX_API_URL`` onto it), then the
    environment (``SFOX_API_URL``), then the default.
    """

    def __init__(
        self, conf: Mapping[str, Any] | None, environ: Mapping[str, str], app_name: str | None
    ) -> None:
        self.conf = conf
        self.environ = environ
        self.app = f"the Celery app {app_name!r}" if app_name else "the Celery app"
        self.origins: dict[str, str] = {}

    def get(self, env: str, default: Any, *, also: str | None = None, key: str = "") -> Any:
        """The value of the setting named ``env`` (its ``sfox_*`` key in the app's conf)."""
        for conf_key in (env.lower(), key):
            if conf_key and self.conf is not None:
                value = self.conf.get(conf_key)
                if value is not None and value != "":
                    self.origins[env] = f"{conf_key} in the configuration of {self.app}"
                    return value
        for name in (env, also):
            value = self.environ.get(name, "").strip() if name else ""
            if value:
                self.origins[env] = f"{name} in this process's environment"
                return value
        return default

    def places(self, env: str, *, also: str | None = None) -> str:
        """Every place a setting is looked for, in order, as one phrase."""
        django = f"CELERY_{env}"
        looked = [f"{env.lower()} in the configuration of {self.app} ({django} in Django settings)"]
        looked += [f"{n} in this process's environment" for n in (env, also) if n]
        return ", then ".join(looked)

    def explain(self, message: str) -> str:
        """Where the settings named in ``message`` came from (or where they were looked for)."""
        named = sorted({m for m in re.findall(r"\bSFOX_[A-Z_]+", message)})
        parts = [
            f"{name} from {self.origins[name]}" if name in self.origins else self.places(name)
            for name in named
        ]
        fallback = f"looked in the configuration of {self.app}, then the environment"
        return "; ".join(parts) if parts else fallback


def _conf_url(conf: Mapping[str, Any] | None, name: str) -> Any:
    """``broker_url`` or ``result_backend`` as Celery itself resolves it (env first)."""
    if conf is None:
        return None
    value = getattr(conf, name, None) if hasattr(type(conf), name) else None
    return value if value is not None else conf.get(name)


def redis_url_of(*urls: Any) -> str | None:
    """The first of ``urls`` that is a Redis URL (``sentinel://`` included)."""
    for url in urls:
        if isinstance(url, str) and url.startswith(REDIS_SCHEMES):
            return url
    return None


def limiter_url_for(source: SettingSource, conf: Mapping[str, Any] | None) -> str | None:
    """Where the limiter and the run books live; a Sentinel URL carries its master's name.

    ``SFOX_LIMITER_URL``, else the app's broker or result backend, whichever is
    Redis. For ``sentinel://``, the master is ``SFOX_LIMITER_MASTER_NAME``, else
    the ``master_name`` of the URL's query, else the ``master_name`` of the
    transport options of the broker or result backend the URL is (of the
    broker's, then the backend's, for a URL of its own).
    """
    url = source.get("SFOX_LIMITER_URL", None, key="sfox_limiter_backend")
    broker, backend = _conf_url(conf, "broker_url"), _conf_url(conf, "result_backend")
    url = url or redis_url_of(broker, backend)
    if not isinstance(url, str) or not is_sentinel(url):
        return url
    names = ["broker_transport_options", "result_backend_transport_options"]
    if url == backend and url != broker:
        names.reverse()
    found = [_options(conf, name) for name in names]
    # The sentinels' own credentials, as kombu and Celery take them (``sentinel_kwargs``).
    auth: Any = next((o["sentinel_kwargs"] for o in found if o.get("sentinel_kwargs")), {})
    url = with_sentinel_auth(url, auth if isinstance(auth, Mapping) else {})
    named = source.get("SFOX_LIMITER_MASTER_NAME", None)
    if named:
        return with_master_name(url, str(named), replace=True)
    return with_master_name(
        url, next((str(o["master_name"]) for o in found if o.get("master_name")), None)
    )


def _options(conf: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    options = conf.get(name) if conf is not None else None
    return options if isinstance(options, Mapping) else {}


def _check_sentinel_url(url: str) -> None:
    """A ``sentinel://`` limiter URL lists sentinels only, and names its master."""
    for part in url.split(";"):
        if not is_sentinel(part.strip()):
            raise ConfigurationError(
                "SFOX_LIMITER_URL: every part of a Sentinel URL must be sentinel://HOST:PORT, "
                "separated by ';'"
            )
        try:
            urlsplit(part).port  # noqa: B018 - a port that is not a number raises here
        except ValueError:
            raise ConfigurationError(
                "SFOX_LIMITER_URL: a sentinel's port is not a number (write "
                "sentinel://h1:26379;sentinel://h2:26379)"
            ) from None
    if not sentinel_master_name(url):
        raise ConfigurationError(
            "SFOX_LIMITER_URL is a sentinel:// URL with no master name: set "
            "SFOX_LIMITER_MASTER_NAME, or master_name in CELERY_BROKER_TRANSPORT_OPTIONS "
            '(for example {"master_name": "mymaster"}) when the limiter is on the broker'
        )


#: The form a store URL is expected in, for the errors that refuse one.
URL_FORM = (
    "SCHEME://[:PASSWORD@]HOST[:PORT][/DB], for example rediss://:PASSWORD@redis.example.com:6380/0"
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: Schemes whose URL must name a host (``unix://`` names a socket path, ``memory://`` nothing).
_HOST_SCHEMES = ("redis://", "rediss://")
#: ``user:password@`` anywhere in a text, URL or not.
_USERINFO = re.compile(r"([^/:@;]*):([^@;/]*)@")


def mask_any_url(url: str) -> str:
    """``url`` with any password masked, even when it is not a well-formed URL."""
    return _USERINFO.sub(lambda m: f"{m.group(1)}:**@", url)


def _url_shape_problem(url: str) -> str | None:
    """Why ``url`` is not a URL at all (no ``scheme://``, no host, a bad port), or None.

    A bare transport or backend name (``memory``, ``django-db``) is no URL and passes:
    Celery reads those as aliases.
    """
    for part in url.split(";"):
        part = part.strip()
        if not _SCHEME.match(part):
            if re.search(r"[/@:]", part):
                return "is not a URL: it has no '://' after its scheme"
            continue
        try:
            parts = urlsplit(part)
            parts.port  # noqa: B018 - a port that is not a number raises here
        except ValueError:
            return "is not a URL: its port is not a number"
        if part.startswith(_HOST_SCHEMES) and parts.netloc and not parts.hostname:
            return "names no host"
    return None


def check_url_shape(setting: str, url: str, origin: str) -> None:
    """Refuse a URL with no ``scheme://`` (``rediss//h``), no host or a bad port, in one line.

    The message names ``setting``, where it came from (``origin``) and the expected form,
    with any password masked; it says nothing about whether the server answers.
    """
    problem = _url_shape_problem(url)
    if problem:
        raise ConfigurationError(
            f"{setting}={mask_any_url(url)!r} (from {origin}) {problem}: expected {URL_FORM}"
        )


def check_celery_urls(
    conf: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None = None,
    *,
    app_name: str | None = None,
    names: Collection[str] = ("broker_url", "result_backend"),
) -> None:
    """Check the shape of the app's broker and result backend URLs; Celery's use is unchanged.

    Celery reads ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` from the environment
    before the app's ``broker_url`` and ``result_backend``: the error says which it was.
    """
    env = os.environ if environ is None else environ
    app = f"the Celery app {app_name!r}" if app_name else "the Celery app"
    for name, variable in (
        ("broker_url", "CELERY_BROKER_URL"),
        ("result_backend", "CELERY_RESULT_BACKEND"),
    ):
        if name not in names:
            continue
        url = _conf_url(conf, name)
        if not isinstance(url, str) or not url:
            continue
        if env.get(variable, "").strip() == url:
            origin = f"{variable} in this process's environment"
        else:
            origin = f"{name} in the configuration of {app}"
        check_url_shape(variable, url, origin)


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
