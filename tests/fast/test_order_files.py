"""Reading and checking nightly orders, and their client_order_ids."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal

import pytest

from tasks._exceptions import ConfigurationError
from tasks.nightly.orders import Order, OrderError, client_order_id, load_orders

DAY = date(2026, 11, 27)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_csv_orders_are_read_and_checked(tmp_path):
    """Good rows become orders; numbers stay decimal; empty cells are absent."""
    path = write(
        tmp_path,
        "orders.csv",
        "user_id,side,currency_pair,algorithm_id,quantity,amount,price\n"
        "u1,buy,btcusd,100,,25,\n"
        "u2,sell,ethusd,201,0.5,,3000.10\n",
    )
    items = list(load_orders(path=path))
    assert all(isinstance(i, Order) for i in items)
    first, second = items
    assert (first.user_id, first.amount, first.quantity, first.ref) == (
        "u1",
        Decimal("25"),
        None,
        "#1",
    )
    assert second.body(DAY)["price"] == 3000.1 and second.body(DAY)["quantity"] == 0.5
    assert "amount" not in second.body(DAY)


def test_malformed_rows_are_reported_with_their_line_and_skipped(tmp_path):
    """Each bad row is an OrderError naming its line; the good rows survive."""
    path = write(
        tmp_path,
        "orders.csv",
        "user_id,side,currency_pair,algorithm_id,quantity,amount,price\n"
        "u1,buy,btcusd,100,,25,\n"
        "u2,hold,btcusd,100,1,,\n"
        "u3,buy,btcusd,999,1,,\n"
        "u4,buy,btcusd,201,1,,\n"
        "u5,sell,btcusd,100,,10,\n"
        "u6,buy,btcusd,100,-1,,\n"
        ",buy,btcusd,100,1,,\n"
        "u7,buy,btcusd,100,abc,,\n"
        "u8,buy,btcusd,100,1,,\n",
    )
    items = list(load_orders(path=path))
    errors = {i.line: i.message for i in items if isinstance(i, OrderError)}
    assert [i.user_id for i in items if isinstance(i, Order)] == ["u1", "u8"]
    assert set(errors) == {3, 4, 5, 6, 7, 8, 9}
    assert "side" in errors[3] and "algorithm_id" in errors[4] and "price" in errors[5]
    assert "quantity" in errors[6] and "greater than 0" in errors[7] and "user_id" in errors[8]


def test_jsonl_orders_and_order_refs(tmp_path):
    """JSON lines carry the same fields; order_ref tells one user's orders apart."""
    path = write(
        tmp_path,
        "orders.jsonl",
        '{"user_id": "u1", "side": "buy", "currency_pair": "btcusd", "algorithm_id": 100,'
        ' "amount": "25", "order_ref": "weekly"}\n'
        "\n"
        '{"user_id": "u1", "side": "buy", "currency_pair": "ethusd", "algorithm_id": 100,'
        ' "amount": 10, "order_ref": "daily"}\n'
        "not json\n",
    )
    items = list(load_orders(path=path))
    assert [i.ref for i in items if isinstance(i, Order)] == ["weekly", "daily"]
    assert [(i.line, "JSON" in i.message) for i in items if isinstance(i, OrderError)] == [
        (4, True)
    ]


def test_position_identifies_orders_without_ref(tmp_path):
    """Without order_ref, a row's position among its user's rows is its identity."""
    path = write(
        tmp_path,
        "o.csv",
        "user_id,side,currency_pair,algorithm_id,quantity\n"
        "u1,sell,btcusd,100,1\nu2,sell,btcusd,100,1\nu1,sell,btcusd,100,2\n",
    )
    refs = [(o.user_id, o.ref) for o in load_orders(path=path)]
    assert refs == [("u1", "#1"), ("u2", "#1"), ("u1", "#2")]


def test_client_order_id_is_deterministic_and_safe():
    """Same date, user and order give the same id: ASCII letters, digits, - and _, <= 64."""
    a = client_order_id(DAY, "user with spaces/ünïcode", "#1")
    assert a == client_order_id(DAY, "user with spaces/ünïcode", "#1")
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", a)
    assert a != client_order_id(DAY, "user with spaces/ünïcode", "#2")
    assert a != client_order_id(date(2026, 11, 28), "user with spaces/ünïcode", "#1")


def partner_orders():
    """An orders source a partner might keep in its own database."""
    return [
        {
            "user_id": "db-1",
            "side": "buy",
            "currency_pair": "btcusd",
            "algorithm_id": 100,
            "amount": 5,
        },
        {"user_id": "db-2", "side": "buy", "currency_pair": "btcusd", "algorithm_id": 7},
    ]


def test_orders_source_callable():
    """module:function supplies rows; bad ones are reported by position."""
    items = list(load_orders(source="tests.fast.test_order_files:partner_orders"))
    assert isinstance(items[0], Order) and isinstance(items[1], OrderError)
    assert items[1].line == 2


@pytest.mark.parametrize(
    "kwargs", [{}, {"path": "/nonexistent.csv"}, {"source": "nope"}, {"source": "nope.mod:fn"}]
)
def test_missing_or_bad_sources_are_configuration_errors(kwargs):
    """No source, a missing file or an unloadable callable is a clear configuration error."""
    with pytest.raises(ConfigurationError):
        list(load_orders(**kwargs))


def test_the_dev_stacks_sample_orders_are_all_valid():
    """The sample file the dev stack's nightly run uses parses without a single error."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "nightly-orders.csv"
    items = list(load_orders(path=str(path)))
    assert items and all(isinstance(i, Order) for i in items)
    assert len({(i.user_id, i.ref) for i in items}) == len(items)
