"""Nightly orders: reading them, checking them, and naming them for idempotency.

Orders come from a CSV file (header row), a JSON-lines file (``.jsonl``), or a
partner's own callable (``module:function``). Each is checked against what
sFOX's Create Order endpoint requires; a malformed row is reported with its
line number and skipped, and the others go on.

Every order gets a deterministic ``client_order_id`` from the run date, the
user and the order's identity (its ``order_ref``, else its position among
that user's rows). sFOX rejects a reused id for 24 hours, so a redelivered or
repeated order can never be placed twice.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .._exceptions import ConfigurationError
from .._settings import MAX_USER_ID_LENGTH

__all__ = [
    "ALGORITHMS",
    "Order",
    "OrderError",
    "client_order_id",
    "load_orders",
    "parse_orders",
]

#: sFOX's algorithm ids; 100 is Market, the only one without price.
ALGORITHMS = {
    100: "Market",
    200: "Smart Routing",
    201: "Limit",
    304: "Stop",
    307: "TWAP",
    308: "Trailing Stop",
    309: "IOC",
}
MARKET = 100
_REF_SAFE = 64


@dataclass(frozen=True)
class Order:
    """One checked order of one user."""

    user_id: str
    side: str
    currency_pair: str
    algorithm_id: int
    quantity: Decimal | None
    amount: Decimal | None
    price: Decimal | None
    #: The partner's name for this order, or its position among the user's rows ("#1").
    ref: str
    line: int

    def body(self, run_date: date) -> dict[str, Any]:
        """The JSON body for ``POST /v1/orders/{side}``."""
        body: dict[str, Any] = {
            "currency_pair": self.currency_pair,
            "algorithm_id": self.algorithm_id,
            "client_order_id": client_order_id(run_date, self.user_id, self.ref),
        }
        for name in ("quantity", "amount", "price"):
            value = getattr(self, name)
            if value is not None:
                body[name] = _number(value)
        return body

    def to_json(self) -> str:
        return json.dumps(
            {
                "user_id": self.user_id,
                "side": self.side,
                "currency_pair": self.currency_pair,
                "algorithm_id": self.algorithm_id,
                "quantity": _text(self.quantity),
                "amount": _text(self.amount),
                "price": _text(self.price),
                "ref": self.ref,
                "line": self.line,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Order:
        data = json.loads(text)
        return cls(
            user_id=data["user_id"],
            side=data["side"],
            currency_pair=data["currency_pair"],
            algorithm_id=int(data["algorithm_id"]),
            quantity=_decimal_or_none(data.get("quantity")),
            amount=_decimal_or_none(data.get("amount")),
            price=_decimal_or_none(data.get("price")),
            ref=data["ref"],
            line=int(data["line"]),
        )


@dataclass(frozen=True)
class OrderError:
    """A row that could not be used, and why."""

    line: int
    message: str
    user_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "user_id": self.user_id, "error": self.message}


def client_order_id(run_date: date, user_id: str, ref: str) -> str:
    """``n<YYYYMMDD>-<28 hex>``: ASCII, at most 64 characters, the same on every retry.

    The user and order identity are hashed, because user IDs and refs are the
    partner's free text and may hold characters sFOX does not accept.
    """
    digest = hashlib.sha256(f"{user_id}\x00{ref}".encode()).hexdigest()[:28]
    return f"n{run_date:%Y%m%d}-{digest}"


def parse_orders(rows: Iterable[tuple[int, Mapping[str, Any]]]) -> Iterator[Order | OrderError]:
    """Check each ``(line, row)``; yield an :class:`Order` or an :class:`OrderError`."""
    positions: dict[str, int] = {}
    seen_refs: set[tuple[str, str]] = set()
    for line, row in rows:
        try:
            order = _check(line, row, positions)
        except _RowError as exc:
            yield OrderError(line, str(exc), exc.user_id)
            continue
        if (order.user_id, order.ref) in seen_refs:
            yield OrderError(
                line, f"order_ref {order.ref!r} repeats an earlier row of this user", order.user_id
            )
            continue
        seen_refs.add((order.user_id, order.ref))
        yield order


def load_orders(
    *, path: str | None = None, source: str | None = None
) -> Iterator[Order | OrderError]:
    """Orders from ``SFOX_NIGHTLY_ORDERS_SOURCE`` (``module:function``) or a file."""
    if source:
        return parse_orders(enumerate(_call_source(source), start=1))
    if path:
        return parse_orders(_read_file(Path(path)))
    raise ConfigurationError(
        "no nightly orders: set SFOX_NIGHTLY_ORDERS_FILE (CSV or .jsonl) "
        "or SFOX_NIGHTLY_ORDERS_SOURCE (module:function)"
    )


def _call_source(source: str) -> Iterable[Mapping[str, Any]]:
    module_name, sep, attr = source.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"SFOX_NIGHTLY_ORDERS_SOURCE={source!r} must be module:function")
    try:
        function: Callable[[], Iterable[Mapping[str, Any]]] = getattr(
            importlib.import_module(module_name), attr
        )
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"SFOX_NIGHTLY_ORDERS_SOURCE={source!r} cannot be loaded: {exc}"
        ) from None
    return function()


def _read_file(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    if not path.is_file():
        raise ConfigurationError(f"SFOX_NIGHTLY_ORDERS_FILE={str(path)!r} is not a readable file")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError:
                    yield line, {"__error__": "not a JSON object"}
                    continue
                yield line, row if isinstance(row, dict) else {"__error__": "not a JSON object"}
        return
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [
            f
            for f in ("user_id", "side", "currency_pair", "algorithm_id")
            if f not in (reader.fieldnames or [])
        ]
        if missing:
            raise ConfigurationError(
                f"{path.name}: the header row lacks column(s) {', '.join(missing)}"
            )
        for row in reader:
            yield reader.line_num, row


class _RowError(ValueError):
    def __init__(self, message: str, user_id: str | None = None) -> None:
        super().__init__(message)
        self.user_id = user_id


def _check(line: int, row: Mapping[str, Any], positions: dict[str, int]) -> Order:
    if "__error__" in row:
        raise _RowError(str(row["__error__"]))
    if None in row:  # csv puts surplus cells under the None key
        raise _RowError("more cells than header columns")
    user_id = _cell(row, "user_id")
    if not user_id:
        raise _RowError("user_id is empty")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise _RowError(f"user_id is longer than {MAX_USER_ID_LENGTH} characters")
    side = (_cell(row, "side") or "").lower()
    if side not in ("buy", "sell"):
        raise _RowError(f"side must be buy or sell, not {_cell(row, 'side')!r}", user_id)
    pair = (_cell(row, "currency_pair") or "").lower()
    if not pair.isalnum():
        raise _RowError("currency_pair must be letters and digits, like btcusd", user_id)
    try:
        algorithm_id = int(_cell(row, "algorithm_id") or "")
    except ValueError:
        raise _RowError("algorithm_id must be one of sFOX's numbers", user_id) from None
    if algorithm_id not in ALGORITHMS:
        raise _RowError(f"algorithm_id {algorithm_id} is not one of {sorted(ALGORITHMS)}", user_id)
    quantity, amount, price = (
        _amount(row, name, user_id) for name in ("quantity", "amount", "price")
    )
    if algorithm_id == MARKET:
        if side == "buy" and quantity is None and amount is None:
            raise _RowError("a Market buy needs quantity or amount", user_id)
        if side == "sell" and quantity is None:
            raise _RowError("a Market sell needs quantity", user_id)
    elif price is None or quantity is None:
        raise _RowError(f"a {ALGORITHMS[algorithm_id]} order needs price and quantity", user_id)
    positions[user_id] = positions.get(user_id, 0) + 1
    ref = _cell(row, "order_ref") or f"#{positions[user_id]}"
    if len(ref) > _REF_SAFE:
        raise _RowError(f"order_ref is longer than {_REF_SAFE} characters", user_id)
    return Order(user_id, side, pair, algorithm_id, quantity, amount, price, ref, line)


def _cell(row: Mapping[str, Any], name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _amount(row: Mapping[str, Any], name: str, user_id: str) -> Decimal | None:
    text = _cell(row, name)
    if text is None:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise _RowError(f"{name} {text!r} is not a decimal number", user_id) from None
    if not value.is_finite() or value <= 0:
        raise _RowError(f"{name} must be greater than 0", user_id)
    return value


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _decimal_or_none(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))
