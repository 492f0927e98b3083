"""The worker's own Prometheus metrics: what it asked of sFOX, and what came of it.

Flower counts Celery tasks. These count what an operator alerts on: requests
to sFOX by endpoint and status and how long they took, tokens granted, users
refused, tokens minted again at the moment of use, shared pauses after a 429,
and time spent waiting for the shared limiter. The names and labels are the
contract's (docs/guides/monitoring.md). No metric carries a user ID, a token, a key or
a URL: the only labels are the endpoint (three fixed names) and the HTTP
status.

The code that knows a count calls one function here (:func:`request_done`,
:func:`tokens_minted`, ...). Each does nothing until :func:`serve` has run, so
the command line, the tests and a worker without ``SFOX_METRICS_PORT`` pay one
global read per call, and none of them can fail the caller: a count that
cannot be written is dropped (and logged once), never raised into a mint.

A prefork worker runs its tasks in several processes, which one in-memory
registry per process would count apart. :func:`serve` runs in the worker's
main process before the pool forks: it points ``PROMETHEUS_MULTIPROC_DIR`` at
a fresh directory of its own, where every pool process (and each that
replaces a recycled one) keeps its counts in a file, and serves the sum of
those files on the port. Counts of a process that has ended stay in the sum,
as counters must. :meth:`MetricsServer.close` removes the directory when the
worker stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = [
    "DURATION_BUCKETS",
    "ENDPOINTS",
    "METRIC_NAMES",
    "MetricsServer",
    "limiter_waited",
    "rate_limit_paused",
    "request_done",
    "serve",
    "token_reminted",
    "tokens_minted",
    "users_refused",
]

logger = logging.getLogger("tasks.metrics")

#: The ``endpoint`` label's values: the sFOX routes the package calls.
ENDPOINTS = ("user_tokens", "user_token", "order")
#: Upper bounds of the request-duration histogram's buckets, in seconds (read timeout: 30).
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Every metric family served, as Prometheus names it.
METRIC_NAMES = (
    "sfox_requests_total",
    "sfox_request_duration_seconds",
    "sfox_tokens_minted_total",
    "sfox_users_refused_total",
    "sfox_token_remints_total",
    "sfox_rate_limit_pauses_total",
    "sfox_rate_limit_wait_seconds_total",
)
_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

F = TypeVar("F", bound=Callable[..., None])


class _Metrics:
    """The metric objects, made once multiprocess mode is on (not registered anywhere:
    the server reads what every process wrote)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "sfox_requests",
            "Requests sent to sFOX, by endpoint and HTTP status ('error': no answer)",
            ("endpoint", "status"),
            registry=None,
        )
        self.duration = Histogram(
            "sfox_request_duration_seconds",
            "Durations of requests to sFOX, by endpoint, answered or not",
            ("endpoint",),
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.minted = Counter(
            "sfox_tokens_minted", "Tokens sFOX granted, re-mints included", registry=None
        )
        self.refused = Counter(
            "sfox_users_refused",
            "Users a mint got no token for: refused by sFOX, or left out of its answer twice",
            registry=None,
        )
        self.remints = Counter(
            "sfox_token_remints",
            "Tokens minted again at the moment of use (expired, or refused with 401)",
            registry=None,
        )
        self.pauses = Counter(
            "sfox_rate_limit_pauses",
            "Shared pauses of every worker begun after a 429",
            registry=None,
        )
        self.waited = Counter(
            "sfox_rate_limit_wait_seconds",
            "Seconds requests waited for the shared rate limiter (in the worker, or as a "
            "broker countdown)",
            registry=None,
        )


_current: _Metrics | None = None
_failed_once = False


def _never_raises(hook: F) -> F:
    def guarded(*args: Any) -> None:
        global _failed_once
        try:
            hook(*args)
        except Exception:  # a count lost is better than a mint failed
            if not _failed_once:
                _failed_once = True
                logger.warning("a metric could not be counted; counts may be low", exc_info=True)

    guarded.__doc__ = hook.__doc__
    return guarded  # type: ignore[return-value]


# -- the hooks: one call each, where the count is known --------------------------------


@_never_raises
def request_done(endpoint: str, status: int | None, seconds: float) -> None:
    """A request to sFOX ended: its HTTP status, or ``None`` when no answer came."""
    metrics = _current
    if metrics is not None:
        metrics.requests.labels(endpoint, "error" if status is None else str(status)).inc()
        metrics.duration.labels(endpoint).observe(seconds)


@_never_raises
def tokens_minted(count: int) -> None:
    """sFOX granted ``count`` tokens."""
    metrics = _current
    if metrics is not None and count:
        metrics.minted.inc(count)


@_never_raises
def users_refused(count: int) -> None:
    """A mint gives up on ``count`` users."""
    metrics = _current
    if metrics is not None and count:
        metrics.refused.inc(count)


@_never_raises
def token_reminted() -> None:
    """One user's token was minted again at the moment of use."""
    metrics = _current
    if metrics is not None:
        metrics.remints.inc()
        metrics.minted.inc()


@_never_raises
def rate_limit_paused() -> None:
    """A 429 began (or lengthened) the shared pause."""
    metrics = _current
    if metrics is not None:
        metrics.pauses.inc()


@_never_raises
def limiter_waited(seconds: float) -> None:
    """A request must wait ``seconds`` for the shared limiter."""
    metrics = _current
    if metrics is not None and seconds > 0:
        metrics.waited.inc(seconds)


# -- serving -------------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Several scrapers, or a restart on the same port, must not wait for TIME_WAIT.
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the worker's log


class MetricsServer:
    """One worker's metrics endpoint and the directory its processes count in."""

    def __init__(
        self, httpd: _Server, directory: str, previous: str | None, thread: threading.Thread
    ) -> None:
        self._httpd = httpd
        self._previous = previous
        self._thread = thread
        #: Where every process of this worker keeps its counts.
        self.directory = directory

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        """Stop serving, stop counting, and remove the directory."""
        global _current
        _current = None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
        _restore(self._previous)
        shutil.rmtree(self.directory, ignore_errors=True)


def serve(port: int, host: str = "") -> MetricsServer:
    """Count in every process forked from here on, and serve the sums on ``port``.

    Call it in a worker's main process before its pool starts. ``host`` ``""``
    listens on every interface. Raises :class:`OSError` when the port is taken.
    """
    global _current
    from prometheus_client import CollectorRegistry, make_wsgi_app, values
    from prometheus_client.multiprocess import MultiProcessCollector

    directory = tempfile.mkdtemp(prefix=f"sfox-metrics-{os.getpid()}-")
    previous = os.environ.get(_DIR_VARIABLE)
    os.environ[_DIR_VARIABLE] = directory
    # prometheus_client picks how values are kept when it is first imported; if anything
    # in this process imported it before, pick again now that the directory is set.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    try:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        httpd = make_server(
            host, port, make_wsgi_app(registry), _Server, handler_class=_QuietHandler
        )
    except BaseException:
        _restore(previous)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    _current = _Metrics()
    thread = threading.Thread(target=httpd.serve_forever, name="sfox-metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, directory, previous, thread)


def _restore(previous: str | None) -> None:
    from prometheus_client import values

    if previous is None:
        os.environ.pop(_DIR_VARIABLE, None)
    else:
        os.environ[_DIR_VARIABLE] = previous
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
