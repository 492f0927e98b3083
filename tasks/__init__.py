"""Celery tasks that mint sFOX user auth tokens in batches and hand them, sealed, to jobs.

The public surface is this module: :data:`app`, :func:`unseal`,
:func:`with_user_tokens` with :func:`run_progress`, the tasks and the exception tree. Tasks are
registered under the names ``sfox.*``. Where each concern lives: README, "Where things are".
"""

from __future__ import annotations

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
from tasks.fanout.store import RunProgress
from tasks.fanout.tasks import run_progress, with_user_tokens
from tasks.nightly.tasks import place_user_order, run_nightly_orders
from tasks.worker.app import app
from tasks.worker.mint import mint_user_tokens
from tasks.worker.runtime import unseal

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
