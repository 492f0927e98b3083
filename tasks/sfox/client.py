"""The sFOX HTTP client: one request in, one classified outcome out.

It knows the endpoints, the wire format and the meaning of each status, and
nothing of Celery, retries or rate limits: every failure becomes one of the
exceptions in :mod:`tasks._exceptions`, and the layers above decide what to
do. Connections are pooled in :class:`requests.Session` objects the client
keeps and reuses; each request borrows one that no other thread is using, so
one client may serve several threads at once (requests does not promise that
one session is safe to share between threads: its cookie jar is iterated
without a lock while another thread's response may add to it).

On a multi-homed host the client can bind every connection to one local
address (``source_address``), so that sFOX sees the egress IP whose budget the
worker's limiter scope counts against.

Secrets: the enterprise key lives only in the session's headers; bodies of
successful answers (which hold tokens) are never echoed into a message, and
error texts from sFOX are scrubbed of the key before they go anywhere.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from .._exceptions import (
    AuthenticationError,
    MalformedResponse,
    PermanentError,
    RateLimited,
    RequestRefused,
    ServerError,
    TokenRejected,
    TransportError,
)
from .._metrics import request_done
from .._settings import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, check_api_url

__all__ = [
    "IssuedToken",
    "SfoxClient",
    "Timeouts",
    "http_adapter",
    "normalise_expires",
    "origin_of",
    "parse_retry_after",
    "transport_reason",
]

logger = logging.getLogger("tasks.client")

#: Statuses worth another try later.
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
#: Statuses that, for a user-token request, may mean one refused user.
REFUSAL_STATUSES = frozenset({400, 404, 422})
#: Longest error text from sFOX kept in a message.
_MAX_ERROR_TEXT = 200

USER_AGENT = "sfox-tokens/0.1 (+celery)"


@dataclass(frozen=True)
class Timeouts:
    """Connect and read timeouts for every request, in seconds."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT

    def as_requests(self) -> tuple[float, float]:
        return (self.connect, self.read)

    @property
    def longest(self) -> float:
        """Seconds after which a request has surely reached sFOX or never will."""
        return self.connect + self.read


@dataclass(frozen=True)
class IssuedToken:
    """One token as sFOX issued it. ``token`` is plaintext: seal it before it travels."""

    partner_user_id: str
    token: str = ""
    expires: str = ""

    def __repr__(self) -> str:  # keep the token out of any accidental log or traceback
        return f"IssuedToken(partner_user_id={self.partner_user_id!r}, expires={self.expires!r})"


