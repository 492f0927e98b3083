"""The package's exceptions: one root, split by what the caller should do.

::

    SfoxError                      root of everything raised here
    ├── ConfigurationError         settings are missing or wrong: fix the environment
    ├── InvalidArgument (ValueError) an argument of a package call is unusable: fix the call
    │   └── InvalidUserIds         the user IDs given are unusable: fix the input
    ├── TransientError             sFOX or the network failed for now: retry later
    │   ├── TransportError         no usable HTTP answer (connection, timeout)
    │   ├── ServerError            500, 502, 503, 504
    │   ├── RateLimited            429
    │   └── MalformedResponse      a 2xx whose body is not the documented shape
    ├── PermanentError             sFOX refused the whole call: retrying will not help
    │   ├── AuthenticationError    401 / 403: the enterprise key is wrong or lacks rights
    │   └── TokenRejected          401 / 403 to a user token: mint that user a new one
    ├── RequestRefused             400 / 404 / 422: perhaps one user spoiled the batch
    ├── RetriesExhausted           the retry budget or deadline ran out
    └── SealError                  a sealed token cannot be opened (expired, other key)

No message carries a secret: neither the enterprise key nor a user token is ever
formatted into one. Every exception keeps its message as its only argument so
that Celery's JSON result backend can rebuild it on the caller's side.
"""

from __future__ import annotations


class SfoxError(Exception):
    """Root of every error this package raises."""

    #: HTTP status sFOX answered with, when there was one.
    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else ""


class ConfigurationError(SfoxError):
    """A setting is missing or invalid; the message names the variable."""


class InvalidArgument(SfoxError, ValueError):
    """An argument given to a package call or task is unusable; nothing was sent."""


class InvalidUserIds(InvalidArgument):
    """The user IDs given cannot be sent to sFOX; nothing was sent."""


class TransientError(SfoxError):
    """A failure that may pass: retry after a wait."""

    #: Seconds sFOX asked us to wait (``Retry-After``), if it said.
    retry_after: float | None = None

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        if retry_after is not None:
            self.retry_after = retry_after


class TransportError(TransientError):
    """No usable HTTP answer: connection refused or reset, or a timeout."""


class ServerError(TransientError):
    """sFOX answered 500, 502, 503 or 504."""


class RateLimited(TransientError):
    """sFOX answered 429: every worker must pause."""


class MalformedResponse(TransientError):
    """A 2xx answer whose body is not the documented shape."""


class PermanentError(SfoxError):
    """sFOX refused the whole call; the same call will be refused again."""


class AuthenticationError(PermanentError):
    """sFOX refused the enterprise key (401 or 403)."""


class TokenRejected(PermanentError):
    """sFOX refused a user auth token (401 or 403): it expired or was revoked."""


class RequestRefused(SfoxError):
    """sFOX refused a user-token request with 400, 404 or 422.

    For a batch this may be one unknown or deactivated user spoiling the rest;
    for a single user it is that user's refusal.
    """

    def __init__(self, message: str, *, status: int | None = None, error: str = "") -> None:
        super().__init__(message, status=status)
        #: sFOX's own ``error`` text, kept apart for the ``failed`` entries.
        self.error = error


class RetriesExhausted(SfoxError):
    """The retry budget or the deadline ran out; the message names the last failure."""


class SealError(SfoxError):
    """A sealed token cannot be opened: too old, or sealed under another key."""
