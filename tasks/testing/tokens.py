"""The stand-in's token endpoints: the batch mint and the single-user mint.

A mixin of :class:`~tasks.testing.server.FakeSfox`. It writes the records that
:class:`~tasks.testing.inspection.Inspection` reads; callers hold no lock, each method takes it.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone

from .faults import FakeSfoxConfig, Fault
from .http import _bearer, _error, _json_response, _parse_json, _Request, _Response


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


class TokenDesk:
    """``POST /v1/enterprise/user-tokens`` and ``POST /v1/enterprise/user-tokens/<user>``."""

    _api_key: bytes
    _lock: threading.Lock
    _refused: dict[str, tuple[int, str]]
    _tokens: dict[str, tuple[str, datetime]]
    _token_born: dict[str, float]
    _mints_by_user: dict[str, int]
    _minted: int

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