class _SourceAddressAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose connections all leave from one local address (any port)."""

    # Kept when the adapter is pickled, like HTTPAdapter's own settings.
    __attrs__ = [*requests.adapters.HTTPAdapter.__attrs__, "source_address"]  # noqa: RUF012

    def __init__(self, source_address: str, **kwargs: Any) -> None:
        # Set before HTTPAdapter.__init__, which builds the pool manager.
        self.source_address = source_address
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source_address, 0)
        super().init_poolmanager(*args, **kwargs)


def http_adapter(
    pool_size: int = 10, source_address: str | None = None
) -> requests.adapters.HTTPAdapter:
    """The transport for sFOX: a connection pool, bound to ``source_address`` when given."""
    if source_address:
        return _SourceAddressAdapter(source_address, pool_connections=1, pool_maxsize=pool_size)
    return requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)


class SfoxClient:
    """Talks to one sFOX base URL with one enterprise key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeouts: Timeouts | None = None,
        session: requests.Session | None = None,
        pool_size: int = 10,
        plain_http_hosts: Collection[str] = (),
        source_address: str | None = None,
    ) -> None:
        check_api_url(base_url, plain_http_hosts)
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or Timeouts()
        #: Local address every connection leaves from; ``None`` lets the OS choose.
        self.source_address = source_address
        self._api_key = api_key
        self._pool_size = pool_size
        self._lock = threading.Lock()
        first = self._prepare(session or requests.Session())
        #: Every session made, and those no request is using now (last used first).
        self._sessions: list[requests.Session] = [first]
        self._idle: list[requests.Session] = [first]

    @property
    def origin(self) -> str:
        """``scheme://host:port`` of sFOX, for messages: never a path, a user or a password."""
        return origin_of(self.base_url)

    def _prepare(self, session: requests.Session) -> requests.Session:
        adapter = http_adapter(self._pool_size, self.source_address)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        # Never let a proxy setting or .netrc swap our Authorization header.
        session.trust_env = False
        session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
        return session

    @contextmanager
    def _borrow(self) -> Iterator[requests.Session]:
        """A session for one request, used by no other thread meanwhile.

        One thread at a time always gets the same session back; ``K`` threads at
        once make at most ``K`` sessions, kept with their connections for later.
        """
        with self._lock:
            session = self._idle.pop() if self._idle else None
        if session is None:
            session = self._prepare(requests.Session())
            with self._lock:
                self._sessions.append(session)
        try:
            yield session
        finally:
            with self._lock:
                self._idle.append(session)

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.close()

    # -- endpoints -----------------------------------------------------------------

    def create_user_tokens(self, user_ids: Sequence[str]) -> dict[str, IssuedToken]:
        """``POST /v1/enterprise/user-tokens``: tokens keyed by ``partner_user_id``.

        Only requested IDs are returned; entries for others are dropped and
        logged (without their token). A requested ID may be absent: the caller
        decides what to do about it.
        """
        body = self._post(
            "/v1/enterprise/user-tokens",
            self._api_key,
            {"data": list(user_ids)},
            "user tokens",
            endpoint="user_tokens",
        )
        data = body.get("data")
        if not isinstance(data, list):
            raise MalformedResponse(
                "sFOX answered 201 to a user-token request without a 'data' list", status=201
            )
        wanted = set(user_ids)
        issued: dict[str, IssuedToken] = {}
        unexpected = []
        for entry in data:
            token = _parse_token(entry)
            if token.partner_user_id in wanted:
                issued[token.partner_user_id] = token
            else:
                unexpected.append(token.partner_user_id)
        if unexpected:
            logger.warning(
                "sFOX returned %d token(s) for user IDs that were not requested; dropped: %s",
                len(unexpected),
                ", ".join(unexpected[:20]),
            )
        return issued

    def create_user_token(self, user_id: str) -> IssuedToken:
        """``POST /v1/enterprise/user-tokens/{user_id}``: one user's token."""
        path = "/v1/enterprise/user-tokens/" + quote(user_id, safe="")
        body = self._post(path, self._api_key, None, "user token", endpoint="user_token")
        token = _parse_token(body.get("data"))
        if token.partner_user_id != user_id:
            raise MalformedResponse(
                "sFOX answered a single-user token request with another user's token", status=201
            )
        return token

    def create_order(self, user_token: str, side: str, order: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/orders/{side}`` with the user's token; sFOX's order as a dict."""
        if side not in ("buy", "sell"):
            raise ValueError(f"side must be 'buy' or 'sell', not {side!r}")
        return self._post(
            f"/v1/orders/{side}",
            user_token,
            dict(order),
            "order",
            endpoint="order",
            user_token=True,
        )

    # -- wire ----------------------------------------------------------------------

    def _post(
        self,
        path: str,
        bearer: str,
        payload: Any,
        what: str,
        *,
        endpoint: str,
        user_token: bool = False,
    ) -> dict[str, Any]:
        """POST ``payload``; ``endpoint`` names the route in the metrics (no ID in it)."""
        url = self.base_url + path
        started = time.monotonic()
        status: int | None = None
        try:
            with self._borrow() as session:
                response = session.post(
                    url,
                    json=payload,
                    headers={"Authorization": f"Bearer {bearer}"},
                    timeout=self.timeouts.as_requests(),
                    allow_redirects=False,
                )
            status = response.status_code
        except requests.ConnectTimeout:
            raise TransportError(
                f"cannot reach sFOX at {self.origin} (no connection within "
                f"{time.monotonic() - started:.1f} s: connect timeout)"
            ) from None
        except requests.Timeout as exc:
            raise TransportError(
                f"sFOX at {self.origin} did not answer a {what} request within "
                f"{time.monotonic() - started:.1f} s ({type(exc).__name__})"
            ) from None
        except requests.ConnectionError as exc:
            raise TransportError(
                f"cannot reach sFOX at {self.origin} ({transport_reason(exc)})"
            ) from None
        except requests.RequestException as exc:
            raise TransportError(
                f"sFOX {what} request to {self.origin} failed in transport: {type(exc).__name__}"
            ) from None
        finally:
            request_done(endpoint, status, time.monotonic() - started)
        try:
            return self._classify(response, what, user_token=user_token)
        finally:
            response.close()

    def _classify(
        self, response: requests.Response, what: str, *, user_token: bool = False
    ) -> dict[str, Any]:
        status = response.status_code
        if 200 <= status < 300:
            try:
                body = response.json()
            except (ValueError, requests.RequestException):
                raise MalformedResponse(
                    f"sFOX answered {status} to a {what} request with a body that is not JSON",
                    status=status,
                ) from None
            if not isinstance(body, dict):
                raise MalformedResponse(
                    f"sFOX answered {status} to a {what} request with a non-object body",
                    status=status,
                )
            return body
        error = self._error_text(response)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        where = f"sFOX answered {status} to a {what} request"
        if status == 429:
            raise RateLimited(
                f"{where}: rate limited ({error})", status=429, retry_after=retry_after
            )
        if status in TRANSIENT_STATUSES:
            raise ServerError(f"{where}: {error}", status=status, retry_after=retry_after)
        if status in (401, 403) and user_token:
            raise TokenRejected(
                f"{where}: {error}. The user's auth token expired or was revoked: mint a new one",
                status=status,
            )
        if status in (401, 403):
            raise AuthenticationError(
                f"{where}: {error}. Check SFOX_ENTERPRISE_API_KEY: the key is wrong, "
                "revoked, for another environment (production vs sandbox), or lacks "
                "enterprise rights",
                status=status,
            )
        if status in REFUSAL_STATUSES:
            raise RequestRefused(f"{where}: {error}", status=status, error=error)
        if 300 <= status < 400:
            raise PermanentError(
                f"{where}: a redirect; check SFOX_API_URL points at the API itself",
                status=status,
            )
        raise PermanentError(f"{where}: {error}", status=status)

    def _error_text(self, response: requests.Response) -> str:
        """sFOX's ``error`` text, bounded, with the enterprise key scrubbed out."""
        text = ""
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                text = body["error"]
        except ValueError:
            text = ""
        if not text:
            text = response.reason or "no error message"
        text = " ".join(text.split())[:_MAX_ERROR_TEXT]
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "[enterprise key]")
        return text


