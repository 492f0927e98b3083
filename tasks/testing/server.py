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
through :class:`~tasks.testing.inspection.Inspection`; the HTTP plumbing is ``http.py``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, cast
from urllib.parse import unquote

from tasks.testing.control import handle_control
from tasks.testing.faults import (
    _LOGGED_HEADERS,
    ALGORITHM_IDS,
    CLIENT_ORDER_ID_TTL,
    CONTROL_PREFIX,
    MARKET_ALGORITHM,
    ORDER_SIDES,
    ORDERS_PATH,
    TOKENS_PATH,
    AuthVerdict,
    FakeSfoxConfig,
    Fault,
    Order,
    RateLimitPer,
    _default_message,
    _is_int,
    _is_number,
    _LiveRecord,
)
from tasks.testing.http import (
    _bearer,
    _error,
    _json_response,
    _parse_json,
    _Request,
    _Response,
    _Server,
)
from tasks.testing.inspection import Inspection


def _format_expiry(expires: datetime, with_millis: bool) -> tuple[datetime, str]:
    # Both spellings appear in sFOX's docs; the stored datetime is exactly what the text says so
    # tests can compare them.
    if with_millis:
        expires = expires.replace(microsecond=expires.microsecond // 1000 * 1000)
        text = expires.strftime("%Y-%m-%dT%H:%M:%S") + f".{expires.microsecond // 1000:03d}Z"
    else:
        expires = expires.replace(microsecond=0)
        text = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    return expires, text


def _batch_expiry(cfg: FakeSfoxConfig) -> tuple[tuple[datetime, str], tuple[datetime, str]]:
    """The expiry of a token minted now, spelt without and with milliseconds."""
    raw = datetime.now(timezone.utc) + timedelta(seconds=cfg.token_ttl)
    return _format_expiry(raw, with_millis=False), _format_expiry(raw, with_millis=True)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class FakeSfox(Inspection):
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

    def _mint_locked(
        self,
        user_id: str,
        cfg: FakeSfoxConfig,
        expiry: tuple[tuple[datetime, str], tuple[datetime, str]] | None = None,
    ) -> dict[str, str]:
        # ``expiry`` is (plain, with millis) computed once for a whole batch: formatting it per
        # token was half the fake's CPU, which capped the benchmark's unlimited-rate runs.
        token = secrets.token_hex(32)
        if expiry is None:
            expiry = _batch_expiry(cfg)
        expires, text = expiry[self._minted % 2]
        self._minted += 1
        self._tokens[token] = (user_id, expires)
        self._token_born[token] = time.monotonic()
        self._mints_by_user[user_id] = self._mints_by_user.get(user_id, 0) + 1
        return {"token": token, "expires": text, "partner_user_id": user_id}

    def _check_enterprise(self, req: _Request) -> _Response | None:
        credential = _bearer(req.headers)
        if credential is None or not secrets.compare_digest(credential.encode(), self._api_key):
            return _error(401, "invalid api key")
        return None

    def _issue_batch(self, req: _Request, fault: Fault | None, cfg: FakeSfoxConfig) -> _Response:
        denied = self._check_enterprise(req)
        if denied is not None:
            return denied
        ok, payload = _parse_json(req.body)
        if not ok:
            return _error(400, "invalid JSON body")
        ids = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(ids, list) or not ids:
            return _error(400, "data must be a non-empty list of user ids")
        if not all(isinstance(uid, str) and uid for uid in ids):
            return _error(400, "user ids must be non-empty strings")
        with self._lock:
            for uid in ids:
                if uid in self._refused:
                    status, message = self._refused[uid]
                    return _error(status, message)
            if cfg.max_batch is not None and len(ids) > cfg.max_batch:
                return _error(400, "too many users")
            dropped: str | None = None
            if fault is not None and fault.kind == "drop_user":
                dropped = fault.user_id if fault.user_id is not None else ids[0]
            expiry = _batch_expiry(cfg)
            entries = [self._mint_locked(uid, cfg, expiry) for uid in ids if uid != dropped]
            if fault is not None and fault.kind == "extra_user":
                entries.append(self._mint_locked(fault.user_id or "intruder", cfg, expiry))
        if cfg.shuffle and len(entries) > 1:
            shuffled = random.sample(entries, len(entries))
            # A shuffle may land on the original order; rotate so order can never be relied on.
            if shuffled == entries:
                shuffled = shuffled[1:] + shuffled[:1]
            entries = shuffled
        return _json_response(201, {"data": entries})

    def _issue_single(
        self, req: _Request, user_id: str, fault: Fault | None, cfg: FakeSfoxConfig
    ) -> _Response:
        denied = self._check_enterprise(req)
        if denied is not None:
            return denied
        with self._lock:
            if user_id in self._refused:
                status, message = self._refused[user_id]
                return _error(status, message)
            if fault is not None and fault.kind == "drop_user" and fault.user_id in (None, user_id):
                return _json_response(201, {"data": None})
            if fault is not None and fault.kind == "extra_user":
                # The single endpoint has room for one entry: answer for the wrong user.
                user_id = fault.user_id or "intruder"
            entry = self._mint_locked(user_id, cfg)
        return _json_response(201, {"data": entry})

    def _place_order(self, req: _Request, side: str) -> _Response:
        credential = _bearer(req.headers)
        with self._lock:
            entry = self._tokens.get(credential) if credential is not None else None
            owner = (
                entry[0] if entry is not None and entry[1] > datetime.now(timezone.utc) else None
            )
            if entry is not None:
                # How old the token was when its order arrived.
                born = self._token_born[cast(str, credential)]
                self._token_ages.append(max(0.0, req.arrived - born))
        if owner is None:
            return _error(401, "invalid token")
        if side not in ORDER_SIDES:
            return _error(400, "side must be buy or sell")
        ok, body = _parse_json(req.body)
        if not ok or not isinstance(body, dict):
            return _error(400, "invalid JSON body")
        problem = _validate_order(side, body)
        if problem is not None:
            return _error(400, problem)
        client_order_id = body.get("client_order_id")
        with self._lock:
            now = time.monotonic()
            if client_order_id is not None:
                used_at = self._client_order_ids.get((owner, client_order_id))
                if used_at is not None and now - used_at < CLIENT_ORDER_ID_TTL:
                    self._duplicates += 1
                    return _error(400, "client_order_id already exists")
                self._client_order_ids[(owner, client_order_id)] = now
            order = Order(
                id=self._next_order_id,
                user_id=owner,
                side=side,
                currency_pair=body["currency_pair"],
                algorithm_id=body["algorithm_id"],
                quantity=body.get("quantity"),
                price=body.get("price"),
                amount=body.get("amount"),
                client_order_id=client_order_id,
                placed_at=req.arrived,
            )
            self._next_order_id += 1
            self._orders.append(order)
        return _json_response(201, order.to_dict())


def _validate_order(side: str, body: Mapping[str, Any]) -> str | None:
    """The first thing wrong with an order body, or None."""
    pair = body.get("currency_pair")
    if not isinstance(pair, str) or not pair:
        return "currency_pair is required"
    algorithm_id = body.get("algorithm_id")
    if algorithm_id is None:
        return "algorithm_id is required"
    if not _is_int(algorithm_id) or algorithm_id not in ALGORITHM_IDS:
        return "invalid algorithm_id"
    for name in ("quantity", "price", "amount"):
        value = body.get(name)
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
            return f"{name} must be a positive number"
    client_order_id = body.get("client_order_id")
    if client_order_id is not None and (
        not isinstance(client_order_id, str) or not client_order_id
    ):
        return "client_order_id must be a non-empty string"
    has = {name: body.get(name) is not None for name in ("quantity", "price", "amount")}
    if algorithm_id == MARKET_ALGORITHM:
        if side == "buy" and not (has["quantity"] or has["amount"]):
            return "quantity or amount is required"
        if side == "sell" and not has["quantity"]:
            return "quantity is required"
        return None
    if not has["price"]:
        return "price is required"
    if not has["quantity"]:
        return "quantity is required"
    return None
