"""The package's own Celery app, for the standalone worker, beat and Flower (``celery -A tasks``).

It is configured from the package's ``celeryconfig`` module (the repository's
``celeryconfig.py``), never from a ``celeryconfig`` found on ``sys.path``, and
it never becomes the current or default app of the process that imports the
package: a partner's own tasks keep resolving to the partner's app. Nothing in
the package sends through it unless the process has no app of its own
(:func:`tasks.worker.host.calling_app`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from celery.app import backends

from .._exceptions import ConfigurationError
from .._metrics import MetricsServer, serve
from .backend import ttl_backend_class
from .host import set_package_app, settings_for
from .logs import hide_task_results_in_logs

__all__ = ["PACKAGE", "app"]

#: The name the package was imported under: ``tasks``, or ``sfox_tokens`` beside a
#: project that has a ``tasks`` module of its own.
PACKAGE = __name__.split(".")[0]

_log = logging.getLogger("tasks.metrics")


class SfoxCelery(Celery):  # type: ignore[misc]
    """Celery, with Redis results that honour a task's own ``result_ttl``.

    The backend is swapped here rather than through the ``result_backend``
    setting because ``CELERY_RESULT_BACKEND`` in the environment overrides that
    setting wherever Celery reads it. Broker connections go through
    :class:`tasks.worker.transport.Connection` (see that module).
    """

    amqp_cls = f"{PACKAGE}.worker.transport:AMQP"

    def _get_backend(self) -> Any:
        backend, url = backends.by_url(self.backend_cls or self.conf.result_backend, self.loader)
        # Every Redis backend (redis://, rediss://, sentinel://) writes mint results with
        # their own TTL; any other backend is Celery's own.
        return ttl_backend_class(backend)(app=self, url=url)


app = SfoxCelery(PACKAGE, set_as_current=False)
app.config_from_object(f"{PACKAGE}.celeryconfig")
set_package_app(app)
# Celery's "Task ... succeeded" line must not carry a package task's result (sealed tokens).
hide_task_results_in_logs()


_metrics_server: MetricsServer | None = None


@signals.celeryd_after_setup.connect
def _serve_metrics(instance: Any = None, **_: Any) -> None:
    """With ``SFOX_METRICS_PORT`` set, this worker serves metrics counted by all its processes.

    ``celeryd_after_setup`` comes in the worker's main process once logging is set
    up and before the pool starts, so every pool process forked later counts
    where the server reads. A port in use stops the worker: metrics asked for
    and silently absent would blind the operator.
    """
    global _metrics_server
    try:
        port = settings_for(getattr(instance, "app", None) or app).metrics_port
    except ConfigurationError:
        return  # the worker refuses to start, saying why (tasks.worker.mint)
    if port is None or _metrics_server is not None:
        return
    try:
        _metrics_server = serve(port)
    except OSError as exc:
        _log.critical(
            "refusing to start: cannot serve metrics on SFOX_METRICS_PORT=%d: %s", port, exc
        )
        raise SystemExit(
            f"sfox-tokens: cannot serve metrics on SFOX_METRICS_PORT={port}: {exc}"
        ) from None
    _log.info(
        "serving Prometheus metrics of every pool process on port %d (/metrics); counts kept in %s",
        port,
        _metrics_server.directory,
    )


@signals.worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    """Stop serving and remove the directory the processes counted in."""
    global _metrics_server
    if _metrics_server is not None:
        _metrics_server.close()
        _metrics_server = None
