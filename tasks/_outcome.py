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

from tasks._mint import MintResult

__all__ = ["MintOutcome", "summarise"]

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


class MintOutcome(Mapping[str, Any]):
    """A mint's result as Celery's worker holds it: the contract's dict, with a short repr."""

    __slots__ = ("_result",)

    def __init__(self, result: MintResult) -> None:
        self._result = result

    def __getitem__(self, key: str) -> Any:
        return self._result[key]  # type: ignore[literal-required]

    def __iter__(self) -> Iterator[str]:
        return iter(self._result)

    def __len__(self) -> int:
        return len(self._result)

    def __json__(self) -> MintResult:
        """What kombu's JSON encoder writes: the plain result dict."""
        return self._result

    def __repr__(self) -> str:
        return summarise(self._result)
