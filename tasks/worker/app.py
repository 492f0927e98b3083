"""The Celery application, configured from ``celeryconfig``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

from celery import Celery, signals
from celery.app import backends
from celery.backends.redis import RedisBackend

from tasks._exceptions import ConfigurationError
from tasks._metrics import MetricsServer, serve
from tasks._settings import Settings
from tasks.worker.backend import TokenRedisBackend
from tasks.worker.logs import hide_task_results_in_logs

__all__ = ["app", "package_conf"]

_log = logging.getLogger("tasks.metrics")


class SfoxCelery(Celery):  # type: ignore[misc]
    """Celery, with Redis results that honour a task's own ``result_ttl``.

    The backend is swapped here rather than through the ``result_backend``
    setting because ``CELERY_RESULT_BACKEND`` in the environment overrides that
    setting wherever Celery reads it. Broker connections go through
    :class:`tasks.worker.transport.Connection` (see that module).
    """

    amqp_cls = "tasks.worker.transport:AMQP"

    def _get_backend(self) -> Any:
        backend, url = backends.by_url(self.backend_cls or self.conf.result_backend, self.loader)
        if backend is RedisBackend:
            backend = TokenRedisBackend
        return backend(app=self, url=url)


app = SfoxCelery("tasks")
app.config_from_object("celeryconfig")
# Celery's "Task ... succeeded" line must not carry a result (sealed tokens, or worse).
hide_task_results_in_logs()


_metrics_server: MetricsServer | None = None


@signals.celeryd_after_setup.connect
def _serve_metrics(**_: Any) -> None:
    """With ``SFOX_METRICS_PORT`` set, this worker serves metrics counted by all its processes.

    ``celeryd_after_setup`` comes in the worker's main process once logging is set
    up and before the pool starts, so every pool process forked later counts
    where the server reads. A port in use stops the worker: metrics asked for
    and silently absent would blind the operator.
    """
    global _metrics_server
    try:
        port = Settings.from_conf(app.conf).metrics_port
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


def package_conf(conf: Mapping[str, Any]) -> Mapping[str, Any]:
    """The settings the package's tasks run with, in whichever app runs them.

    A partner's app that imports ``tasks`` runs the tasks with its own broker
    and result backend, but its configuration knows nothing of ``sfox_*``:
    those come from the environment, as ``celeryconfig`` read it for
    :data:`app`, unless the running app sets them itself.
    """
    if conf is app.conf:
        return cast("Mapping[str, Any]", conf)
    merged: dict[str, Any] = {k: app.conf.get(k) for k in app.conf if k.startswith("sfox_")}
    for key in list(merged) + [k for k in conf if k.startswith("sfox_")]:
        value = conf.get(key)
        if value is not None and value != "":
            merged[key] = value
    merged["broker_url"] = conf.get("broker_url")
    merged["result_backend"] = conf.get("result_backend")
    merged["broker_transport_options"] = conf.get("broker_transport_options")
    return merged
