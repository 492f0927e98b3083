"""Tasks only the tests register in their workers (``--include tests.testtasks``)."""

from __future__ import annotations

from typing import Any

from tasks import app


@app.task(name="tests.echo")
def echo(value: Any) -> Any:
    """Return ``value``: a task with the global result expiry, to compare TTLs."""
    return value
