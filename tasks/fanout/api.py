"""The fan-out as the package's other parts drive it: :class:`FanOut`, and nothing more.

:func:`~tasks.fanout.tasks.with_user_tokens` is the canvas for a caller with a
list of users in hand. A coordinator that keeps its users in books of its own
and watches the run itself (the nightly run) drives a fan-out through
:class:`FanOut` instead: it starts the run from its users, reads its progress,
hands lost chunks back, and sends a user's downstream task again. The rest of
:mod:`tasks.fanout` is the fan-out's own; an import contract in
``pyproject.toml`` keeps it so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from celery import Celery
from celery.canvas import Signature

from ..worker.runtime import get_runtime
from .store import Chunk, JitRun, RunProgress
from .tasks import (
    DEFAULT_AHEAD,
    downstream_of,
    run_spec,
    segments,
    send_chunks,
    send_downstream,
)

__all__ = ["DEFAULT_AHEAD", "FanOut", "RunProgress"]


class FanOut:
    """One fan-out run, driven by one coordinator at a time.

    The caller keeps to "one at a time" (the nightly run holds a lease). Chunks
    are taken in the name of the run's coordinator, not of one task: a
    coordinator that takes the run over from one that died sends the chunks the
    dead one took and never confirmed sent, instead of waiting for them to go
    stale.
    """

    def __init__(self, app: Celery, run_id: str) -> None:
        self.app = app
        self.run_id = run_id
        self._books = JitRun(get_runtime(app).redis, run_id)
        self._sender = f"coordinator:{run_id}"

    def start(
        self,
        downstream: Signature,
        user_ids: Iterable[str],
        *,
        total: int,
        chunk_size: int,
        ahead: int = DEFAULT_AHEAD,
    ) -> None:
        """Stage ``user_ids`` (``total`` of them) for ``downstream`` and send the first chunks.

        The users are read a segment at a time. Safe to call again with the same
        users (a coordinator that resumes): a segment staged before is not staged
        twice, and the chunks taken before but never sent go out now.
        """
        # Coordinated: the books outlive the last user's end until the coordinator closes
        # the run (close), so that it reads them whole.
        spec = {
            **run_spec(self.app, downstream, total=total, chunk_size=chunk_size, ahead=ahead),
            "coordinated": 1,
        }
        for index, segment in enumerate(segments(user_ids, chunk_size)):
            self._send(self._books.stage(index, segment, spec, sender=self._sender))

    def progress(self) -> RunProgress:
        """Where the run stands."""
        return self._books.progress()

    def sweep(self) -> int:
        """Send the chunks now due: releasable ones, and ones whose chunk task was lost.

        Returns how many went out.
        """
        chunks = self._books.sweep(sender=self._sender)
        self._send(chunks)
        return len(chunks)

    def resend(self, user_ids: Iterable[str]) -> None:
        """Send the downstream task of each of ``user_ids`` again, without a token, under a new id.

        For users whose task was lost: the downstream mints the user's token
        itself (it cannot open an empty seal).
        """
        downstream, route = downstream_of(self._books, self.app)
        for user_id in user_ids:
            entry = {"partner_user_id": user_id, "token": "", "expires": ""}
            send_downstream(self.run_id, downstream, entry, route)

    def close(self) -> None:
        """The coordinator is done with the run: its books expire in three days."""
        self._books.close()

    def ended(self) -> set[str]:
        """Users whose downstream task ended, and users sFOX refused a token."""
        return self._books.done_users() | set(self._books.failed())

    def refused(self) -> dict[str, dict[str, Any]]:
        """Users sFOX refused a token, with their ``failed`` entries."""
        return self._books.failed()

    def _send(self, chunks: Sequence[Chunk]) -> None:
        send_chunks(self._books, chunks, sender=self._sender)
