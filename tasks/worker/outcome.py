"""How a finished mint reads to a human, in logs and in Flower: counts and refused IDs.

Celery puts ``saferepr(result)``, cut to ``resultrepr_maxsize`` characters, in the
``task-succeeded`` event that Flower shows: for a mint, the start of a wall of
ciphertext. So a worker hands Celery a :class:`MintOutcome` rather than the bare
dict. It is a read-only mapping over the very same dict that reprs as
``{tokens: 11 sealed, failed: 1 [u7]}``, and kombu's JSON encoder writes it
(through ``__json__``) as exactly the contract's ``{"tokens": [...], "failed": [...]}``:
the result backend, callers and linked tasks never see the wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ..minting import MintResult

__all__ = ["MintOutcome", "ShortRepr", "summarise", "summarise_nightly"]

#: Failed user IDs named in a summary; the count says how many more there are.
SUMMARY_IDS = 5
#: Characters kept of each ID named in a summary.
SUMMARY_ID_CHARS = 24


def summarise(result: Mapping[str, Any]) -> str:
    """``{tokens: 11 sealed, failed: 1 [u7]}``: counts, and the first few failed IDs."""
    tokens = result.get("tokens") or []
    failed = result.get("failed") or []
    text = f"{{tokens: {len(tokens)} sealed, failed: {len(failed)}"
    if failed:
        names = [str(f.get("user_id", "?"))[:SUMMARY_ID_CHARS] for f in failed[:SUMMARY_IDS]]
        more = ", …" if len(failed) > SUMMARY_IDS else ""
        text += f" [{', '.join(names)}{more}]"
    return text + "}"


def summarise_nightly(summary: Mapping[str, Any]) -> str:
    """``{run 2026-11-27 done: 1000 users, 995 placed, 0 already, 5 failed}``.

    A trigger that ran no night (``skipped``, ``under_way``, ``not_configured``, ...)
    carries a ``reason``: ``{run 2026-11-27 under_way: task <id>}``.
    """
    if "reason" in summary:
        owner = f": task {summary['owner']}" if summary.get("owner") else ""
        return f"{{run {summary.get('run_date')} {summary.get('status')}{owner}}}"
    return (
        f"{{run {summary.get('run_date')} {summary.get('status')}: "
        f"{summary.get('users', 0)} users, {summary.get('placed', 0)} placed, "
        f"{summary.get('already_placed', 0)} already, {summary.get('failed_orders', 0)} failed}}"
    )


class ShortRepr(Mapping[str, Any]):
    """A task's result dict as Celery's worker holds it: the same dict, with a short repr."""

    __slots__ = ("_result", "_text")

    def __init__(self, result: Mapping[str, Any], text: str) -> None:
        self._result = result
        self._text = text

    def __getitem__(self, key: str) -> Any:
        return self._result[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._result)

    def __len__(self) -> int:
        return len(self._result)

    def __json__(self) -> Mapping[str, Any]:
        """What kombu's JSON encoder writes: the plain result dict."""
        return self._result

    def __repr__(self) -> str:
        return self._text


class MintOutcome(ShortRepr):
    """A mint's result as Celery's worker holds it: ``{tokens: 11 sealed, failed: 1 [u7]}``."""

    __slots__ = ()

    def __init__(self, result: MintResult) -> None:
        super().__init__(result, summarise(result))