def origin_of(url: str) -> str:
    """``scheme://host:port`` of ``url`` (the scheme's default port spelt out)."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    except ValueError:
        return "(an unreadable URL)"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{port}" if port else f"{parts.scheme}://{host}"


#: Words in a connection error's text, and what they mean in a message.
_REASONS = (
    ("refused", "connection refused"),
    ("name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("temporary failure in name resolution", "host name not found"),
    ("getaddrinfo failed", "host name not found"),
    ("no address associated", "host name not found"),
    ("network is unreachable", "network unreachable"),
    ("no route to host", "no route to host"),
    ("cannot assign requested address", "cannot send from the source address"),
    ("reset by peer", "connection reset"),
    ("remotedisconnected", "connection closed without an answer"),
    ("connection aborted", "connection closed without an answer"),
)


def transport_reason(exc: BaseException) -> str:
    """A few words for why a connection failed: refused, host not found, TLS, reset."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, requests.exceptions.ProxyError):
        return "proxy error"
    text = str(exc).lower()
    for words, reason in _REASONS:
        if words in text:
            return reason
    return type(exc).__name__


def _parse_token(entry: Any) -> IssuedToken:
    if not isinstance(entry, dict):
        raise MalformedResponse("sFOX token entry is not an object", status=201)
    user_id = entry.get("partner_user_id")
    token = entry.get("token")
    expires = entry.get("expires")
    if not isinstance(user_id, str) or not user_id:
        raise MalformedResponse("sFOX token entry has no partner_user_id", status=201)
    if not isinstance(token, str) or not token:
        raise MalformedResponse("sFOX token entry has no token", status=201)
    if not isinstance(expires, str):
        raise MalformedResponse("sFOX token entry has no expires", status=201)
    return IssuedToken(partner_user_id=user_id, token=token, expires=normalise_expires(expires))


# Cached: every token of one answer carries (nearly) the same expiry text, and parsing
# it was a tenth of the CPU a 100-user batch costs. Failures raise and are not cached.
@functools.lru_cache(maxsize=1024)
def normalise_expires(text: str) -> str:
    """ISO-8601 UTC with ``Z``, whole seconds: ``2022-02-08T03:28:56Z``.

    Accepts sFOX's forms with and without fractional seconds, ``Z`` or an offset.
    """
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        # Python < 3.11 parses only 3 or 6 fraction digits; trim any other count.
        head, dot, tail = raw.partition(".")
        if not dot:
            raise MalformedResponse("sFOX token 'expires' is not an ISO-8601 time") from None
        digits = "".join(ch for ch in tail if ch.isdigit())
        zone = tail[len(digits) :]
        try:
            moment = datetime.fromisoformat(f"{head}.{(digits + '000000')[:6]}{zone}")
        except ValueError:
            raise MalformedResponse("sFOX token 'expires' is not an ISO-8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), or ``None``."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
