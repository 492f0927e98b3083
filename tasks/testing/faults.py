"""What the sFOX stand-in can be made to do: scripted faults, its records and its settings.

:class:`Fault` is the fault language (a status, a reset, a delay, a malformed body, a user
dropped from or added to a batch answer); :class:`FakeSfoxConfig` the stand-in's settings;
:class:`RequestRecord` and :class:`Order` what it remembers. Standard library only.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, cast, get_args

TOKENS_PATH = "/v1/enterprise/user-tokens"
ORDERS_PATH = "/v1/orders"
CONTROL_PREFIX = "/_fake/"

#: sFOX algorithm ids the order endpoint accepts; 100 is Market.
ALGORITHM_IDS = frozenset({100, 200, 201, 304, 307, 308, 309})
MARKET_ALGORITHM = 100
ORDER_SIDES = ("buy", "sell")
#: sFOX only promises client_order_id uniqueness over this many seconds.
CLIENT_ORDER_ID_TTL = 86400.0
#: Headers worth keeping in the request log; Authorization is never among them.
_LOGGED_HEADERS = ("content-type", "user-agent", "accept", "x-request-id")
_MAX_BODY = 10 * 1024 * 1024

FaultKind = Literal["status", "reset", "delay", "malformed", "drop_user", "extra_user"]
_FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))

#: What the rate limit counts: each client address on its own (sFOX's rule), or all together.
RateLimitPer = Literal["address", "server"]
_RATE_LIMIT_PER: frozenset[str] = frozenset(get_args(RateLimitPer))

AuthVerdict = Literal["none", "enterprise", "user_token", "expired_token", "invalid"]

_DEFAULT_MESSAGES = {
    400: "bad request",
    401: "invalid api key",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    409: "conflict",
    429: "rate limit exceeded",
    500: "internal server error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}


def _default_message(code: int) -> str:
    if code in _DEFAULT_MESSAGES:
        return _DEFAULT_MESSAGES[code]
    try:
        return HTTPStatus(code).phrase.lower()
    except ValueError:
        return "error"


def http_date(delay_s: float = 0.0) -> str:
    """Return an RFC 7231 HTTP-date ``delay_s`` seconds from now (for ``Retry-After`` faults)."""
    return email.utils.formatdate(time.time() + delay_s, usegmt=True)


def _is_number(value: object) -> bool:
    # bool is an int subclass; a JSON `true` is not a quantity.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, consumed by the next request whose path starts with ``path``.

    Build them with the constructors (``Fault.status(503)``, ``Fault.reset()``, ...) rather than
    by hand; ``Fault.from_dict`` accepts the JSON form used by the control API.
    """

    kind: FaultKind
    path: str = TOKENS_PATH
    code: int = 503
    message: str | None = None
    body_text: str | None = None
    retry_after: int | str | None = None
    seconds: float = 0.0
    user_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ValueError("fault path must be a string starting with '/'")
        if not _is_int(self.code) or not 100 <= self.code <= 599:
            raise ValueError("fault code must be an HTTP status between 100 and 599")
        if not _is_number(self.seconds) or not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError("fault seconds must be a finite number >= 0")
        if self.retry_after is not None and not (
            (_is_int(self.retry_after) and cast(int, self.retry_after) >= 0)
            or isinstance(self.retry_after, str)
        ):
            raise ValueError("retry_after must be an int >= 0 or an HTTP-date string")
        for name in ("message", "body_text", "user_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"fault {name} must be a string")

    @classmethod
    def status(
        cls,
        code: int,
        body: str | Mapping[str, Any] | None = None,
        retry_after: int | str | None = None,
        *,
        path: str = TOKENS_PATH,
    ) -> Fault:
        """Answer with ``code``; ``body`` is the error message (str) or a whole JSON object."""
        if isinstance(body, Mapping):
            return cls(
                "status", path, code, body_text=json.dumps(dict(body)), retry_after=retry_after
            )
        return cls("status", path, code, message=body, retry_after=retry_after)

    @classmethod
    def reset(cls, *, path: str = TOKENS_PATH) -> Fault:
        """Read the request, send half a status line, then drop the connection."""
        return cls("reset", path)

    @classmethod
    def delay(cls, seconds: float, *, path: str = TOKENS_PATH) -> Fault:
        """Sleep ``seconds`` (on top of the configured latency) and then answer normally."""
        return cls("delay", path, seconds=seconds)

    @classmethod
    def malformed(cls, body_text: str, *, path: str = TOKENS_PATH) -> Fault:
        """Answer 201 with ``body_text`` verbatim under an application/json content type."""
        return cls("malformed", path, 201, body_text=body_text)

    @classmethod
    def drop_user(cls, user_id: str | None = None, *, path: str = TOKENS_PATH) -> Fault:
        """Answer normally but leave out ``user_id`` (default: the first requested user)."""
        return cls("drop_user", path, user_id=user_id)

    @classmethod
    def extra_user(cls, user_id: str = "intruder", *, path: str = TOKENS_PATH) -> Fault:
        """Answer normally plus a token for ``user_id``, which nobody asked for."""
        return cls("extra_user", path, user_id=user_id)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        """Build a fault from its JSON form, e.g. ``{"kind": "status", "code": 503}``.

        Keys: ``kind`` (required), ``path``, ``code``, ``body`` (message string or JSON object
        for ``status``; raw text for ``malformed``), ``message``, ``retry_after``, ``seconds``,
        ``user_id``.  Raises ``ValueError`` on anything else.
        """
        if not isinstance(data, Mapping):
            raise ValueError("a fault must be a JSON object")
        allowed = {"kind", "path", "code", "body", "message", "retry_after", "seconds", "user_id"}
        unknown = set(data) - allowed - {"times"}
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        kind = data.get("kind")
        path = data.get("path", TOKENS_PATH)
        if not isinstance(path, str):
            raise ValueError("fault path must be a string")
        body = data.get("body")
        try:
            if kind == "status":
                code = data.get("code", 503)
                if body is None:
                    body = data.get("message")
                if body is not None and not isinstance(body, (str, Mapping)):
                    raise ValueError("status body must be a string or an object")
                return cls.status(code, body, data.get("retry_after"), path=path)
            if kind == "reset":
                return cls.reset(path=path)
            if kind == "delay":
                return cls.delay(data.get("seconds", 0.0), path=path)
            if kind == "malformed":
                if not isinstance(body, str):
                    raise ValueError("malformed fault needs a string 'body'")
                return cls.malformed(body, path=path)
            if kind == "drop_user":
                return cls.drop_user(data.get("user_id"), path=path)
            if kind == "extra_user":
                return cls.extra_user(data.get("user_id", "intruder"), path=path)
        except TypeError as exc:  # a wrongly typed value reaching a comparison
            raise ValueError(str(exc)) from exc
        raise ValueError(f"unknown fault kind {kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this fault (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = {"kind": self.kind, "path": self.path}
        if self.kind == "status":
            out["code"] = self.code
            if self.body_text is not None:
                out["body"] = json.loads(self.body_text)
            elif self.message is not None:
                out["body"] = self.message
            if self.retry_after is not None:
                out["retry_after"] = self.retry_after
        elif self.kind == "delay":
            out["seconds"] = self.seconds
        elif self.kind == "malformed":
            out["body"] = self.body_text
        elif self.kind in ("drop_user", "extra_user"):
            out["user_id"] = self.user_id
        return out


# --------------------------------------------------------------------------------------------
# Records and configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One non-control request as the fake saw it.

    ``status`` is 0 while the request is still being answered and stays 0 for ``reset`` faults
    (no complete response was sent).  ``auth`` is the verdict on the Authorization header; the
    header value itself is never kept.
    """

    time: float
    method: str
    path: str
    status: int
    ip: str
    user_ids: list[str]
    auth: AuthVerdict
    headers: dict[str, str]

    @property
    def user_count(self) -> int:
        return len(self.user_ids)


@dataclass
class _LiveRecord:
    # Mutable twin of RequestRecord: created on arrival so counts are right even while a
    # delayed request is still sleeping, completed when the answer is known.
    time: float
    method: str
    path: str
    ip: str
    user_ids: list[str]
    auth: AuthVerdict
    headers: dict[str, str]
    status: int = 0

    def snapshot(self) -> RequestRecord:
        return RequestRecord(
            self.time,
            self.method,
            self.path,
            self.status,
            self.ip,
            list(self.user_ids),
            self.auth,
            dict(self.headers),
        )


@dataclass(frozen=True)
class Order:
    """An order the fake accepted; ``user_id`` is the owner of the token that placed it."""

    id: int
    user_id: str
    side: str
    currency_pair: str
    algorithm_id: int
    quantity: float | None
    price: float | None
    amount: float | None
    client_order_id: str | None
    status: str = "started"
    #: When the order request arrived (monotonic).
    placed_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "client_order_id": self.client_order_id,
            "side": self.side,
            "currency_pair": self.currency_pair,
            "algorithm_id": self.algorithm_id,
            "quantity": self.quantity,
            "price": self.price,
            "amount": self.amount,
            "user_id": self.user_id,
        }


@dataclass(frozen=True)
class FakeSfoxConfig:
    """Tunable behaviour; swapped atomically by :meth:`FakeSfox.configure`."""

    latency: float = 0.0
    rate_limit: int | None = None
    rate_window: float = 10.0
    rate_penalty: float = 60.0
    #: "address": a budget and a penalty per client IP, as sFOX does; "server": one for all.
    rate_limit_per: RateLimitPer = "address"
    retry_after_on_limit: bool = False
    shuffle: bool = True
    max_batch: int | None = None
    token_ttl: float = 86400.0
    fail_every: int | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        def number(name: str, minimum: float | None, *, strict: bool = False) -> None:
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")
            if minimum is not None and (value <= minimum if strict else value < minimum):
                raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}")

        def optional_count(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be null or an integer >= 1")

        number("latency", 0.0)
        number("rate_window", 0.0, strict=True)
        number("rate_penalty", 0.0)
        number("token_ttl", None)
        optional_count("rate_limit")
        optional_count("max_batch")
        optional_count("fail_every")
        for name in ("retry_after_on_limit", "shuffle", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean")
        if self.rate_limit_per not in _RATE_LIMIT_PER:
            raise ValueError(f"rate_limit_per must be one of {sorted(_RATE_LIMIT_PER)}")


# --------------------------------------------------------------------------------------------
