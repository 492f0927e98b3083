"""A local stand-in for the parts of the sFOX HTTP API this package talks to.

This module owns :class:`FakeSfox`, a small threaded HTTP server that behaves like sFOX's
enterprise user-token endpoints (batch and single) and the order endpoint, plus everything the
test suite, the demo, the benchmark and the docker service need to make it misbehave on purpose:
scripted faults (:class:`Fault`), refused users, latency, and a rate limiter with a penalty
period.  The limiter counts per client address, as sFOX counts per IP (``rate_limit_per =
"address"``), or one budget for every client (``"server"``: many hosts behind one NAT).  It
records every request it answers so tests can assert on traffic shape
(``max_requests_in_window``, per address in ``stats()["by_address"]``) and on how old each token
was when an order used it, without ever storing a secret: Authorization headers are reduced to a
verdict, and issued tokens live only in ``issued_tokens``.

It deliberately imports nothing but the standard library, so it can run as a service
(``python -m tasks.testing``) in an image that does not have the rest of the package's
dependencies, and so that importing it never drags Celery in.

Out-of-process users drive it through a small control API under ``/_fake/`` (loopback only by
default) which is neither rate limited nor logged (``control.py``). What it saw is read
through :class:`~tasks.testing.inspection.Inspection`; the HTTP plumbing is ``http.py``. The
endpoints themselves are mixins: :class:`~tasks.testing.tokens.TokenDesk` (the two mints) and
:class:`~tasks.testing.orders.OrderDesk` (orders).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, cast
from urllib.parse import unquote

from .control import handle_control
from .faults import (
    _LOGGED_HEADERS,
    CONTROL_PREFIX,
    ORDERS_PATH,
    TOKENS_PATH,
    AuthVerdict,
    FakeSfoxConfig,
    Fault,
    Order,
    RateLimitPer,
    _default_message,
    _is_int,
    _LiveRecord,
)
from .http import (
    _bearer,
    _error,
    _json_response,
    _parse_json,
    _Request,
    _Response,
    _Server,
)
from .inspection import Inspection
from .orders import OrderDesk
from .tokens import TokenDesk

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class FakeSfox(TokenDesk, OrderDesk, Inspection):
    """A fake sFOX API server for tests, demos, benchmarks and the docker service.

    All mutable state sits behind one lock; handler threads only sleep (latency, delay faults)
    outside it.  ``start()`` binds and serves in a daemon thread; use it as a context manager
    to get ``start``/``stop`` for free.
    """

    def __init__(
        self,
        api_key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        rate_limit: int | None = None,
        rate_window: float = 10.0,
        rate_penalty: float = 60.0,
        rate_limit_per: RateLimitPer = "address",
        retry_after_on_limit: bool = False,
        shuffle: bool = True,
        max_batch: int | None = None,
        token_ttl: float = 86400.0,
        fail_every: int | None = None,
        refused: Iterable[str] = (),
        allow_remote_control: bool = False,
        verbose: bool = False,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._api_key = api_key.encode()
        self.host = host
        self._requested_port = port
        self.allow_remote_control = allow_remote_control
        self._config = FakeSfoxConfig(
            latency=latency,
            rate_limit=rate_limit,
            rate_window=rate_window,
            rate_penalty=rate_penalty,
            rate_limit_per=rate_limit_per,
            retry_after_on_limit=retry_after_on_limit,
            shuffle=shuffle,
            max_batch=max_batch,
            token_ttl=token_ttl,
            fail_every=fail_every,
            verbose=verbose,
        )
        # Refusals given at construction (the CLI's --refuse) are configuration: reset()
        # restores them rather than wiping them.
        self._baseline_refused: dict[str, tuple[int, str]] = {
            uid: (404, "user not found") for uid in refused
        }
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._init_state()

    def _init_state(self) -> None:
        self._faults: deque[Fault] = deque()
        self._refused: dict[str, tuple[int, str]] = dict(self._baseline_refused)
        self._log: list[_LiveRecord] = []
        self._tokens: dict[str, tuple[str, datetime]] = {}
        self._orders: list[Order] = []
        self._client_order_ids: dict[tuple[str, str], float] = {}
        self._duplicates = 0
        self._rate_limited = 0
        self._rate_limited_by_ip: dict[str, int] = {}
        # Keyed by client address, or by "*" when the limit is per server.
        self._hits: dict[str, deque[float]] = {}
        self._penalty_until: dict[str, float] = {}
        self._next_order_id = 1_000_001
        self._minted = 0
        self._fail_counter = 0
        #: token -> when it was minted (monotonic); user -> tokens minted for them.
        self._token_born: dict[str, float] = {}
        self._mints_by_user: dict[str, int] = {}
        #: Seconds since minting of the token each order request carried.
        self._token_ages: list[float] = []
        # Turns the monotonic times kept here into wall-clock times for stats().
        self._wall_offset = time.time() - time.monotonic()

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeSfox:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("FakeSfox is already running")
        server = _Server((self.host, self._requested_port), self)
        self._stopping.clear()
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-sfox-{server.server_address[1]}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        # Wake handlers sleeping on latency/delay so they do not outlive the server by much.
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeSfox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeSfox is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL clients should use, e.g. ``http://127.0.0.1:8900``."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host  # noqa: S104
        return f"http://{host}:{self.port}"

    # ---- configuration and scripting ---------------------------------------------------

    @property
    def config(self) -> FakeSfoxConfig:
        return self._config

    def configure(self, **changes: Any) -> FakeSfoxConfig:
        """Change any :class:`FakeSfoxConfig` field(s); raises ``ValueError`` on bad input.

        Changing a rate-limit setting forgets the limiter's history and penalties, so a
        switch-on does not punish traffic sent while the limiter was off.
        """
        try:
            new = dataclasses.replace(self._config, **changes)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc
        with self._lock:
            old, self._config = self._config, new
            if (old.rate_limit, old.rate_window, old.rate_penalty, old.rate_limit_per) != (
                new.rate_limit,
                new.rate_window,
                new.rate_penalty,
                new.rate_limit_per,
            ):
                self._hits.clear()
                self._penalty_until.clear()
            if old.fail_every != new.fail_every:
                self._fail_counter = 0
        return new

    def inject(self, *faults: Fault) -> None:
        """Append faults to the FIFO queue; each is consumed by one matching request."""
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"expected Fault, got {type(fault).__name__}")
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def refuse(self, user_id: str, status: int = 404, message: str = "user not found") -> None:
        """Make every token request naming ``user_id`` fail with ``status`` until unrefused."""
        if not _is_int(status) or not 400 <= status <= 599:
            raise ValueError("refusal status must be an HTTP error status (400-599)")
        with self._lock:
            self._refused[user_id] = (status, message)

    def unrefuse(self, user_id: str) -> None:
        with self._lock:
            self._refused.pop(user_id, None)

    def reset(self) -> None:
        """Forget faults, logs, tokens, orders and limiter state; keep configuration."""
        with self._lock:
            self._init_state()

    def expire_token(self, token: str) -> bool:
        """Force ``token`` to be expired; returns whether the fake had issued it."""
        with self._lock:
            if token not in self._tokens:
                return False
            self._tokens[token] = (self._tokens[token][0], _EPOCH)
            return True

    def expire_all_tokens(self, user_id: str | None = None) -> int:
        """Expire every issued token (or only ``user_id``'s); returns how many."""
        with self._lock:
            victims = [t for t, (uid, _) in self._tokens.items() if user_id in (None, uid)]
            for token in victims:
                self._tokens[token] = (self._tokens[token][0], _EPOCH)
            return len(victims)

    # ---- request handling (called from handler threads) -------------------------------

    def _auth_verdict_locked(self, headers: Mapping[str, str]) -> AuthVerdict:
        credential = _bearer(headers)
        if credential is None:
            return "none"
        if secrets.compare_digest(credential.encode(), self._api_key):
            return "enterprise"
        entry = self._tokens.get(credential)
        if entry is None:
            return "invalid"
        return "user_token" if entry[1] > datetime.now(timezone.utc) else "expired_token"

    def _rate_check_locked(self, ip: str, now: float, cfg: FakeSfoxConfig) -> float | None:
        """Seconds of penalty left if this request must get a 429, else None."""
        if cfg.rate_limit is None:
            return None
        budget = ip if cfg.rate_limit_per == "address" else "*"
        until = self._penalty_until.get(budget)
        if until is not None:
            if now < until:
                return until - now
            del self._penalty_until[budget]
        hits = self._hits.setdefault(budget, deque())
        while hits and now - hits[0] >= cfg.rate_window:
            hits.popleft()
        if len(hits) >= cfg.rate_limit:
            self._penalty_until[budget] = now + cfg.rate_penalty
            return cfg.rate_penalty
        # Only admitted requests fill the window; the penalty is the punishment for overflow.
        hits.append(now)
        return None

    def _take_fault_locked(self, path: str, cfg: FakeSfoxConfig) -> Fault | None:
        for index, fault in enumerate(self._faults):
            if path.startswith(fault.path):
                del self._faults[index]
                return fault
        if cfg.fail_every is not None and path.startswith(TOKENS_PATH):
            self._fail_counter += 1
            if self._fail_counter % cfg.fail_every == 0:
                return Fault.status(503)
        return None

    def _handle(self, req: _Request) -> _Response:
        if req.path.startswith(CONTROL_PREFIX):
            return handle_control(self, req)
        user_ids = self._body_user_ids(req)
        headers = {k: v for k, v in req.headers.items() if k in _LOGGED_HEADERS}
        with self._lock:
            cfg = self._config
            now = req.arrived = time.monotonic()
            record = _LiveRecord(
                now,
                req.method,
                req.path,
                req.ip,
                user_ids,
                self._auth_verdict_locked(req.headers),
                headers,
            )
            self._log.append(record)
            penalty_left = self._rate_check_locked(req.ip, now, cfg)
            if penalty_left is not None:
                self._rate_limited += 1
                self._rate_limited_by_ip[req.ip] = self._rate_limited_by_ip.get(req.ip, 0) + 1
            fault = None if penalty_left is not None else self._take_fault_locked(req.path, cfg)
        pause = cfg.latency + (fault.seconds if fault is not None and fault.kind == "delay" else 0)
        if pause > 0:
            self._stopping.wait(pause)
        try:
            if penalty_left is not None:
                extra: list[tuple[str, str]] = []
                if cfg.retry_after_on_limit:
                    extra.append(("Retry-After", str(max(1, math.ceil(penalty_left)))))
                response = _json_response(429, {"error": "rate limit exceeded"}, extra)
            else:
                response = self._answer(req, fault, cfg)
        except Exception:
            if cfg.verbose:
                import traceback

                traceback.print_exc()
            response = _error(500)
        with self._lock:
            record.status = 0 if response.reset else response.status
        return response

    @staticmethod
    def _body_user_ids(req: _Request) -> list[str]:
        if req.path == TOKENS_PATH:
            ok, payload = _parse_json(req.body)
            if ok and isinstance(payload, dict) and isinstance(payload.get("data"), list):
                return [uid for uid in payload["data"] if isinstance(uid, str)]
        elif req.path.startswith(TOKENS_PATH + "/"):
            return [unquote(req.path[len(TOKENS_PATH) + 1 :])]
        return []

    def _answer(self, req: _Request, fault: Fault | None, cfg: FakeSfoxConfig) -> _Response:
        if fault is not None:
            if fault.kind == "status":
                extra = (
                    [] if fault.retry_after is None else [("Retry-After", str(fault.retry_after))]
                )
                if fault.body_text is not None:
                    return _Response(fault.code, fault.body_text.encode(), extra)
                return _json_response(
                    fault.code, {"error": fault.message or _default_message(fault.code)}, extra
                )
            if fault.kind == "reset":
                return _Response(0, reset=True)
            if fault.kind == "malformed":
                return _Response(fault.code, (fault.body_text or "").encode())
        return self._route(req, fault, cfg)

    def _route(self, req: _Request, fault: Fault | None, cfg: FakeSfoxConfig) -> _Response:
        path = req.path
        tail: str | None = None
        if path == TOKENS_PATH:
            endpoint = "batch"
        elif path.startswith(TOKENS_PATH + "/"):
            endpoint, tail = "single", unquote(path[len(TOKENS_PATH) + 1 :])
        elif path.startswith(ORDERS_PATH + "/"):
            endpoint, tail = "order", path[len(ORDERS_PATH) + 1 :]
        else:
            return _error(404)
        if tail is not None and (not tail or "/" in tail):
            return _error(404)
        if req.method != "POST":
            response = _error(405)
            response.headers.append(("Allow", "POST"))
            return response
        if endpoint == "batch":
            return self._issue_batch(req, fault, cfg)
        if endpoint == "single":
            return self._issue_single(req, cast(str, tail), fault, cfg)
        return self._place_order(req, cast(str, tail))
