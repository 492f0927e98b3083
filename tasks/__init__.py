"""Celery tasks that mint sFOX user auth tokens in batches and hand them, sealed, to jobs.

The public surface is this module: :data:`app`, :func:`unseal`,
:func:`with_user_tokens` with :func:`run_progress`, the tasks and the exception tree. Tasks are
registered under the names ``sfox.*`` with every Celery app in the process, and each name here
resolves to the task of the app at hand (the running task's, else the caller's own, else
:data:`app`). Importing the package changes nothing for the host's own app and tasks.

The package is importable as ``tasks`` and, for projects with a ``tasks`` module of their
own, as ``sfox_tokens``: the same code under two names. Use one name per process.
Where each concern lives: docs/architecture.md.
"""

from __future__ import annotations

from ._exceptions import (
    AuthenticationError,
    ConfigurationError,
    InvalidArgument,
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
from .fanout.store import RunProgress
from .fanout.tasks import run_progress, with_user_tokens
from .minting import FailedEntry, MintResult, TokenEntry
from .nightly.tasks import place_user_order, run_nightly_orders
from .worker.app import app
from .worker.mint import mint_user_tokens
from .worker.runtime import unseal

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "FailedEntry",
    "InvalidArgument",
    "InvalidUserIds",
    "MalformedResponse",
    "MintResult",
    "PermanentError",
    "RateLimited",
    "RequestRefused",
    "RetriesExhausted",
    "RunProgress",
    "SealError",
    "ServerError",
    "SfoxError",
    "TokenEntry",
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
