"""Celery tasks that mint sFOX user auth tokens in batches and hand them, sealed, to jobs.

The public surface is this module: :data:`app`, :func:`unseal`,
:func:`with_user_tokens` with :func:`run_progress`, the tasks and the exception tree. Tasks are
registered under the names ``sfox.*``.
"""

from __future__ import annotations

from tasks._app import app
from tasks._exceptions import (
    AuthenticationError,
    ConfigurationError,
    InvalidUserIds,
    MalformedResponse,
    PermanentError,
    RateLimited,
    RequestRefused,
    RetriesExhausted,
    SealError,
    ServerError,
    SfoxError,
    TokenRejected,
    TransientError,
    TransportError,
)
from tasks._jit import RunProgress, run_progress, with_user_tokens
from tasks._nightly import place_user_order, run_nightly_orders
from tasks._runtime import get_runtime
from tasks._tasks import mint_user_tokens

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "InvalidUserIds",
    "MalformedResponse",
    "PermanentError",
    "RateLimited",
    "RequestRefused",
    "RetriesExhausted",
    "RunProgress",
    "SealError",
    "ServerError",
    "SfoxError",
    "TokenRejected",
    "TransientError",
    "TransportError",
    "app",
    "mint_user_tokens",
    "place_user_order",
    "run_nightly_orders",
    "run_progress",
    "unseal",
    "with_user_tokens",
]


def unseal(sealed: str) -> str:
    """The plaintext user auth token inside ``sealed``.

    Raises :class:`SealError` when it is older than ``SFOX_TOKEN_RESULT_TTL`` or
    was sealed under another key. Use the plaintext at once; do not store it.
    """
    return get_runtime(app.conf).sealer.unseal(sealed)
